"""Tile arithmetic, the output tile's store and the two sides of a hand-written ring of pipeline
stages, shared by the two schedules of the Hopper grouped matmul (the cooperative one in
ring_mgpu.py, the ping-pong one in pingpong_mgpu.py)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.tuning import TuningConfig


def smem_transforms(dtype, minor_elems, max_swizzle: int = 128):
    """Tiling and 128-byte (or narrower) swizzle of a shared-memory tile."""
    swizzle = min(max_swizzle, plgpu.find_swizzle(minor_elems * jnp.dtype(dtype).itemsize * 8))
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))


def operand_transforms(dtype, a_minor_elems, b_minor_elems, a_slice=None, b_slice=None,
                       tile_k=None):
    """(A's, B's) shared-memory transforms with one swizzle, the wider one both minor dims
    allow: Mosaic GPU's wgmma takes its two operands with the same swizzle (layout inference
    fails otherwise). 128 bytes but where a minor dim of 96 or 160 bf16 elements (192, 320
    bytes: B stored n-minor in column tiles sized to the SM count) allows only 64. a_slice,
    b_slice: the width of each warpgroup's slice along that minor dim, where warpgroups split
    a tile along it (a slice must start on a swizzle boundary: 96 columns of a 192-wide tile
    take a 64-byte swizzle). tile_k: the k-step, which bounds it too where an operand is stored
    k-major (k along its rows: wgmma reads such an operand in k-groups of one swizzle's width,
    so 32-element k-steps of bf16 take a 64-byte swizzle; a k-minor operand's minor dim is the
    k-step itself)."""
    widths = (a_minor_elems, b_minor_elems, *(s for s in (a_slice, b_slice, tile_k) if s))
    swizzle = min(plgpu.find_swizzle(e * jnp.dtype(dtype).itemsize * 8) for e in widths)
    return (smem_transforms(dtype, a_minor_elems, swizzle),
            smem_transforms(dtype, b_minor_elems, swizzle))


def tile_coords(lin_idx, per_group: int, iters: tuple[int, int], c: TuningConfig):
    """(group ordinal, m tile, n tile) of work item lin_idx: group major, a planar snake over
    the (m, n) tiles inside a group."""
    g_ord = lax.div(lin_idx, jnp.int32(per_group))
    rem = lax.rem(lin_idx, jnp.int32(per_group))
    m_idx, n_idx = plgpu.planar_snake(rem, iters, c.grid_minor_dim, c.grid_tile_width)
    return g_ord, m_idx, n_idx


def active_range(bounds_gmem, num_groups: int):
    """(lo, hi, b_offset, out_offset) from a kernel's bounds operand: the active groups
    [lo, hi), clipped to [0, num_groups], and the weight and output group offsets."""
    lo = jnp.clip(bounds_gmem[0], 0, num_groups)
    hi = jnp.clip(bounds_gmem[1], lo, num_groups)
    return lo, hi, bounds_gmem[2], bounds_gmem[3]


def round_robin_count(num_items, first, stride):
    """How many of the items first, first + stride, ... lie below num_items."""
    return jnp.maximum(num_items - first + stride - 1, 0) // stride


def operand_tile(gmem, g, idx, kk, size: int, tk: int, k_first: bool):
    """Block idx (``size`` rows of M, or columns of N) by k-step kk (``tk``) of group g of an
    operand stored [G, K, size-dim] (k_first: A with transpose_lhs, B without transpose_rhs) or
    [G, size-dim, K]."""
    mn, ks = pl.ds(idx * size, size), pl.ds(kk * tk, tk)
    return gmem.at[g, ks, mn] if k_first else gmem.at[g, mn, ks]


def zero_work(cta, num_ctas, num_mm, num_zero):
    """(first zero tile, number of zero tiles) of this CTA: the zero tiles continue the
    round-robin where the num_mm matmul tiles stopped, so the CTAs that got one matmul tile
    fewer take the first zero tiles."""
    first = lax.rem(cta - lax.rem(num_mm, num_ctas) + num_ctas, num_ctas)
    return first, round_robin_count(num_zero, first, num_ctas)


def store_zero_tiles(slots_smem, zero_tile, cta, num_ctas, num_mm, num_zero, out_lo, num_active,
                     tile_coords, store):
    """A compute warpgroup's share of the zero tiles of the idle output groups: writes
    ``zero_tile`` into slot 0 of its epilogue slots, then calls ``store(g, m_idx, n_idx)`` for
    each of this CTA's zero items (``zero_work``; g is the output group, the active groups
    [out_lo, out_lo + num_active) skipped), which TMA-stores that slot over its part of the tile."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    slots_smem[0] = zero_tile
    plgpu.commit_smem()
    first, count = zero_work(cta, num_ctas, num_mm, num_zero)

    @pl.loop(0, count)
    def _zero_loop(i):
        q, m_idx, n_idx = tile_coords(first + i * num_ctas)
        store(jnp.where(q < out_lo, q, q + num_active), m_idx, n_idx)


def epilogue_tiles(c: TuningConfig):
    """(epi_mi, epi_ni) of a warpgroup tile's epilogue tiles, in the order they are stored."""
    return [(mi, ni) for mi in range(c.tile_m // c.epi_tile_m)
            for ni in range(c.tile_n // c.epi_tile_n)]


def epilogue_part(chunks, c: TuningConfig, epi_mi, epi_ni):
    """Epilogue tile (epi_mi, epi_ni) of a warpgroup's (tile_m, tile_n) output value, given
    as the values of its wgmma column chunks (``c.n_chunks``; each epilogue tile lies in one)."""
    col = epi_ni * c.epi_tile_n
    for (offset, width), chunk in zip(c.n_chunks, chunks, strict=True):
        if offset <= col < offset + width:
            return chunk[epi_mi * c.epi_tile_m:(epi_mi + 1) * c.epi_tile_m,
                         col - offset:col - offset + c.epi_tile_n]
    raise AssertionError((col, c.n_chunks))


def store_epilogue_tile(part, out_smem_wg, c: TuningConfig, e: int, dst):
    """TMA-stores epilogue tile number e of a warpgroup tile (``part``, already cast) to ``dst``
    through slot e % slots of its shared-memory slots, once the store that last used the slot
    has read it (the stores of a tile go round the slots in order)."""
    slots = c.num_out_slots
    slot = e % slots
    plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
    out_smem_wg[slot] = part
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem_wg.at[slot], dst)


def store_tile(chunks, out_smem_wg, c: TuningConfig, dst, defer: int = 0):
    """TMA-stores a warpgroup's (tile_m, tile_n) tile (already cast; the values of its wgmma
    column chunks, ``c.n_chunks``) through its shared-memory slots, epilogue tile by epilogue
    tile; dst(epi_mi, epi_ni) is the destination in GMEM.
    The last ``defer`` epilogue tiles are not stored but returned (a tuple of values), for
    ``store_epilogue_tile`` to store later."""
    epi = epilogue_tiles(c)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for e, (epi_mi, epi_ni) in enumerate(epi[:len(epi) - defer]):
        store_epilogue_tile(epilogue_part(chunks, c, epi_mi, epi_ni), out_smem_wg, c, e,
                            dst(epi_mi, epi_ni))
    return tuple(epilogue_part(chunks, c, *ij) for ij in epi[len(epi) - defer:])


def fill_ring(num_tiles, k_iters: int, stages: int, consumed, tile_loads):
    """The memory warpgroup's side of a ring of ``stages`` shared-memory stages: the k_iters
    k-steps of each of ``num_tiles`` tiles in order, ring step s into slot s % stages once the
    step that last used the slot has released it (``consumed[slot]``). ``tile_loads(i)`` does
    the i-th tile's own work (its coordinates: once per tile, not per k-step) and returns
    ``load_step(kk, slot)``, which issues k-step kk's TMA copies. Ends by awaiting the last
    releases, so that no barrier is left mid-phase."""

    @pl.loop(0, num_tiles)
    def _tile(i):
        load_step = tile_loads(i)

        @pl.loop(0, k_iters)
        def _load(kk):
            step = i * k_iters + kk
            slot = lax.rem(step, stages)

            @pl.when(step >= stages)
            def _wait_free():
                plgpu.barrier_wait(consumed.at[slot])

            load_step(kk, slot)

    total = num_tiles * k_iters

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _quiesce(step):
        plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])


def consume_ring(mma, first_step, k_iters: int, stages: int, delay: int, loaded, consumed,
                 on_issued=None, under_steps=()):
    """A compute warpgroup's main loop over one tile: ring steps first_step ... + k_iters - 1,
    each awaited on ``loaded(slot)``, multiplied by ``mma(slot)`` (which issues the step's
    wgmma groups on the stage) and released on ``consumed[slot]``; with delay = 1 one wgmma
    group stays in flight and a stage is released a k-step later (so with two groups per step,
    the fused SwiGLU's gate and up, the previous step's are done by then). ``on_issued()``, if
    given, runs once the last k-step's wgmma is issued, before it is awaited. The callables
    ``under_steps`` (at most k_iters) run one per k-step from the first, each once its step's
    wgmma is issued, so that their work overlaps the tensor cores' (those steps are unrolled)."""
    assert len(under_steps) <= k_iters, (len(under_steps), k_iters)

    def k_step(kk, under=None):
        step = first_step + kk
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(loaded(slot))
        mma(slot)
        if under is not None:
            under()
        plgpu.wgmma_wait(delay)
        if not delay:
            plgpu.barrier_arrive(consumed.at[slot])
        else:   # the previous step's wgmma is done: release its stage
            @pl.when(kk > 0)
            def _release_previous():
                plgpu.barrier_arrive(consumed.at[lax.rem(step - 1, stages)])

    for kk, under in enumerate(under_steps):
        k_step(kk, under)
    pl.loop(len(under_steps), k_iters)(k_step)

    if on_issued is not None:
        on_issued()
    if delay:
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(consumed.at[lax.rem(first_step + k_iters - 1, stages)])
