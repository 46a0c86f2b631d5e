"""Grouped matmul for Hopper GPUs in Pallas / Mosaic GPU.

``out[g + out_offset] = A[g] @ B[g + b_offset]`` for the groups ``g`` in a
runtime range ``[lo, hi)``; every other output group is written with zeros.
The offsets let a window of G groups of activations use G consecutive groups
of a larger stacked weight (the diagonal schedule's ramp steps) without a copy
of those weights, and let the weight gradient land in the full stacked shape.

Structure (after jax's ``pallas/ops/gpu/hopper_matmul_mgpu.py``):

* a persistent grid of one CTA per SM; each CTA walks a linear list of work
  items ``step = sm, sm + num_sms, ...``;
* the work list is ``(hi - lo) * tiles_per_group`` matmul tiles (group major,
  a planar snake over (m, n) tiles inside a group), so idle groups launch no
  matmul work at all and the active work is spread evenly over all SMs
  whatever ``lo`` and ``hi`` are;
* each matmul tile runs a warp-specialised pipeline: one memory warpgroup
  issues TMA loads into 128-byte-swizzled shared memory
  (``max_concurrent_steps`` stages), two compute warpgroups issue wgmma into
  float32 accumulators (each owns half of the CTA tile), and a tiled epilogue
  casts, stages the tile through shared memory and TMA-stores it;
* with ``cluster_dimension`` the CTAs run in clusters of two that compute
  neighbouring tiles along that dimension and share the common operand tile
  through a TMA multicast (half the L2 traffic for it);
* with ``chain_tiles`` the tile pipelines of one CTA form a pipeline of
  pipelines (``plgpu.PipelinePipeline``): the memory warpgroup starts loading
  the next tile while the compute warpgroups still finish and store the
  current one, so there is no pipeline fill bubble between tiles;
* after the matmul tiles, the CTAs walk ``(G - (hi - lo)) * tiles_per_group``
  zero items and TMA-store a zero tile into the idle groups' output (cost: the
  idle output bytes, no loads and no math);
* with ``swiglu`` the B operand holds [gate | up] columns: each k-step loads the
  gate and the up tile of the same output columns, each compute warpgroup keeps
  a gate and an up accumulator, and the epilogue stores ``silu(gate) * up``
  (a Llama MLP's first half without its 2F-wide intermediate in memory);
* ragged edges: rows (and columns) past the end of a group are handled by TMA,
  which fills out-of-bounds loads with zeros and clips out-of-bounds stores;
* block sizes: 128 x 256 CTA tiles (two 128 x 128 wgmma warpgroups), k-step
  64, 4 stages, chained tiles (``select_config``; 128 x 128 tiles where n is no
  multiple of 256);
* with ``pingpong`` (``_pingpong_kernel``) the two compute warpgroups work on
  different tiles instead and take turns on the tensor cores, each one's
  epilogue under the other's main loop; ``select_config`` picks it where its
  smaller work items fill the SMs' last wave clearly better.

Operand layouts: ``A`` is ``[G, M, K]`` or, with ``transpose_lhs``,
``[G, K, M]``; ``B`` is ``[G, K, N]`` or, with ``transpose_rhs``,
``[G, N, K]``. The forward pass uses neither, ``dx = dy @ w^T`` uses
``transpose_rhs`` and ``dw = x^T @ dy`` uses ``transpose_lhs``: no transposed
copy of any operand is ever materialised.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

H100_NUM_SMS = 132  # H100 SXM and H200 SXM.
_SMEM_BYTES = 227 * 1024  # Hopper's per-block dynamic shared memory limit.


class MatmulDimension(enum.IntEnum):
    M = 0
    N = 1

    def __str__(self):
        return self.name

    __repr__ = __str__


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Block sizes and schedule of the Hopper grouped matmul.

    tile_m x tile_n is the tile of ONE compute warpgroup; the CTA tile is twice
    as large along ``wg_dimension`` (two compute warpgroups).
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    max_concurrent_steps: int = 4
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_minor_dim: MatmulDimension = MatmulDimension.N
    grid_tile_width: int = 1
    wg_dimension: MatmulDimension = MatmulDimension.N
    # Chain the tile pipelines of a CTA (no fill bubble between tiles). Used
    # only where the k-steps are a multiple of max_concurrent_steps.
    chain_tiles: bool = True
    # Clusters of 2 CTAs on neighbouring tiles along this dimension, sharing the
    # other operand's tile by TMA multicast (N: the A tile, M: the B tile).
    cluster_dimension: MatmulDimension | None = None
    # Keep this many wgmma groups in flight before releasing a stage to the
    # memory warpgroup (0: wait for each k-step's wgmma). Pipelines of pipelines
    # do not support it, so delay_release > 0 runs the tiles unchained.
    delay_release: int = 0
    # Shared-memory slots per compute warpgroup for the epilogue's TMA stores:
    # with fewer slots than epilogue tiles the epilogue waits for earlier stores.
    epi_slots: int = 2
    # Ping-pong schedule (``_pingpong_kernel``): the two compute warpgroups work on different
    # (tile_m x tile_n) tiles and take turns on the tensor cores, each one's epilogue
    # overlapping the other's main loop.
    pingpong: bool = False

    @property
    def _split(self) -> int:
        """Warpgroups sharing a CTA tile: 2 (cooperative), 1 with ping-pong."""
        return 1 if self.pingpong else 2

    @property
    def cta_tile_m(self) -> int:
        return self.tile_m * (self._split if self.wg_dimension == MatmulDimension.M else 1)

    @property
    def cta_tile_n(self) -> int:
        return self.tile_n * (self._split if self.wg_dimension == MatmulDimension.N else 1)

    def chains(self, k_iters: int) -> bool:
        """Whether tiles with k_iters k-steps run as a pipeline of pipelines: it needs
        whole rounds of stages per tile and no delayed release."""
        return (self.chain_tiles and self.delay_release == 0
                and k_iters % self.max_concurrent_steps == 0)

    @property
    def num_out_slots(self) -> int:
        epi_tiles = (self.tile_m * self.tile_n) // (self.epi_tile_m * self.epi_tile_n)
        return max(1, min(self.epi_slots, epi_tiles))

    def smem_bytes(self, in_itemsize: int, out_itemsize: int, b_tiles: int = 1) -> int:
        pipe = (
            self.max_concurrent_steps
            * self.tile_k
            * (self.cta_tile_m + b_tiles * self.cta_tile_n)
            * in_itemsize
        )
        out = 2 * self.num_out_slots * self.epi_tile_m * self.epi_tile_n * out_itemsize
        return pipe + out + 1024  # barriers and alignment slack


DEFAULT_CONFIG = TuningConfig()  # CTA tile 128 x 256, 4 stages
NARROW_CONFIG = TuningConfig(tile_n=64, max_concurrent_steps=5)  # 128 x 128
# Fused SwiGLU (gate and up tiles per k-step): 128 x 128 output tiles, each warpgroup
# 64 rows with a gate and an up accumulator (64 x 128 each), 4 stages of 48 KiB.
SWIGLU_CONFIG = TuningConfig(tile_m=64, tile_n=128, wg_dimension=MatmulDimension.M)
# Ping-pong: 128 x 128 tiles per warpgroup, 6 stages (cuBLAS's nvjet ..._128x128_64x6 shape),
# one wgmma group in flight (without it the schedule ran at 0.82-0.86x of this one on the H200).
PINGPONG_CONFIG = TuningConfig(pingpong=True, max_concurrent_steps=6, delay_release=1)
# How much better the ping-pong schedule must fill the last wave of tiles than the default one
# before select_config picks it: at equal fill it ran 1-2 % slower (3b qkv/o, 1b gate_up).
PINGPONG_MIN_WAVE_GAIN = 0.025


def wave_fill(work_items: int, num_sms: int) -> float:
    """Fraction of the SMs' time slots that hold work when ``work_items`` equal items are
    dealt round-robin to ``num_sms`` SMs (1.0: the last wave is full)."""
    waves = pl.cdiv(work_items, num_sms)
    return work_items / (waves * num_sms) if work_items else 1.0


def select_config(
    num_groups: int,
    m: int,
    k: int,
    n: int,
    *,
    transpose_lhs: bool = False,
    transpose_rhs: bool = False,
    dtype=jnp.bfloat16,
    num_sms: int | None = None,
) -> TuningConfig:
    """Block sizes for one problem (G, M, K, N) on an H100/H200.

    Measured on an H200 (eval/results/grouped_matmul_h200*; device times from
    profiled, interleaved A/B runs): 128 x 256 CTA tiles with 4 stages and
    chained tiles are the best of the variants tried on every Llama-1B/3B/8B
    diagonal shape at full load, at 0.92-1.01x the speed of cuBLAS's batched
    matmul (687-794 TF/s of device time vs 714-799; all twelve shapes at
    c09fce3's kernel code). Within noise or slower:
    3 stages, unchained tiles, 128 x 128 tiles (4 or 6 stages, cuBLAS's choice
    for the 1b attention shapes), 256 x 128 and row-split 128 x 192 tiles,
    other grid orders, 2-CTA clusters with multicast (``cluster_dimension``),
    one wgmma group in flight (``delay_release``, which rules out chaining) and
    a whole staged epilogue tile (``epi_slots=4`` with 3 stages), and CTAs of one
    compute warpgroup on 128 x 128 tiles (0.71-0.79x of the default; meant to run
    two per SM, but the warp-specialized pipeline asks 256 registers per thread for
    a lone compute warpgroup, likely room for one CTA only; removed). A second,
    narrow kernel picked per call by ``lax.cond`` on the active count was
    slower (1b o-proj, 1 of 16 groups active: 51 TF/s with it, 191 without).

    The ping-pong schedule (``PINGPONG_CONFIG``) runs 1-2 % slower than the default
    where both fill the SMs equally (3b qkv/o, 1b gate_up at G = 16), but its work
    items are half a CTA tile, so it fills the last wave better where the CTA tiles
    leave it nearly empty: picked when ``wave_fill`` gains at least
    ``PINGPONG_MIN_WAVE_GAIN``, forward products only. H200 A/B (device time, vs
    the default): 1b qkv at G = 16 308 vs 320 us (fill 0.970 vs 0.935), 1b gate_up
    at G = 1 108 vs 120 us, 3b gate_up at G = 1 283 vs 296 us.
    """
    del k, dtype
    if n % DEFAULT_CONFIG.cta_tile_n and n % NARROW_CONFIG.cta_tile_n == 0:
        return NARROW_CONFIG
    if not (transpose_lhs or transpose_rhs):   # the backward products are not measured yet
        num_sms = _num_sms() if num_sms is None else num_sms
        m_tiles = pl.cdiv(m, DEFAULT_CONFIG.cta_tile_m)
        cta_tiles = num_groups * m_tiles * pl.cdiv(n, DEFAULT_CONFIG.cta_tile_n)
        # ping-pong: a work item is one warpgroup's 128 x 128 tile, half a default CTA tile;
        # an SM's two warpgroups take turns on its tensor cores, so it works through its items
        # one after another and the last wave is counted in half tiles
        pp_items = num_groups * m_tiles * pl.cdiv(n, PINGPONG_CONFIG.tile_n)
        if (n % PINGPONG_CONFIG.tile_n == 0 and wave_fill(pp_items, num_sms)
                - wave_fill(cta_tiles, num_sms) >= PINGPONG_MIN_WAVE_GAIN):
            return PINGPONG_CONFIG
    return DEFAULT_CONFIG


def problem_dims(a_shape, b_shape, transpose_lhs, transpose_rhs, swiglu=False):
    """(G, M, K, N) of the product described by the stored operand shapes (G: the
    groups of A; B may hold more groups, addressed with an offset). With swiglu, B's
    columns are [gate | up] and N is the output width, half of them."""
    g, a0, a1 = a_shape
    g2, b0, b1 = b_shape
    m, k = (a1, a0) if transpose_lhs else (a0, a1)
    k2, n = (b1, b0) if transpose_rhs else (b0, b1)
    if g2 < g or k != k2 or (swiglu and n % 2):
        raise ValueError(
            f"grouped matmul: incompatible operand shapes {tuple(a_shape)} and"
            f" {tuple(b_shape)} ({transpose_lhs=}, {transpose_rhs=}"
            f"{', swiglu: b needs an even number of [gate | up] columns' if swiglu else ''})"
        )
    return g, m, k, n // 2 if swiglu else n


def unsupported_reason(
    a_shape,
    b_shape,
    dtype,
    out_dtype,
    *,
    transpose_lhs=False,
    transpose_rhs=False,
    config: TuningConfig = DEFAULT_CONFIG,
    interpret: bool = False,
    swiglu: bool = False,
) -> str | None:
    """Why the Mosaic GPU kernel cannot serve this problem well (None: it can).

    float32 is accepted only in interpret mode (tests of the tiling logic).
    """
    dtype = jnp.dtype(dtype)
    out_dtype = jnp.dtype(out_dtype)
    if dtype == jnp.dtype(jnp.float32) and not interpret:
        # wgmma reads float32 as TF32 and only K-major: not a float32 matmul.
        return "float32 inputs (the GPU kernel takes bfloat16/float16)"
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"input dtype {dtype} (kernel takes bfloat16/float16)"
    if out_dtype != dtype:
        return f"output dtype {out_dtype} != input dtype {dtype}"
    _, m, k, n = problem_dims(a_shape, b_shape, transpose_lhs, transpose_rhs, swiglu)
    c = config
    if swiglu and (transpose_lhs or transpose_rhs or c.cluster_dimension is not None
                   or c.delay_release):
        return "fused SwiGLU: no transposed operands, clusters or delayed release"
    # Minor (contiguous) dims are tiled by the 128-byte swizzle (64 elements),
    # major dims by 8 rows; TMA handles the ragged remainder of major dims.
    minor_a, major_a = (m, k) if transpose_lhs else (k, m)
    minor_b, major_b = (k, n) if transpose_rhs else (n, k)
    if minor_a % c.tile_k or minor_b % c.tile_k or minor_a < c.tile_k:
        return f"minor dims {minor_a}, {minor_b} not multiples of {c.tile_k}"
    if major_a % 8 or major_b % 8:
        return f"major dims {major_a}, {major_b} not multiples of 8"
    if n % c.cta_tile_n or m % 8:
        return f"n={n} not a multiple of {c.cta_tile_n} or m={m} not of 8"
    if m < c.cta_tile_m // 2 or n < c.cta_tile_n:
        return f"m={m}, n={n} too small for the tile"
    if not 0 <= c.delay_release < c.max_concurrent_steps:
        return f"delay_release={c.delay_release} not in [0, {c.max_concurrent_steps})"
    if c.pingpong and (swiglu or c.delay_release > 1 or c.cluster_dimension is not None):
        return "ping-pong: delay_release 0 or 1; no fused SwiGLU or clusters"
    if c.smem_bytes(dtype.itemsize, out_dtype.itemsize, 1 + swiglu) > _SMEM_BYTES:
        return "config exceeds shared memory"
    if c.cluster_dimension == MatmulDimension.N and pl.cdiv(n, c.cta_tile_n) % 2:
        return f"cluster along n needs an even number of {c.cta_tile_n}-column tiles, n={n}"
    if c.cluster_dimension == MatmulDimension.M and pl.cdiv(m, c.cta_tile_m) % 2:
        return f"cluster along m needs an even number of {c.cta_tile_m}-row tiles, m={m}"
    return None


def _kernel(
    bounds_gmem,
    a_gmem,
    b_gmem,
    out_gmem,
    *,
    config: TuningConfig,
    dims,
    transpose_lhs: bool,
    transpose_rhs: bool,
    swiglu: bool = False,
):
    # n: output columns. With swiglu, b holds 2 n columns [gate | up] and the
    # output is silu(a @ gate) * (a @ up), computed from the float32 accumulators.
    num_groups, m, k, n = dims
    num_out_groups = out_gmem.shape[0]
    num_b = 2 if swiglu else 1
    dtype = a_gmem.dtype
    out_dtype = out_gmem.dtype
    c = config
    tile_m, tile_n, tile_k = c.tile_m, c.tile_n, c.tile_k
    cta_tile_m, cta_tile_n = c.cta_tile_m, c.cta_tile_n
    m_iters = pl.cdiv(m, cta_tile_m)
    n_iters = pl.cdiv(n, cta_tile_n)
    k_iters = pl.cdiv(k, tile_k)
    tiles_per_group = m_iters * n_iters
    # Matmul work items: one tile per CTA, or one pair of neighbouring tiles per cluster.
    cluster_m = 1 + (c.cluster_dimension == MatmulDimension.M)
    cluster_n = 1 + (c.cluster_dimension == MatmulDimension.N)
    item_m_iters, item_n_iters = m_iters // cluster_m, n_iters // cluster_n
    items_per_group = item_m_iters * item_n_iters
    work_axis = "sm" if c.cluster_dimension is None else "cluster_grid"
    chain = c.chains(k_iters)

    smem_transforms = functools.partial(_smem_transforms, dtype)

    if transpose_lhs:  # A[g] stored (K, M)
        a_block, a_map = (tile_k, cta_tile_m), (lambda kk: (kk, 0))
        a_tr = smem_transforms(cta_tile_m)
    else:  # A[g] stored (M, K)
        a_block, a_map = (cta_tile_m, tile_k), (lambda kk: (0, kk))
        a_tr = smem_transforms(tile_k)
    if transpose_rhs:  # B[g] stored (N, K)
        b_block, b_map = (cta_tile_n, tile_k), (lambda kk: (0, kk))
        b_tr = smem_transforms(tile_k)
    else:  # B[g] stored (K, N)
        b_block, b_map = (tile_k, cta_tile_n), (lambda kk: (kk, 0))
        b_tr = smem_transforms(cta_tile_n)

    epi_tile_m, epi_tile_n = c.epi_tile_m, c.epi_tile_n
    num_out_slots = c.num_out_slots
    out_transforms = _smem_transforms(out_dtype, epi_tile_n)

    def get_pipeline(pipeline_body, compute_context, pipeline_state=None):
        a_spec = plgpu.BlockSpec(a_block, a_map, transforms=a_tr, memory_space=plgpu.SMEM,
                                 delay_release=c.delay_release,
                                 collective_axes=("cluster",) if cluster_n > 1 else ())
        b_spec = plgpu.BlockSpec(b_block, b_map, transforms=b_tr, memory_space=plgpu.SMEM,
                                 delay_release=c.delay_release,
                                 collective_axes=("cluster",) if cluster_m > 1 else ())
        return plgpu.emit_pipeline_warp_specialized(
            pipeline_body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[a_spec] + [b_spec] * num_b,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=c.max_concurrent_steps,
            compute_context=compute_context,
            pipeline_state=pipeline_state,
        )

    def a_group(g, m_slice):
        if transpose_lhs:
            return a_gmem.at[g, :, m_slice]
        return a_gmem.at[g, m_slice, :]

    def b_group(g, n_slice):
        if transpose_rhs:
            return b_gmem.at[g, n_slice, :]
        return b_gmem.at[g, :, n_slice]

    def b_tiles(g, n_idx):
        """The B column tiles of output column tile n_idx: (w,) or (gate, up)."""
        cols = [pl.ds(n_idx * cta_tile_n, cta_tile_n)]
        if swiglu:
            cols.append(pl.ds(n + n_idx * cta_tile_n, cta_tile_n))
        return [b_group(g, col) for col in cols]

    ignore = lambda *_, **__: None
    dummy_a = a_group(0, pl.ds(0, cta_tile_m))
    dummy_b = b_tiles(0, 0)

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(dummy_a, *dummy_b),
        out_smem=plgpu.SMEM(
            (2, num_out_slots, epi_tile_m, epi_tile_n), out_dtype,
            transforms=out_transforms,
        ),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg_idx = lax.axis_index("wg")
        lo = jnp.clip(bounds_gmem[0], 0, num_groups)
        hi = jnp.clip(bounds_gmem[1], lo, num_groups)
        b_offset = bounds_gmem[2]
        out_offset = bounds_gmem[3]
        num_active = hi - lo

        if c.wg_dimension == MatmulDimension.M:
            wg_m_slice = pl.ds(wg_idx * tile_m, tile_m)
            wg_n_slice = slice(None)
        else:
            wg_m_slice = slice(None)
            wg_n_slice = pl.ds(wg_idx * tile_n, tile_n)

        def tile_coords(lin_idx, per_group=tiles_per_group, iters=(m_iters, n_iters)):
            return _tile_coords(lin_idx, per_group, iters, c)

        def cta_index():
            """(this CTA's linear index, the number of CTAs)."""
            if c.cluster_dimension is None:
                return lax.axis_index("sm"), lax.axis_size("sm")
            return (lax.axis_index("cluster_grid") * 2 + lax.axis_index("cluster"),
                    lax.axis_size("cluster_grid") * 2)

        def out_epi_slices(g_out, m_idx, n_idx, epi_mi, epi_ni):
            return (
                out_gmem.at[g_out]
                .at[pl.ds(m_idx * cta_tile_m, cta_tile_m), pl.ds(n_idx * cta_tile_n, cta_tile_n)]
                .at[wg_m_slice, wg_n_slice]
                .at[pl.ds(epi_mi * epi_tile_m, epi_tile_m), pl.ds(epi_ni * epi_tile_n, epi_tile_n)]
            )

        # ---- matmul tiles of the active groups --------------------------------
        @plgpu.nd_loop((num_active * items_per_group,), collective_axes=work_axis)
        def _mm_loop(loop_info: plgpu.NDLoopInfo):
            (lin_idx,) = loop_info.index
            g_ord, m_idx, n_idx = tile_coords(lin_idx, items_per_group,
                                              (item_m_iters, item_n_iters))
            if c.cluster_dimension is not None:   # this CTA's tile of the cluster's pair
                cta = lax.axis_index("cluster")
                m_idx = m_idx * cluster_m + (cta if cluster_m > 1 else 0)
                n_idx = n_idx * cluster_n + (cta if cluster_n > 1 else 0)
            g = lo + g_ord
            cta_m_slice = pl.ds(m_idx * cta_tile_m, cta_tile_m)

            def store_tile(acc):
                _store_tile(acc.astype(out_dtype), out_smem.at[wg_idx], c, lambda mi, ni:
                            out_epi_slices(g + out_offset, m_idx, n_idx, mi, ni))

            acc_type = plgpu.ACC((tile_m, tile_n), jnp.float32)

            def compute_context(eval_pipeline):
                if not swiglu:
                    @functools.partial(pl.run_scoped, acc_ref=acc_type)
                    def _acc_scope(acc_ref):
                        eval_pipeline(acc_ref)
                        store_tile(acc_ref[...])
                    return

                @functools.partial(pl.run_scoped, gate_ref=acc_type, up_ref=acc_type)
                def _swiglu_scope(gate_ref, up_ref):
                    eval_pipeline((gate_ref, up_ref))
                    gate, up = gate_ref[...], up_ref[...]
                    store_tile(gate / (1.0 + jnp.exp(-gate)) * up)   # silu(gate) * up

            def mma_body(_, a_smem, *b_smems_and_accs):
                *b_smems, accs = b_smems_and_accs
                if transpose_lhs:
                    a_op = a_smem.at[:, wg_m_slice].transpose((1, 0))
                else:
                    a_op = a_smem.at[wg_m_slice]
                for b_smem, acc_ref in zip(b_smems, accs if swiglu else (accs,), strict=True):
                    if transpose_rhs:
                        b_op = b_smem.at[wg_n_slice, :].transpose((1, 0))
                    else:
                        b_op = b_smem.at[:, wg_n_slice]
                    plgpu.wgmma(acc_ref, a_op, b_op)
                plgpu.wgmma_wait(c.delay_release)
                return accs

            def run_pipeline(state):
                get_pipeline(mma_body, compute_context, state)(
                    a_group(g, cta_m_slice),
                    *b_tiles(g + b_offset, n_idx),
                    allocations=pipeline_allocs,
                )

            if not chain:
                run_pipeline(None)
                return
            # First tile of this CTA: START (fills the stages); last: STOP (drains);
            # in between STEADY. A CTA with a single tile runs a plain pipeline.
            step, num_steps = loop_info.local_index, loop_info.num_local_steps
            alone = num_steps == 1

            @pl.when(alone)
            def _single():
                run_pipeline(None)

            @pl.when(jnp.logical_not(alone))
            def _chained():
                P = plgpu.PipelinePipeline
                state = jnp.where(
                    step == 0, int(P.START), jnp.where(step == num_steps - 1, int(P.STOP),
                                                      int(P.STEADY)))
                run_pipeline(state)

        # ---- zero tiles of the idle output groups -----------------------------
        num_mm = num_active * tiles_per_group
        num_zero = (num_out_groups - num_active) * tiles_per_group
        out_lo = lo + out_offset

        @pl.when(wg_idx < 2)
        def _zero_phase():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem[wg_idx, 0] = jnp.zeros((epi_tile_m, epi_tile_n), out_dtype)
            plgpu.commit_smem()
            sm, num_sms = cta_index()
            first, count = _zero_work(sm, num_sms, num_mm, num_zero)

            @pl.loop(0, count)
            def _zero_loop(i):
                z = first + i * num_sms
                q, m_idx, n_idx = tile_coords(z)
                g = jnp.where(q < out_lo, q, q + num_active)
                for epi_mi in range(tile_m // epi_tile_m):
                    for epi_ni in range(tile_n // epi_tile_n):
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg_idx, 0], out_epi_slices(g, m_idx, n_idx, epi_mi, epi_ni)
                        )

    # Await all transfers before we exit.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _smem_transforms(dtype, minor_elems):
    """Tiling and 128-byte (or narrower) swizzle of a shared-memory tile."""
    swizzle = plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def _tile_coords(lin_idx, per_group: int, iters: tuple[int, int], c: TuningConfig):
    """(group ordinal, m tile, n tile) of work item lin_idx: group major, a planar snake over
    the (m, n) tiles inside a group."""
    g_ord = lax.div(lin_idx, jnp.int32(per_group))
    rem = lax.rem(lin_idx, jnp.int32(per_group))
    m_idx, n_idx = plgpu.planar_snake(rem, iters, c.grid_minor_dim, c.grid_tile_width)
    return g_ord, m_idx, n_idx


def _zero_work(cta, num_ctas, num_mm, num_zero):
    """(first zero tile, number of zero tiles) of this CTA: the zero tiles continue the
    round-robin where the num_mm matmul tiles stopped, so the CTAs that got one matmul tile
    fewer take the first zero tiles."""
    first = lax.rem(cta - lax.rem(num_mm, num_ctas) + num_ctas, num_ctas)
    return first, jnp.maximum(num_zero - first + num_ctas - 1, 0) // num_ctas


def _store_tile(acc, out_smem_wg, c: TuningConfig, dst):
    """TMA-stores a warpgroup's (tile_m, tile_n) tile (already cast) through its shared-memory
    slots, epilogue tile by epilogue tile; dst(epi_mi, epi_ni) is the destination in GMEM."""
    slots = c.num_out_slots
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for epi_mi in range(c.tile_m // c.epi_tile_m):
        for epi_ni in range(c.tile_n // c.epi_tile_n):
            epi_m = slice(epi_mi * c.epi_tile_m, (epi_mi + 1) * c.epi_tile_m)
            epi_n = slice(epi_ni * c.epi_tile_n, (epi_ni + 1) * c.epi_tile_n)
            slot = (epi_mi * (c.tile_n // c.epi_tile_n) + epi_ni) % slots
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
            out_smem_wg[slot] = acc[epi_m, epi_n]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem_wg.at[slot], dst(epi_mi, epi_ni))


def _pingpong_kernel(bounds_gmem, a_gmem, b_gmem, out_gmem, *, config: TuningConfig, dims,
                     transpose_lhs: bool, transpose_rhs: bool):
    """The ping-pong schedule (``TuningConfig.pingpong``): the two compute warpgroups of a CTA
    work on different (tile_m, tile_n) output tiles (the even and odd tiles of the CTA's share
    of the work list) and take turns on the tensor cores: while one runs the main loop of its
    tile, the other stores its previous one, so the epilogue overlaps the math (CUTLASS's
    ping-pong schedule; cuBLAS's non-cooperative Hopper kernels, by their names). The turns make the order in which
    stages are consumed strict (tile 0's k-steps, then tile 1's, ...), so one memory warpgroup
    fills one ring of stages in that order.

    With ``delay_release = 1`` a warpgroup keeps one wgmma in flight and releases each stage
    a k-step later.

    Barriers: ``loaded[w * S + slot]`` (A and B of a stage, one set per compute warpgroup, since
    a barrier's phase is tracked by each waiting thread and must see every phase),
    ``consumed[slot]`` (waited on by the memory warpgroup only) and ``turn``, a rendezvous of
    the two compute warpgroups: each passes it after its main loop and after its epilogue, and
    warpgroup 1 once more at the start, so their main loops alternate.
    """
    num_groups, m, k, n = dims
    num_out_groups = out_gmem.shape[0]
    dtype, out_dtype = a_gmem.dtype, out_gmem.dtype
    c = config
    tm, tn, tk, stages = c.tile_m, c.tile_n, c.tile_k, c.max_concurrent_steps
    delay = c.delay_release   # 1: one wgmma in flight, its stage released a step later
    m_iters, n_iters, k_iters = pl.cdiv(m, tm), pl.cdiv(n, tn), pl.cdiv(k, tk)
    tiles_per_group = m_iters * n_iters
    a_block = (tk, tm) if transpose_lhs else (tm, tk)
    b_block = (tn, tk) if transpose_rhs else (tk, tn)
    out_transforms = _smem_transforms(out_dtype, c.epi_tile_n)

    def a_tile(g, m_idx, kk):
        rows, cols = pl.ds(m_idx * tm, tm), pl.ds(kk * tk, tk)
        return a_gmem.at[g, cols, rows] if transpose_lhs else a_gmem.at[g, rows, cols]

    def b_tile(g, n_idx, kk):
        rows, cols = pl.ds(kk * tk, tk), pl.ds(n_idx * tn, tn)
        return b_gmem.at[g, cols, rows] if transpose_rhs else b_gmem.at[g, rows, cols]

    def out_epi(g, m_idx, n_idx, epi_mi, epi_ni):
        return out_gmem.at[g, pl.ds(m_idx * tm + epi_mi * c.epi_tile_m, c.epi_tile_m),
                           pl.ds(n_idx * tn + epi_ni * c.epi_tile_n, c.epi_tile_n)]

    @functools.partial(
        pl.run_scoped,
        a_smem=plgpu.SMEM((stages, *a_block), dtype,
                          transforms=_smem_transforms(dtype, a_block[1])),
        b_smem=plgpu.SMEM((stages, *b_block), dtype,
                          transforms=_smem_transforms(dtype, b_block[1])),
        out_smem=plgpu.SMEM((2, c.num_out_slots, c.epi_tile_m, c.epi_tile_n), out_dtype,
                            transforms=out_transforms),
        loaded=plgpu.Barrier(num_arrivals=2, num_barriers=2 * stages),
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        turn=plgpu.Barrier(num_arrivals=2, num_barriers=1),
        collective_axes="wg",
    )
    def _scope(a_smem, b_smem, out_smem, loaded, consumed, turn):
        wg_idx = lax.axis_index("wg")
        lo = jnp.clip(bounds_gmem[0], 0, num_groups)
        hi = jnp.clip(bounds_gmem[1], lo, num_groups)
        b_offset, out_offset = bounds_gmem[2], bounds_gmem[3]
        num_active = hi - lo
        sm, num_sms = lax.axis_index("sm"), lax.axis_size("sm")
        num_mm = num_active * tiles_per_group
        my_tiles = jnp.maximum(num_mm - sm + num_sms - 1, 0) // num_sms   # sm, sm + num_sms, ...

        def tile_coords(lin_idx):
            return _tile_coords(lin_idx, tiles_per_group, (m_iters, n_iters), c)

        @pl.when(wg_idx == 2)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")
            total = my_tiles * k_iters

            @pl.loop(0, total)
            def _load(step):
                i, kk = lax.div(step, k_iters), lax.rem(step, k_iters)
                g_ord, m_idx, n_idx = tile_coords(sm + i * num_sms)
                slot = lax.rem(step, stages)

                @pl.when(step >= stages)
                def _wait_free():
                    plgpu.barrier_wait(consumed.at[slot])

                barrier = loaded.at[lax.rem(i, 2) * stages + slot]
                plgpu.copy_gmem_to_smem(a_tile(lo + g_ord, m_idx, kk), a_smem.at[slot], barrier)
                plgpu.copy_gmem_to_smem(b_tile(lo + g_ord + b_offset, n_idx, kk),
                                        b_smem.at[slot], barrier)

            # Await the last consumptions, so that no barrier is left mid-phase.
            @pl.loop(jnp.maximum(total - stages, 0), total)
            def _quiesce(step):
                plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

        @pl.when(wg_idx < 2)
        def _compute_wg():
            plgpu.set_max_registers(232, action="increase")

            def rendezvous():
                plgpu.barrier_arrive(turn.at[0])
                plgpu.barrier_wait(turn.at[0])

            pl.when(wg_idx == 1)(rendezvous)   # warpgroup 0 has the first turn

            @pl.loop(0, lax.div(my_tiles - wg_idx + 1, 2))
            def _tile(j):
                i = wg_idx + 2 * j
                g_ord, m_idx, n_idx = tile_coords(sm + i * num_sms)

                def main_loop(acc_ref):
                    @pl.loop(0, k_iters)
                    def _k_step(kk):
                        step = i * k_iters + kk
                        slot = lax.rem(step, stages)
                        plgpu.barrier_wait(loaded.at[wg_idx * stages + slot])
                        a_op = a_smem.at[slot]
                        b_op = b_smem.at[slot]
                        if transpose_lhs:
                            a_op = a_op.transpose((1, 0))
                        if transpose_rhs:
                            b_op = b_op.transpose((1, 0))
                        plgpu.wgmma(acc_ref, a_op, b_op)
                        plgpu.wgmma_wait(delay)
                        if not delay:
                            plgpu.barrier_arrive(consumed.at[slot])
                        else:   # the previous step's wgmma is done: release its stage
                            @pl.when(kk > 0)
                            def _release_previous():
                                plgpu.barrier_arrive(consumed.at[lax.rem(step - 1, stages)])

                    if delay:
                        plgpu.wgmma_wait(0)
                        last = i * k_iters + k_iters - 1
                        plgpu.barrier_arrive(consumed.at[lax.rem(last, stages)])
                    return acc_ref[...]

                acc = pl.run_scoped(main_loop, plgpu.ACC((tm, tn), jnp.float32))
                rendezvous()   # the other warpgroup's main loop starts
                _store_tile(acc.astype(out_dtype), out_smem.at[wg_idx], c, lambda mi, ni:
                            out_epi(lo + g_ord + out_offset, m_idx, n_idx, mi, ni))
                rendezvous()   # and ends before this one's next main loop

            # Both pass the rendezvous equally often: 2 per tile, and 1 more for warpgroup 1 at
            # the start; the warpgroup with fewer passes makes it up.
            pl.when(lax.rem(my_tiles, 2) == wg_idx)(rendezvous)

            # Zero tiles of the idle output groups, continuing the round-robin of the matmul
            # tiles; the two warpgroups split each tile's epilogue tiles.
            num_zero = (num_out_groups - num_active) * tiles_per_group
            out_lo = lo + out_offset
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem[wg_idx, 0] = jnp.zeros((c.epi_tile_m, c.epi_tile_n), out_dtype)
            plgpu.commit_smem()
            first, count = _zero_work(sm, num_sms, num_mm, num_zero)

            @pl.loop(0, count)
            def _zero_loop(z):
                q, m_idx, n_idx = tile_coords(first + z * num_sms)
                g = jnp.where(q < out_lo, q, q + num_active)
                epi_n_tiles = tn // c.epi_tile_n
                for e in range((tm // c.epi_tile_m) * epi_n_tiles):
                    @pl.when(wg_idx == e % 2)
                    def _store_zero():
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg_idx, 0],
                            out_epi(g, m_idx, n_idx, e // epi_n_tiles, e % epi_n_tiles))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def grouped_matmul_mgpu(
    a,
    b,
    bounds,
    *,
    transpose_lhs: bool = False,
    transpose_rhs: bool = False,
    config: TuningConfig = DEFAULT_CONFIG,
    out_groups: int | None = None,
    num_sms: int | None = None,
    interpret=None,
    swiglu: bool = False,
):
    """``out[g + out_off] = op(a[g]) @ op(b[g + b_off])`` for g in ``[lo, hi)``.

    a: [G, M, K] (or [G, K, M] with ``transpose_lhs``); b: [Gb, K, N] (or
    [Gb, N, K] with ``transpose_rhs``), Gb >= G; bounds: int32[2] = (lo, hi) or
    int32[4] = (lo, hi, b_off, out_off), traced; the caller keeps the offset
    groups in range. Returns [out_groups (default G), M, N] in a's dtype with
    zeros in every output group not written.

    With ``swiglu`` (no transposes), b is [Gb, K, 2 N] holding [gate | up] columns and
    the result is ``silu(a[g] @ gate) * (a[g] @ up)``, [out_groups, M, N]: a Llama
    MLP's gate/up projection and activation in one pass, from float32 accumulators.
    """
    dims = problem_dims(a.shape, b.shape, transpose_lhs, transpose_rhs, swiglu)
    g, m, k, n = dims
    out_groups = g if out_groups is None else out_groups
    if out_groups < g:
        raise ValueError(f"grouped matmul: out_groups={out_groups} < the {g} groups of a")
    if bounds.shape == (2,):
        bounds = jnp.concatenate([bounds, jnp.zeros((2,), bounds.dtype)])
    if bounds.shape != (4,):
        raise ValueError(f"grouped matmul: bounds must have shape (2,) or (4,), got {bounds.shape}")
    if a.dtype != b.dtype:
        raise ValueError(f"grouped matmul: dtypes differ: {a.dtype} vs {b.dtype}")
    reason = unsupported_reason(
        a.shape,
        b.shape,
        a.dtype,
        a.dtype,
        transpose_lhs=transpose_lhs,
        transpose_rhs=transpose_rhs,
        config=config,
        interpret=interpret is not None,
        swiglu=swiglu,
    )
    if reason is not None:
        raise ValueError(
            f"grouped matmul: Mosaic GPU kernel cannot serve a{tuple(a.shape)} @"
            f" b{tuple(b.shape)} {a.dtype}: {reason}"
        )
    if num_sms is None:
        num_sms = _num_sms()
    if config.cluster_dimension is None:
        grid = dict(grid=(num_sms,), grid_names=("sm",))
    else:
        grid = dict(grid=(num_sms // 2,), grid_names=("cluster_grid",), cluster=(2,),
                    cluster_names=("cluster",))
    if config.pingpong:
        body = functools.partial(_pingpong_kernel, config=config, dims=dims,
                                 transpose_lhs=transpose_lhs, transpose_rhs=transpose_rhs)
    else:
        body = functools.partial(_kernel, config=config, dims=dims, transpose_lhs=transpose_lhs,
                                 transpose_rhs=transpose_rhs, swiglu=swiglu)
    f = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((out_groups, m, n), a.dtype),
        **grid,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return f(bounds.astype(jnp.int32), a, b)


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(dev.core_count)
    except Exception:  # pragma: no cover - exotic backends
        pass
    return H100_NUM_SMS
