"""The cooperative schedule of the Hopper grouped matmul (every ``TuningConfig`` without
``pingpong``), on one hand-written ring of stages."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mgpu_tiles as tiles
from kernels.tuning import MatmulDimension, TuningConfig

_REGISTERS_PER_SM = 65536
_MEMORY_REGISTERS = 40


def ring_kernel(bounds_gmem, a_gmem, b_gmem, out_gmem, *, config: TuningConfig, dims,
                transpose_lhs: bool, transpose_rhs: bool, swiglu: bool = False,
                probe: frozenset[str] = frozenset()):
    """The cooperative schedule: the compute warpgroups share each CTA tile (each owns its
    tile_m x tile_n part), fed by a pipeline written out by hand: the memory warpgroup fills
    one ring of stages with the k-steps of all the CTA's tiles in order, so the next tile's
    loads run under this tile's last k-steps and its epilogue, at any number of k-steps. (JAX's
    pipeline of pipelines, on which an earlier implementation ran this schedule, chains tiles
    only where the k-steps are a multiple of the stages and without a delayed release; the dw
    products' 18 / 34 / 66 k-steps are not.) With ``delay_release = 1`` each warpgroup keeps
    one wgmma group in flight and releases a stage a k-step later.

    With ``deferred_epi_tiles = d`` each compute warpgroup keeps the last d epilogue tiles of a
    tile in registers and stores them under the next tile's first d k-steps (the last tile's
    after the loop), so their waits for a free shared-memory slot overlap the tensor cores'
    work instead of idling them between tiles.

    With ``swiglu`` (no transposes) B holds [gate | up] columns: each stage holds the gate and
    the up tile of the output columns, each compute warpgroup keeps a gate and an up
    accumulator, and the epilogue stores ``silu(gate) * up``.

    A warpgroup tile wider than one wgmma (``tile_n`` > 256) keeps one accumulator per column
    chunk (``config.n_chunks``) and issues one wgmma per chunk and k-step.

    With ``cluster_dimension`` the CTAs run in clusters of two on neighbouring tiles along it
    (the work items are the pairs), and the operand tile they share (A along n, B along m) is
    loaded once by TMA multicast into both CTAs' stage.

    Barriers: ``loaded[slot]`` (A and B of a stage; every compute warpgroup waits on every
    stage, so each sees every phase) and ``consumed[slot]``, one arrival per compute warpgroup,
    waited on by the memory warpgroup; in a cluster an arrival counts on both CTAs' barrier,
    since the peer's multicast refills this CTA's stage too.

    ``probe`` (eval/probe_ring.py only; the library never sets it, and the product is then
    wrong): "no_loads" signals each stage loaded without loading it, "no_mma" issues no wgmma,
    so that timing the rest of the kernel splits its time between feeding and computing.
    """
    num_groups, m, k, n = dims
    num_out_groups = out_gmem.shape[0]
    dtype, out_dtype = a_gmem.dtype, out_gmem.dtype
    c = config
    wgs, stages, delay = c.compute_wgs, c.max_concurrent_steps, c.delay_release
    tm, tn, tk = c.tile_m, c.tile_n, c.tile_k
    cta_m, cta_n = c.cta_tile_m, c.cta_tile_n
    m_iters, n_iters, k_iters = pl.cdiv(m, cta_m), pl.cdiv(n, cta_n), pl.cdiv(k, tk)
    tiles_per_group = m_iters * n_iters
    num_b = 2 if swiglu else 1   # B tiles per stage: (w,) or (gate, up)
    chunks = c.n_chunks   # a warpgroup's accumulators: one per column chunk, or (gate, up)
    a_block = (tk, cta_m) if transpose_lhs else (cta_m, tk)
    b_block = (cta_n, tk) if transpose_rhs else (tk, cta_n)
    by_rows = c.wg_dimension == MatmulDimension.M
    # Work items: one tile per CTA, or one pair of neighbouring tiles per cluster.
    clustered = c.cluster_dimension is not None
    cluster_m = 1 + (c.cluster_dimension == MatmulDimension.M)
    cluster_n = 1 + (c.cluster_dimension == MatmulDimension.N)
    item_iters = (m_iters // cluster_m, n_iters // cluster_n)
    items_per_group = item_iters[0] * item_iters[1]
    a_multicast = ("cluster",) if cluster_n > 1 else None   # A shared along n
    b_multicast = ("cluster",) if cluster_m > 1 else None
    compute_registers = (_REGISTERS_PER_SM // 128 - _MEMORY_REGISTERS) // wgs // 8 * 8

    a_tile = functools.partial(tiles.operand_tile, a_gmem, size=cta_m, tk=tk,
                               k_first=transpose_lhs)
    b_tile = functools.partial(tiles.operand_tile, b_gmem, size=cta_n, tk=tk,
                               k_first=not transpose_rhs)

    def out_epi(g, m_idx, n_idx, wg, epi_mi, epi_ni):
        """Epilogue tile (epi_mi, epi_ni) of warpgroup wg's part of CTA tile (m_idx, n_idx)."""
        row = m_idx * cta_m + (wg * tm if by_rows else 0) + epi_mi * c.epi_tile_m
        col = n_idx * cta_n + (0 if by_rows else wg * tn) + epi_ni * c.epi_tile_n
        return out_gmem.at[g, pl.ds(row, c.epi_tile_m), pl.ds(col, c.epi_tile_n)]

    # The swizzle must suit each warpgroup's slice of a tile where the slice runs along the
    # tile's minor dim: a stored m-minor (dw) split by rows, b stored n-minor split by columns
    # or into column chunks.
    b_slices = ([] if by_rows else [tn]) + ([w for _, w in chunks] if len(chunks) > 1 else [])
    a_transforms, b_transforms = tiles.operand_transforms(
        dtype, a_block[1], b_block[1],
        a_slice=tm if transpose_lhs and by_rows else None,
        b_slice=math.gcd(*b_slices) if b_slices and not transpose_rhs else None,
        tile_k=tk)

    @functools.partial(
        pl.run_scoped,
        a_smem=plgpu.SMEM((stages, *a_block), dtype, transforms=a_transforms),
        b_smem=plgpu.SMEM((stages * num_b, *b_block), dtype, transforms=b_transforms),
        out_smem=plgpu.SMEM((wgs, c.num_out_slots, c.epi_tile_m, c.epi_tile_n), out_dtype,
                            transforms=tiles.smem_transforms(out_dtype, c.epi_tile_n)),
        loaded=plgpu.Barrier(num_arrivals=1 + num_b, num_barriers=stages),
        consumed=(plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=wgs,
                                       num_barriers=stages)
                  if clustered else plgpu.Barrier(num_arrivals=wgs, num_barriers=stages)),
        collective_axes="wg",
    )
    def _scope(a_smem, b_smem, out_smem, loaded, consumed):
        wg_idx = lax.axis_index("wg")
        lo, hi, b_offset, out_offset = tiles.active_range(bounds_gmem, num_groups)
        num_active = hi - lo
        if clustered:   # a worker is a cluster; the CTA index for the zero tiles
            peer = lax.axis_index("cluster")
            worker, num_workers = lax.axis_index("cluster_grid"), lax.axis_size("cluster_grid")
            cta, num_ctas = worker * 2 + peer, num_workers * 2
        else:
            worker, num_workers = lax.axis_index("sm"), lax.axis_size("sm")
            cta, num_ctas = worker, num_workers
        # items worker, worker + num_workers, ...
        my_tiles = tiles.round_robin_count(num_active * items_per_group, worker, num_workers)

        def tile_coords(lin_idx):
            return tiles.tile_coords(lin_idx, tiles_per_group, (m_iters, n_iters), c)

        def my_tile(i):
            """(group ordinal, m tile, n tile) of this CTA's i-th matmul tile."""
            g_ord, m_idx, n_idx = tiles.tile_coords(worker + i * num_workers, items_per_group,
                                                    item_iters, c)
            if clustered:   # this CTA's tile of the cluster's pair
                m_idx = m_idx * cluster_m + (peer if cluster_m > 1 else 0)
                n_idx = n_idx * cluster_n + (peer if cluster_n > 1 else 0)
            return g_ord, m_idx, n_idx

        @pl.when(wg_idx == wgs)
        def _memory_wg():
            plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

            def tile_loads(i):
                g_ord, m_idx, n_idx = my_tile(i)

                def load_step(kk, slot):
                    if "no_loads" in probe:   # the arrivals the copies would make, no bytes
                        for _ in range(1 + num_b):
                            plgpu.barrier_arrive(loaded.at[slot])
                        return
                    plgpu.copy_gmem_to_smem(a_tile(lo + g_ord, m_idx, kk), a_smem.at[slot],
                                            loaded.at[slot], collective_axes=a_multicast)
                    for j in range(num_b):   # the up tiles start at column n, n_iters tiles on
                        plgpu.copy_gmem_to_smem(
                            b_tile(lo + g_ord + b_offset, n_idx + j * n_iters, kk),
                            b_smem.at[slot * num_b + j], loaded.at[slot],
                            collective_axes=b_multicast)
                return load_step

            tiles.fill_ring(my_tiles, k_iters, stages, consumed, tile_loads)

        @pl.when(wg_idx < wgs)
        def _compute_wg():
            plgpu.set_max_registers(compute_registers, action="increase")
            wg_rows = pl.ds(wg_idx * tm, tm) if by_rows else slice(None)
            wg_cols = slice(None) if by_rows else pl.ds(wg_idx * tn, tn)
            wg_col0 = 0 if by_rows else wg_idx * tn
            if swiglu:   # (gate, up): the same columns of the stage's two B tiles
                acc_shapes = [(tm, tn)] * 2
                acc_b = [(j, wg_cols) for j in range(2)]
            else:
                acc_shapes = [(tm, width) for _, width in chunks]
                acc_b = [(0, wg_cols if len(chunks) == 1 else pl.ds(wg_col0 + off, width))
                         for off, width in chunks]

            def mma(accs, slot):
                """This warpgroup's wgmma groups on the stage in ``slot``."""
                if "no_mma" in probe:
                    return
                if transpose_lhs:
                    a_op = a_smem.at[slot].at[:, wg_rows].transpose((1, 0))
                else:
                    a_op = a_smem.at[slot].at[wg_rows]
                for acc_ref, (j, cols) in zip(accs, acc_b, strict=True):
                    b_op = b_smem.at[slot * num_b + j]
                    if transpose_rhs:
                        b_op = b_op.at[cols, :].transpose((1, 0))
                    else:
                        b_op = b_op.at[:, cols]
                    plgpu.wgmma(acc_ref, a_op, b_op)

            epi = tiles.epilogue_tiles(c)
            defer = min(c.deferred_epi_tiles, len(epi), k_iters)

            def tile_dst(i):
                """dst(epi_mi, epi_ni) of this warpgroup's part of its CTA's i-th tile."""
                g_ord, m_idx, n_idx = my_tile(i)
                return lambda mi, ni: out_epi(lo + g_ord + out_offset, m_idx, n_idx, wg_idx,
                                              mi, ni)

            def store_deferred(i, deferred, j):
                """Stores the j-th deferred epilogue tile of the CTA's i-th tile."""
                e = len(epi) - defer + j
                tiles.store_epilogue_tile(deferred[j], out_smem.at[wg_idx], c, e,
                                          tile_dst(i)(*epi[e]))

            def tile_body(i, deferred):
                """The CTA's i-th tile; ``deferred``: the previous tile's last epilogue tiles,
                stored under this tile's first k-steps (their waits for free slots hidden)."""
                under = [functools.partial(pl.when(i > 0), functools.partial(
                    store_deferred, i - 1, deferred, j)) for j in range(defer)]

                def main_loop(*accs):
                    tiles.consume_ring(functools.partial(mma, accs), i * k_iters, k_iters,
                                       stages, delay, lambda slot: loaded.at[slot], consumed,
                                       under_steps=under)
                    return [acc_ref[...] for acc_ref in accs]

                accs = pl.run_scoped(main_loop, *[plgpu.ACC(shape, jnp.float32)
                                                  for shape in acc_shapes])
                if swiglu:
                    gate, up = accs
                    accs = [gate / (1.0 + jnp.exp(-gate)) * up]   # silu(gate) * up
                return tiles.store_tile(tuple(acc.astype(out_dtype) for acc in accs),
                                        out_smem.at[wg_idx], c, tile_dst(i), defer=defer)

            # before the first tile nothing is deferred (placeholders, never stored)
            no_tile = defer and plgpu.layout_cast(
                jnp.zeros((c.epi_tile_m, c.epi_tile_n), out_dtype), plgpu.Layout.WGMMA)
            deferred = lax.fori_loop(0, my_tiles, tile_body, (no_tile,) * defer)
            for j in range(defer):   # the last tile's
                pl.when(my_tiles > 0)(functools.partial(store_deferred, my_tiles - 1, deferred, j))

            # Zero tiles of the idle output groups, continuing the round-robin of the matmul
            # tiles; each warpgroup stores its part of each.
            def store(g, m_idx, n_idx):
                for epi_mi, epi_ni in epi:
                    plgpu.copy_smem_to_gmem(out_smem.at[wg_idx, 0],
                                            out_epi(g, m_idx, n_idx, wg_idx, epi_mi, epi_ni))

            tiles.store_zero_tiles(
                out_smem.at[wg_idx], jnp.zeros((c.epi_tile_m, c.epi_tile_n), out_dtype), cta,
                num_ctas, num_active * tiles_per_group,
                (num_out_groups - num_active) * tiles_per_group, lo + out_offset, num_active,
                tile_coords, store)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
