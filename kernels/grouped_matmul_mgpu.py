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
  current one, so there is no pipeline fill bubble between tiles (JAX allows it
  only where the k-steps are a multiple of the stages, without delayed release);
* with ``ring`` (``ring_mgpu.py``) the same cooperative schedule runs on a
  hand-written pipeline: one ring of stages over all of a CTA's tiles, chained
  at any number of k-steps (the weight gradients' k-steps, the diagonal's rows /
  64: 18, 34, 66, JAX's pipelines cannot chain), with one wgmma group in flight;
  ``select_config`` runs the default and the 192 x 192 tiles on it;
* after the matmul tiles, the CTAs walk ``(G - (hi - lo)) * tiles_per_group``
  zero items and TMA-store a zero tile into the idle groups' output (cost: the
  idle output bytes, no loads and no math);
* with ``swiglu`` the B operand holds [gate | up] columns: each k-step loads the
  gate and the up tile of the same output columns, each compute warpgroup keeps
  a gate and an up accumulator, and the epilogue stores ``silu(gate) * up``
  (a Llama MLP's first half without its 2F-wide intermediate in memory);
* ragged edges: rows and columns past the end of a group are handled by TMA,
  which fills out-of-bounds loads with zeros and clips out-of-bounds stores (a
  ragged last column tile: cooperative schedule only);
* block sizes (``select_config``, measured on the H200): 128 x 256 CTA tiles
  (two 128 x 128 wgmma warpgroups), k-step 64, 4 stages, chained tiles (on
  the ring) by default; 128 x 128 tiles where n is no multiple of 256; with
  three compute warpgroups (``compute_wgs=3``, 64-row warpgroup tiles) 192 x 128 tiles where
  they fill the SMs' waves clearly better, and 192 x 192 tiles on products of
  many tiles where they cost no more than the default (the 1b shapes at G = 16)
  or, in 2-CTA clusters along n, at most 1 % more (8b qkv and gate/up);
* with ``pingpong`` (``pingpong_mgpu.py``) the two compute warpgroups work on
  different tiles instead and take turns on the tensor cores, each one's
  epilogue under the other's main loop; ``select_config`` picks it where its
  smaller work items fill the SMs' last wave clearly better.

Operand layouts: ``A`` is ``[G, M, K]`` or, with ``transpose_lhs``,
``[G, K, M]``; ``B`` is ``[G, K, N]`` or, with ``transpose_rhs``,
``[G, N, K]``. The forward pass uses neither, ``dx = dy @ w^T`` uses
``transpose_rhs`` and ``dw = x^T @ dy`` uses ``transpose_lhs``: no transposed
copy of any operand is ever materialised.

Modules: the configs and the per-shape choice are in ``kernels/tuning.py`` (re-exported
here), the ping-pong schedule in ``kernels/pingpong_mgpu.py``, the ring of stages in
``kernels/ring_mgpu.py``, the tile arithmetic and output store they share in
``kernels/mgpu_tiles.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mgpu_tiles as tiles
from kernels.pingpong_mgpu import pingpong_kernel
from kernels.ring_mgpu import ring_kernel

# The tuning names are part of this module's interface (callers write mgpu_kernel.TuningConfig).
from kernels.tuning import (  # noqa: F401
    DEFAULT_CONFIG,
    H100_NUM_SMS,
    NARROW_CONFIG,
    PINGPONG_CONFIG,
    PINGPONG_MIN_WAVE_GAIN,
    RING_CONFIG,
    RING_WIDE_THREE_WG_CONFIG,
    SWIGLU_CONFIG,
    THREE_WG_CONFIG,
    THREE_WG_VARIANTS,
    WIDE_CLUSTER_CONFIGS,
    WIDE_CLUSTER_N_CONFIG,
    WIDE_THREE_WG_CONFIG,
    MatmulDimension,
    TuningConfig,
    num_sms_of_device,
    on_ring,
    problem_dims,
    select_config,
    tile_cost,
    unsupported_reason,
    wave_fill,
)


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

    smem_transforms = functools.partial(tiles.smem_transforms, dtype)

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
    out_transforms = tiles.smem_transforms(out_dtype, epi_tile_n)

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
            num_compute_wgs=c.compute_wgs,
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
            (c.compute_wgs, num_out_slots, epi_tile_m, epi_tile_n), out_dtype,
            transforms=out_transforms,
        ),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg_idx = lax.axis_index("wg")
        lo, hi, b_offset, out_offset = tiles.active_range(bounds_gmem, num_groups)
        num_active = hi - lo

        if c.wg_dimension == MatmulDimension.M:
            wg_m_slice = pl.ds(wg_idx * tile_m, tile_m)
            wg_n_slice = slice(None)
        else:
            wg_m_slice = slice(None)
            wg_n_slice = pl.ds(wg_idx * tile_n, tile_n)

        def tile_coords(lin_idx, per_group=tiles_per_group, iters=(m_iters, n_iters)):
            return tiles.tile_coords(lin_idx, per_group, iters, c)

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
                dst = lambda mi, ni: out_epi_slices(g + out_offset, m_idx, n_idx, mi, ni)
                tiles.store_tile(acc.astype(out_dtype), out_smem.at[wg_idx], c, dst)

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
        @pl.when(wg_idx < c.compute_wgs)
        def _zero_phase():
            def store(g, m_idx, n_idx):
                for epi_mi in range(tile_m // epi_tile_m):
                    for epi_ni in range(tile_n // epi_tile_n):
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg_idx, 0], out_epi_slices(g, m_idx, n_idx, epi_mi, epi_ni)
                        )

            tiles.store_zero_tiles(
                out_smem.at[wg_idx], jnp.zeros((epi_tile_m, epi_tile_n), out_dtype), *cta_index(),
                num_active * tiles_per_group, (num_out_groups - num_active) * tiles_per_group,
                lo + out_offset, num_active, tile_coords, store)

    # Await all transfers before we exit.
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
        num_sms = num_sms_of_device()
    if config.cluster_dimension is None:
        grid = dict(grid=(num_sms,), grid_names=("sm",))
    else:
        grid = dict(grid=(num_sms // 2,), grid_names=("cluster_grid",), cluster=(2,),
                    cluster_names=("cluster",))
    if config.pingpong:
        body = functools.partial(pingpong_kernel, config=config, dims=dims,
                                 transpose_lhs=transpose_lhs, transpose_rhs=transpose_rhs)
    else:
        body = functools.partial(ring_kernel if config.ring else _kernel, config=config,
                                 dims=dims, transpose_lhs=transpose_lhs,
                                 transpose_rhs=transpose_rhs, swiglu=swiglu)
    f = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((out_groups, m, n), a.dtype),
        **grid,
        num_threads=config.num_compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return f(bounds.astype(jnp.int32), a, b)
