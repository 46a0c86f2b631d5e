"""Training-step benchmark: one Optax step of `train.step` with the grouped matmuls on XLA
(`gmm_impl="xla"`) and on the kernels of `kernels/` (`"auto"`: on a Hopper GPU the grouped matmul
and the fused gate/up + SwiGLU, with their custom VJPs, wherever the kernel serves the shape;
`--impls pallas`, GPU only: every grouped product on the kernel, an error where it cannot), with
the loss through the sequential schedule (G = 1 products, a layer at a time) or, with `--schedules
diagonal`, through diagonal batching (every layer of a diagonal in one grouped product).

Setting: the sizes of `eval.bench` (1b = Llama-3.2-1B shapes, T = 1024, M = 128, d_mem = 64),
random weights with random W_mv held in float32 (master weights and AdamW state), computed in
bf16 (`compute_dtype`, as `armt train --compute-dtype bfloat16`; the kernels take 16-bit
operands, so with float32 compute "auto" means XLA), a batch of B sequences of n tokens with the
loss on every token, full backpropagation through time with each segment rematerialised (as
`train.step` does). All variants are compiled and run once first (loss and gradient norm of the
same first step are compared), then timed in rotated rounds in one process, so a slow drift of
the GPU's clock hits them alike; each row gives the median and the range over rounds.

Training FLOP = 3 x the forward FLOP (the forward, and two backward products per matmul), the
forward being `eval.bench`'s model FLOP plus the LM head over the text tokens (2 n D vocab); the
rematerialised forward runs once more and is not counted.

    python -m eval.bench_train --tokens 4096 16384
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

from eval.bench import bench_config, bench_params, model_flops, time_dense_matmul
from eval.profile import parse_compiler_option

IMPLS = ("xla", "auto", "pallas")


def train_setting(size: str):
    """The benchmark's model: (cfg, armt, float32 master params with random W_mv, the AdamW
    optimizer and its state, the attention impl: cuDNN on a GPU)."""
    import jax
    import jax.numpy as jnp
    import optax

    cfg, armt = bench_config(size)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), bench_params("sequential", cfg, armt))
    optimizer = optax.adamw(1e-5)
    attn = "cudnn" if jax.devices()[0].platform == "gpu" else None
    return cfg, armt, params, optimizer, optimizer.init(params), attn


def make_batch(cfg, batch: int, n: int, seed: int = 0) -> dict:
    import numpy as np
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, cfg.vocab_size, (batch, n)).astype(np.int32),
            "loss_mask": np.ones((batch, n), np.float32),
            "lengths": np.full((batch,), n, np.int32)}


def bench_length(cfg, armt, params, optimizer, opt_state, n: int, batch: int, impls, reps: int,
                 dense: float, attn_impl, compute_dtype, profile_dir: Path | None = None,
                 dump_hlo: bool = False, compiler_options: dict | None = None,
                 schedules=("sequential",)) -> list[dict]:
    """Rows for one length: every (schedule, impl) compiled and checked, then timed in rotated
    rounds; with profile_dir, one more step of each is traced (device time by kind and kernel, with
    source lines; eval.profile's tables) and its summary written there, with dump_hlo also
    each step's optimised HLO (gzip; e.g. to find what a copy kernel copies)."""
    import jax
    import jax.numpy as jnp

    from train.step import make_train_step

    data = jax.device_put(make_batch(cfg, batch, n))
    steps, compile_s, lower_s, first, temp_bytes = {}, {}, {}, {}, {}
    variants = [(schedule, impl) for schedule in schedules for impl in impls]
    for v in variants:
        step = make_train_step(cfg, armt, optimizer, attn_impl=attn_impl, gmm_impl=v[1],
                               compute_dtype=compute_dtype, compiler_options=compiler_options,
                               schedule=v[0])
        t0 = time.perf_counter()
        lowered = step.lower(params, opt_state, data)   # tracing, and lowering to StableHLO
        lower_s[v] = time.perf_counter() - t0
        steps[v] = lowered.compile()
        compile_s[v] = time.perf_counter() - t0         # both (the wait before the first step)
        # XLA's temporary buffers of the step (activations and residuals kept for the backward).
        temp_bytes[v] = getattr(steps[v].memory_analysis(), "temp_size_in_bytes", None)
        _, _, metrics = steps[v](params, opt_state, data)
        first[v] = {k: float(x) for k, x in metrics.items()}
    samples = {v: [] for v in variants}
    for r in range(reps):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            t0 = time.perf_counter()
            jax.block_until_ready(steps[v](params, opt_state, data))
            samples[v].append(time.perf_counter() - t0)
    profiles = {}
    if profile_dir is not None:
        from eval.profile import kernel_sources, print_breakdown, traced_kernel_times
        profile_dir.mkdir(parents=True, exist_ok=True)
        for v in variants:
            times, _ = traced_kernel_times(
                lambda: jax.block_until_ready(steps[v](params, opt_state, data)), 1)
            hlo = steps[v].as_text()
            profiles[v] = print_breakdown(
                f"training step, {v[0]} schedule, gmm_impl={v[1]}, {n} tokens x {batch}",
                times, 1, kernel_sources(hlo), top=25)
            tag = v[1] if v[0] == "sequential" else f"{v[0]}_{v[1]}"
            (profile_dir / f"train_profile_{tag}_{n}.json").write_text(
                json.dumps(profiles[v], indent=1))
            if dump_hlo:
                with gzip.open(profile_dir / f"train_hlo_{tag}_{n}.txt.gz", "wt") as f:
                    f.write(hlo)
    lm_head = 2 * n * cfg.hidden_size * cfg.vocab_size
    flops = 3 * batch * (model_flops("sequential", n, cfg, armt) + lm_head)
    device = jax.devices()[0]
    rows = []
    ref = first.get(("sequential", "xla"), first[variants[0]])
    for v in variants:
        seconds = statistics.median(samples[v])
        rows.append({
            "schedule": v[0], "gmm_impl": v[1], "compute_dtype": jnp.dtype(compute_dtype).name,
            "tokens": n, "batch": batch, "seconds": seconds,
            "runs": samples[v], "tokens_per_s": batch * n / seconds,
            "train_tflop": flops / 1e12, "tflops": flops / seconds / 1e12,
            "dense_tflops": dense, "frac_of_dense": flops / seconds / 1e12 / dense,
            "compile_s": compile_s[v], "lower_s": lower_s[v], "temp_bytes": temp_bytes[v],
            "compiler_options": compiler_options or {}, **first[v],
            **({"device_busy_s": profiles[v]["busy_s_per_run"],
                "device_s_by_kind": profiles[v]["by_kind_s"]} if v in profiles else {}),
            "loss_rel_diff": abs(first[v]["loss"] / ref["loss"] - 1),
            "grad_norm_rel_diff": abs(first[v]["grad_norm"] / ref["grad_norm"] - 1),
            "device": device.device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        print(f"{v[0]:10s} {v[1]:5s} {n:6d} tok x {batch}  {seconds:8.4f} s"
              f" ({min(samples[v]):.4f}-{max(samples[v]):.4f})"
              f"  {rows[-1]['frac_of_dense']:6.1%} of dense  loss {first[v]['loss']:.4f}"
              f"  compile {compile_s[v]:5.1f} s (lowering {lower_s[v]:.1f})"
              + (f"  temp {temp_bytes[v] / 2**30:.2f} GiB" if temp_bytes[v] is not None else ""),
              flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| schedule | gmm_impl | compute | tokens x batch | seconds (median) | min-max | tokens/s | TFLOP/s | of dense"
             " | speed vs sequential xla | loss | rel. diff. loss / grad norm vs sequential xla (first step) | compile s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["tokens"], r["batch"]): r for r in rows
            if r["gmm_impl"] == "xla" and r.get("schedule", "sequential") == "sequential"}
    for r in rows:
        b = base.get((r["tokens"], r["batch"]))
        speed = f"{b['seconds'] / r['seconds']:.2f}x" if b else "-"
        lines.append(
            f"| {r.get('schedule', 'sequential')} | {r['gmm_impl']} | {r['compute_dtype']} | {r['tokens']} x {r['batch']} | {r['seconds']:.4f} |"
            f" {min(r['runs']):.4f}-{max(r['runs']):.4f} | {r['tokens_per_s']:.0f} |"
            f" {r['tflops']:.3g} | {r['frac_of_dense']:.1%} | {speed} | {r['loss']:.4f} |"
            f" {r['loss_rel_diff']:.1e} / {r['grad_norm_rel_diff']:.1e} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import jax.numpy as jnp

    ap = argparse.ArgumentParser(prog="python -m eval.bench_train",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="1b")
    ap.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=["xla", "auto"])
    ap.add_argument("--schedules", nargs="+", choices=("sequential", "diagonal"),
                    default=["sequential"], help="the forward each step's loss runs through")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (each impl once per round)")
    ap.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path("out/train_bench.json"))
    ap.add_argument("--profile", action="store_true",
                    help="also trace one step per impl: device time by kind and kernel (GPU)")
    ap.add_argument("--dump-hlo", action="store_true",
                    help="with --profile: also write each step's optimised HLO (gzip)")
    ap.add_argument("--compiler-option", type=parse_compiler_option, action="append", default=[],
                    metavar="xla_NAME=VALUE",
                    help="an XLA option for compiling the steps (repeatable), over the step's"
                         " defaults (train.step.default_compiler_options), e.g."
                         " xla_gpu_enable_dus_accumulator_zero_init_elimination=false")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.dump_hlo and not args.profile:
        ap.error("--dump-hlo needs --profile")
    if args.reps < 1 or args.batch < 1:
        ap.error(f"--reps ({args.reps}) and --batch ({args.batch}) must be >= 1")
    impls = list(dict.fromkeys(args.impls))   # each once, in the order given

    from train.step import default_compiler_options

    for n in args.tokens:
        if n < 2:
            ap.error(f"--tokens {n}: a training sequence needs at least 2 tokens")
    cfg, armt, params, optimizer, opt_state, attn = train_setting(args.size)
    dense = time_dense_matmul(8192 if args.size == "1b" else 512)
    rows = []
    for n in sorted(args.tokens):
        rows += bench_length(cfg, armt, params, optimizer, opt_state, n, args.batch, impls,
                             args.reps, dense, attn,
                             jnp.dtype(args.compute_dtype),
                             args.out.parent if args.profile else None, args.dump_hlo,
                             {**default_compiler_options(), **dict(args.compiler_option)},
                             list(dict.fromkeys(args.schedules)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"setting": f"{args.size} shapes, random float32 master weights (random W_mv) computed"
                         f" in {args.compute_dtype}, AdamW, loss on every token, remat per segment"
                         " (sequential) or per step (diagonal)",
              "command": "python -m eval.bench_train " + " ".join(argv), "rows": rows}
    args.out.write_text(json.dumps(report, indent=1))
    table = markdown_table(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
