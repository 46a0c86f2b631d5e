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
* warp specialisation over one ring of stages (``ring_mgpu.py``): a memory
  warpgroup issues the TMA loads of all of the CTA's tiles, k-step after
  k-step, into ``max_concurrent_steps`` stages of 128-byte-swizzled shared
  memory; two (or three) compute warpgroups issue wgmma into float32
  accumulators (each owns its part of the CTA tile), keeping one wgmma group
  in flight, and a tiled epilogue casts, stages the tile through shared memory
  and TMA-stores it. The ring runs on across tiles, so the next tile's loads
  run under this tile's last k-steps and epilogue (no fill bubble between
  tiles, at any number of k-steps);
* with ``cluster_dimension`` the CTAs run in clusters of two that compute
  neighbouring tiles along that dimension and share the common operand tile
  through a TMA multicast (half the L2 traffic for it);
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
  (two 128 x 128 wgmma warpgroups), k-step 64, 4 stages by default; 128 x 128
  tiles where n is no multiple of 256; with three compute warpgroups
  (``compute_wgs=3``, 64-row warpgroup tiles) 192 x 128 tiles where they fill
  the SMs' waves clearly better, and 192 x 192 tiles on products of many tiles
  where they cost no more than the default (the 1b shapes at G = 16) or, in
  2-CTA clusters along n, at most 1 % more (8b qkv and gate/up);
* a warpgroup tile wider than one wgmma (``tile_n`` > 256: the 128 x 320 tiles of
  ``WIDE_ROW_SPLIT_VARIANTS``, measured, not chosen) keeps its accumulator in column chunks,
  one wgmma per chunk and k-step;
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
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.pingpong_mgpu import pingpong_kernel
from kernels.ring_mgpu import ring_kernel

# The tuning names are part of this module's interface (callers write mgpu_kernel.TuningConfig).
from kernels.tuning import (  # noqa: F401
    COLUMN_SPLIT_VARIANTS,
    DEFAULT_CONFIG,
    DW_COLUMN_SPLIT_CONFIG,
    DW_CONFIG,
    DW_ROW_STRIPE_CONFIG,
    H100_NUM_SMS,
    NARROW_CONFIG,
    PINGPONG_CONFIG,
    PINGPONG_MIN_WAVE_GAIN,
    ROW_SPLIT_CONFIG,
    ROW_STRIPE_CONFIG,
    SM_FIT_DX_CONFIG,
    SM_FIT_VARIANTS,
    SM_FIT_MAX_COST_RATIO,
    SWIGLU_CONFIG,
    THREE_WG_CONFIG,
    THREE_WG_VARIANTS,
    WIDE_CLUSTER_CONFIGS,
    WIDE_CLUSTER_N_CONFIG,
    WIDE_ROW_SPLIT_CONFIG,
    WIDE_ROW_SPLIT_VARIANTS,
    WIDE_THREE_WG_CONFIG,
    MatmulDimension,
    TuningConfig,
    fills_tile,
    num_sms_of_device,
    problem_dims,
    select_config,
    tile_cost,
    unsupported_reason,
    wave_fill,
)


# eval/probe_ring.py's diagnostics (``_probe``): the kernel without its loads, without its wgmma.
PROBES = ("no_loads", "no_mma")


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
    out_dtype=None,
    _probe: frozenset[str] = frozenset(),
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

    ``_probe``: eval/probe_ring.py's diagnostics (``ring_kernel``'s ``probe``; a wrong product).
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
    out_dtype = jnp.dtype(a.dtype if out_dtype is None else out_dtype)
    reason = unsupported_reason(
        a.shape,
        b.shape,
        a.dtype,
        out_dtype,
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
    if unknown := set(_probe) - set(PROBES):
        raise ValueError(f"grouped matmul: unknown probes {sorted(unknown)} ({', '.join(PROBES)})")
    if _probe and interpret is not None:
        raise ValueError(f"grouped matmul: probe {sorted(_probe)} runs on a GPU only")
    if config.pingpong:
        body = functools.partial(pingpong_kernel, config=config, dims=dims,
                                 transpose_lhs=transpose_lhs, transpose_rhs=transpose_rhs,
                                 probe=frozenset(_probe))
    else:
        body = functools.partial(ring_kernel, config=config, dims=dims,
                                 transpose_lhs=transpose_lhs, transpose_rhs=transpose_rhs,
                                 swiglu=swiglu, probe=frozenset(_probe))
    f = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((out_groups, m, n), out_dtype),
        **grid,
        num_threads=config.num_compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )
    return f(bounds.astype(jnp.int32), a, b)
