"""Probe: a decode step's products (m = 1..8 rows) against one layer of stacked weights [L, k, n],
XLA (which copies the layer out of the stack before its GEMM) against the grouped-matmul kernel
reading the layer in place, its k split into S groups (kernels/split_k.py: partial products
in float32, summed after). Prints a table (us per product, GB/s of weights read) and writes JSON rows.

    python -m eval.probe_skinny --out probe_skinny.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import grouped_matmul_mgpu as mk
from kernels import split_k
from eval.bench_generate import median_seconds

SHAPES = {  # name: (k, n)
    "1b": {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048)},
    "8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
}
CONFIGS = {
    "64x128_s6": mk.TuningConfig(tile_m=64, tile_n=64, max_concurrent_steps=6, epi_slots=1),
    "64x256_s4": mk.TuningConfig(tile_m=64, tile_n=128, max_concurrent_steps=4, epi_slots=1),
    "64x128_k128_s4": mk.TuningConfig(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=4,
                                      epi_slots=1),
}


def split_product(x, w, layer, splits, cfg):
    """x [m, k] @ w[layer] (w [L, k, n]) on the kernel, k in `splits` slices (kernels/split_k.py)."""
    bounds = jnp.stack([0, 1, layer, 0]).astype(jnp.int32)
    return split_k.split_k_matmul(x[None], w, bounds, out_dtype=x.dtype, config=cfg,
                                  num_sms=mk.num_sms_of_device(), splits=splits)[0]


def timed(f, *args, reps=30):
    """(median seconds of f(*args) after a warm-up, its output)."""
    return median_seconds(lambda: f(*args), reps)[0], f(*args)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--rows", default="8,64")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="names from CONFIGS")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    rng = np.random.default_rng(0)
    print(f"{'shape':<12}{'m':>4} {'variant':<24}{'us/product':>11}{'GB/s':>8}{'rel err':>10}")
    for model in args.models.split(","):
        for name, (k, n) in SHAPES[model].items():
            L = args.layers if model == "1b" else max(2, args.layers // 4)
            w = jnp.asarray(rng.standard_normal((L, k, n), np.float32) * k ** -0.5, jnp.bfloat16)
            w_list = [w[i] for i in range(L)]
            for m in map(int, args.rows.split(",")):
                x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
                ref = np.einsum("mk,lkn->lmn", np.asarray(x, np.float64), np.asarray(w, np.float64))
                layer_ids = jnp.arange(L)
                chosen_splits = split_k.num_splits(1, k, n, split_k.CONFIG, mk.num_sms_of_device())

                def scan_of(product):
                    return jax.jit(lambda x, w: jax.lax.scan(
                        lambda c, l: (c, product(x, w, l)), None, layer_ids)[1])

                variants = {"xla_stacked": scan_of(lambda x, w, l: x @ w[l]),
                            "xla_separate": jax.jit(lambda x, ws: jnp.stack([x @ wi for wi in ws]))}
                for cname in args.configs.split(","):
                    cfg = CONFIGS[cname]
                    for s in (1, 2, 4, 8, 16):
                        if k % (s * cfg.tile_k) or n < cfg.cta_tile_n:
                            continue
                        variants[f"kernel_{cname}_S{s}"] = scan_of(
                            lambda x, w, l, s=s, cfg=cfg: split_product(x, w, l, s, cfg))
                if m >= 8 and name == "gate_up":
                    variants["kernel_swiglu_fused"] = scan_of(
                        lambda x, w, l: mk.grouped_matmul_mgpu(
                            x[None], w, jnp.stack([0, 1, l, 0]).astype(jnp.int32),
                            config=mk.SWIGLU_CONFIG, swiglu=True)[0])
                for vname, f in variants.items():
                    try:
                        sec, out = timed(f, x, w_list if vname == "xla_separate" else w,
                                         reps=args.reps)
                    except Exception as e:  # a config the kernel refuses or fails to lower
                        print(f"{name:<12}{m:>4} {vname:<24} FAILED {type(e).__name__}: {str(e)[:200]}")
                        rows.append(dict(model=model, shape=name, m=m, variant=vname, error=str(e)[:500]))
                        continue
                    per = sec / L
                    if vname == "kernel_swiglu_fused":
                        g, u = np.split(ref, 2, axis=-1)
                        want = g / (1 + np.exp(-g)) * u
                    else:
                        want = ref
                    err = float(np.abs(np.asarray(out, np.float64) - want).max() / np.abs(want).max())
                    gbs = k * n * 2 / per / 1e9
                    chosen = "  <- num_splits" if vname.endswith(f"_S{chosen_splits}") else ""
                    print(f"{model}-{name:<9}{m:>4} {vname:<24}{per * 1e6:>11.1f}{gbs:>8.0f}{err:>10.1e}{chosen}")
                    rows.append(dict(model=model, shape=name, k=k, n=n, m=m, layers=L, variant=vname,
                                     us_per_product=per * 1e6, weight_gb_per_s=gbs, rel_err=err))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                           date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), rows=rows), fh,
                      indent=1)


if __name__ == "__main__":
    main()
