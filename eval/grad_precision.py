"""How far bf16 gradients are from float32, per weight, through each training schedule.

`eval.bench_train`'s model (random float32 weights, random W_mv) and first batch: the loss's
gradient in float32 through the sequential schedule is the reference; the table gives, per
weight, the relative error (Frobenius norm of the difference over the reference's) of the float32
gradient through the diagonal schedule and of the bf16 gradients through both. A schedule that
kept a state or a sum in a narrower dtype would show a larger error than the other; GPU runs
compare schedules through one first-step gradient norm, which rounding alone moves by a factor of
two and more on this model (eval/results/reproducibility_h200.md), so this is where the
schedules' precision is compared. XLA matmuls (the kernels' precision is checked against XLA
in tests/test_grouped_matmul.py). On a GPU the float32 gradients are computed at the "highest"
matmul precision (XLA's default there rounds float32 matmul inputs to TF32).

    python -m eval.grad_precision --size mid --tokens 4096     # CPU: ~5 minutes
    python -m eval.grad_precision --size 1b --tokens 16384     # H200: over 6 minutes

(On the H200 the 1b model's sequential float32 step took 69 s, its diagonal one over 290 s,
compile included; train_h200.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import time


def gradients(schedule: str, dtype, cfg, armt, params, batch):
    import jax

    from armt_jax.schedules import schedule_forward

    forward = schedule_forward(schedule)

    def loss(p):
        p = jax.tree.map(lambda a: a.astype(dtype), p)
        return forward(p, batch["tokens"], cfg, armt, output="none", compute_loss=True,
                       loss_mask=batch["loss_mask"], lengths=batch["lengths"], remat=True,
                       gmm_impl="xla").loss

    precision = (jax.default_matmul_precision("highest") if dtype == jax.numpy.float32
                 else contextlib.nullcontext())
    with precision:
        return jax.jit(jax.value_and_grad(loss))(params)


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eval.bench_train import make_batch, train_setting

    ap = argparse.ArgumentParser(prog="python -m eval.grad_precision",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="mid")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    cfg, armt, params, *_ = train_setting(args.size)
    batch = make_batch(cfg, 1, args.tokens)
    variants = [("sequential", jnp.float32), ("diagonal", jnp.float32),
                ("sequential", jnp.bfloat16), ("diagonal", jnp.bfloat16)]
    grads = {}
    for schedule, dtype in variants:
        t0 = time.perf_counter()
        loss, g = gradients(schedule, dtype, cfg, armt, params, batch)
        # Kept on the device in float32: the 1b model's four gradients would take 40 GB as
        # float64 on the host, and float32 resolves the ~1e-6 differences compared here.
        grads[schedule, dtype] = g = jax.tree.map(lambda a: a.astype(jnp.float32), g)
        norm = np.sqrt(sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(g)))
        print(f"{schedule:10s} {jnp.dtype(dtype).name:8s} loss {float(loss):.6f}"
              f"  gradient norm {norm:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    ref = grads["sequential", jnp.float32]
    print(f"\n{args.size} model, {args.tokens} tokens: relative error of each gradient against the "
          "sequential schedule's float32 one\n")
    print("| weight | reference norm | diagonal float32 | sequential bf16 | diagonal bf16 |")
    print("|---|---:|---:|---:|---:|")
    others = [grads[v] for v in variants[1:]]
    for (path, r), *got in zip(jax.tree_util.tree_leaves_with_path(ref),
                               *map(jax.tree.leaves, others), strict=True):
        norm = float(jnp.linalg.norm(r))
        errs = [float(jnp.linalg.norm(g - r)) / max(norm, 1e-30) for g in got]
        print(f"| {jax.tree_util.keystr(path)} | {norm:.4g} | "
              + " | ".join(f"{e:.2e}" for e in errs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
