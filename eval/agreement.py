"""Diagonal vs sequential at full model size on the device at hand (the CPU tests cover tiny models).

Runs both schedules on Llama-3.2-1B shapes with random weights (random W_mv) and prints the
relative L2 difference of the final hidden states and of every layer's A and z, in float32 with
full-precision matmuls (expect ~1e-5 or less: the schedules compute the same function) and in bf16
(rounding differs between a batched and a single matmul, and the recurrence carries it forward).
For scale it also prints the model's own sensitivity: how much the sequential result moves when
every weight is perturbed by a relative 1e-7 (float32 rounding size). Schedules that agree to
rounding differ by about that much; a bug would differ by far more.

With ``--gmm-impl auto`` both schedules run the kernels of `kernels/` (bf16 only; on a Hopper GPU
the grouped matmul and the fused gate/up + SwiGLU), and the row adds how far the sequential result
with the kernels is from the sequential result with XLA matmuls.

    python -m eval.agreement --tokens 16384
    python -m eval.agreement --tokens 8192 --gmm-impl auto
"""

from __future__ import annotations

import argparse
import json
import sys


def rel(a, b) -> float:
    import jax.numpy as jnp
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from armt_jax import diagonal_forward, init_params, sequential_forward
    from eval.bench import W_MV_STD, bench_config

    ap = argparse.ArgumentParser(prog="python -m eval.agreement", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="1b")
    ap.add_argument("--w-mv-std", type=float, default=W_MV_STD)
    ap.add_argument("--float32-only", action="store_true")
    ap.add_argument("--bf16-only", action="store_true")
    ap.add_argument("--gmm-impl", default="xla", choices=("xla", "auto"),
                    help="grouped matmuls of both schedules: 'auto' = the kernels on a Hopper GPU"
                         " (bf16 only), fused gate/up + SwiGLU included")
    args = ap.parse_args(argv)
    if args.float32_only and (args.bf16_only or args.gmm_impl != "xla"):
        ap.error("--float32-only excludes --bf16-only and --gmm-impl auto (the kernels take bf16)")

    cfg, armt = bench_config(args.size)
    attn = "cudnn" if jax.devices()[0].platform == "gpu" else None
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, args.tokens)),
                         jnp.int32)
    results = {}
    dtypes = ((jnp.float32, "highest"), (jnp.bfloat16, "default"))
    if args.float32_only:
        dtypes = dtypes[:1]
    if args.bf16_only or args.gmm_impl != "xla":
        dtypes = dtypes[1:]
    for dtype, precision in dtypes:
        params = init_params(jax.random.key(0), cfg, armt, dtype)
        w_mv = params["memory"]["w_mv"]
        params["memory"]["w_mv"] = (args.w_mv_std * jax.random.normal(jax.random.key(2), w_mv.shape)
                                    ).astype(dtype)
        f32_attn = None if dtype == jnp.float32 else attn      # cuDNN attention needs 16-bit
        outs = {}
        with jax.default_matmul_precision(precision):
            for name, fwd in (("sequential", sequential_forward), ("diagonal", diagonal_forward)):
                fn = jax.jit(lambda p, t, fwd=fwd: fwd(p, t, cfg, armt, output="hidden",
                                                       attn_impl=f32_attn, gmm_impl=args.gmm_impl))
                outs[name] = jax.block_until_ready(fn(params, tokens))
                if name == "sequential":
                    fn_seq = fn
            noisy = jax.tree.map(lambda a: a * (1 + 1e-7 * jax.random.normal(
                jax.random.key(5), a.shape, jnp.float32)).astype(a.dtype), params)
            moved = fn_seq(noisy, tokens)
            if args.gmm_impl != "xla":   # the kernels' rounding vs XLA's, same schedule
                outs["sequential_xla"] = jax.jit(lambda p, t: sequential_forward(
                    p, t, cfg, armt, output="hidden", attn_impl=f32_attn, gmm_impl="xla"))(
                    params, tokens)
        s, d = outs["sequential"], outs["diagonal"]
        row = {"A": rel(d.state.A, s.state.A), "hidden": rel(d.out, s.out),
               "sensitivity_hidden": rel(moved.out, s.out),
               "sensitivity_A": rel(moved.state.A, s.state.A),
               "A_max_over_layers": max(rel(d.state.A[l], s.state.A[l]) for l in range(len(s.state.A))),
               "z_max_over_layers": max(rel(d.state.z[l], s.state.z[l]) for l in range(len(s.state.z))),
               "finite": bool(jnp.isfinite(s.out.astype(jnp.float32)).all())}
        if "sequential_xla" in outs:
            row["hidden_sequential_vs_xla"] = rel(s.out, outs["sequential_xla"].out)
        results[jnp.dtype(dtype).name] = row
        print(f"{jnp.dtype(dtype).name:9s} " + "  ".join(f"{k} {v:.2e}" if isinstance(v, float)
                                                          else f"{k} {v}" for k, v in row.items()),
              flush=True)
    print(json.dumps({"tokens": args.tokens, "gmm_impl": args.gmm_impl,
                      "device": jax.devices()[0].device_kind, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
