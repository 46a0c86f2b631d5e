#!/usr/bin/env bash
# Re-checks and re-measures everything GPU-specific on an H200, in stages (one device command may
# run 10 minutes, so the stages are split over two calls):
#   tests      the kernels' GPU tests but the weight-offset ones: every config lowered, tile
#              schedules, fused SwiGLU (the whole set outgrew one call: 73 passed in 560 s at
#              79c4cf8, with the SwiGLU tests still to run)
#   tests_offsets  test_gpu_weight_offset: every GPU config's forward, dx and dw against float64
#   tests_model  the diagonal schedule and training steps through the kernels on the GPU, and
#              the split-k decode products (6 min at 6681502's parent, with the cuDNN test)
#   generate   the generation benchmark (eval/bench_generate.py), batch 1: time to the first token
#              after 4096-131072 tokens and ms per decoded token, each schedule
#   probe_decode  a decoded token's cost (eval/probe_decode.py), XLA or "auto" grouped matmuls,
#              batch 1 and 8                                                    (~3 min)
#   probe_decode_graphs  the same with XLA's command buffers (CUDA graphs) taking while loops
#              and conditionals too                                              (~6 min)
#   probe_decode_profile  one traced decode (batch 1, XLA and "auto"): device time by kernel
#              with source lines, and the decode's optimised HLO                 (~2 min)
#   probe_skinny  a decode step's products (1b, 8b; 1 and 8 rows) on XLA and on the split-k
#              kernel at every S (eval/probe_skinny.py)                     (141 s at 6681502)
#   generate_batch  the generation benchmark at batch 8 and 64 (4096 and 32768 tokens): the
#              decode steps' m = 8 rows take the split-k kernel under "auto", m = 64 the kernel
#   bench      the inference benchmark, every schedule and length                 (~9 min)
#   agreement  model-scale agreement of the schedules, XLA and kernel paths        (> 3 min)
#   kernel     the grouped-matmul benchmark (1b all loads, 3b/8b quick, backward products)
#   kernel_big the 3b/8b shapes at every G in {1,2,4,8,16} and 1..8 of 16 active (~4 min)
#              (kernel_big_3b, kernel_big_8b: one model each, if the pair overruns a call)
#   fused      fused gate/up + SwiGLU kernel vs unfused: profiled A/B, G = 1 and 16  (~2 min)
#   diagonal   the inference benchmark of sequential and the diagonal schedules  (~8 min)
#   train      training steps (1b, 4096 and 16384 tokens) with XLA vs kernel grouped matmuls,
#              one step of each traced (device time by kind and kernel)
#   profile    per-kernel device time of both diagonal schedules at 131072 tokens, with each
#              kernel's source lines
#   pingpong   the ping-pong kernel schedule (first compiled on a GPU with this stage): its GPU tests
#              under a timeout (a barrier slip would hang), then a profiled A/B against the
#              default kernel and cuBLAS on all twelve shapes   (~3 min; <= 9 min by timeouts)
#   pingpong2  ping-pong with one wgmma in flight: stages and tile orders on the 1b/3b attention
#              shapes (and 1b gate_up), profiled A/B against the default and cuBLAS
#   select     select_config's choice ("auto": ping-pong where it fills the last wave of tiles
#              better) against the default, ping-pong and cuBLAS at G = 1 and 16   (~3 min)
#   train_products  a training step's products (G = 1: forward, dx, dw) of the 1b shapes, the
#              kernel's configs against cuBLAS and the XLA path: profiled A/B
#   train_profile  a 1b training step (4096 tokens) traced per gmm_impl: device time by kind
#              and kernel, and each step's optimised HLO (what the copies and fills are)
#   train_zero_init  the `train` stage's steps without XLA's GPU pass that replaces the zero
#              init of fully overwritten loop accumulators (scan outputs) by an allocation, which
#              the training step turns on by default (train.step.GPU_COMPILER_OPTIONS)
#   wg3        three-warpgroup tiles (192 x 128, 192 x 192): their GPU tests (weight offsets, idle
#              groups, dw) under a timeout, then a profiled A/B of all three products of the 1b
#              shapes at G = 1 and 16 and the 3b/8b shapes at G = 16
#   select3    select_config's three-warpgroup choice off G = 1 (1b o, down and dx products at
#              G = 2, 4; 3b o dw at G = 1): auto against the default, 192 x 128 and cuBLAS  (~3 min)
#   pingpong_bwd  the ping-pong schedule on the backward products (dw: k = the 1152-2176 rows of
#              a diagonal step, where a non-overlapped epilogue weighs most; dx), G = 1 and 16:
#              profiled A/B against the default, "auto" and cuBLAS           (~4 min)
#   reproducibility  a training step's first step in fresh processes (default XLA flags, and with
#              deterministic ops): the same loss, gradient norm and updated weights bit for bit?
#              and which per-fusion autotune results differ between processes   (~4 min)
#   wg3_repeat 192 x 192 tiles against the default, "auto" and cuBLAS on the 1b shapes at G = 16
#              (forward, dx), 5 rounds: a second run before select_config may take them (~3 min)
#   train_diagonal  training steps through the sequential and the diagonal schedule (1b, 4096 and
#              16384 tokens), XLA and kernel grouped matmuls: same first step, time per step
#   wg3_groups 192 x 192 tiles against the default, "auto" and cuBLAS at G = 2, 4, 8 (1b qkv, o,
#              down; 3b qkv, o; forward and dx), where a cost rule would take them   (~4 min)
#   select_wide select_config's 192 x 192 choice: "auto" against the default and cuBLAS on the 1b
#              shapes at G = 16 and on 1b gate_up / down at G = 2, 4, 8 (forward, dx)  (~4 min)
#   train_deterministic  the `train` stage's steps (4096 tokens) compiled with XLA's
#              deterministic ops (train.step.DETERMINISTIC_OPTIONS, `armt train --deterministic`)
#   train_diagonal_long  the kernels' training steps through both schedules at 32768 and 65536
#              tokens (where most diagonal steps are full)                       (~7 min)
#   train_diagonal_profile  one traced step of each schedule (kernels, 16384 tokens): device time
#              by kind and kernel (what a ramp step's full-size weight gradient costs)
#   wg3_epilogue  192 x 192 tiles with 3 stages and 2 or 3 epilogue slots per warpgroup (4 stages
#              leave room for one): their GPU tests under a timeout, then a profiled A/B against
#              "auto" and cuBLAS on the 1b forward / dx products at G = 16 and 8b qkv / o
#   train_windows  train_diagonal_profile's traced steps (16384 tokens) and the 65536-token steps
#              of both schedules, after each diagonal window became its own remat (no zero-filled
#              residuals of the windows a step does not run)                 (~6 min)
#   wg3_cluster  192 x 192 tiles in 2-CTA clusters (along m: the B tile multicast; along n: the
#              A tile), as cuBLAS runs: their GPU tests under a timeout, then a profiled A/B
#              against "auto" and cuBLAS (1b qkv / o / down, 8b qkv / o; forward and dx, G = 16;
#              a product with an odd number of tiles along the cluster dimension is refused and
#              reported as a failure: along n, every 1b product but qkv)
#   train_seq_remat  the sequential step after its loss became rematerialised too (fb59d53: one
#              more LM-head matmul per segment in the backward, no [T, V] residual per segment):
#              both schedules at 65536 tokens, the sequential one at 16384            (~8 min)
#   parity_rest  "auto" against cuBLAS on the shapes the s10/s11 A/B runs left out (3b qkv / o /
#              gate_up / down, 8b gate_up / down, 1b gate_up; forward and dx, G = 16), with the
#              2-CTA-cluster 192 x 192 tiles where they serve the shape                 (~4 min)
#   select_cluster  select_config's clustered 192 x 192 choice (8b qkv / gate_up forward): "auto"
#              against the default and cuBLAS at G = 16 (forward and dx; where "auto" is the
#              default, the run times two identical configs: its noise), and at G = 1, 8 (~4 min)
#   compile_cache  JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) on a diagonal
#              training step with the kernels: the same step compiled in two fresh processes,
#              the second one reading the first one's cache                     (~5 min)
#   train_4096  both schedules' training steps with the kernels at 4096 tokens (one diagonal of
#              16 layers needs 16 segments; here there are 4), after the per-window remat  (~4 min)
#   dw_auto    select_config's dw choices (rule 9 since 163d4f4: 4 deferred epilogue tiles):
#              "auto" (timed twice) against the default and cuBLAS on all twelve dw products at
#              G = 16                                         (run s24_dw_auto: 78 s)
#   parity_all "auto" (timed twice: the run's spread) against cuBLAS on all 24 forward and dx
#              products at G = 16, the issue's parity bar in one call (run s15_parity_all, with
#              default_defer1 in place of auto#2 and one trace per config, took 137 s; with a
#              trace in every round, since: 130 s, runs s20_parity_all, s20_parity_all2)
#   pingpong_turn  ping-pong passing the turn once the main loop's last wgmma is issued (the
#              default since this stage) against passing it once it is done: the three ping-pong
#              configs' GPU tests, then a profiled A/B with "auto" and cuBLAS on the attention
#              shapes (forward, dx) at G = 16 and the G = 1 products that select ping-pong
#              (runs s15_pingpong_turn_g16 / _g1, 132 s)
#   defer      deferred epilogue tiles, a repeat: the default and the 192 x 192 tiles without
#              deferral against "auto" (which defers 1 on both) and cuBLAS on the attention
#              shapes and the 8b MLP products at G = 16 (forward, dx; 420 s limit)
#   mlp8b      the 8b MLP products (gate_up, down; forward, dx), where cuBLAS led most in run
#              s15_parity_all: "auto" (twice) against 256 x 128 tiles (plain and in 2-CTA clusters
#              along n, cuBLAS's shape on 8b down), the clustered 192 x 192 tiles and cuBLAS
#   grid8b     the default tiles in other tile orders (default_gn4 / gn8: stripes of column
#              tiles walked down m; default_gm1 / gm4: row stripes walked along n) against "auto"
#              and cuBLAS on the 8b qkv / down products (forward, dx) and 8b gate_up dx, G = 16,
#              5 rounds (runs s17_grid8b, s17_grid8b_gu: 67 s and 22 s)
#   smfit      the dx products' column tiles sized to the SM count (192 x 96, 128 x 160:
#              tuning.SM_FIT_VARIANTS, cuBLAS's tiles at G = 1): their GPU tests under a
#              timeout, then a profiled A/B against "auto" and cuBLAS on the 1b and 3b dx
#              products at G = 1 (where the kernel's tiles fill under two waves) and G = 16
#   smfit_select  select_config's 128 x 160 choice for dx (SM_FIT_DX_CONFIG where tile_cost
#              promises <= 0.94 of the other choice's time: 1b qkv / o / gate_up dx at G <= 2,
#              3b dx at G = 1 and 3b qkv / o / gate_up dx at G = 2): "auto" against 128 x 160,
#              the 192 x 128 and default tiles (the choices before it) and cuBLAS at G = 1, 2, 4
#   wide_small_g  192 x 192 tiles (plain, in 2-CTA clusters along m and n) on the 1b / 3b qkv,
#              o, gate_up dx products at G = 2, 4, where cuBLAS runs 192 x 192 clusters (run
#              s18_smfit_select's kernel names): against "auto" and cuBLAS (a product with an odd
#              number of column tiles is refused along n and reported as a failure: 1b)
#   wide_select  select_config's 192 x 192 choice for dx (rule 7: wherever tile_cost promises
#              no more than the other choice's time) on the 1b / 3b dx products at G = 1, 2, 4, 8:
#              "auto" against the choices before it (128 x 160, 192 x 128, default) and cuBLAS
#   wide_fwd   192 x 192 tiles on the forward products select_config's rule 3 leaves to other
#              tiles at G = 2, 4, 8 (1b qkv / o, 3b: under 8 waves of default tiles or ragged
#              rows): against "auto" and cuBLAS, the evidence a forward rule 7 would need
#   smfit_fwd  the 192 x 96 / 128 x 160 tiles on the forward and dw products (b stored n-minor:
#              a 64-byte swizzle on both operands; 0.61-0.90x "auto" in run s19_smfit_fwd):
#              their GPU tests (all three products) under a timeout, then a profiled A/B against
#              "auto" and cuBLAS on the 1b / 3b shapes at G = 1 and 2, where cuBLAS runs these
#              tiles on 1b o and down (run s17_g1_all)
#   wide_rest  rule 7's choices s18_wide_fwd left untimed: the forward 1b down at G = 2, 4, 8
#              (192 x 192 in place of 192 x 128 / ping-pong) and 1b gate_up at G = 1 (in place
#              of ping-pong): "auto" against those and cuBLAS
#   dw_cluster the dw products at G = 16 (0.90-1.01x of cuBLAS, which runs them in 2-CTA
#              clusters: 128 x 256 on 8b down dw, 256 x 128 on 3b down dw, 128 x 160 on 1b qkv
#              dw) with clustered and 192 x 192 tiles, none of them timed on dw since the ring
#              of stages: "auto" (timed twice) against them and cuBLAS (run as two calls of
#              the 3b / 8b and the 1b shapes, without auto#2: s20_dw_cluster*, 91 + 39 s; with
#              3b o dw timed again, whose first "auto" median was one slow round's, the fastest
#              other config was within 2.3 % of "auto" on every product)
#   split_cols 192 x 192 tiles of two warpgroups splitting the columns (192 x 96 each; cuBLAS's
#              coopB kernel on 8b down dx): its GPU test under a timeout, then a profiled A/B
#              against "auto" (twice), the three-warpgroup 192 x 192 tiles and cuBLAS on the
#              G = 16 products below 0.99x of cuBLAS and the 8b ones (run s20_split_cols, 150 s:
#              0.83-0.92x "auto")
#   fwd_t      the G = 1 forward products computed transposed (w^T @ x^T, both operands read
#              transposed: 128-byte swizzles with tiles sized to the SMs) against the forward
#              itself ("auto") and cuBLAS, on the 1b / 3b shapes where "auto" trails cuBLAS
#              (run s20_fwd_t, 96 s: 1.19x / 1.10x the forward on 1b o / down, <= 1.03x else)
# The stages that chose between JAX's pipelines and the ring of stages for the cooperative
# schedule (ring, ring2, ring_all, ring_check, ring_cluster, ring_wg3, ring_swiglu; dw_variants,
# dw_select, dw_3b) were removed with JAX's pipelines: their runs in
# eval/results/grouped_matmul_h200.ab.json name the code revision that has them.
#   ncu        Nsight Compute counters (eval/ncu_products.py; cycles, SM clock, DRAM / L2 bytes,
#              warp stalls) of "auto" and cuBLAS on 8b down dx / down, 3b qkv and 1b gate_up, G = 16,
#              one launch each (run s21_ncu_full: 48 s), with the report's summary and details
#   ncu_dw     the same on the dw products where the kernel takes the most cycles over cuBLAS's
#              (1b qkv / down dw, 3b qkv dw: 4-11 % more under sustained load, run
#              s22_sustained_dw_before), 6 launches (run s24_ncu_dw: 32 s; one call of the
#              same stage ran past 300 s with no output): where a short tile (18 / 34 k-steps) loses
#   ncu_source Nsight Compute's source counters (sampled warp stalls per SASS instruction) on
#              1b down dw, "auto" and cuBLAS (NCU_CONFIGS: others), the report's SASS page as
#              $OUT/ncu_source_sass.csv.gz; `python3 eval/ncu_products.py --sass FILE` lists the
#              instructions with the most samples (run s25_ncu_source: 18 s, 50 s held)
#   ncu_dw_gm4 ncu_dw's counters on 1b down dw in row stripes of 4 ("auto@gm4"), against "auto"
#              and cuBLAS: does reading A once (DRAM bytes) close the cycle gap? (run s25_ncu_dw_gm4)
#   sustained  sustained-load A/B (eval/sustained_ab.py: 1.5 s windows of back-to-back calls, 3
#              rounds, nvidia-smi's clock and power) of "auto", the default tile order and cuBLAS
#              on the eight 8b / 3b products of runs s21_sustained* (~4 min)
#   sustained_fwd_dx  "auto" against cuBLAS under sustained load on all 24 forward and dx
#              products at G = 16 (1.2 s windows, 3 rounds; run s22_sustained_fwd_dx: 247 s; the
#              JSON is rewritten after every product, so a timeout keeps what was timed)
#   sustained_dw  the same on the 12 dw products (run s22_sustained_dw: 158 s)
#   sustained_attention  the products below cuBLAS by the burst A/B but not yet timed under
#              sustained load (1b qkv, 1b o dx, 3b qkv / o / o dx): "auto" against ping-pong
#              (3b qkv: its half tiles fill 0.993 of the last wave, the default's 0.981), row
#              stripes of 4 and cuBLAS (1.2 s windows, ~3 min; run s22_attention timed four of
#              them with 1 s windows)
#   sustained_dw_orders  rule 8's dw part again: "auto" (row stripes of 12 on 8b down / gate_up
#              / o / qkv dw and 3b down dw since a8acb49; the default order on 3b qkv dw and
#              1b down dw, the products nearest below its bound) against the default order,
#              column stripes of 4 and cuBLAS (1.2 s windows, ~4 min; runs s22_dw_orders* timed
#              these orders before the rule)
#   sustained_trace  the sustained windows' time per call against traced device time per call
#              (--trace_calls 64) on 1b qkv / o dw, 3b qkv and 8b down dx, "auto" and cuBLAS: are
#              there gaps between calls, or does nvidia-smi's clock overstate the effective one
#              (time x clock read 9-24 % above ncu's counted cycles in session 22)? (~2 min)
#   sustained_dw_variants  the dw products with the most cycles over cuBLAS's (1b qkv / down dw,
#              3b qkv dw; short tiles of 18 / 34 k-steps) under sustained load: "auto" against
#              more deferred epilogue tiles (2, 4), 64 x 32 epilogue tiles in 4 slots, 192 x 128
#              tiles of three warpgroups, ping-pong and cuBLAS (all compiled and tested on the
#              GPU before; only burst A/Bs timed them on dw) (~3 min; run s23_dw_variants: 4
#              deferred tiles fastest on all three)
#   sustained_dw_defer  4 deferred epilogue tiles on every dw product (rule 9's GPU tests first):
#              "auto" against them in the default order and in row stripes, and cuBLAS (1 s
#              windows, 3 rounds, ~4 min; run s23_dw_defer, which select_config's rule 9 took)
#   dw_tests   rule 9's dw configs' GPU tests (test_gpu_weight_offset[dw, dw_row_stripes])
#   dw_small_g rule 9 off full load: burst A/B of "auto" against rules 5 and 8 (1 deferred
#              tile) and cuBLAS on five dw products at G = 1 and 4 (~90 s)
#   sustained_chain  the sustained A/B with 8 products per dispatch (sustained_ab.py --chain 8:
#              no host gaps between products) on the short 1b products and 3b qkv, then 16
#              traced dispatches (device time per product, launches per dispatch; run
#              s24_sustained_chain: 51 s, 17 launches per dispatch)
#   sustained_dw_feed  rule 9's dw tiles fed differently (k-steps of 32 in 8 stages, no wgmma
#              group in flight, 128 x 128 tiles in 6 stages, row stripes of 4) against "auto" and
#              cuBLAS on 1b down / qkv and 3b qkv dw (~100 s; runs s25_dw_feed*: none faster)
#   probe_ring the ring kernel without its loads, without its wgmma, without both, against itself
#              and cuBLAS (eval/probe_ring.py, device time; run s25_probe_ring: 33 s): is a
#              product's loss in feeding the tensor cores or in computing?
#   rows_tests the default's 128 x 256 tiles split by rows between the warpgroups (a 64 x 256
#              wgmma each; SWEEP rows_64x256, dw_rows): their GPU tests (weight offsets)
#   rows_probe probe_ring on 1b down / qkv dw: "auto", dw_rows and ping-pong
#   sustained_rows_dw, sustained_rows_fwd  the row split under sustained load against "auto"
#              and cuBLAS: five dw products; seven forward / dx products on the default tiles
#              (rows_probe and sustained_rows_dw ran at 8c2c145, where "auto" on dw was the
#              column split; today "auto" is dw_rows there, so compare dw_columns instead)
#   sustained_rows_all_dw  "auto" against rule 9's column split of s25 (dw_columns, in both
#              tile orders), the row stripes and cuBLAS on all 12 dw products, after dw_tests
#              (run s26_rows_all_dw at 5f7f9db, where "auto" split every dw tile by rows, the
#              stripes' too; today's rule 9 keeps the column split in the stripes)
#   rows_bursts  the row split off full load and in bursts: profiled A/B of "auto" against the
#              column split (dw_columns) and cuBLAS on the seven dw products in the default
#              tile order at G = 1, 4 and 16 (s26 timed it at G = 16 under sustained load only)
#   borderline the three products that dipped below cuBLAS in some sustained run up to s26 (3b
#              qkv, 8b down dx, 1b down dw): "auto" against cuBLAS, 10 rounds of 1 s windows,
#              so that their ratio has a spread of its own, not one of 3 rounds (~2 min);
#              PRODUCTS=... ROUNDS=... time others the same way
#   wide_tests the 128 x 320 tiles split by rows (two wgmma accumulators a warpgroup; SWEEP
#              rows_128x320*): their GPU tests (weight offsets; forward and both gradients)
#   sustained_wide  after wide_tests, the 128 x 320 tiles under sustained load against "auto"
#              and cuBLAS on 3b qkv and 3b qkv dw (n = 5120: 33 full waves of 128 x 320 tiles
#              at G = 16, against 41.2 of the default's), 1 s windows, 6 rounds (~2 min)
#   wide_n192  the 128 x 320 tiles' registers and spills (eval/ptxas_report.py) beside "auto"'s,
#              then under sustained load on 3b qkv with chunks of 192 + 128 columns (with and
#              without the deferred epilogue tile), after all five wide configs' GPU tests
#   Never pipe a stage through head: a closed pipe ends the script while a profiled process
#   may run on and hold the GPU (an ncu_dw call of session 23 returned nothing).
#   NCU_LIMIT_S (default 240) limits ncu in the ncu stages.
#   run: bash eval/gpu_session.sh tests; bash eval/gpu_session.sh tests_model fused;
#        bash eval/gpu_session.sh bench;
#        bash eval/gpu_session.sh agreement kernel
# Results land in $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet() { grep -v "^[WI]0000\|^WARNING: All log"; }
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader | tee -a "$OUT/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
# train_bench NAME LIMIT_S ARGS...: eval.bench_train under a timeout (0: none), its JSON in
# $OUT/NAME/, its log in $OUT/NAME.txt, the log shown without the markdown table.
train_bench() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m eval.bench_train "$@" --out "$OUT/$name/train_bench.json" 2>&1 \
    | quiet | tee "$OUT/$name.txt" | grep -v "^| "
}
# ab NAME LIMIT_S ARGS...: an interleaved grouped-matmul A/B (eval/bench_grouped_matmul.py --ab ...)
# under a timeout (0: none), results in $OUT/NAME/, its A/B lines and failures shown.
ab() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 eval/bench_grouped_matmul.py --models "" "$@" --out "$OUT/$name" 2>&1 \
    | quiet | grep "  ab \|FAIL\|wrote" | cut -c1-200
}
# tests_pass NAME LIMIT_S COUNT FILE K_EXPR: a new schedule's GPU tests (FILE, -k K_EXPR) under
# a timeout and a 150 s per-test one (pytest-timeout, where installed: a hang on a barrier stops
# there), their tail shown and kept in $OUT/NAME_tests.txt; succeeds if exactly COUNT passed, so
# a stage times the schedule only if it computed correctly.
tests_pass() {
  local name=$1 limit=$2 count=$3 file=$4 expr=$5
  timeout "$limit" python3 -m pytest -o addopts="" -o timeout=150 -q -p no:cacheprovider "$file" \
    -k "$expr" 2>&1 | quiet > "$OUT/${name}_tests_full.txt"
  tail -4 "$OUT/${name}_tests_full.txt" | tee "$OUT/${name}_tests.txt"
  grep -qw "$count passed" "$OUT/${name}_tests.txt" || { echo "$name: tests did not pass"; return 1; }
}
# wg3_variants STAGE TEST_PATTERN CONFIGS [SHAPES]: the GPU tests of three-warpgroup configs, then
# (if both passed) a profiled A/B of them against "auto" (timed twice: the run's spread between
# identical configs) and cuBLAS at G = 16.
wg3_variants() {
  tests_pass "$1" 300 2 tests/test_grouped_matmul.py "gpu_weight_offset and $2" || return
  ab "$1" 250 --ab "auto,auto#2,$3,xla_einsum" \
    --ab_groups 16 --ab_products fwd,dx --ab_profile --ab_reps 3 \
    --ab_shapes "${4:-1b:qkv,1b:o,1b:down,8b:qkv,8b:o}"
}
# ncu_profile NAME PRODUCTS [CONFIGS]: Nsight Compute's full set (or the sections in
# NCU_SECTIONS) on one launch each of CONFIGS (default "auto" and cuBLAS) per product
# (eval/ncu_products.py; the clocks left as found), the chosen metrics side by side in
# $OUT/NAME_summary.md and the report's details page in $OUT/NAME_details.txt (the ~25 MB a
# product report itself is too big to bring back).
# ncu's log goes to $OUT/NAME_ncu.txt, not through a pipe: a profiled process that outlives a
# killed ncu would hold the pipe open and stall the script (one ncu_dw call in session 24 ran
# past its limit with no output, then completed in 32 s on the same machine; cause unknown).
# timeout's signal does not reach the profiled process: ncu runs it under its own launcher
# (TreeLauncherSubreaper), which outlived a timed-out ncu in session 24. So on a timeout
# (NCU_LIMIT_S, default 240 s) the stage shows what is still running, kills it and stops.
ncu_profile() {
  local name=$1 products=$2 configs=${3:-auto,xla_einsum} rc
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "${NCU_LIMIT_S:-240}" ncu --profile-from-start off \
    --clock-control none ${NCU_SECTIONS:---set full} --import-source no \
    --kernel-name regex:"mosaic|nvjet|gemm|cutlass" \
    -f -o "$OUT/$name" python3 eval/ncu_products.py --products "$products" --configs "$configs" \
    --manifest "$OUT/$name.json" > "$OUT/${name}_ncu.txt" 2>&1
  rc=$?
  quiet < "$OUT/${name}_ncu.txt" | grep -v "^==PROF==\|^$"
  if [ $rc -ne 0 ]; then
    echo "$name: ncu exit $rc (stopped at the ${NCU_LIMIT_S:-240} s limit: 124, 137, or 139 when" \
      "ncu crashes on the signal, as seen); last lines and processes left:"
    tail -3 "$OUT/${name}_ncu.txt"
    ps -eo pid,stat,wchan:24,etime,cmd | grep "[n]cu_products.py --products" | cut -c1-160
    pkill -9 -f "ncu_products.py --products"
    return 1
  fi
  python3 eval/ncu_products.py --summarize "$OUT/$name.ncu-rep" --manifest "$OUT/$name.json" \
    | tee "$OUT/${name}_summary.md"
  ncu --import "$OUT/$name.ncu-rep" --page details > "$OUT/${name}_details.txt"
}
# gpu_tests NAME LIMIT_S EXTRA FILES...: the GPU tests of FILES (and the tests matching the
# pytest -k expression EXTRA, if not empty) under a timeout, verbose into
# $OUT/NAME.txt (what passed survives a timeout); shown: failures, the summary, the slowest.
# With pytest-timeout installed, a test that runs past 240 s (a kernel hung on a barrier) ends
# the run there, naming the test, instead of using up the call (without it: a warning).
gpu_tests() {
  local name=$1 limit=$2 extra=${3:+and ($3)}; shift 3
  timeout "$limit" python3 -m pytest -o addopts="" -o timeout=240 -v -p no:cacheprovider \
    --durations=8 "$@" -k "(gpu or pallas or accumulates_in_float32) $extra" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $?, $(grep -c PASSED "$OUT/$name.txt") passed"
  grep -E "FAILED|ERROR|s call|passed|failed" "$OUT/$name.txt" | quiet | tail -14
}
# sustained_ab LIMIT_S ARGS...: eval/sustained_ab.py under a timeout, its JSON in
# $OUT/$stage.json; the per-round lines are left out of the log (the summary has their medians).
sustained_ab() {
  local limit=$1; shift
  timeout "$limit" python3 eval/sustained_ab.py "$@" --out "$OUT/$stage.json" 2>&1 | quiet \
    | grep -v " round "
}
# diagonal_products KIND...: the 1b / 3b / 8b diagonal shapes' products of these kinds (fwd, dx,
# dw) as sustained_ab.py's --products list.
diagonal_products() {
  local m s k list=""
  for m in 1b 3b 8b; do for s in qkv o gate_up down; do for k in "$@"; do
    list+="$m:$s:$k,"; done; done; done
  echo "${list%,}"
}
# dw_tests: rule 9's dw configs on the GPU (test_gpu_weight_offset[dw, dw_row_stripes,
# dw_columns]: forward, dx and dw against float64); succeeds if all three passed.
dw_tests() { tests_pass dw_tests 200 3 tests/test_grouped_matmul.py "gpu_weight_offset and dw"; }
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests tests_offsets tests_model bench agreement kernel)
for stage in "${stages[@]}"; do
  echo "== $stage $(date -u +%FT%TZ)"
  case $stage in
    tests) gpu_tests gpu_tests 560 "not gpu_weight_offset" tests/test_grouped_matmul.py \
             tests/test_swiglu.py ;;
    tests_offsets) gpu_tests gpu_tests_offsets 560 gpu_weight_offset tests/test_grouped_matmul.py ;;
    tests_model) gpu_tests gpu_tests_model 500 "" tests/test_diagonal.py tests/test_train.py \
                   tests/test_split_k.py ;;
    generate) timeout 560 python3 -m eval.bench_generate --batches 1 \
             --out "$OUT/generate_h200.json" 2>&1 | quiet ;;
    probe_decode) timeout 500 python3 eval/probe_decode.py --batches 1 8 \
               --out "$OUT/probe_decode.jsonl" 2>&1 | quiet ;;
    probe_decode_graphs)
           XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
             timeout 500 python3 eval/probe_decode.py --batches 1 8 \
               --out "$OUT/probe_decode_graphs.jsonl" 2>&1 | quiet ;;
    probe_decode_profile) timeout 240 python3 eval/probe_decode.py --gmm-impls xla auto \
               --reps 3 --profile --top 40 --dump-hlo "$OUT/hlo" 2>&1 | quiet ;;
    probe_skinny) timeout 400 python3 -m eval.probe_skinny --models 1b,8b --rows 1,8 \
               --configs 64x128_k128_s4 --reps 60 --out "$OUT/probe_skinny.json" 2>&1 | quiet ;;
    generate_batch) timeout 560 python3 -m eval.bench_generate --batches 8 64 --lengths 4096 32768 \
             --out "$OUT/generate_batch_h200.json" 2>&1 | quiet ;;
    bench) python3 -m eval.bench --out "$OUT/inference_h200.json" 2>&1 | quiet \
             | tee "$OUT/bench.txt" ;;
    agreement) python3 -m eval.agreement --tokens 16384 2>&1 | quiet | tee "$OUT/agreement.txt"
             for n in 8192 16384; do python3 -m eval.agreement --tokens $n --gmm-impl auto 2>&1 \
               | quiet | tee -a "$OUT/agreement.txt"; done ;;
    kernel) python3 eval/bench_grouped_matmul.py --models 1b,3b,8b --quick --bwd \
              --out "$OUT/kernel" 2>&1 | quiet | grep -v "^  " | tail -80 ;;
    kernel_big|kernel_big_3b|kernel_big_8b)
           models=${stage#kernel_big_}; [ "$models" = kernel_big ] && models=3b,8b
           python3 eval/bench_grouped_matmul.py --models "$models" --big_groups 1,2,4,8,16 \
              --budget_s 480 --out "$OUT/$stage" 2>&1 | quiet | grep -v "^  " | tail -80 ;;
    fused) python3 eval/bench_grouped_matmul.py --models "" --ab default,swiglu,swiglu_unfused \
             --ab_groups 1,16 \
             --ab_profile --ab_shapes 1b:gate_up,3b:gate_up,8b:gate_up --out "$OUT/fused" 2>&1 \
             | quiet | grep -v "^  " | tail -20 ;;
    diagonal) python3 -m eval.bench --schedules sequential diagonal diagonal_pallas \
             --out "$OUT/diagonal/inference_h200.json" 2>&1 | quiet | tee "$OUT/diagonal.txt" ;;
    train) python3 -m eval.bench_train --tokens 4096 16384 --profile \
             --out "$OUT/train/train_bench.json" 2>&1 | quiet | tee "$OUT/train.txt" ;;
    profile) python3 -m eval.profile --schedules diagonal diagonal_pallas --tokens 131072 \
             --runs 1 --top 30 --out "$OUT/profile" 2>&1 | quiet | tee "$OUT/profile.txt" ;;
    pingpong) tests_pass pingpong 240 2 tests/test_grouped_matmul.py \
             "gpu_weight_offset and pingpong" || continue
           S=$(for m in 1b 3b 8b; do for s in qkv o gate_up down; do printf "%s:%s," $m $s; done; done)
           ab pingpong 300 --ab \
             default,pingpong,pingpong_delay1,pingpong_s4,pingpong_n256,xla_einsum --ab_profile \
             --ab_reps 3 --ab_shapes "${S%,}" ;;
    pingpong2) C=default,pingpong_delay1,pingpong_delay1_s4,pingpong_delay1_s5
           C=$C,pingpong_delay1_gm4,pingpong_delay1_gn4,xla_einsum
           ab pingpong2 0 --ab $C --ab_profile --ab_reps 5 \
             --ab_shapes 1b:qkv,1b:o,3b:qkv,3b:o,1b:gate_up ;;
    select) ab select 0 --ab \
             default,pingpong_delay1,auto,xla_einsum --ab_groups 1,16 --ab_profile --ab_reps 5 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down,3b:qkv,3b:gate_up,8b:gate_up ;;
    train_products) ab train_products 0 --ab \
             default,pingpong_delay1,auto,xla_einsum --ab_groups 1 --ab_products fwd,dx,dw \
             --ab_profile --ab_reps 5 --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down ;;
    train_profile) python3 -m eval.bench_train --tokens 4096 --reps 3 --profile --dump-hlo \
             --out "$OUT/train_profile/train_bench.json" 2>&1 | quiet | tee "$OUT/train_profile.txt" ;;
    train_zero_init) python3 -m eval.bench_train --tokens 4096 16384 --profile \
             --compiler-option xla_gpu_enable_dus_accumulator_zero_init_elimination=false \
             --out "$OUT/train_zero_init/train_bench.json" 2>&1 | quiet \
             | tee "$OUT/train_zero_init.txt" | grep -v "^| " ;;
    wg3) tests_pass wg3 300 2 tests/test_grouped_matmul.py \
             "gpu_weight_offset and wg3 and not s3e and not 192x192_c" || continue
           C=default,auto,wg3_192x128,wg3_192x192,xla_einsum
           ab wg3 280 --ab $C --ab_groups 1,16 \
             --ab_products fwd,dx,dw --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down
           ab wg3_big 200 --ab $C --ab_groups 16 \
             --ab_profile --ab_reps 3 --ab_shapes 3b:qkv,3b:o,3b:down,8b:qkv,8b:o,8b:down ;;
    select3) C=default,auto,wg3_192x128,xla_einsum
           ab select3 250 --ab $C --ab_groups 2,4 \
             --ab_products fwd,dx,dw --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down
           ab select3_3b 100 --ab $C --ab_groups 1 \
             --ab_products dw --ab_profile --ab_reps 3 --ab_shapes 3b:o,3b:qkv ;;
    pingpong_bwd) C=default,auto,pingpong_delay1,xla_einsum
           ab pingpong_bwd 250 --ab $C --ab_groups 1,16 \
             --ab_products dx,dw --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down
           ab pingpong_bwd_big 150 --ab $C --ab_groups 16 \
             --ab_products dw --ab_profile --ab_reps 3 --ab_shapes 3b:qkv,3b:down,8b:qkv,8b:down ;;
    reproducibility) timeout 320 python3 -m eval.reproducibility --tokens 16384 --processes 3 \
             --variant default= --variant deterministic=--xla_gpu_deterministic_ops=true \
             --out /tmp/reproducibility 2>&1 | quiet | tee "$OUT/reproducibility.txt" | cut -c1-400
           cp /tmp/reproducibility/reproducibility.json "$OUT/" ;;
    wg3_repeat) ab wg3_repeat 280 --ab \
             default,auto,wg3_192x192,xla_einsum --ab_groups 16 --ab_products fwd,dx \
             --ab_profile --ab_reps 5 --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down ;;
    train_diagonal) train_bench train_diagonal 0 --tokens 4096 16384 --reps 3 \
             --schedules sequential diagonal ;;
    wg3_groups) C=default,auto,wg3_192x192,xla_einsum
           ab wg3_groups 200 --ab $C --ab_groups 2,4,8 \
             --ab_products fwd,dx --ab_profile --ab_reps 3 --ab_shapes 1b:qkv,1b:o,1b:down
           ab wg3_groups_3b 120 --ab $C --ab_groups 2,4 \
             --ab_products fwd,dx --ab_profile --ab_reps 3 --ab_shapes 3b:qkv,3b:o ;;
    select_wide) C=default,auto,xla_einsum
           ab select_wide 170 --ab $C --ab_groups 16 \
             --ab_products fwd,dx --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down
           ab select_wide_g248 150 --ab $C --ab_groups 2,4,8 \
             --ab_products fwd,dx --ab_profile --ab_reps 3 --ab_shapes 1b:gate_up,1b:down ;;
    train_deterministic) train_bench train_deterministic 0 --tokens 4096 --reps 3 \
             --compiler-option xla_gpu_deterministic_ops=true ;;
    train_diagonal_long) train_bench train_diagonal_long 0 --tokens 32768 65536 --reps 3 \
             --impls auto --schedules sequential diagonal ;;
    train_diagonal_profile) python3 -m eval.bench_train --tokens 16384 --reps 1 --impls auto \
             --schedules sequential diagonal --profile \
             --out "$OUT/train_diagonal_profile/train_bench.json" 2>&1 | quiet \
             | tee "$OUT/train_diagonal_profile.txt" | cut -c1-220 ;;
    wg3_epilogue) wg3_variants wg3_epilogue "wg3_192x192_s3" wg3_192x192_s3e2,wg3_192x192_s3e3 ;;
    train_windows) python3 -m eval.bench_train --tokens 16384 --reps 1 --impls auto \
             --schedules sequential diagonal --profile \
             --out "$OUT/train_windows_profile/train_bench.json" 2>&1 | quiet \
             | tee "$OUT/train_windows_profile.txt" | grep -v "^| " | grep -v "^$" | cut -c1-160 | head -40
           train_bench train_windows_long 0 --tokens 65536 --reps 3 --impls auto \
             --schedules sequential diagonal ;;
    wg3_cluster) wg3_variants wg3_cluster "wg3_192x192_c" \
                   wg3_192x192_cm,wg3_192x192_cn ;;
    parity_rest) ab parity_rest 540 --ab auto,wg3_192x192_cm,wg3_192x192_cn,xla_einsum \
             --ab_groups 16 --ab_products fwd,dx --ab_profile --ab_reps 3 \
             --ab_shapes 3b:qkv,3b:o,3b:gate_up,3b:down,8b:gate_up,8b:down,1b:gate_up ;;
    select_cluster) C=default,auto,xla_einsum
           ab select_cluster 330 --ab $C --ab_groups 16 \
             --ab_products fwd,dx --ab_profile --ab_reps 5 --ab_shapes 8b:qkv,8b:gate_up,8b:down
           ab select_cluster_g18 200 --ab $C --ab_groups 1,8 \
             --ab_products fwd --ab_profile --ab_reps 3 --ab_shapes 8b:qkv,8b:gate_up ;;
    compile_cache) export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache; rm -rf /tmp/jax_cache
           for run in first second; do
             timeout 280 python3 -m eval.bench_train --tokens 4096 --reps 1 --impls auto \
               --schedules diagonal --out "$OUT/compile_cache_$run/train_bench.json" 2>&1 | quiet \
               | grep -v "^| " | sed "s/^/$run: /"
             files=$(find /tmp/jax_cache -type f 2>/dev/null | wc -l)
             echo "$run: cache $(du -sh /tmp/jax_cache 2>/dev/null | cut -f1), $files files"
           done
           unset JAX_COMPILATION_CACHE_DIR ;;
    train_4096) train_bench train_4096 400 --tokens 4096 --reps 3 --impls auto \
             --schedules sequential diagonal ;;
    dw_auto) ab dw_auto 480 --ab default,auto,auto#2,xla_einsum --ab_groups 16 --ab_products dw \
             --ab_profile --ab_reps 3 --ab_shapes \
             1b:qkv,1b:o,1b:gate_up,1b:down,3b:qkv,3b:o,3b:gate_up,3b:down,8b:qkv,8b:o,8b:gate_up,8b:down ;;
    parity_all) S=$(for m in 1b 3b 8b; do for p in qkv o gate_up down; do printf "%s:%s," $m $p; done; done)
           ab parity_all 560 --ab auto,auto#2,xla_einsum --ab_groups 16 --ab_products fwd,dx \
             --ab_profile --ab_reps 3 --ab_shapes "${S%,}" ;;
    pingpong_turn) tests_pass pingpong_turn 200 3 tests/test_grouped_matmul.py \
             "gpu_weight_offset and pingpong" || continue
           ab pingpong_turn 330 --ab auto,pingpong_delay1,pingpong_late_turn,xla_einsum \
             --ab_groups 16 --ab_products fwd,dx --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,3b:qkv,3b:o,8b:o
           ab pingpong_turn_g1 60 --ab auto,pingpong_delay1,pingpong_late_turn,xla_einsum \
             --ab_groups 1 --ab_products fwd --ab_profile --ab_reps 3 \
             --ab_shapes 1b:gate_up,3b:gate_up ;;
    defer) ab defer 420 --ab auto,default_defer0,wg3_192x192_nodefer,xla_einsum --ab_groups 16 \
             --ab_products fwd,dx --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,3b:qkv,3b:o,8b:o,8b:gate_up,8b:down ;;
    mlp8b) ab mlp8b 400 --ab auto,auto#2,wg_m,wg_m_cn,wg3_192x192_cn,xla_einsum --ab_groups 16 \
             --ab_products fwd,dx --ab_profile --ab_reps 3 --ab_shapes 8b:gate_up,8b:down ;;
    grid8b) ab grid8b 200 --ab auto,default_gn4,default_gn8,default_gm1,default_gm4,xla_einsum \
             --ab_groups 16 --ab_products fwd,dx --ab_profile --ab_reps 5 --ab_shapes 8b:down,8b:qkv
           ab grid8b_gu 100 --ab auto,default_gn4,default_gn8,xla_einsum --ab_groups 16 \
             --ab_products dx --ab_profile --ab_reps 5 --ab_shapes 8b:gate_up ;;
    smfit) tests_pass smfit 240 2 tests/test_grouped_matmul.py "gpu_column_tiles_sized" || continue
           ab smfit 300 --ab auto,wg3_192x96,wg2_128x160,xla_einsum --ab_groups 1,16 \
             --ab_products dx --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down,3b:qkv,3b:o,3b:gate_up,3b:down ;;
    smfit_select) ab smfit_select 400 --ab auto,wg2_128x160,wg3_192x128,default,xla_einsum \
             --ab_groups 1,2,4 --ab_products dx --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,3b:qkv,3b:o,3b:gate_up,3b:down ;;
    wide_small_g) ab wide_small_g 300 --ab auto,wg3_192x192,wg3_192x192_cm,wg3_192x192_cn,xla_einsum \
             --ab_groups 2,4 --ab_products dx --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,3b:qkv,3b:o,3b:gate_up ;;
    wide_select) ab wide_select 420 --ab auto,wg2_128x160,wg3_192x128,default,xla_einsum \
             --ab_groups 1,2,4,8 --ab_products dx --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down,3b:qkv,3b:o,3b:gate_up,3b:down ;;
    wide_fwd) ab wide_fwd 200 --ab auto,wg3_192x192,xla_einsum --ab_groups 2,4,8 \
             --ab_products fwd --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,3b:qkv,3b:o,3b:gate_up,3b:down ;;
    smfit_fwd) tests_pass smfit_fwd 300 2 tests/test_grouped_matmul.py "gpu_column_tiles_sized" \
             || continue
           ab smfit_fwd 300 --ab auto,wg3_192x96,wg2_128x160,xla_einsum --ab_groups 1,2 \
             --ab_products fwd,dw --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down,3b:qkv,3b:o,3b:gate_up,3b:down ;;
    wide_rest) ab wide_rest 240 --ab auto,wg3_192x128,pingpong_delay1,xla_einsum --ab_groups 1,2,4,8 \
             --ab_products fwd --ab_profile --ab_reps 3 --ab_shapes 1b:gate_up,1b:down ;;
    dw_cluster) S=$(for m in 1b 3b 8b; do for p in qkv o gate_up down; do printf "%s:%s," $m $p; done; done)
           ab dw_cluster 560 --ab auto,auto#2,cluster_n,wg_m_cn,wg3_192x192,wg3_192x192_cn,xla_einsum \
             --ab_groups 16 --ab_products dw --ab_profile --ab_reps 3 --ab_shapes "${S%,}" ;;
    split_cols) tests_pass split_cols 240 1 tests/test_grouped_matmul.py \
             "gpu_weight_offset and wg2_192x192" || continue
           ab split_cols 360 --ab auto,auto#2,wg2_192x192,wg3_192x192,xla_einsum --ab_groups 16 \
             --ab_products fwd,dx --ab_profile --ab_reps 3 \
             --ab_shapes 3b:qkv,8b:qkv,8b:o,8b:gate_up,8b:down ;;
    fwd_t) ab fwd_t 300 --ab auto,wg3_192x96,wg2_128x160,wg3_192x128,xla_einsum --ab_groups 1 \
             --ab_products fwd,fwd_t --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:down,3b:qkv,3b:o,3b:down ;;
    train_seq_remat) train_bench train_seq_remat 330 --tokens 65536 --reps 3 --impls auto \
             --schedules sequential diagonal
           train_bench train_seq_remat_16k 200 --tokens 16384 --reps 3 --impls auto \
             --schedules sequential ;;
    ncu) ncu_profile ncu 8b:down:dx,8b:down,3b:qkv,1b:gate_up ;;
    ncu_dw) ncu_profile ncu_dw 1b:qkv:dw,1b:down:dw,3b:qkv:dw ;;
    ncu_dw_gm4) ncu_profile ncu_dw_gm4 1b:down:dw auto,auto@gm4,xla_einsum ;;
    ncu_source) NCU_SECTIONS="--section SourceCounters --section WarpStateStats --section SpeedOfLight" \
             ncu_profile ncu_source 1b:down:dw "${NCU_CONFIGS:-auto,xla_einsum}" || continue
           ncu --import "$OUT/ncu_source.ncu-rep" --page source --csv --print-source sass \
             > "$OUT/ncu_source_sass.csv" 2> "$OUT/ncu_source_sass.err"
           echo "source page: exit $?, $(wc -l < "$OUT/ncu_source_sass.csv") lines"; head -c 600 "$OUT/ncu_source_sass.err"
           gzip -f "$OUT/ncu_source_sass.csv"; ls -la "$OUT" | cut -c1-120
           rm -f "$OUT/ncu_source.ncu-rep" ;;
    sustained) sustained_ab 400 \
             --products 8b:down:dx,8b:down,8b:gate_up:dx,8b:o:dx,8b:qkv:dx,8b:o,3b:gate_up:dx,3b:down \
             --configs auto,default,xla_einsum --seconds 1.5 --rounds 3 ;;
    sustained_attention) sustained_ab 400 --products 1b:qkv,1b:o:dx,3b:qkv,3b:o,3b:o:dx \
             --configs auto,pingpong_delay1,auto@gm4,xla_einsum --seconds 1.2 --rounds 3 ;;
    sustained_dw_orders) sustained_ab 560 \
             --products 8b:down:dw,8b:gate_up:dw,8b:o:dw,8b:qkv:dw,3b:down:dw,3b:qkv:dw,1b:down:dw \
             --configs auto,default,auto@gn4,xla_einsum --seconds 1.2 --rounds 3 ;;
    sustained_trace) sustained_ab 300 --products 1b:qkv:dw,1b:o:dw,3b:qkv,8b:down:dx \
             --configs auto,xla_einsum --seconds 1.0 --rounds 2 --trace_calls 64 ;;
    sustained_dw_variants) sustained_ab 400 --products 1b:qkv:dw,1b:down:dw,3b:qkv:dw \
             --configs auto,default_defer2,default_defer4,default_e32,wg3_192x128,pingpong_delay1,xla_einsum \
             --seconds 1.0 --rounds 3 ;;
    sustained_dw_defer) dw_tests || continue
           sustained_ab 560 --products "$(diagonal_products dw)" \
             --configs auto,default_defer4,default_defer4@gm12,xla_einsum --seconds 1.0 --rounds 3 ;;
    dw_small_g) ab dw_small_g 220 --ab auto,default,row_stripes,xla_einsum --ab_groups 1,4 \
             --ab_products dw --ab_profile --ab_reps 3 --ab_shapes 1b:qkv,1b:down,3b:o,3b:down,8b:down ;;
    sustained_chain) sustained_ab 400 --products 1b:qkv:dw,1b:o:dw,1b:down:dw,1b:qkv,3b:qkv \
             --configs auto,xla_einsum --seconds 1.0 --rounds 3 --chain 8 --trace_calls 16 ;;
    dw_tests) dw_tests ;;
    sustained_dw_feed) sustained_ab 400 --products 1b:down:dw,1b:qkv:dw,3b:qkv:dw \
             --configs auto,dw_k32,dw_delay0,dw_128x128_s6,auto@gm4,xla_einsum --seconds 1.0 \
             --rounds 3 ;;
    probe_ring) timeout 300 python3 eval/probe_ring.py --products 1b:down:dw,1b:qkv:dw,3b:qkv:dw,1b:down \
             2>&1 | quiet | tee "$OUT/probe_ring.md" ;;
    rows_tests) tests_pass rows_tests 240 4 tests/test_grouped_matmul.py \
             "gpu_weight_offset and (rows_64x256 or dw)" ;;
    rows_probe) timeout 240 python3 eval/probe_ring.py --products 1b:down:dw,1b:qkv:dw \
             --configs auto,dw_rows,pingpong_delay1 2>&1 | quiet | tee "$OUT/rows_probe.md" ;;
    sustained_rows_dw) sustained_ab 300 --products 1b:down:dw,1b:qkv:dw,1b:o:dw,3b:qkv:dw,3b:gate_up:dw \
             --configs auto,dw_rows,xla_einsum --seconds 1.0 --rounds 3 ;;
    sustained_rows_all_dw) dw_tests || continue
           sustained_ab 560 --products "$(diagonal_products dw)" \
             --configs auto,dw_columns,dw_columns@gm12,auto@gm12,xla_einsum --seconds 0.8 --rounds 3 ;;
    rows_bursts) ab rows_bursts 400 --ab auto,dw_columns,xla_einsum --ab_groups 1,4,16 \
             --ab_products dw --ab_profile --ab_reps 3 \
             --ab_shapes 1b:qkv,1b:o,1b:gate_up,1b:down,3b:qkv,3b:o,3b:gate_up ;;
    sustained_rows_fwd) sustained_ab 400 \
             --products 1b:gate_up,3b:qkv,3b:o,3b:down,1b:down:dx,3b:qkv:dx,3b:gate_up:dx \
             --configs auto,rows_64x256,xla_einsum --seconds 1.0 --rounds 3 ;;
    borderline) sustained_ab 300 --products "${PRODUCTS:-3b:qkv,8b:down:dx,1b:down:dw}" \
             --configs auto,xla_einsum --seconds 1.0 --rounds "${ROUNDS:-10}" ;;
    wide_tests) tests_pass wide_tests 300 3 tests/test_grouped_matmul.py \
             "gpu_weight_offset and 320" ;;
    sustained_wide) tests_pass wide_tests 300 3 tests/test_grouped_matmul.py \
             "gpu_weight_offset and 320" || continue
           sustained_ab 400 --products 3b:qkv,3b:qkv:dw \
             --configs auto,rows_128x320,rows_128x320_k32,rows_128x320_dw,xla_einsum \
             --seconds 1.0 --rounds "${ROUNDS:-6}" ;;
    wide_n192) tests_pass wide_tests 300 5 tests/test_grouped_matmul.py \
             "gpu_weight_offset and 320" || continue
           timeout 200 python3 eval/ptxas_report.py --products 3b:qkv \
             --configs auto,rows_64x256,rows_128x320,rows_128x320_dw,rows_128x320_n192,rows_128x320_n192_d0 \
             2>&1 | quiet | tee "$OUT/wide_ptxas.md"
           sustained_ab 300 --products 3b:qkv \
             --configs auto,rows_128x320_n192,rows_128x320_n192_d0,xla_einsum \
             --seconds 1.0 --rounds "${ROUNDS:-5}" ;;
    sustained_fwd_dx) sustained_ab 560 --products "$(diagonal_products fwd dx)" \
             --configs auto,xla_einsum --seconds 1.2 --rounds 3 ;;
    sustained_dw) sustained_ab 560 --products "$(diagonal_products dw)" \
             --configs auto,xla_einsum --seconds 1.2 --rounds 3 ;;
    *) echo "unknown stage $stage (tests, tests_offsets, tests_model, generate, probe_decode," \
            "probe_decode_graphs, probe_decode_profile, probe_skinny, generate_batch, bench, agreement, kernel, kernel_big, fused, diagonal," \
            "train, profile, pingpong, pingpong2, select, train_products, train_profile," \
            "train_zero_init, wg3, select3, pingpong_bwd, reproducibility, wg3_repeat," \
            "train_diagonal, wg3_groups, select_wide, train_deterministic," \
            "train_diagonal_long, train_diagonal_profile, wg3_epilogue, train_windows," \
            "wg3_cluster, train_seq_remat, parity_rest, select_cluster, compile_cache, train_4096," \
            "dw_auto, parity_all, pingpong_turn, defer, mlp8b, grid8b, smfit, smfit_select, wide_small_g, wide_select, wide_fwd, smfit_fwd, wide_rest, dw_cluster, split_cols, fwd_t," \
            "ncu, ncu_dw, ncu_source, sustained, sustained_fwd_dx, sustained_dw, sustained_attention," \
            "sustained_dw_orders, sustained_dw_variants, sustained_trace, sustained_dw_defer," \
            "dw_small_g, dw_tests, sustained_chain, ncu_dw_gm4, sustained_dw_feed, probe_ring, rows_tests," \
            "rows_probe, sustained_rows_dw, sustained_rows_fwd, sustained_rows_all_dw, rows_bursts, borderline," \
            "wide_tests, sustained_wide, wide_n192)"
       exit 2 ;;
  esac
done
