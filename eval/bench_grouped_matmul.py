"""Benchmark: grouped matmul, Pallas Mosaic GPU kernel vs XLA einsum.

For Llama-3.2-1B / 3.2-3B / 3.1-8B diagonal-step shapes (x [G, m, k] @ w [G,
k, n], m = B * (T + M) rows per slot), every figure is given in TFLOP/s of
USEFUL work (2 * active * m * k * n / seconds) and as a fraction of a dense
8192^3 bf16 ``jnp.dot`` timed in the same run. Before timing, every (shape,
G) is checked: pallas vs xla relative error <= 1e-2 and idle groups exactly 0.
Baselines: "xla" is the library's XLA path (einsum + the select that zeroes
idle groups); "xla_einsum" is XLA's plain batched matmul of all groups (timed
at full load only), the figure to beat.

    python3 eval/bench_grouped_matmul.py [--models 1b,3b,8b] [--sweep NAMES]
        [--bwd] [--out DIR] [--quick]
    python3 eval/bench_grouped_matmul.py --models "" --ab default,xla_einsum \
        --ab_profile --ab_shapes 1b:qkv,1b:o    # interleaved A/B + device times

Writes DIR/grouped_matmul_h200.json (rows: model, shape, G, active, impl,
seconds, tflops, frac_of_dense; device, jax version, date, command) and prints
a markdown table. ``--smoke`` runs tiny shapes with impl=interpret on CPU to
test this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import re
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

import kernels  # noqa: E402
from kernels import grouped_matmul_mgpu as mgpu_kernel  # noqa: E402
from kernels import ops  # noqa: E402
from kernels import swiglu as swiglu_ops  # noqa: E402

# (name, m, k, n) per model: fused QKV, attention output, fused gate/up, down.
MODELS = {
    "1b": [
        ("qkv", 1152, 2048, 3072),
        ("o", 1152, 2048, 2048),
        ("gate_up", 1152, 2048, 16384),
        ("down", 1152, 8192, 2048),
    ],
    "3b": [
        ("qkv", 2176, 3072, 5120),
        ("o", 2176, 3072, 3072),
        ("gate_up", 2176, 3072, 16384),
        ("down", 2176, 8192, 3072),
    ],
    "8b": [
        ("qkv", 4224, 4096, 6144),
        ("o", 4224, 4096, 4096),
        ("gate_up", 4224, 4096, 28672),
        ("down", 4224, 14336, 4096),
    ],
}


def _time(fn, *args, min_batch_s=0.02, runs=7):
    """Median seconds per call: batches of back-to-back calls, synced at end."""
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, min(200, int(min_batch_s / one)))
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def _rel_err(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _product_operands(key, g, m, k, n, transpose=None):
    """bf16 operands of the product (m, k, n) as stored: a [g, m, k] (or [g, k, m] with
    transpose_lhs), b [g, k, n] (or [g, n, k] with transpose_rhs), b scaled by 1/sqrt(k)."""
    tl, tr = transpose or (False, False)
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (g, k, m) if tl else (g, m, k), jnp.float32)
    b = jax.random.normal(kb, (g, n, k) if tr else (g, k, n), jnp.float32)
    return a.astype(jnp.bfloat16), (b / np.sqrt(k)).astype(jnp.bfloat16)


# The products of a grouped matmul y = x @ w (x [G, m, k], w [G, k, n]) as (m, k, n) of the
# product and (transpose_lhs, transpose_rhs): dx = dy @ w^T and dw = x^T @ dy.
PRODUCTS = {"fwd": lambda m, k, n: ((m, k, n), None),
            "dx": lambda m, k, n: ((m, n, k), (False, True)),
            "dw": lambda m, k, n: ((k, m, n), (True, False))}


def diagonal_products() -> dict[str, tuple]:
    """Every product of the diagonal shapes, in MODELS order, by name ("1b qkv", "1b qkv dx",
    "1b qkv dw", ...): its (m, k, n) and (transpose_lhs, transpose_rhs) (None: forward), as
    PRODUCTS gives them."""
    return {f"{model} {product_name(name, p)}": kind(m, k, n) for model, rows in MODELS.items()
            for name, m, k, n in rows for p, kind in PRODUCTS.items()}


# The forward product computed transposed, y^T = w^T @ x^T (w read m-minor as the left operand,
# x k-minor as the right one): at G = 1 its output tiles can match the SM count with 128-byte
# swizzles on both operands (1b o: 11 x 12 tiles of 192 x 96), where the forward product's
# can only with a 64-byte one (run s19_smfit_fwd: 0.65-0.90x); a consumer would read y^T.
# Timed by name (--ab_products fwd_t); not among the figures' products.
TRANSPOSED_PRODUCTS = {"fwd_t": lambda m, k, n: ((n, k, m), (True, True))}


def product_name(shape: str, product: str) -> str:
    """A row's shape name for a product: "qkv", "qkv dx", "qkv dw"."""
    return shape if product == "fwd" else f"{shape} {product}"


def device_us(note: str | None) -> float | None:
    """The device time per call that a profiled A/B row's note carries ("device N us/call")."""
    found = re.search(r"device (\d+) us/call", note or "")
    return float(found.group(1)) if found else None


def dense_seconds(size=8192, dtype=jnp.bfloat16):
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (size, size), jnp.float32).astype(dtype)
    f = jax.jit(jnp.dot)
    return _time(f, a, b), 2.0 * size**3


@dataclasses.dataclass
class Row:
    model: str
    shape: str
    m: int
    k: int
    n: int
    G: int
    active: int
    impl: str
    seconds: float
    tflops: float
    frac_of_dense: float
    config: str = ""
    rel_err: float | None = None
    note: str = ""
    tflops_range: list[float] | None = None  # (min, max) over --ab rounds
    device_us_range: list[float] | None = None  # (min, max) device us per call over --ab traces


@functools.lru_cache(maxsize=None)
def _make_fn(impl, config=None, transpose=None):
    if impl == "xla_einsum":
        tl, tr = transpose or (False, False)
        spec = f"{'gkm' if tl else 'gmk'},{'gnk' if tr else 'gkn'}->gmn"
        return jax.jit(lambda a, b, lo, hi: jnp.einsum(spec, a, b))
    if transpose is None:

        def f(x, w, lo, hi):
            return kernels.grouped_matmul(x, w, (lo, hi), impl=impl, config=config)
    else:  # backward-style products, straight to the kernel / reference
        tl, tr = transpose

        def f(a, b, lo, hi):
            if impl == "xla":
                return kernels.grouped_matmul_reference(
                    a, b, jnp.stack([lo, hi]), transpose_lhs=tl, transpose_rhs=tr
                )
            dims = mgpu_kernel.problem_dims(a.shape, b.shape, tl, tr)
            cfg = config or mgpu_kernel.select_config(*dims, transpose_lhs=tl, transpose_rhs=tr)
            interpret = impl == "interpret"   # CPU checks of this script
            return mgpu_kernel.grouped_matmul_mgpu(
                a,
                b,
                jnp.stack([lo, hi]).astype(jnp.int32),
                transpose_lhs=tl,
                transpose_rhs=tr,
                config=cfg,
                interpret=plgpu.InterpretGPUParams() if interpret else None,
                num_sms=ops.INTERPRET_NUM_SMS if interpret else None,
            )

    return jax.jit(f)


def bench_shape(
    model,
    name,
    m,
    k,
    n,
    groups,
    actives_at_max,
    impls,
    dense_tflops,
    key,
    rows,
    failures,
    config=None,
    note="",
    transpose=None,
):
    """Check, then time, one (m, k, n) for each G in groups (+ partial loads)."""
    for g in groups:
        a, b = _product_operands(key, g, m, k, n, transpose)
        actives = sorted({g, *(a_ for a_ in actives_at_max if a_ < g)}) if g == max(groups) else [g]
        fns = {impl: _make_fn(impl, None if impl == "xla" else config, transpose) for impl in impls}
        shape_s = f"{m}x{k}x{n}"
        ok = {}
        for impl in impls:
            if impl.startswith("xla"):
                ok[impl] = True
                continue
            try:
                for act in (g, max(1, g // 2)):
                    lo = (g - act) // 2
                    got = fns[impl](a, b, jnp.int32(lo), jnp.int32(lo + act))
                    want = fns["xla"](a, b, jnp.int32(lo), jnp.int32(lo + act))
                    err = _rel_err(got, want)
                    got32 = np.asarray(jnp.asarray(got, jnp.float32))
                    idle = np.concatenate([got32[:lo].ravel(), got32[lo + act :].ravel()])
                    if not (err <= 1e-2 and np.all(idle == 0) and np.all(np.isfinite(got32))):
                        raise AssertionError(
                            f"{impl} wrong: rel_err={err:.3g}, idle max"
                            f" {np.abs(idle).max() if idle.size else 0}"
                        )
                ok[impl] = err
            except Exception as e:  # keep going: report the failure
                failures.append(f"{model} {name} {shape_s} G={g} {impl}: {e!r}"[:2000])
                traceback.print_exc()
                ok[impl] = None
        for act in actives:
            lo = jnp.int32((g - act) // 2)
            hi = jnp.int32((g - act) // 2 + act)
            flops = 2.0 * act * m * k * n
            for impl in impls:
                if ok[impl] is None or (impl == "xla_einsum" and act != g):
                    continue
                try:
                    sec = _time(fns[impl], a, b, lo, hi)
                except Exception as e:
                    failures.append(f"time {model} {name} G={g} {impl}: {e!r}"[:2000])
                    continue
                tf = flops / sec / 1e12
                rows.append(
                    Row(
                        model,
                        name,
                        m,
                        k,
                        n,
                        g,
                        act,
                        impl,
                        sec,
                        tf,
                        tf / dense_tflops,
                        config="" if impl.startswith("xla") else str(config or "auto"),
                        rel_err=None if impl.startswith("xla") else ok[impl],
                        note=note,
                    )
                )
                r = rows[-1]
                print(
                    f"  {model:3s} {name:8s} {shape_s:>16s} G={g:2d} act={act:2d}"
                    f" {impl:7s} {sec * 1e3:8.3f} ms {tf:6.1f} TF/s"
                    f" {r.frac_of_dense:5.2f} dense {note}",
                    flush=True,
                )
        del a, b


M_ = mgpu_kernel.MatmulDimension
SWEEP = {  # named configs for --sweep / --ab (the default is select_config's choice)
    # Every config but ping-pong runs on the ring of stages (kernels/ring_mgpu.py). The A/B runs
    # up to s14_* timed some of these names on JAX's pipelines (the configs they wrote say
    # chain_tiles=..., without ring=True).
    # 128x256 CTA, 4 stages, one wgmma group in flight, one deferred epilogue tile
    "default": mgpu_kernel.DEFAULT_CONFIG,
    "delay0": dataclasses.replace(mgpu_kernel.DEFAULT_CONFIG, delay_release=0),
    "stages3": mgpu_kernel.TuningConfig(max_concurrent_steps=3),
    "stages2": mgpu_kernel.TuningConfig(max_concurrent_steps=2),
    "narrow": mgpu_kernel.NARROW_CONFIG,  # 128x128, 5 stages
    "narrow_s4": mgpu_kernel.TuningConfig(tile_n=64),  # 128x128, 4 stages
    "grid_m4": mgpu_kernel.TuningConfig(grid_minor_dim=M_.M, grid_tile_width=4),
    "grid_n4": mgpu_kernel.TuningConfig(grid_tile_width=4),
    "wg_m": mgpu_kernel.TuningConfig(wg_dimension=M_.M),
    # 256 x 128 CTA tiles (two 128 x 128 warpgroups splitting rows) in 2-CTA clusters along n
    # (the A tile multicast; clusters take no deferred epilogue tiles): cuBLAS runs 8b down on
    # 256 x 128 cooperative tiles in 2-CTA clusters (nvjet ..._256x128_64x4_2x1_..._coopA)
    "wg_m_cn": mgpu_kernel.TuningConfig(wg_dimension=M_.M, cluster_dimension=M_.N),
    # 128 x 192 CTA tiles, split by rows between the two warpgroups (64 x 192 wgmma each):
    # n = 3072 gives 144 tiles per group instead of 108, fewer idle SMs in the last wave.
    "m64_n192": mgpu_kernel.TuningConfig(tile_m=64, tile_n=192, wg_dimension=M_.M),
    # the default's 128 x 256 CTA tiles split by rows (one 64 x 256 wgmma per k16 and warpgroup,
    # CUTLASS's cooperative split) rather than by columns (two 64 x 128 ones, each reading its
    # B slice again): a sixth less shared-memory reading per k-step. On dw rule 9's choice since
    # s26 ("dw_rows" below); on seven forward / dx products 0.98-1.00x "auto" (run s26_rows_fwd)
    "rows_64x256": mgpu_kernel.ROW_SPLIT_CONFIG,
    # clusters of 2 CTAs on neighbouring column (row) tiles, the A (B) tile multicast to both
    **{f"cluster_{d.name.lower()}": mgpu_kernel.TuningConfig(cluster_dimension=d) for d in M_},
    # the whole 128 x 128 warpgroup tile staged for the epilogue (no waits on earlier TMA
    # stores inside it), paid for with a stage less
    "stages3_slots4": mgpu_kernel.TuningConfig(max_concurrent_steps=3, epi_slots=4),
    # cuBLAS's choice for the 1b attention shapes (nvjet ..._128x128_64x6_2x1): 128 x 128 CTA
    # tiles (two 64 x 128 warpgroups), 6 stages, optionally 2-CTA clusters
    "m64n128_s6": mgpu_kernel.TuningConfig(tile_m=64, tile_n=128, wg_dimension=M_.M,
                                           max_concurrent_steps=6),
    "m64n128_s6_cn": mgpu_kernel.TuningConfig(tile_m=64, tile_n=128, wg_dimension=M_.M,
                                              max_concurrent_steps=6, cluster_dimension=M_.N),
    "m64n128_s4": mgpu_kernel.TuningConfig(tile_m=64, tile_n=128, wg_dimension=M_.M),
    "m64n128_s4_cn": mgpu_kernel.TuningConfig(tile_m=64, tile_n=128, wg_dimension=M_.M,
                                              cluster_dimension=M_.N),
    # ping-pong: the two compute warpgroups on different 128 x 128 tiles, taking turns on the
    # tensor cores (one's epilogue under the other's main loop), one ring of 6 (or 4) stages;
    # "pingpong" and its _s4 / _n256 variants wait for each k-step's wgmma (delay_release=0, as
    # PINGPONG_CONFIG did when they were first measured); PINGPONG_CONFIG is "pingpong_delay1"
    "pingpong": dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG, delay_release=0),
    "pingpong_delay1": mgpu_kernel.PINGPONG_CONFIG,
    # the turn passed once the last wgmma of a main loop is done, not once it is issued (as
    # every ping-pong run up to s14_* did): the tensor cores drain between the warpgroups
    "pingpong_late_turn": dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG, early_turn=False),
    "pingpong_s4": dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG, delay_release=0,
                                       max_concurrent_steps=4),
    "pingpong_n256": dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG, delay_release=0, tile_m=64,
                                         tile_n=256, max_concurrent_steps=4),
    # ping-pong with one wgmma in flight (the only ping-pong variant near the default kernel in
    # the first A/B), with fewer stages or another tile order (L2 reuse)
    **{f"pingpong_delay1_{name}": dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG, **kw)
       for name, kw in {"s4": dict(max_concurrent_steps=4), "s5": dict(max_concurrent_steps=5),
                        "gm4": dict(grid_minor_dim=M_.M, grid_tile_width=4),
                        "gn4": dict(grid_tile_width=4)}.items()},
    # three compute warpgroups splitting 192-row CTA tiles (m = 1152 = 6 x 192): 192 x 128 (96
    # tiles on the 1b n = 2048 products at G = 1, where 128 x 256 gives 72 for 132 SMs), 192 x
    # 192 (cuBLAS's tile on 8b gate/up) and its 3-stage variants with more epilogue slots
    **mgpu_kernel.THREE_WG_VARIANTS,
    # column tiles sized to the SM count: 192 x 96 and 128 x 160, cuBLAS's tiles at G = 1 (on
    # the forward and dw products, b stored n-minor, with a 64-byte swizzle on both operands)
    **mgpu_kernel.SM_FIT_VARIANTS,
    # 192 x 192 tiles of two warpgroups splitting the columns (192 x 96 each): cuBLAS's tile on
    # 8b down dx (nvjet ..._192x192_64x4_1x2_h_bz_coopB)
    **mgpu_kernel.COLUMN_SPLIT_VARIANTS,
    # and with 4 epilogue slots (e4), 3 stages (s3, s3e4), no deferred epilogue tile (d0), in
    # 2-CTA clusters along m without one (cm), row stripes walked along n (gm): run
    # s20_wg2_variants on 8b down / gate_up dx at G = 16 (only d0 and cm near "auto")
    **{f"wg2_{name}": dataclasses.replace(mgpu_kernel.COLUMN_SPLIT_VARIANTS["wg2_192x192"], **kw)
       for name, kw in {"e4": dict(epi_slots=4), "s3": dict(max_concurrent_steps=3),
                        "s3e4": dict(max_concurrent_steps=3, epi_slots=4),
                        "d0": dict(deferred_epi_tiles=0),
                        "cm": dict(cluster_dimension=M_.M, deferred_epi_tiles=0),
                        "gm": dict(grid_minor_dim=M_.M)}.items()},
    # narrower epilogue tiles (64 x 32) in as much shared memory, so more of them are in flight:
    # 192 x 192 tiles with 2 slots per warpgroup (not 1 of 64 x 64), the default with 4 (not 2);
    # without deferred epilogue tiles, as measured (runs s15_epi_*: level or slower)
    "wg3_192x192_e32": dataclasses.replace(mgpu_kernel.WIDE_THREE_WG_CONFIG, epi_tile_n=32,
                                           epi_slots=2, deferred_epi_tiles=0),
    "default_e32": dataclasses.replace(mgpu_kernel.DEFAULT_CONFIG, epi_tile_n=32, epi_slots=4,
                                       deferred_epi_tiles=0),
    # the last d epilogue tiles of a tile stored under the next tile's first k-steps (the
    # default defers 1 since the runs s15_*; 0: all stored in the epilogue, as before)
    **{f"default_defer{d}": dataclasses.replace(mgpu_kernel.DEFAULT_CONFIG, deferred_epi_tiles=d)
       for d in (0, 1, 2, 4)},
    # the 192 x 192 tiles (plain, clustered along n) storing all epilogue tiles in the epilogue
    **{f"{name}_nodefer": dataclasses.replace(mgpu_kernel.THREE_WG_VARIANTS[name],
                                              deferred_epi_tiles=0)
       for name in ("wg3_192x192", "wg3_192x192_cn")},
    # the default tiles in other tile orders (planar_snake): stripes of 4 or 8 column tiles
    # walked down m (gn4, gn8; the default walks one column at a time), or row stripes walked
    # along n (gm1, gm4), for the 8b MLP products whose operands outgrow the L2 cache
    **{f"default_g{dim.name.lower()}{width}": dataclasses.replace(
        mgpu_kernel.DEFAULT_CONFIG, grid_minor_dim=dim, grid_tile_width=width)
       for dim, width in ((M_.N, 4), (M_.N, 8), (M_.M, 1), (M_.M, 4))},
    # select_config's rule 8 (row stripes of 12, one deferred epilogue tile; rule 9 makes it
    # DW_ROW_STRIPE_CONFIG on dw)
    "row_stripes": mgpu_kernel.ROW_STRIPE_CONFIG,
    # rule 9's dw tiles as of s25 (DW_COLUMN_SPLIT_CONFIG) fed differently, where PC sampling
    # of 1b down dw showed its compute warps waiting on a stage's loads at 12-14 % of all
    # samples, cuBLAS's at about 1 % (runs s25_ncu_source*): k-steps of 32 in 8 stages (1.5x
    # the bytes in flight; a 64-byte swizzle), no wgmma group in flight, and 128 x 128 tiles in
    # 6 stages (cuBLAS's nvjet ..._128x128_64x6_...). Under sustained load at G = 16 on 1b down
    # / qkv and 3b qkv dw (runs s25_dw_feed*): 0.92x, 0.996-1.003x and 0.76-0.84x the speed of
    # "auto" then (the column split); 2-CTA clusters with the 4 deferred tiles (code 1480caf)
    # 0.99-1.00x. "dw_columns" is that split itself; "dw_rows" is today's DW_CONFIG, the same
    # tiles split by rows (runs s26_rows_*: 0.2-2.1 % faster than "dw_columns" on the seven dw
    # products timed in the default order).
    **{f"dw_{name}": dataclasses.replace(mgpu_kernel.DW_COLUMN_SPLIT_CONFIG, **kw)
       for name, kw in {"columns": {},
                        "k32": dict(tile_k=32, max_concurrent_steps=8),
                        "delay0": dict(delay_release=0),
                        "128x128_s6": dict(tile_m=64, tile_n=128, wg_dimension=M_.M,
                                           max_concurrent_steps=6, deferred_epi_tiles=2),
                        }.items()},
    "dw_rows": mgpu_kernel.DW_CONFIG,
    # 128 x 320 tiles split by rows, two wgmma accumulators a warpgroup (256 + 64 columns):
    # 3b qkv's n = 5120 in 16 column tiles, 33 full waves at G = 16
    **mgpu_kernel.WIDE_ROW_SPLIT_VARIANTS,
}


_ORDER_SUFFIX = re.compile(r"@g([nm])(\d+)$")


def resolve_config(name: str, g: int, m: int, k: int, n: int, transpose_lhs: bool = False,
                   transpose_rhs: bool = False):
    """The TuningConfig a config name stands for: "auto" (select_config's choice for the
    product) or a SWEEP name, optionally in another tile order: "auto@gn12" walks stripes of 12
    column tiles down m (grid_minor_dim N, grid_tile_width 12), "auto@gm11" stripes of 11 row
    tiles along n (kernels/mgpu_tiles.tile_coords)."""
    order = _ORDER_SUFFIX.search(name)
    base = name[:order.start()] if order else name
    if base == "auto":
        config = mgpu_kernel.select_config(g, m, k, n, transpose_lhs=transpose_lhs,
                                           transpose_rhs=transpose_rhs)
    elif base in SWEEP:
        config = SWEEP[base]
    else:
        raise KeyError(f"config {name!r}: not auto or a SWEEP name (optionally with a tile-order"
                       f" suffix like @gn12); SWEEP: {', '.join(sorted(SWEEP))}")
    if order:
        dim = M_.N if order.group(1) == "n" else M_.M
        config = dataclasses.replace(config, grid_minor_dim=dim,
                                     grid_tile_width=int(order.group(2)))
    return config


def add_product_arguments(parser, default_products: str) -> None:
    """--products and --configs of the profiling scripts (see ``full_load_calls``)."""
    parser.add_argument("--products", default=default_products,
                        help="comma-separated model:shape[:fwd|dx|dw], G = 16, all groups active")
    parser.add_argument("--configs", default="auto,xla_einsum",
                        help="auto (select_config's choice), xla_einsum (cuBLAS) or SWEEP names,"
                             " each optionally in another tile order (auto@gn12:"
                             " resolve_config)")


def product_spec(spec: str):
    """(label, (m, k, n), transpose) of a diagonal product named "model:shape[:fwd|dx|dw]" (e.g.
    "8b:down:dx" -> "8b down dx"), as ``diagonal_products`` gives it; an unknown name stops with
    the known shapes."""
    model, shape, *rest = spec.split(":")
    product = rest[0] if rest else "fwd"
    label = f"{model} {product_name(shape, product)}"
    products = diagonal_products()
    if product not in PRODUCTS or len(rest) > 1 or label not in products:
        raise SystemExit(f"unknown product {spec!r}: model:shape[:fwd|dx|dw], e.g. 8b:down:dx;"
                         f" shapes {', '.join(f'{m}:{r[0]}' for m in MODELS for r in MODELS[m])}")
    return (label, *products[label])


def full_load_calls(spec: str, config_names, key, g: int = 16):
    """One product at full load for the profiling scripts (eval/ncu_products.py,
    eval/sustained_ab.py): spec "model:shape[:fwd|dx|dw]" (e.g. "8b:down:dx"). Returns its label
    ("8b down dx"), the call's arguments (a, b, lo, hi), {config name: (jitted call, str of its
    TuningConfig, "" for cuBLAS)} for the configs (``resolve_config`` names or "xla_einsum") that
    serve it and compute it like the XLA path (relative error <= 1e-2), and [(name, why)] for
    the others."""
    label, (m, k, n), transpose = product_spec(spec)
    tl, tr = transpose or (False, False)
    a, b = _product_operands(key, g, m, k, n, transpose)
    args = (a, b, jnp.int32(0), jnp.int32(g))
    want = _make_fn("xla", None, transpose)(*args)
    calls, failed = {}, []
    for name in config_names:
        if name == "xla_einsum":
            calls[name] = (_make_fn("xla_einsum", None, transpose), "")
            continue
        config = resolve_config(name, g, m, k, n, tl, tr)
        why = mgpu_kernel.unsupported_reason(a.shape, b.shape, a.dtype, a.dtype, transpose_lhs=tl,
                                             transpose_rhs=tr, config=config)
        if why:
            failed.append((name, why))
            continue
        fn = _make_fn("pallas", config, transpose)
        try:
            err = _rel_err(fn(*args), want)
            if not err <= 1e-2:
                raise AssertionError(f"rel_err={err:.3g}")
        except Exception as e:   # a config that fails to compile or compute is reported
            failed.append((name, repr(e)[:500]))
            continue
        calls[name] = (fn, str(config))
    return label, args, calls, failed


def markdown_sweep(rows):
    lines = [
        "| shape | config | G | active | pallas TF/s | frac | xla TF/s |",
        "|---|---|---|---|---|---|---|",
    ]
    xla = {
        (r.shape, r.G, r.active): r for r in rows if r.impl == "xla" and r.note.startswith("sweep")
    }
    sweep_shapes = {r.shape for r in rows if r.note.startswith("sweep")}
    for r in rows:
        if (
            r.impl != "xla"
            and r.model == "1b"
            and r.note == ""
            and (r.shape in sweep_shapes and r.G == 16)
        ):
            r = dataclasses.replace(r, note="sweep default (select_config)")
        if r.impl != "xla" and r.note.startswith("sweep"):
            x = xla.get((r.shape, r.G, r.active))
            lines.append(
                f"| {r.shape} {r.m}x{r.k}x{r.n} | {r.note[6:]} | {r.G} |"
                f" {r.active} | {r.tflops:.0f} | {r.frac_of_dense:.2f} |"
                f" {x.tflops:.0f} |"
                if x
                else ""
            )
    return "\n".join(lines)


# --ab names for the fused gate/up + SwiGLU product (kernels.grouped_matmul_swiglu; its default
# config, or waiting for each k-step's wgmma) and its unfused composition (the kernel's gate_up
# matmul, then XLA's activation pass): gate_up shapes.
SWIGLU_VARIANTS = {"swiglu": "fused", "swiglu_delay0": "fused", "swiglu_unfused": "unfused"}
SWIGLU_CONFIGS = {"swiglu_delay0": dataclasses.replace(mgpu_kernel.SWIGLU_CONFIG, delay_release=0)}


@functools.cache
def _make_swiglu_fn(impl, config=None):
    return jax.jit(lambda a, b, lo, hi: kernels.grouped_matmul_swiglu(a, b, (lo, hi), impl=impl,
                                                                      config=config))


@functools.cache
def _make_unfused_swiglu_fn(impl):
    """The grouped-matmul kernel writing [gate | up], then XLA's elementwise activation."""
    return jax.jit(lambda a, b, lo, hi: swiglu_ops._swiglu(
        kernels.grouped_matmul(a, b, (lo, hi), impl=impl)))


def per_call_seconds(times: dict[str, list[float]], calls: int) -> dict[str, float]:
    """{kernel name: device seconds per call} from a trace's kernel durations (in launch order)
    over `calls` calls: the median over calls of each call's launches of the kernel, so that a
    slow call in a trace does not move the figure (the mean where the launches do not divide
    into the calls)."""
    per_call = {}
    for name, ts in times.items():
        if len(ts) % calls:
            per_call[name] = sum(ts) / calls
        else:
            k = len(ts) // calls
            per_call[name] = statistics.median(sum(ts[i:i + k]) for i in range(0, len(ts), k))
    return per_call


def _device_times(fn, args, calls=10):
    """{kernel name: device seconds per call} from a jax.profiler trace of `calls` calls
    (`per_call_seconds`), after a throwaway trace: in the H200 A/B runs s13_ring_* the kernel
    config traced right after the XLA path read 2.6-15 % slower than its second timing in 6 of
    40 products' timings (on the 1b shapes), while its wall-clock rate was not slower."""
    from eval.profile import traced_kernel_times

    run_once = lambda: jax.block_until_ready(fn(*args))
    run_once()
    traced_kernel_times(run_once, 2)
    times, _ = traced_kernel_times(run_once, calls)
    return per_call_seconds(times, calls)


def device_summary(rounds: list[dict[str, float]], flops: float) -> tuple[str, float, float, float]:
    """(note text, median, min, max device seconds per call) from the per-round traces of one
    config ({kernel name: device seconds per call} each): the median round's total and its three
    longest kernels, the range over the rounds."""
    busy = [sum(r.values()) for r in rounds]
    mid = sorted(range(len(busy)), key=busy.__getitem__)[len(busy) // 2]
    top = sorted(rounds[mid].items(), key=lambda kv: -kv[1])[:3]
    text = (f"device {busy[mid] * 1e6:.0f} us/call ({min(busy) * 1e6:.0f}-{max(busy) * 1e6:.0f}"
            f" over {len(busy)} traces) = {flops / busy[mid] / 1e12:.0f} TF/s: "
            + "; ".join(f"{name[:90]} {t * 1e6:.0f} us" for name, t in top))
    return text, busy[mid], min(busy), max(busy)


def ab_compare(shapes, cfg_names, active, reps, dense_tflops, key, rows, failures, g=16,
               profile=False, configs=None, impl="pallas", products=("fwd",)):
    """Interleaved A/B: every config (and XLA) of one shape is compiled and checked first,
    then timed once per round, ``reps`` rounds in rotated order, so slow drifts of the GPU's
    clock hit every config alike. Rows carry the median and the (min, max) over rounds. With
    ``profile`` (on a GPU), each is also traced in every round, right after its timing: device
    time per call by kernel, the median round's in the note (``device_summary``), the range
    over the rounds in ``device_us_range`` (a single trace of 10 calls read up to 4.5 % off
    another config's on the 8b products in run s15_parity_all, while the wall clock disagreed).
    ``configs`` maps names to TuningConfigs (default SWEEP); "auto" names select_config's choice
    for the shape, "xla_einsum" XLA's plain batched matmul (full load only). ``products``: of
    PRODUCTS, "fwd" and the backward products "dx" / "dw" (rows named e.g. "o dx"; the SwiGLU
    variants are forward-only)."""
    configs = dict(SWEEP if configs is None else configs)
    kinds = {**PRODUCTS, **TRANSPOSED_PRODUCTS}
    todo = [(model, product_name(name, p), *kinds[p](m, k, n))
            for model, name, m, k, n in shapes for p in products]
    active = g if active is None else active
    for model, name, (m, k, n), transpose in todo:
        tl, tr = transpose or (False, False)
        key, sub = jax.random.split(key)
        a, b = _product_operands(sub, g, m, k, n, transpose)
        lo, hi = jnp.int32((g - active) // 2), jnp.int32((g - active) // 2 + active)
        configs["auto"] = mgpu_kernel.select_config(g, m, k, n, transpose_lhs=tl,
                                                    transpose_rhs=tr)
        for cfg_name in cfg_names:   # "NAME#2": the config NAME once more, compiled and timed
            base = cfg_name.split("#")[0]   # apart (the spread between identical configs)
            if base != cfg_name and base in configs:
                configs[cfg_name] = configs[base]
        fns = {"xla": _make_fn("xla", None, transpose)}
        want = {}   # XLA reference outputs, computed once per kind of product
        for cfg_name in cfg_names:
            if cfg_name == "xla_einsum":
                if active == g:
                    fns[cfg_name] = _make_fn("xla_einsum", None, transpose)
                continue
            variant = cfg_name.split("#")[0]
            swiglu = variant in SWIGLU_VARIANTS   # gate/up + activation (output n/2 wide)
            if swiglu and transpose is not None:
                continue
            if swiglu:
                fn = (_make_swiglu_fn(impl, SWIGLU_CONFIGS.get(variant))
                      if SWIGLU_VARIANTS[variant] == "fused" else _make_unfused_swiglu_fn(impl))
            else:
                fn = _make_fn(impl, configs[cfg_name], transpose)
            if swiglu not in want:
                want[swiglu] = (_make_swiglu_fn("xla") if swiglu else fns["xla"])(a, b, lo, hi)
            try:
                err = _rel_err(fn(a, b, lo, hi), want[swiglu])
                if not err <= 1e-2:
                    raise AssertionError(f"rel_err={err:.3g}")
                fns[cfg_name] = fn
            except Exception as e:  # report and go on with the other configs
                failures.append(f"ab {model} {name} {cfg_name}: {e!r}"[:2000])
        traced = profile and jax.devices()[0].platform == "gpu"   # a CPU trace has no kernels
        samples = {c: [] for c in fns}
        device = {c: [] for c in fns}   # per round: {kernel: device seconds per call}
        order = list(fns)
        for r in range(reps):
            for c in order[r % len(order):] + order[: r % len(order)]:
                samples[c].append(_time(fns[c], a, b, lo, hi, runs=3))
                if traced:
                    device[c].append(_device_times(fns[c], (a, b, lo, hi)))
        flops = 2.0 * active * m * k * n
        for c, secs in samples.items():
            tfs = [flops / s_ / 1e12 for s_ in secs]
            sec = statistics.median(secs)
            note, device_range = "ab " + c, None
            if device[c]:
                text, _, fastest, slowest = device_summary(device[c], flops)
                note += " | " + text
                device_range = [fastest * 1e6, slowest * 1e6]
            variant = c.split("#")[0]
            kind = impl if (c in configs or variant in SWIGLU_VARIANTS) else "xla"
            rows.append(Row(model, name, m, k, n, g, active, kind,
                            sec, flops / sec / 1e12, flops / sec / 1e12 / dense_tflops,
                            config=str(configs.get(c) or SWIGLU_CONFIGS.get(variant) or ""),
                            note=note, tflops_range=[min(tfs), max(tfs)],
                            device_us_range=device_range))
            print(f"  ab {model} {name:8s} {m}x{k}x{n} G={g:2d} act={active:2d} {c:22s}"
                  f" {flops / sec / 1e12:6.1f} TF/s ({min(tfs):.0f}-{max(tfs):.0f}) {note[3:]}",
                  flush=True)
        del a, b


def markdown_ab(rows):
    lines = [("| model | shape (m x k x n) | active of G | config | median TF/s | min-max |"
              " frac of dense | / XLA path | / plain einsum |"),
             "|---|---|---|---|---|---|---|---|---|"]
    ab = [r for r in rows if r.note.startswith("ab ")]
    cfg = lambda r: r.note[3:].split(" | ")[0]
    base = {(cfg(r), r.model, r.shape, r.G, r.active): r for r in ab}
    ratio = lambda r, c: (f"{r.tflops / base[c, *k].tflops:.2f}"
                          if (c, *(k := (r.model, r.shape, r.G, r.active))) in base else "-")
    for r in ab:
        lo, hi = r.tflops_range
        lines.append(f"| {r.model} | {r.shape} {r.m}x{r.k}x{r.n} | {r.active} of {r.G} |"
                     f" {cfg(r)} | {r.tflops:.0f} | {lo:.0f}-{hi:.0f} | {r.frac_of_dense:.2f} |"
                     f" {ratio(r, 'xla')} | {ratio(r, 'xla_einsum')} |")
    return "\n".join(lines)


def markdown(rows):
    lines = [
        ("| model | shape (m x k x n) | G | active | xla path TF/s | frac | pallas TF/s | frac |"
         " pallas/xla path | plain einsum TF/s | frac | pallas/einsum |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r.model, r.shape, r.G, r.active, r.note)
    by = {}
    for r in rows:
        if r.note.startswith(("sweep", "ab ")):
            continue
        by.setdefault(key(r), {})[r.impl] = r
    for (model, shape, g, act, note), d in by.items():
        x, e = d.get("xla"), d.get("xla_einsum")
        p = d.get("pallas") or d.get("interpret")
        r0 = x or p or e
        cell = lambda r: (f"{r.tflops:.0f}", f"{r.frac_of_dense:.2f}") if r else ("-", "-")
        ratio = lambda a, b: f"{a.tflops / b.tflops:.2f}" if (a and b) else "-"
        lines.append(
            f"| {model} | {shape}{(' ' + note) if note else ''} {r0.m}x{r0.k}x{r0.n}"
            f" | {g} | {act} | {' | '.join(cell(x))} | {' | '.join(cell(p))} |"
            f" {ratio(p, x)} | {' | '.join(cell(e))} | {ratio(p, e)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="1b,3b,8b")
    p.add_argument(
        "--groups", default="1,2,4,8,16", help="G values timed at full load (1b; others: 1 and max)"
    )
    p.add_argument("--sweep", nargs="?", const="stages3,narrow,grid_m4,wg_m", default=None,
                   help="comma-separated SWEEP config names, timed on the --sweep_shapes")
    p.add_argument("--sweep_shapes", default="o,gate_up,down", help="1b shapes for --sweep")
    p.add_argument("--sweep_actives", default="4", help="active groups of 16 for --sweep")
    p.add_argument("--ab", default=None,
                   help="comma-separated SWEEP config names for an interleaved A/B (with XLA);"
                        " also auto (select_config's), xla_einsum, swiglu / swiglu_delay0 /"
                        " swiglu_unfused for gate_up shapes; NAME#2 times config NAME a second"
                        " time, apart (the run's noise between identical configs)")
    p.add_argument("--ab_shapes", default="1b:qkv,1b:o,1b:gate_up,1b:down",
                   help="model:shape pairs for --ab")
    p.add_argument("--ab_groups", default="16", help="comma-separated G values for --ab")
    p.add_argument("--ab_products", default="fwd",
                   help="comma-separated products for --ab: fwd, dx (dy @ w^T), dw (x^T @ dy),"
                        " fwd_t (w^T @ x^T)")
    p.add_argument("--ab_active", type=int, default=None,
                   help="active groups of G for --ab (default: all)")
    p.add_argument("--ab_reps", type=int, default=5, help="rounds of --ab")
    p.add_argument("--ab_profile", action="store_true",
                   help="--ab: also trace each config in every round (device time per kernel:"
                        " the median round's in the note, the range over the rounds)")
    p.add_argument(
        "--bwd", action="store_true", help="time the backward products (dx, dw) for 1b shapes"
    )
    p.add_argument(
        "--wide_only",
        action="store_true",
        help="also time the wide-tile kernel alone (no runtime choice"
        " of narrow tiles) on the 1b shapes, G=16, all loads",
    )
    p.add_argument("--big_groups", default="1,4,16", help="G values timed at full load for 3b/8b")
    p.add_argument("--quick", action="store_true",
                   help="3b/8b: only G=16 full and 4/16 active (else every --big_groups G at full"
                        " load and 1, 2, 4, 8 of the largest G active)")
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, impl=interpret, CPU: tests this script"
    )
    p.add_argument("--out", default=None,
                   help="results folder (default: $OUT, else eval/results; --smoke: out/smoke, so "
                        "a CPU smoke run never overwrites the committed H200 results)")
    p.add_argument(
        "--budget_s", type=float, default=0, help="skip remaining shapes after this many seconds"
    )
    args = p.parse_args(argv)
    # Config names are checked before any timing: an unknown one (e.g. a name from an older
    # run's command) would otherwise end the run with a KeyError after minutes of work.
    known_ab = {*SWEEP, "auto", "xla_einsum", *SWIGLU_VARIANTS}
    for flag, names, known in (("--sweep", args.sweep, set(SWEEP)), ("--ab", args.ab, known_ab)):
        unknown = [c for c in (names or "").split(",") if c and c.split("#")[0] not in known]
        if unknown:
            p.error(f"{flag}: unknown config name(s) {', '.join(unknown)};"
                    f" known: {', '.join(sorted(known))}")

    t_start = time.time()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", flush=True)
    rows: list[Row] = []
    failures: list[str] = []
    key = jax.random.key(int(time.time()))

    if args.out is None:
        args.out = "out/smoke" if args.smoke else os.environ.get("OUT", "eval/results")
    if args.smoke:
        dense_s, dense_flops = dense_seconds(256, jnp.float32)
        impls = ("xla", "interpret", "xla_einsum")
        models = {"smoke": [("a", 72, 128, 128)]}
        groups = [1, 4]
        actives = [1, 2]
    else:
        dense_s, dense_flops = dense_seconds()
        # xla: the library's XLA path (einsum + the active-group select); xla_einsum: XLA's
        # plain batched matmul of all groups (timed at full load only)
        impls = ("xla", "pallas", "xla_einsum")
        models = {mname: MODELS[mname] for mname in args.models.split(",") if mname}
        groups = [int(s) for s in args.groups.split(",")]
        actives = [1, 2, 4, 8]
    dense_tflops = dense_flops / dense_s / 1e12
    print(
        f"dense {dense_flops / 2:.3g}-FMA matmul: {dense_s * 1e3:.3f} ms = {dense_tflops:.1f} TF/s",
        flush=True,
    )

    def save():
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "grouped_matmul_h200.json")
        result = {
            "device": f"{dev.device_kind} ({dev.platform})",
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "dense": {
                "size": 8192 if not args.smoke else 256,
                "seconds": dense_s,
                "tflops": dense_tflops,
            },
            "note": (
                "tflops = useful FLOP (2*active*m*k*n) / seconds; seconds ="
                " median over 7 batches of back-to-back calls; frac_of_dense"
                " = tflops / dense bf16 jnp.dot tflops of the same run;"
                " config 'auto' = kernels.grouped_matmul_mgpu.select_config;"
                " note dx/dw = backward products (transposed operand views)"
            ),
            "failures": failures,
            "wall_seconds": time.time() - t_start,
            "rows": [dataclasses.asdict(r) for r in rows],
        }
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        table = markdown(rows)
        if any(r.note.startswith("sweep") for r in rows):
            table += "\n\n" + markdown_sweep(rows)
        if any(r.note.startswith("ab ") for r in rows):
            table += "\n\n" + markdown_ab(rows)
        with open(os.path.join(args.out, "grouped_matmul_h200.md"), "w") as f:
            f.write(
                f"device {result['device']}, jax {jax.__version__},"
                f" dense 8192^3 bf16 {dense_tflops:.0f} TF/s\n\n{table}\n"
            )
        return path, table

    todo = []  # (model, name, m, k, n, groups, actives, config, note, transpose)
    for mname in [m_ for m_ in models if m_ in ("1b", "smoke")]:
        for name, m, k, n in models[mname]:
            todo.append((mname, name, m, k, n, groups, actives, None, "", None))
    if args.sweep and not args.smoke:
        shapes = [s_ for s_ in MODELS["1b"] if s_[0] in args.sweep_shapes.split(",")]
        sweep_actives = [int(v) for v in args.sweep_actives.split(",")]
        for name, m, k, n in shapes:
            for cfg_name in args.sweep.split(","):
                todo.append(("1b", name, m, k, n, [16], sweep_actives, SWEEP[cfg_name],
                             "sweep " + cfg_name, None))
    if args.wide_only and not args.smoke:
        for name, m, k, n in MODELS["1b"]:
            todo.append(
                (
                    "1b",
                    name,
                    m,
                    k,
                    n,
                    [16],
                    actives,
                    SWEEP["default"],
                    "sweep wide only (128x256, 4 stages)",
                    None,
                )
            )
    if args.bwd and not args.smoke:
        # dx[G,m,k] = dy[G,m,n] @ w[G,k,n]^T: product (m, n, k), w read transposed
        # dw[G,k,n] = x[G,m,k]^T @ dy[G,m,n]: product (k, m, n), x read transposed
        for name, m, k, n in MODELS["1b"]:
            todo.append(("1b", name, m, n, k, [16], [4], None, "dx", (False, True)))
            todo.append(("1b", name, k, m, n, [16], [4], None, "dw", (True, False)))
    for mname in [m_ for m_ in models if m_ not in ("1b", "smoke")]:
        for name, m, k, n in models[mname]:
            gs = [max(groups)] if args.quick else [int(v) for v in args.big_groups.split(",")]
            todo.append((mname, name, m, k, n, gs, [4] if args.quick else actives, None, "",
                         None))

    for mname, name, m, k, n, gs, acts, cfg, note, tr in todo:
        if args.budget_s and time.time() - t_start > args.budget_s:
            failures.append(f"skipped (time budget): {mname} {name} {note}")
            continue
        key, sub = jax.random.split(key)
        bench_shape(
            mname,
            name,
            m,
            k,
            n,
            gs,
            acts,
            impls if not note.startswith("sweep") else ("xla", "pallas"),
            dense_tflops,
            sub,
            rows,
            failures,
            config=cfg,
            note=note,
            transpose=tr,
        )
        save()

    if args.ab and not args.smoke:
        pairs = [p_.split(":") for p_ in args.ab_shapes.split(",")]
        shapes = [(mo, *next(s_ for s_ in MODELS[mo] if s_[0] == sh)) for mo, sh in pairs]
        for g in [int(v) for v in args.ab_groups.split(",")]:
            key, sub = jax.random.split(key)
            ab_compare(shapes, args.ab.split(","), args.ab_active, args.ab_reps, dense_tflops, sub,
                       rows, failures, g=g, profile=args.ab_profile,
                       products=args.ab_products.split(","))
    path, table = save()
    print(table)
    if failures:
        print("FAILURES:\n" + "\n".join(failures))
    print(f"wrote {path} in {time.time() - t_start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
