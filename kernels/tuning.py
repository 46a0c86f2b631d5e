"""Block sizes and schedules of the Hopper grouped matmul (grouped_matmul_mgpu.py): the
``TuningConfig`` options, the configs measured on the H200, the per-shape choice
(``select_config``) and what a config cannot serve (``unsupported_reason``)."""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

H100_NUM_SMS = 132  # H100 SXM and H200 SXM.
WGMMA_MAX_N = 256  # the widest wgmma instruction (m64nNk16, N <= 256)
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

    Two schedules: the cooperative one (kernels/ring_mgpu.py: the compute warpgroups share
    each CTA tile, fed by one ring of stages over all of the CTA's tiles) and, with
    ``pingpong``, kernels/pingpong_mgpu.py. tile_m x tile_n is the tile of ONE compute
    warpgroup; the CTA tile is ``compute_wgs`` times as large along ``wg_dimension``
    (cooperative), or the warpgroup tile itself (ping-pong: two warpgroups take a tile each).
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
    # Clusters of 2 CTAs on neighbouring tiles along this dimension, sharing the
    # other operand's tile by TMA multicast (N: the A tile, M: the B tile).
    cluster_dimension: MatmulDimension | None = None
    # Keep this many wgmma groups in flight (0 or 1) before releasing a stage to the memory
    # warpgroup: with 1 a stage is released a k-step later, and the next k-step's wgmma is
    # issued before the last one finishes. Every config select_config picks was measured with
    # 1; on the ring it was level with 0 (six dw products at G = 16, within 0.6 %, run
    # s12_ring_dw_g16_profiled), on ping-pong 0 was 16-22 % slower.
    delay_release: int = 1
    # Shared-memory slots per compute warpgroup for the epilogue's TMA stores:
    # with fewer slots than epilogue tiles the epilogue waits for earlier stores.
    epi_slots: int = 2
    # Cooperative schedule: a warpgroup keeps the last this many epilogue tiles of a tile in
    # registers and stores them under the next tile's first k-steps, one per k-step, so their
    # waits for free slots overlap the tensor cores' work (each costs registers: 16 per thread
    # for a 64 x 64 bf16 tile).
    deferred_epi_tiles: int = 0
    # Ping-pong schedule (kernels/pingpong_mgpu.py): the two compute warpgroups work on different
    # (tile_m x tile_n) tiles and take turns on the tensor cores, each one's epilogue
    # overlapping the other's main loop.
    pingpong: bool = False
    # Ping-pong: pass the turn on the tensor cores once the main loop's last wgmma is issued
    # (CUTLASS's order), not once it is done, which drains the tensor cores between the two
    # warpgroups' main loops. H200 (run s15_pingpong_turn_*): faster or level on 8 of 12
    # products by device time (up to 1 %), faster on 11 of 12 by wall clock.
    early_turn: bool = True
    # Compute warpgroups of a cooperative CTA (2 or 3; three split the rows). 192-row CTA tiles
    # divide the diagonal shapes' m = 1152 / 4224 and change the tile count: 1b o at G = 1 gets
    # 96 tiles of 192 x 128 where 128 x 256 gives 72 for 132 SMs, 8b gate/up 52800 tiles of
    # 192 x 192 at G = 16 (400 full waves). (64 x 96 warpgroup tiles, cuBLAS's 192 x 96, lower
    # with B stored n-minor only with a 64-byte swizzle on both operands: SM_FIT_VARIANTS.)
    compute_wgs: int = 2
    # The widest wgmma a warpgroup issues (<= WGMMA_MAX_N): a wider warpgroup tile keeps its
    # accumulator in column chunks of this width and the remainder (n_chunks).
    wgmma_n: int = WGMMA_MAX_N

    @property
    def num_compute_wgs(self) -> int:
        return 2 if self.pingpong else self.compute_wgs

    @property
    def _split(self) -> int:
        """Warpgroups sharing a CTA tile: compute_wgs (cooperative), 1 with ping-pong."""
        return 1 if self.pingpong else self.compute_wgs

    @property
    def cta_tile_m(self) -> int:
        return self.tile_m * (self._split if self.wg_dimension == MatmulDimension.M else 1)

    @property
    def cta_tile_n(self) -> int:
        return self.tile_n * (self._split if self.wg_dimension == MatmulDimension.N else 1)

    @property
    def n_chunks(self) -> tuple[tuple[int, int], ...]:
        """(column offset, width) of each wgmma accumulator of a warpgroup tile: one unless
        tile_n exceeds ``wgmma_n``, then chunks of that width and the remainder."""
        return tuple((off, min(self.wgmma_n, self.tile_n - off))
                     for off in range(0, self.tile_n, self.wgmma_n))

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
        out = (self.num_compute_wgs * self.num_out_slots * self.epi_tile_m * self.epi_tile_n
               * out_itemsize)
        return pipe + out + 1024  # barriers and alignment slack


# Every cooperative config runs on one hand-written ring of stages over all of a CTA's tiles
# (kernels/ring_mgpu.py), which chains the tiles at any number of k-steps, with one wgmma group
# in flight. Until the runs s14_* a second implementation ran them on JAX's pipelines
# (plgpu.emit_pipeline_warp_specialized; tiles chained by a pipeline of pipelines only where
# the k-steps were a multiple of the stages, without the delayed release). H200 A/B, device
# time (eval/results/grouped_matmul_h200.md, runs s12_* to s14_*), ring against it:
# - dw, whose reduction runs over the diagonal's rows (18 / 34 / 66 k-steps, which the
#   pipelines could not chain): faster on every product but gate/up (level), e.g. 1b qkv dw
#   314-316 vs 322-349 us at G = 16, 1b gate_up dw 114-115 vs 134 us at G = 1;
# - forward and dx on the default tiles: 0.5-2.2 % faster in 11 of 12 forward comparisons
#   (3b / 8b, G = 16), level on dx (-1.0 to +0.9 %) and at G = 4, 8;
# - 192 x 192 tiles (1b, G = 16) -2.4 to +0.4 %; in 2-CTA clusters along n (8b qkv / gate_up
#   forward at G = 1, 8, 16) within 0.5 %, but 8b gate_up at G = 8, where the pipelines' two
#   timings differed by 4.3 % and the ring's fell between them;
# - 192 x 128 tiles at G = 1 (the eight few-tile products select_config gives them): level on
#   six, 1b qkv dw 23 vs 24 us, 3b o dw 56-57 vs 59 us;
# - the fused SwiGLU at G = 16: 1.8 % (1b), 1.9 % (3b), 0.7-1.0 % (8b) faster; level at G = 1.
# The 128 x 128 tiles (NARROW_CONFIG; no diagonal shape takes them) were not timed on it.
# CTA tile 128 x 256, 4 stages, one wgmma group in flight; the last of a warpgroup's 4 epilogue
# tiles stored under the next tile's first k-step: faster than storing it in the epilogue on 15
# of the 16 forward / dx products at G = 16 where both ran this tile, by 0.1-1.0 % (run
# s15_parity_all; the 16th, 8b gate_up dx, 4.5 % slower by device time, faster by wall clock),
# and faster or level on all 9 in a repeat (run s17_defer, by 0-1.9 %).
DEFAULT_CONFIG = TuningConfig(deferred_epi_tiles=1)
NARROW_CONFIG = TuningConfig(tile_n=64, max_concurrent_steps=5)  # 128 x 128
# Fused SwiGLU (gate and up tiles per k-step): 128 x 128 output tiles, each warpgroup
# 64 rows with a gate and an up accumulator (64 x 128 each), 4 stages of 48 KiB.
SWIGLU_CONFIG = TuningConfig(tile_m=64, tile_n=128, wg_dimension=MatmulDimension.M)
# Ping-pong: 128 x 128 tiles per warpgroup, 6 stages (cuBLAS's nvjet ..._128x128_64x6 shape),
# one wgmma group in flight (without it the schedule ran at 0.82-0.86x of this one on the H200).
PINGPONG_CONFIG = TuningConfig(pingpong=True, max_concurrent_steps=6)
# Three compute warpgroups of 64 x 128 rows (192 x 128 CTA tiles, 4 stages), and how much less
# time ``tile_cost`` must promise before select_config picks them over the default.
THREE_WG_CONFIG = TuningConfig(tile_m=64, tile_n=128, wg_dimension=MatmulDimension.M,
                               compute_wgs=3)
THREE_WG_MAX_COST_RATIO = 0.85
# 192 x 192 CTA tiles of three 64 x 192 warpgroups (one epilogue slot each, for shared memory).
# select_config takes them for the forward and dx products with whole 192-row tiles where
# ``tile_cost`` promises at most the default's time and the product spans at least
# WIDE_THREE_WG_MIN_WAVES waves of default tiles: where they were measured faster (the 1b shapes
# at G = 16, three runs; 1b gate_up at G = 2, 4 and down dx at G = 4, 8, one run), and not where
# they were slower (3b / 8b at G = 16: ragged rows or cost 1.01-1.04; dw). Off full load
# (select_config's rule 7) it also takes them wherever tile_cost promises no more than its other
# choice's time, ragged rows and few waves included: measured 1.02-1.30x the choice before on
# every forward and dx product of the 1b / 3b shapes where that rule changed it (runs
# s18_wide_small_g, s18_wide_select, s18_wide_fwd, s19_wide_rest; the last: forward 1b down at
# G = 2, 4, 8: 1.30x, 1.04x, 1.06x; 1b gate_up at G = 1: 1.02x), and
# slower where the cost was higher (1b at G = 1: cost 1.5-1.8, runs s7_* / s8_*; forward 1b
# qkv at G = 2 and 3b gate_up at G = 4, 8: cost 1.07-1.13, 0.90-0.97x).
# Their one slot makes each of a warpgroup's three epilogue stores wait for the last one's: the
# third is stored under the next tile's first k-step (deferred_epi_tiles=1), which made the 1b
# qkv / o forward and dx products at G = 16 1-2 % faster (run s15_defer_1b; the default 128 x
# 256 tiles deferring 2 or 4 of their 4 epilogue tiles were 4-10 % slower, run s15_defer_3b8b).
WIDE_THREE_WG_CONFIG = TuningConfig(tile_m=64, tile_n=192, wg_dimension=MatmulDimension.M,
                                    compute_wgs=3, epi_slots=1, deferred_epi_tiles=1)
WIDE_THREE_WG_MIN_WAVES = 8
# The 192 x 192 tiles in 2-CTA clusters, as cuBLAS runs on every diagonal shape (..._2x1 / _1x2 in
# its kernel names): neighbouring column tiles sharing the A tile by TMA multicast (needs an even
# number of column tiles), or neighbouring row tiles sharing the B tile. select_config takes the
# first (along n) where the 192 x 192 tiles qualify but tile_cost puts them above the default's
# time by at most WIDE_CLUSTER_MAX_COST_RATIO: on the H200 it was 1.6-8.0 % faster than the
# default on the 8b qkv and gate/up forward products (G = 1, 8, 16; two runs at G = 16), and
# 0.6-1.9 % slower where the cost is 1.037 (8b o, down). Along m (the only cluster that pairs
# 8b down dx's 75 column tiles) it won on 8b down dx in one run (+4.1 %), lost in the next
# (-1.4 %; identical configs differed by up to 2.8 % in that run), won by 2.6 % in run
# s17_mlp8b_cm and was level in 9 rounds (s17_down_dx_cm: -0.4 % at G = 16, +0.7 % at G = 4):
# not chosen. On the 1b shapes neither beat the unclustered tiles (runs s11_*).
# Without deferred epilogue tiles: with them, the clustered interpret-mode test hung in about
# 1 of 15 runs on 2 CPU cores (unsupported_reason refuses the pair; see there).
WIDE_CLUSTER_CONFIGS = tuple(
    dataclasses.replace(WIDE_THREE_WG_CONFIG, cluster_dimension=dim, deferred_epi_tiles=0)
    for dim in (MatmulDimension.N, MatmulDimension.M))
WIDE_CLUSTER_N_CONFIG = WIDE_CLUSTER_CONFIGS[0]
WIDE_CLUSTER_MAX_COST_RATIO = 1.01
# The three-warpgroup configs the benchmark (eval/bench_grouped_matmul.py) and the GPU tests try
# by name: 192 x 128, 192 x 192 unclustered and clustered, and 192 x 192 with 3 stages, which
# leaves shared memory for 2 or 3 epilogue slots per warpgroup (4 stages leave room for one, so
# a 64 x 192 warpgroup tile's TMA stores queue). Not chosen by select_config unless named
# above: the 3-stage ones were slower than select_config's choice on 8 of 10 products at G = 16
# (1b, 8b; run s10_wg3_epilogue). 192 x 256 tiles (three 64 x 256 warpgroups, 3 stages; plain and
# clustered along n), for whole column tiles at n = 4096, lowered for CUDA and computed correctly
# in interpret mode but failed both GPU tests on the H200 before any timing: removed.
THREE_WG_VARIANTS = {
    "wg3_192x128": THREE_WG_CONFIG,
    "wg3_192x192": WIDE_THREE_WG_CONFIG,
    **{f"wg3_192x192_s3e{slots}": dataclasses.replace(
        WIDE_THREE_WG_CONFIG, max_concurrent_steps=3, epi_slots=slots) for slots in (2, 3)},
    # 2-CTA clusters along n / m (WIDE_CLUSTER_CONFIGS): "wg3_192x192_cn", "wg3_192x192_cm".
    **{f"wg3_192x192_c{c.cluster_dimension.name.lower()}": c for c in WIDE_CLUSTER_CONFIGS},
}
# 192 x 192 CTA tiles of two warpgroups splitting the columns (192 x 96 each): cuBLAS's kernel
# for 8b down dx at G = 16 (nvjet ..._192x192_64x4_1x2_h_bz_coopB: 4 stages, the consumer
# warpgroups splitting B), where select_config's 128 x 256 tiles run at 0.973x of it (median of
# 11 runs, grouped_matmul_h200.parity.md) and three warpgroups of 64 x 192 at 0.95-0.98x, plain
# or in clusters along m (runs s17_defer, s17_mlp8b_cm, s17_down_dx_cm). Each warpgroup keeps 192
# x 96 accumulators, 144 registers a thread (the default's 128 x 128: 128). With b stored
# n-minor (forward, dw) the 96-column slices take a 64-byte swizzle on both operands (mgpu_tiles.
# operand_transforms). Correct on the H200 (its GPU test), but 0.83-0.92x select_config's choice
# on the ten G = 16 products timed (run s20_split_cols). Its deferred epilogue tile (one 64 x 32
# of nine) costs it 6 % there; without it, in 2-CTA clusters along m, it was level with that
# choice on 8b down dx and 0.93x on 8b gate_up dx (run s20_wg2_variants, the wg2_* configs of
# eval/bench_grouped_matmul.py). A warpgroup's three 64-row wgmmas a k-step each read its 96
# columns of B, and both warpgroups read all of A: 0.026 operand elements from shared memory
# per multiply-add, against 0.023 (default) and 0.021 (three warpgroups of 64 x 192); counted,
# not profiled. Not chosen by select_config.
COLUMN_SPLIT_VARIANTS = {
    "wg2_192x192": TuningConfig(tile_m=192, tile_n=96, wg_dimension=MatmulDimension.N,
                                epi_tile_n=32, deferred_epi_tiles=1),
}
# Column tiles sized to the SM count: at G = 1 cuBLAS runs 192 x 96 tiles on 1b o and o dx (6 x
# 22 = 132 tiles, one full wave, against 96 of 192 x 128) and 128 x 160 on 1b qkv dx, gate_up dx
# and down, where the kernel's tiles fill 0.73 of a wave and it runs at 0.79-0.85x of cuBLAS
# (run s17_g1_all). 32-column epilogue tiles (64 does not divide 96 or 160). With b stored
# n-minor (forward, dw) they take a 64-byte swizzle on both operands (mgpu_tiles.
# operand_transforms); so they compute correctly on the H200 (test_gpu_column_tiles_sized_to_
# the_sms) but ran at 0.65-0.90x (128 x 160) and 0.61-0.86x (192 x 96) select_config's choice
# on every 1b / 3b forward and dw product at G = 1, 2 (run s19_smfit_fwd): used for dx only.
# On the H200 (run s18_smfit, device time against select_config's choice before them):
# 128 x 160 was 1.12-1.13x on 1b qkv / o / gate_up dx at G = 1 (tile_cost 0.83 of the 192 x 128
# tiles'), 1.00-1.02x on 3b qkv / o / gate_up dx at G = 1 (cost 0.94 of the default's), 1.10x
# on 3b down dx (cost 0.88), 0.90x on 1b down dx at G = 1 (cost 1.11) and 0.87-0.96x on every
# 1b / 3b dx product at G = 16 (cost 1.02-1.05). select_config takes it for dx where tile_cost
# promises at most SM_FIT_MAX_COST_RATIO of its other choice's time; so chosen (run
# s18_smfit_select) it was 1.13-1.18x the choice before on 1b qkv / o / gate_up dx at G = 1, 2,
# 1.01-1.09x on 3b qkv / o / down dx at G = 1 and qkv / o dx at G = 2, and 0.987-0.988x on 3b
# gate_up dx (k = 16384) at G = 1, 2. 192 x 96 was slower than 128 x 160 on 7 of the 8 dx
# products at G = 1 (faster on 1b o dx, 16 against 17 us) and on all 8 at G = 16: not chosen.
SM_FIT_VARIANTS = {
    "wg3_192x96": TuningConfig(tile_m=64, tile_n=96, wg_dimension=MatmulDimension.M,
                               compute_wgs=3, epi_tile_n=32, epi_slots=2),
    "wg2_128x160": TuningConfig(tile_m=64, tile_n=160, wg_dimension=MatmulDimension.M,
                                epi_tile_n=32, epi_slots=2),
}
SM_FIT_DX_CONFIG = SM_FIT_VARIANTS["wg2_128x160"]
SM_FIT_MAX_COST_RATIO = 0.94
# The default tiles in row stripes of ROW_STRIPE_TILES row tiles walked along n (planar snake,
# minor dimension m), where a group spans at least ROW_STRIPE_MIN_ROW_TILES row tiles (the 8b
# shapes' m = 4224: 33; 3b: 17, 1b: 9). The default order walks one column tile down all rows,
# so a wave of 132 tiles reads 33 row panels of A and 4 column panels of B; in stripes of 12
# rows it reads 12 and 11, and a stripe's 12 A panels can stay in the L2 cache while it moves
# along n (Nsight Compute, run s22_ncu_rows: 8.2 GB of DRAM read per 8b down dx call against
# 12.0 in the default order and 7.3 for cuBLAS; 8b down dw 11.9 against 26.2 and 9.3).
# At full load the 8b products run at the H200's power limit, where the clock follows the energy
# per cycle and DRAM traffic is a part of it (Nsight Compute, runs s21_ncu_*: the default order
# read 12.4-13.2 GB of DRAM per 8b down dx call, cuBLAS 7.1-7.2 GB, and ran 0.3-0.5 % more
# cycles than cuBLAS at a 3-4 % lower clock). Sustained-load A/B (eval/sustained_ab.py,
# seconds of back-to-back calls per window, runs s21_sustained*), against cuBLAS, default
# order -> row stripes of 12:
# 8b down dx 0.984-0.988 -> 1.000-1.003, 8b down 0.997-1.000 -> 1.009-1.010, gate_up dx
# 1.011-1.013 -> 1.022-1.027, o dx 1.004 -> 1.014, qkv dx 1.003 -> 1.012, o 0.993 -> 1.004; on
# the 3b shapes 0.4-0.5 % slower (gate_up dx, down): not taken there. Stripes of 8 and 16 rows
# and of 4, 8, 12 columns walked down m were slower than 12 rows on 8b down dx and down (4
# columns by 0.1-0.6 %), but 4 columns were 0.6-0.7 % faster on 8b gate_up dx: one rule for
# all. Measured at G = 16 only.
ROW_STRIPE_TILES = 12
ROW_STRIPE_MIN_ROW_TILES = 24
ROW_STRIPE_CONFIG = dataclasses.replace(DEFAULT_CONFIG, grid_minor_dim=MatmulDimension.M,
                                        grid_tile_width=ROW_STRIPE_TILES)
# dw products (x^T @ dy) take the row stripes where the k x m operand (the diagonal step's
# token rows times dw's rows) holds at least DW_ROW_STRIPE_MIN_LHS_ELEMENTS: 3b down dw (17.0 Mi
# elements) and the 8b dw products (16.5-57.8 Mi), not 1b down dw (9.0 Mi) or the 3b attention
# and gate/up dw (6.4 Mi). Sustained-load A/B at G = 16 (runs s22_dw_orders*), against cuBLAS,
# default order -> row stripes of 12: 8b down dw 0.925 -> 0.991 (clock 1281 -> 1399 MHz at
# 696 -> 693 W, cuBLAS 1434), 3b down dw 0.951 -> 0.984, 8b qkv dw 0.992 -> 0.999, o dw 0.994
# -> 0.999, gate/up dw 1.016 -> 1.020; below the threshold they were 0.3-1.8 % slower (3b o,
# gate/up; 1b down, gate/up) or 0.6 % faster (3b qkv dw). The threshold lies between the two
# sets (9.0 and 16.5 Mi); measured on bf16 at G = 16 only.
DW_ROW_STRIPE_MIN_LHS_ELEMENTS = 12 * 2**20
# dw products reduce over the diagonal step's rows: 18 / 34 / 66 k-steps (1b / 3b / 8b), short
# loops beside which a tile's epilogue (4 epilogue tiles per warpgroup) weighs much more than
# on the forward and dx products (128-448 k-steps). On the default tiles and the row stripes
# they store all 4 under the next tile's first 4 k-steps. Sustained-load A/B at G = 16 against
# cuBLAS (run s23_dw_defer), 1 deferred tile -> 4: 1b qkv / o / gate_up / down dw 0.984 /
# 1.004 / 0.960 / 0.955 -> 1.020 / 1.023 / 1.014 / 0.990, 3b qkv / o / gate_up dw 0.987 /
# 0.991 / 0.993 -> 1.018 / 1.018 / 1.031; in row stripes 3b down dw 0.978 -> 1.013, 8b qkv /
# o / gate_up / down dw 0.982 / 0.993 / 1.022 / 0.992 -> 1.009 / 1.009 / 1.041 / 1.010
# (the default order deferring 4 on 8b down dw: 0.930). On the forward and dx products 2 or 4
# deferred tiles were 4-10 % slower (run s15_defer_3b8b). Measured at G = 16 only.
DW_DEFERRED_EPI_TILES = 4
# Rule 9 in the default order up to s25: the default's split of the 128 x 256 CTA tile by
# columns, each warpgroup 128 x 128 (two 64 x 128 wgmma per k16, each reading the warpgroup's B
# slice again).
DW_COLUMN_SPLIT_CONFIG = dataclasses.replace(DEFAULT_CONFIG,
                                             deferred_epi_tiles=DW_DEFERRED_EPI_TILES)
# The default's CTA tiles split by rows: each warpgroup one 64 x 256 wgmma per k16 (CUTLASS's
# cooperative split), which reads a sixth less shared memory per k-step. Level or slower on the
# forward and dx products (run s26_rows_fwd); dw's choice in the default order.
ROW_SPLIT_CONFIG = dataclasses.replace(DEFAULT_CONFIG, tile_m=64, tile_n=256,
                                       wg_dimension=MatmulDimension.M)
# Since s26 rule 9 takes the row split in the default order.
# Sustained-load A/B at G = 16, column split -> row split, speed against cuBLAS (runs
# s26_rows_dw, s26_rows_all_dw): 1b qkv dw 1.001 / 1.006 -> 1.018 / 1.027, o 1.019 / 1.010 ->
# 1.026 / 1.028, gate_up 1.019 -> 1.029, down 0.996 / 1.000 -> 1.007 / 1.012, 3b qkv 1.009 /
# 1.012 -> 1.020 / 1.022, o 1.019 -> 1.028, gate_up 1.035 / 1.029 -> 1.037 / 1.037. In row
# stripes the split made no difference (3b down and the 8b dw products: -0.8 to +0.9 % in two
# runs, s26_rows_dw_stripes and s26_rows_all_dw), so the stripes keep the column split; on the
# forward and dx products on the default tiles it was level or slower (0.98-1.00x, seven
# products, run s26_rows_fwd). Measured at G = 16 only.
DW_CONFIG = dataclasses.replace(ROW_SPLIT_CONFIG, deferred_epi_tiles=DW_DEFERRED_EPI_TILES)
# 128 x 320 CTA tiles split by rows: each warpgroup 64 x 320, one 64 x 256 and one 64 x 64 wgmma
# per k16 into two accumulators (160 registers a thread; TuningConfig.n_chunks), 3 stages of
# 56 KiB. For 3b qkv (n = 5120 = 16 x 320) at G = 16: 4352 tiles fill 33 waves of 132 SMs to
# 99.9 %, the default's 5440 fill 42 to 98.1 % (tile_cost 0.982 of the default's); cuBLAS runs
# it on 128 x 160 tiles (65.9 waves). "_k32": k-steps of 32 in 6 stages (as many bytes in
# flight, twice the barrier waits); "_dw": on dw, 2 of a warpgroup's 5 epilogue tiles deferred;
# "_n192": chunks of 192 + 128 columns (a 64 x 64 wgmma reads 4 KiB of shared memory per
# 64 cycles, both warpgroups together 128 B a cycle, all the SM has; 192 + 128: 96, as the
# default's column split), "_n192_d0": without the deferred epilogue tile (16 registers less).
# Under sustained load on 3b qkv (runs s28_wide, s28_wide_n192), speed against cuBLAS: "auto"
# 0.999 / 0.991, these 0.914, 0.875, 0.868, 0.890 and 0.987 (2.7 % more cycles than "auto" at a
# higher clock); on 3b qkv dw "auto" 1.022, these 0.958 / 0.859 / 0.964. Not chosen: the slots
# the fill saves are lost to 3 stages and, with a deferred tile, to register pressure.
WIDE_ROW_SPLIT_CONFIG = dataclasses.replace(ROW_SPLIT_CONFIG, tile_n=320, max_concurrent_steps=3)
WIDE_ROW_SPLIT_VARIANTS = {
    "rows_128x320": WIDE_ROW_SPLIT_CONFIG,
    "rows_128x320_k32": dataclasses.replace(WIDE_ROW_SPLIT_CONFIG, tile_k=32,
                                            max_concurrent_steps=6),
    "rows_128x320_dw": dataclasses.replace(WIDE_ROW_SPLIT_CONFIG, deferred_epi_tiles=2),
    "rows_128x320_n192": dataclasses.replace(WIDE_ROW_SPLIT_CONFIG, wgmma_n=192),
    "rows_128x320_n192_d0": dataclasses.replace(WIDE_ROW_SPLIT_CONFIG, wgmma_n=192,
                                                deferred_epi_tiles=0),
}
DW_ROW_STRIPE_CONFIG = dataclasses.replace(ROW_STRIPE_CONFIG,
                                           deferred_epi_tiles=DW_DEFERRED_EPI_TILES)
# How much better the ping-pong schedule must fill the last wave of tiles than the default one
# before select_config picks it: at equal fill it ran 1-2 % slower (3b qkv/o, 1b gate_up).
PINGPONG_MIN_WAVE_GAIN = 0.025


def wave_fill(work_items: int, num_sms: int) -> float:
    """Fraction of the SMs' time slots that hold work when ``work_items`` equal items are
    dealt round-robin to ``num_sms`` SMs (1.0: the last wave is full)."""
    waves = pl.cdiv(work_items, num_sms)
    return work_items / (waves * num_sms) if work_items else 1.0


def _num_tiles(config: TuningConfig, num_groups: int, m: int, n: int) -> int:
    return num_groups * pl.cdiv(m, config.cta_tile_m) * pl.cdiv(n, config.cta_tile_n)


def tile_fill(config: TuningConfig, num_groups: int, m: int, n: int, num_sms: int) -> float:
    """``wave_fill`` of a config's work items (its CTA tiles) over ``num_groups`` m x n outputs."""
    return wave_fill(_num_tiles(config, num_groups, m, n), num_sms)


def tile_cost(config: TuningConfig, num_groups: int, m: int, n: int, num_sms: int) -> int:
    """A time model: waves of CTA tiles (every SM works through its tiles one after another)
    times the CTA tile's area (a tile's time, all tiles alike, ragged ones included)."""
    waves = pl.cdiv(_num_tiles(config, num_groups, m, n), num_sms)
    return waves * config.cta_tile_m * config.cta_tile_n


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
    """Block sizes and schedule for one problem (G, M, K, N) on an H100/H200, by rules fitted
    to profiled A/B runs on an H200 (device time; eval/results/grouped_matmul_h200.md has
    every run, the constants' comments above the figures behind each rule). Every config
    but ping-pong runs on the ring of stages (kernels/ring_mgpu.py). In order:

    1. ``NARROW_CONFIG`` (128 x 128 tiles) where n is no multiple of 256 but of 128.
    2. ``THREE_WG_CONFIG`` (192 x 128 tiles of three warpgroups) where ``tile_cost`` promises
       at most ``THREE_WG_MAX_COST_RATIO`` of the default's time: few-tile products (1.2-1.3x
       the default's speed at G = 1), of which rules 6 and 7 leave 1b o and down at G = 1 and
       the 1b qkv and 3b o dw at G = 1.
    3. Forward and dx products with whole 192-row tiles spanning >= ``WIDE_THREE_WG_MIN_WAVES``
       waves of default tiles: ``WIDE_THREE_WG_CONFIG`` (192 x 192 tiles) where
       ``tile_cost`` is at most the default's (the 1b shapes at G = 16), else
       ``WIDE_CLUSTER_N_CONFIG`` (the same tiles in 2-CTA clusters) where
       it is at most ``WIDE_CLUSTER_MAX_COST_RATIO`` of it and the column tiles pair up (8b qkv
       and gate/up).
    4. ``PINGPONG_CONFIG`` for forward products where its half-size work items fill the last
       wave of tiles at least ``PINGPONG_MIN_WAVE_GAIN`` better than the default's (3b qkv
       at G = 2, 4, 3b gate_up at G = 1, 2, 3b o and down at G = 4, 8 after rule 7); at
       equal fill it ran 1-2 % slower.
    5. Otherwise ``DEFAULT_CONFIG``: 128 x 256 tiles, 4 stages, one wgmma group in flight,
       the last epilogue tile of each warpgroup stored under the next tile's first k-step.
    6. For dx products, ``SM_FIT_DX_CONFIG`` (128 x 160 tiles) in place of
       the choice above where ``tile_cost`` promises at most ``SM_FIT_MAX_COST_RATIO`` of its
       time: the 1b qkv / o / gate_up and the 3b dx products at G = 1, whose tiles above
       fill the last wave poorly (at G = 2 rule 7 takes them on).
    7. For forward and dx products, ``WIDE_THREE_WG_CONFIG`` (192 x 192 tiles) in place of
       the choice above (unless that is the same tiles in clusters) where ``tile_cost``
       promises no more than its time, with ragged rows and at any number of waves (where rule
       3 asks for whole rows and 8 waves): the 1b dx products at G = 2-8 (1b down dx also at
       G = 1), the 3b dx products at G = 2 and all but down at G = 4; forward 1b o and down at
       G = 2-8, 1b qkv at G = 4 and 8, 1b gate_up at G = 1, 3b o and down at G = 2. Bigger
       tiles run faster per area than the cost model counts: at equal cost the 192 x 192
       tiles were 2-8 % faster (runs s18_wide_select, s18_wide_fwd, s19_wide_rest).
    8. For forward and dx products on the default tiles, ``ROW_STRIPE_CONFIG`` (the same tiles
       in row stripes of 12 tiles walked along n) where a group spans at least
       ``ROW_STRIPE_MIN_ROW_TILES`` row tiles: the 8b shapes, whose operands outgrow the L2
       cache; 0.9-1.6 % faster than the default order under sustained load at G = 16. For dw
       products the same where the k x m operand holds at least
       ``DW_ROW_STRIPE_MIN_LHS_ELEMENTS``: the 8b dw products and 3b down dw, 0.4-7.1 % faster.
    9. For dw products on the default tiles or the row stripes, ``DW_CONFIG`` or
       ``DW_ROW_STRIPE_CONFIG``: all ``DW_DEFERRED_EPI_TILES`` epilogue tiles of a warpgroup
       stored under the next tile's first k-steps (dw's k-loops are short); 1.6-5.6 % faster
       than deferring one under sustained load at G = 16. In the default order (since s26) the
       CTA tile is split by rows, a 64 x 256 wgmma per warpgroup: 0.2-2.1 % faster than the
       column split under sustained load at G = 16 (runs s26_rows_dw, s26_rows_all_dw).

    At full load (G = 16), under sustained load (eval/sustained_ab.py: seconds of back-to-back
    calls per config; run s22_sustained_fwd_dx), this runs at or above cuBLAS's speed on 23 of
    the 24 forward and dx products of the Llama-1B/3B/8B diagonal shapes (1.006-1.036x) and at
    0.996-0.997x on 3b qkv. Of the 12 dw products, over every sustained run that timed today's
    choice (grouped_matmul_h200.parity.md), 11 were at or above cuBLAS in every run and 1b down
    dw ran at 0.997-1.012x over four runs (before the row split: 0.985-0.997x in every run,
    s23-s25). On 1b qkv / o dw, 0.2-0.4 ms a call, the GPU idled 14-19 % of a traced loop's
    time between calls (run s23_sustained_trace; with 8 products per dispatch the short
    products read 0.985-1.007x on the column split, run s24_sustained_chain). In device time
    of bursts, on the column split, cuBLAS led the dw products by 0-6 % at G = 1 and 4 (run
    s23_dw_small_g; the row split is not timed there). Nsight Compute counted 2.5-5.9 % more
    cycles than cuBLAS on 1b qkv / down and 3b qkv dw on the column split, at a 2.4-3.6 %
    higher clock (run s24_ncu_dw); its compute warps waited on a stage's loads at 13.5 % of the
    sampled stalls on 1b down dw, cuBLAS's at about 1 % (run s25_ncu_source), and without its
    loads it ran at 1.08-1.24x cuBLAS's speed (eval/probe_ring.py, run s25_probe_ring). Device
    time of bursts of 10 calls reads a few percent noisier
    (eval/results/grouped_matmul_h200.parity.md: every H200 run). Tried and not chosen (within
    noise or slower): 3 stages, unchained tiles (on JAX's pipelines), 128 x 128 tiles with 4 or
    6 stages (cuBLAS's choice for the 1b attention shapes), 256 x 128 and row-split 128 x 192
    tiles, other tile orders (also on the 8b products, run s17_grid8b; with rule 9 on 1b qkv /
    down and 3b qkv dw, run s24_dw_orders), clusters on the default tiles (also on the ring), a
    whole staged epilogue tile, 192 x 192 tiles with 3 stages, 64 x 32 epilogue tiles, 2 or 4
    deferred epilogue tiles on forward and dx, ping-pong on dw, CTAs of one compute warpgroup
    (0.71-0.79x; removed), 192 x 256 tiles (failed on the GPU; removed), 192 x 192 tiles of two
    warpgroups splitting the columns (COLUMN_SPLIT_VARIANTS), 2-CTA clusters and 192 x 192 tiles
    on dw (runs s20_dw_cluster*); on rule 9's dw tiles (column split), k-steps of 32 in 8
    stages, no wgmma group in flight, 128 x 128 tiles in 6 stages, 2-CTA clusters (runs
    s25_dw_feed*: 0.76-1.00x) and L2 prefetches ahead of the ring (run s25_dw_prefetch:
    0.91-0.94x); the default tiles split by rows on forward and dx (run s26_rows_fwd:
    0.98-1.00x); 128 x 320 tiles on 3b qkv (WIDE_ROW_SPLIT_VARIANTS, their last wave 99.9 %
    full: 0.87-0.99x cuBLAS where "auto" read 0.99-1.00x, runs s28_wide*); and a second,
    narrow kernel picked per call by ``lax.cond`` (1b o, 1 of 16 groups active: 51 TF/s
    against 191).
    """
    num_sms = num_sms_of_device() if num_sms is None else num_sms
    a_shape = (num_groups, k, m) if transpose_lhs else (num_groups, m, k)
    b_shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
    serves = lambda c: fills_tile(m, c) and unsupported_reason(
        a_shape, b_shape, dtype, dtype, config=c, transpose_lhs=transpose_lhs,
        transpose_rhs=transpose_rhs) is None
    cost = lambda c: tile_cost(c, num_groups, m, n, num_sms)
    choice = _choose_by_tile_fill(num_groups, m, n, transpose_lhs, transpose_rhs, num_sms,
                                  serves, cost)
    if (transpose_rhs and not transpose_lhs   # dx
            and cost(SM_FIT_DX_CONFIG) <= SM_FIT_MAX_COST_RATIO * cost(choice)
            and serves(SM_FIT_DX_CONFIG)):
        choice = SM_FIT_DX_CONFIG
    if (not transpose_lhs and choice not in WIDE_CLUSTER_CONFIGS
            and cost(WIDE_THREE_WG_CONFIG) <= cost(choice) and serves(WIDE_THREE_WG_CONFIG)):
        choice = WIDE_THREE_WG_CONFIG
    if choice == DEFAULT_CONFIG and (
            pl.cdiv(m, DEFAULT_CONFIG.cta_tile_m) >= ROW_STRIPE_MIN_ROW_TILES if not transpose_lhs
            else m * k >= DW_ROW_STRIPE_MIN_LHS_ELEMENTS):
        choice = ROW_STRIPE_CONFIG
    if transpose_lhs and choice in (DEFAULT_CONFIG, ROW_STRIPE_CONFIG):
        choice = DW_CONFIG if choice == DEFAULT_CONFIG else DW_ROW_STRIPE_CONFIG
    return choice


def _choose_by_tile_fill(num_groups, m, n, transpose_lhs, transpose_rhs, num_sms, serves, cost):
    """select_config's rules 1-5 (see there)."""
    if n % DEFAULT_CONFIG.cta_tile_n and n % NARROW_CONFIG.cta_tile_n == 0:
        return NARROW_CONFIG
    if cost(THREE_WG_CONFIG) <= THREE_WG_MAX_COST_RATIO * cost(DEFAULT_CONFIG) and serves(
            THREE_WG_CONFIG):
        return THREE_WG_CONFIG
    if (not transpose_lhs and m % WIDE_THREE_WG_CONFIG.cta_tile_m == 0
            and _num_tiles(DEFAULT_CONFIG, num_groups, m, n) >= WIDE_THREE_WG_MIN_WAVES * num_sms):
        wide_cost = cost(WIDE_THREE_WG_CONFIG)
        if wide_cost <= cost(DEFAULT_CONFIG) and serves(WIDE_THREE_WG_CONFIG):
            return WIDE_THREE_WG_CONFIG
        if (wide_cost <= WIDE_CLUSTER_MAX_COST_RATIO * cost(DEFAULT_CONFIG)
                and serves(WIDE_CLUSTER_N_CONFIG)):
            return WIDE_CLUSTER_N_CONFIG
    if not (transpose_lhs or transpose_rhs):   # dx, dw: ping-pong won on 1b dw only (s8 runs)
        # With ping-pong a work item is one warpgroup's tile (its CTA tile), half a default CTA
        # tile; an SM's two warpgroups take turns on its tensor cores, so it works through its
        # items one after another and the last wave is counted in half tiles.
        fill = lambda c: tile_fill(c, num_groups, m, n, num_sms)
        if (n % PINGPONG_CONFIG.cta_tile_n == 0
                and fill(PINGPONG_CONFIG) - fill(DEFAULT_CONFIG) >= PINGPONG_MIN_WAVE_GAIN):
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


def fills_tile(m: int, config: TuningConfig) -> bool:
    """Whether m rows fill at least half of a CTA tile's rows: fewer are served (TMA pads them
    with zeros) but mostly compute padding, so "auto" and select_config do not take the
    config for them (kernels/split_k.py serves forward products of so few rows)."""
    return m >= config.cta_tile_m // 2


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
    if out_dtype not in (dtype, jnp.dtype(jnp.float32)):
        return f"output dtype {out_dtype}: the input dtype {dtype} or float32"
    _, m, k, n = problem_dims(a_shape, b_shape, transpose_lhs, transpose_rhs, swiglu)
    c = config
    if swiglu and (transpose_lhs or transpose_rhs or c.cluster_dimension is not None):
        return "fused SwiGLU: no transposed operands or clusters"
    # Minor (contiguous) dims are tiled by the 128-byte swizzle (64 elements),
    # major dims by 8 rows; TMA handles the ragged remainder of major dims.
    minor_a, major_a = (m, k) if transpose_lhs else (k, m)
    minor_b, major_b = (k, n) if transpose_rhs else (n, k)
    if minor_a % c.tile_k or minor_b % c.tile_k or minor_a < c.tile_k:
        return f"minor dims {minor_a}, {minor_b} not multiples of {c.tile_k}"
    if major_a % 8 or major_b % 8:
        return f"major dims {major_a}, {major_b} not multiples of 8"
    if m % 8:
        return f"m={m} not a multiple of 8"
    # TMA zero-fills loads and clips stores past n, so the cooperative kernel takes a ragged last
    # column tile; the fused SwiGLU's gate tile would run into the up columns, and ping-pong is
    # not tested with it.
    if n % c.cta_tile_n and (swiglu or c.pingpong):
        return f"n={n} not a multiple of {c.cta_tile_n} (ping-pong, fused SwiGLU)"
    if n < c.cta_tile_n:
        return f"n={n} narrower than the {c.cta_tile_n}-column tile"
    if c.tile_m % c.epi_tile_m or c.tile_n % c.epi_tile_n:
        return (f"epilogue tiles of {c.epi_tile_m} x {c.epi_tile_n} do not divide the"
                f" {c.tile_m} x {c.tile_n} warpgroup tile")
    if not 0 < c.wgmma_n <= WGMMA_MAX_N or c.wgmma_n % 64:
        return f"wgmma_n={c.wgmma_n}: a multiple of 64 up to {WGMMA_MAX_N}"
    if c.tile_n > c.wgmma_n and (c.pingpong or swiglu or c.wgmma_n % c.epi_tile_n):
        return (f"tile_n={c.tile_n} > wgmma_n={c.wgmma_n} (accumulators in column chunks):"
                f" the cooperative schedule only, no fused SwiGLU, epilogue tiles dividing"
                f" {c.wgmma_n}")
    # b's shared-memory tile is swizzled along its minor dim. Stored k-minor (dx) its rows are
    # the k-step's 64 elements (128 bytes) whatever tile_n; stored n-minor (forward, dw, the
    # fused SwiGLU) they are tile_n long: 96 or 160 bf16 columns (192, 320 bytes) take a
    # 64-byte swizzle, and a and b then share it (mgpu_tiles.operand_transforms). With a
    # 128-byte swizzle on a, Mosaic GPU's layout inference failed on them (jax 0.11.2).
    row_elems = 64 // dtype.itemsize
    if c.tile_n % 8 or (not transpose_rhs and c.tile_n % row_elems):
        return (f"tile_n={c.tile_n}: b stored n-minor needs a multiple of {row_elems} columns"
                f" (64-byte rows), stored k-minor (transpose_rhs) a multiple of 8")
    if c.compute_wgs not in (2, 3) or (c.compute_wgs == 3 and (
            c.pingpong or swiglu or c.wg_dimension != MatmulDimension.M)):
        return f"compute_wgs={c.compute_wgs}: 2, or 3 splitting rows (no ping-pong, fused SwiGLU)"
    if c.delay_release not in (0, 1) or c.delay_release >= c.max_concurrent_steps:
        return (f"delay_release={c.delay_release}: 0 or 1 wgmma groups in flight, fewer than"
                f" the {c.max_concurrent_steps} stages")
    if c.pingpong and (swiglu or c.cluster_dimension is not None or c.deferred_epi_tiles):
        return "ping-pong: no fused SwiGLU, clusters or deferred epilogue tiles"
    if c.deferred_epi_tiles < 0:
        return f"deferred_epi_tiles={c.deferred_epi_tiles} < 0"
    if c.deferred_epi_tiles and c.cluster_dimension is not None:
        # The clustered interpret-mode test hung in about 1 of 15 runs on 2 CPU cores, so this
        # pair has no CPU test. The hang follows the host's cores: pinned to one core, 4 of 4
        # deferring runs hung in their first call, clustered or not, and 0 of 8 without
        # deferral (2026-11-30). A stack dump of a hung one-core run: two of the four simulated
        # threads wait at a kernel barrier inside their callbacks, running on XLA's CPU
        # threads, and the other two block inside XLA's execute call with no callback of
        # theirs running (the CPU idle). That points to the interpreter starving its threads,
        # not to a kernel race. Lifting this needs a CPU test that cannot hang.
        return "deferred_epi_tiles with 2-CTA clusters (an interpret-mode run hung)"
    if c.smem_bytes(dtype.itemsize, out_dtype.itemsize, 1 + swiglu) > _SMEM_BYTES:
        return "config exceeds shared memory"
    if c.cluster_dimension == MatmulDimension.N and pl.cdiv(n, c.cta_tile_n) % 2:
        return f"cluster along n needs an even number of {c.cta_tile_n}-column tiles, n={n}"
    if c.cluster_dimension == MatmulDimension.M and pl.cdiv(m, c.cta_tile_m) % 2:
        return f"cluster along m needs an even number of {c.cta_tile_m}-row tiles, m={m}"
    return None


def num_sms_of_device() -> int:
    """SMs of the first device: a GPU's core count, else the H100/H200's 132 (CPU lowering and
    interpret-mode tests)."""
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(dev.core_count)
    except Exception:  # pragma: no cover - exotic backends
        pass
    return H100_NUM_SMS
