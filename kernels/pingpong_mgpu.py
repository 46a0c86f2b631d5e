"""The ping-pong schedule of the Hopper grouped matmul (``TuningConfig.pingpong``)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import mgpu_tiles as tiles
from kernels.tuning import TuningConfig


def pingpong_kernel(bounds_gmem, a_gmem, b_gmem, out_gmem, *, config: TuningConfig, dims,
                     transpose_lhs: bool, transpose_rhs: bool,
                     probe: frozenset[str] = frozenset()):
    """The ping-pong schedule (``TuningConfig.pingpong``): the two compute warpgroups of a CTA
    work on different (tile_m, tile_n) output tiles (the even and odd tiles of the CTA's share
    of the work list) and take turns on the tensor cores: while one runs the main loop of its
    tile, the other stores its previous one, so the epilogue overlaps the math (CUTLASS's
    ping-pong schedule; cuBLAS's non-cooperative Hopper kernels, by their names). The turns
    make the order in which stages are consumed strict (tile 0's k-steps, then tile 1's, ...),
    so one memory warpgroup fills one ring of stages in that order.

    With ``delay_release = 1`` (``PINGPONG_CONFIG``) a warpgroup keeps one wgmma in flight and
    releases each stage a k-step later; waiting for every k-step's wgmma made the schedule 16-22 %
    slower on the H200. ``select_config`` picks it where its per-warpgroup work items fill the
    SMs' last wave clearly better than the cooperative schedule's CTA tiles
    (eval/results/grouped_matmul_h200.md).

    With ``early_turn`` a warpgroup passes the turn as soon as its main loop's last wgmma is
    issued and then awaits it, as CUTLASS's ping-pong does, so the next main loop's wgmmas queue
    behind it; without, it passes the turn once that wgmma is done.

    Barriers: ``loaded[w * S + slot]`` (A and B of a stage, one set per compute warpgroup, since
    a barrier's phase is tracked by each waiting thread and must see every phase),
    ``consumed[slot]`` (waited on by the memory warpgroup only) and ``turn``, a rendezvous of
    the two compute warpgroups: each passes it after its main loop and after its epilogue, and
    warpgroup 1 once more at the start, so their main loops alternate.

    ``probe``: as in ``ring_mgpu.ring_kernel`` (eval/probe_ring.py only; a wrong product).
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
    out_transforms = tiles.smem_transforms(out_dtype, c.epi_tile_n)

    a_tile = functools.partial(tiles.operand_tile, a_gmem, size=tm, tk=tk,
                               k_first=transpose_lhs)
    b_tile = functools.partial(tiles.operand_tile, b_gmem, size=tn, tk=tk,
                               k_first=not transpose_rhs)

    def out_epi(g, m_idx, n_idx, epi_mi, epi_ni):
        return out_gmem.at[g, pl.ds(m_idx * tm + epi_mi * c.epi_tile_m, c.epi_tile_m),
                           pl.ds(n_idx * tn + epi_ni * c.epi_tile_n, c.epi_tile_n)]

    a_transforms, b_transforms = tiles.operand_transforms(dtype, a_block[1], b_block[1],
                                                          tile_k=tk)

    @functools.partial(
        pl.run_scoped,
        a_smem=plgpu.SMEM((stages, *a_block), dtype, transforms=a_transforms),
        b_smem=plgpu.SMEM((stages, *b_block), dtype, transforms=b_transforms),
        out_smem=plgpu.SMEM((2, c.num_out_slots, c.epi_tile_m, c.epi_tile_n), out_dtype,
                            transforms=out_transforms),
        loaded=plgpu.Barrier(num_arrivals=2, num_barriers=2 * stages),
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        turn=plgpu.Barrier(num_arrivals=2, num_barriers=1),
        collective_axes="wg",
    )
    def _scope(a_smem, b_smem, out_smem, loaded, consumed, turn):
        wg_idx = lax.axis_index("wg")
        lo, hi, b_offset, out_offset = tiles.active_range(bounds_gmem, num_groups)
        num_active = hi - lo
        sm, num_sms = lax.axis_index("sm"), lax.axis_size("sm")
        num_mm = num_active * tiles_per_group
        my_tiles = tiles.round_robin_count(num_mm, sm, num_sms)   # sm, sm + num_sms, ...

        def tile_coords(lin_idx):
            return tiles.tile_coords(lin_idx, tiles_per_group, (m_iters, n_iters), c)

        @pl.when(wg_idx == 2)
        def _memory_wg():
            plgpu.set_max_registers(40, action="decrease")

            def tile_loads(i):
                g_ord, m_idx, n_idx = tile_coords(sm + i * num_sms)
                first_barrier = lax.rem(i, 2) * stages   # the tile's warpgroup's barriers

                def load_step(kk, slot):
                    barrier = loaded.at[first_barrier + slot]
                    if "no_loads" in probe:   # the arrivals the copies would make, no bytes
                        plgpu.barrier_arrive(barrier)
                        plgpu.barrier_arrive(barrier)
                        return
                    plgpu.copy_gmem_to_smem(a_tile(lo + g_ord, m_idx, kk), a_smem.at[slot],
                                            barrier)
                    plgpu.copy_gmem_to_smem(b_tile(lo + g_ord + b_offset, n_idx, kk),
                                            b_smem.at[slot], barrier)
                return load_step

            tiles.fill_ring(my_tiles, k_iters, stages, consumed, tile_loads)

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

                def operands(slot):
                    a_op, b_op = a_smem.at[slot], b_smem.at[slot]
                    return (a_op.transpose((1, 0)) if transpose_lhs else a_op,
                            b_op.transpose((1, 0)) if transpose_rhs else b_op)

                def main_loop(acc_ref):
                    mma = (lambda slot: None) if "no_mma" in probe else (
                        lambda slot: plgpu.wgmma(acc_ref, *operands(slot)))
                    # the other warpgroup's main loop starts: with early_turn once this one's
                    # last wgmma is issued, so the tensor cores never drain between the two
                    tiles.consume_ring(mma, i * k_iters, k_iters, stages, delay,
                                       lambda slot: loaded.at[wg_idx * stages + slot], consumed,
                                       on_issued=rendezvous if c.early_turn else None)
                    return acc_ref[...]

                acc = pl.run_scoped(main_loop, plgpu.ACC((tm, tn), jnp.float32))
                if not c.early_turn:
                    rendezvous()   # once its last wgmma is done
                dst = lambda mi, ni: out_epi(lo + g_ord + out_offset, m_idx, n_idx, mi, ni)
                tiles.store_tile((acc.astype(out_dtype),), out_smem.at[wg_idx], c, dst)
                rendezvous()   # and ends before this one's next main loop

            # Both pass the rendezvous equally often: 2 per tile, and 1 more for warpgroup 1 at
            # the start; the warpgroup with fewer passes makes it up.
            pl.when(lax.rem(my_tiles, 2) == wg_idx)(rendezvous)

            # Zero tiles of the idle output groups, continuing the round-robin of the matmul
            # tiles; the two warpgroups split each tile's epilogue tiles.
            def store(g, m_idx, n_idx):
                for e, (epi_mi, epi_ni) in enumerate(tiles.epilogue_tiles(c)):
                    @pl.when(wg_idx == e % 2)
                    def _store_zero():
                        plgpu.copy_smem_to_gmem(out_smem.at[wg_idx, 0],
                                                out_epi(g, m_idx, n_idx, epi_mi, epi_ni))

            tiles.store_zero_tiles(
                out_smem.at[wg_idx], jnp.zeros((c.epi_tile_m, c.epi_tile_n), out_dtype), sm,
                num_sms, num_mm, (num_out_groups - num_active) * tiles_per_group,
                lo + out_offset, num_active, tile_coords, store)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
