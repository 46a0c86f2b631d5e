"""Inference benchmark: full-attention Llama vs ARMT sequential vs ARMT diagonal batching.

Setting of SPEC §6: Llama-3.2-1B shapes, random bf16 weights (random W_mv too), T = 1024, M = 128,
d_mem = 64, batch 1, lm_head = identity (the final-norm hidden states are the output). For each
schedule and length: compile time, the median of >= 3 device-synchronised runs after a warm-up,
tokens/s, peak device memory, and the model FLOP rate as a fraction of a dense 8192^3 bf16 matmul
timed in the same process (H200s of one pool differ by ~25 percent, so the ratio is the figure that
travels). Each schedule runs in its own process, lengths ascending, so the allocator's peak after a
length is that length's peak.

Model FLOPs (multiply-add = 2 FLOP; causal attention counts the lower triangle only):
  per layer and segment of S = T + M rows (ARMT) or per layer over n rows (full attention), D hidden,
  Q = heads * head_dim, K = kv_heads * head_dim, F = intermediate, d_k = 2 * nu * d_mem:
    projections  2 S D (Q + 2K) + 2 S Q D + 2 S D 2F + 2 S F D
    attention    2 S^2 Q                  (QK^T and PV, halved for causality)
    memory read  2 S D d_mem + 2 S d_k D   (ARMT only; DPFP and the denominators ignored)
    memory write 2 M D (d_mem + D + 1) + 4 M d_k D
  ARMT total = N segments x L layers x (sum above); full attention = L x (projections + attention).

    python -m eval.bench                    # every schedule, 4096..131072 tokens
    python -m eval.bench --schedules diagonal --lengths 4096 16384
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Random W_mv scale. With 0.02 (a typical Llama init) every segment's memory read adds about as much
# as the residual stream holds, so activations grow geometrically with the segment index and overflow
# to NaN after ~60 segments (seen on the H200, in both schedules alike). 1e-3 keeps a random model
# finite at 131072 tokens, so the schedules' outputs can be compared.
W_MV_STD = 1e-3
SCHEDULES = ("full_attention", "sequential", "diagonal", "diagonal_pallas")
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


def model_flops(schedule: str, n: int, cfg, armt) -> float:
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    Q, K = cfg.q_size, cfg.kv_size
    dense = lambda S: 2 * S * D * (Q + 2 * K) + 2 * S * Q * D + 6 * S * D * F + 2 * S * S * Q
    if schedule == "full_attention":
        return float(L * dense(n))
    T, M, dm, dk = armt.segment_size, armt.num_mem_tokens, armt.d_mem, armt.d_key
    N = -(-n // T)
    S = T + M
    memory = 2 * S * D * dm + 2 * S * dk * D + 2 * M * D * (dm + D + 1) + 4 * M * dk * D
    return float(N * L * (dense(S) + memory))


def time_dense_matmul(size: int = 8192, reps: int = 10) -> float:
    """TFLOP/s of one dense bf16 matmul (random inputs, median of `reps`)."""
    import jax
    import jax.numpy as jnp
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (size, size), jnp.bfloat16)
    b = jax.random.normal(kb, (size, size), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * size ** 3 / times[len(times) // 2] / 1e12


def bench_config(size: str = "1b"):
    from armt_jax.config import LLAMA_3_2_1B, ArmtConfig, LlamaConfig
    if size == "tiny":    # CPU smoke test of the benchmark itself
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, tie_word_embeddings=True)
        return cfg, ArmtConfig(segment_size=32, num_mem_tokens=8, d_mem=8)
    if size == "mid":     # 16 layers like the 1B model, small enough for a CPU float32 check
        cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=2048,
                          num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=64, rope_theta=500000.0, tie_word_embeddings=True)
        return cfg, ArmtConfig(segment_size=256, num_mem_tokens=32, d_mem=64)
    return LLAMA_3_2_1B, ArmtConfig(segment_size=1024, num_mem_tokens=128, d_mem=64)


def forward_fn(schedule: str, cfg, armt):
    """A function (params, tokens) -> hidden states for one schedule."""
    import jax
    from armt_jax.diagonal import diagonal_forward
    from armt_jax.layers import llama_forward
    from armt_jax.sequential import sequential_forward
    attn = "cudnn" if jax.devices()[0].platform == "gpu" else None
    if schedule == "full_attention":
        return lambda p, t: llama_forward(p, t, cfg, output="hidden", attn_impl=attn, gmm_impl="xla")
    if schedule == "sequential":
        return lambda p, t: sequential_forward(p, t, cfg, armt, output="hidden", attn_impl=attn,
                                               gmm_impl="xla").out
    # auto: the kernels (grouped matmul, fused gate/up + SwiGLU) where they serve the shape
    impl = "auto" if schedule == "diagonal_pallas" else "xla"
    return lambda p, t: diagonal_forward(p, t, cfg, armt, output="hidden", attn_impl=attn,
                                         gmm_impl=impl).out


def bench_params(schedule: str, cfg, armt) -> dict:
    """Random bf16 weights; W_mv (zero at init) random too, so the memory path does real work."""
    import jax
    import jax.numpy as jnp
    from armt_jax.params import init_params
    params = init_params(jax.random.key(0), cfg, armt, jnp.bfloat16)
    if schedule == "full_attention":
        params.pop("memory")
    else:
        w_mv = params["memory"]["w_mv"]
        params["memory"]["w_mv"] = (W_MV_STD * jax.random.normal(jax.random.key(2), w_mv.shape)
                                    ).astype(w_mv.dtype)
    return params


def worker(schedule: str, lengths: list[int], reps: int, out_file: Path, size: str) -> None:
    """Runs in its own process: one schedule, lengths ascending; appends JSON rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    cfg, armt = bench_config(size)
    params = bench_params(schedule, cfg, armt)
    dense = time_dense_matmul(8192 if size == "1b" else 512)
    device = jax.devices()[0]
    fn = jax.jit(forward_fn(schedule, cfg, armt))
    for n in sorted(lengths):
        tokens = jnp.asarray(np.random.default_rng(n).integers(0, cfg.vocab_size, (1, n)),
                             jnp.int32)
        t0 = time.perf_counter()
        compiled = fn.lower(params, tokens).compile()
        compile_s = time.perf_counter() - t0
        out = compiled(params, tokens)
        out.block_until_ready()
        finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
        # a strided sample of the output, to compare schedules with each other afterwards
        sample = np.asarray(out[0, ::61, ::97].astype(jnp.float32)).ravel().tolist()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            compiled(params, tokens).block_until_ready()
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        flops = model_flops(schedule, n, cfg, armt)
        stats = device.memory_stats() or {}
        row = {
            "schedule": schedule, "tokens": n, "seconds": seconds, "runs": times,
            "tokens_per_s": n / seconds, "compile_s": compile_s,
            "peak_gb": stats.get("peak_bytes_in_use", float("nan")) / 1e9,
            "model_tflop": flops / 1e12, "tflops": flops / seconds / 1e12,
            "dense_tflops": dense, "frac_of_dense": flops / seconds / 1e12 / dense,
            "output_finite": finite, "sample": sample, "device": device.device_kind, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with out_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{schedule:16s} {n:7d} tok  {seconds:8.4f} s  {row['frac_of_dense']:6.1%} of dense"
              f"  peak {row['peak_gb']:6.2f} GB  compile {compile_s:5.1f} s", flush=True)


def add_agreement(rows: list[dict]) -> None:
    """rel_err_vs_sequential: relative L2 difference of each diagonal row's output sample from the
    sequential schedule's at the same length (bf16, so ~1e-2 is expected, not 0)."""
    import numpy as np
    seq = {r["tokens"]: np.asarray(r["sample"]) for r in rows if r["schedule"] == "sequential"}
    for r in rows:
        if r["schedule"].startswith("diagonal") and r["tokens"] in seq:
            ref = seq[r["tokens"]]
            r["rel_err_vs_sequential"] = float(np.linalg.norm(np.asarray(r["sample"]) - ref)
                                               / np.linalg.norm(ref))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| schedule | tokens | seconds | tokens/s | TFLOP/s | of dense | dense TFLOP/s | "
             "peak GB | compile s | rel. diff. vs sequential |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["tokens"], SCHEDULES.index(r["schedule"]))):
        diff = r.get("rel_err_vs_sequential")
        lines.append(f"| {r['schedule']} | {r['tokens']} | {r['seconds']:.4f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {r['frac_of_dense']:.1%} | "
                     f"{r['dense_tflops']:.0f} | {r['peak_gb']:.2f} | {r['compile_s']:.1f} | "
                     f"{'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines)


def write_report(out: Path, title: str, report: dict, table: str) -> None:
    """The report ({command, setting, rows, ...}) as JSON at `out`, and beside it a markdown page:
    the command, the setting with the first row's device, jax version and date, the table."""
    head = report["rows"][0] if report["rows"] else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(
        f"# {title}\n\nCommand: `{report['command']}`\n\n{report['setting']}; device "
        f"{head.get('device', '?')}, jax {head.get('jax', '?')}, {head.get('date', '')}.\n\n"
        f"{table}\n")


# `--op NAME`: benchmarks that own their flags, run with the rest of the command line
DELEGATED_OPS = {"grouped_matmul": "eval.bench_grouped_matmul", "generate": "eval.bench_generate"}


def _delegated_op(argv: list[str]) -> tuple[str, list[str]] | None:
    """(op, argv without `--op op`) when argv asks for a delegated benchmark, else None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--op=") and arg[5:] in DELEGATED_OPS:
            return arg[5:], argv[:i] + argv[i + 1:]
        if arg == "--op" and i + 1 < len(argv) and argv[i + 1] in DELEGATED_OPS:
            return argv[i + 1], argv[:i] + argv[i + 2:]
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if (delegated := _delegated_op(argv)) is not None:
        import importlib
        op, rest = delegated
        return importlib.import_module(DELEGATED_OPS[op]).main(rest) or 0
    ap = argparse.ArgumentParser(prog="armt bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    ap.add_argument("--reps", type=int, default=3, help="timed runs after the warm-up (>= 3)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: eval/results/inference_h200.json for --size 1b, "
                         "out/inference_<size>.json otherwise, so smaller runs never overwrite "
                         "the committed results)")
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="1b",
                    help="mid / tiny: smaller models for CPU checks of this script")
    ap.add_argument("--op", choices=("model", *DELEGATED_OPS), default="model",
                    help="grouped_matmul: the kernel benchmark (eval/bench_grouped_matmul.py); "
                         "generate: time to the first token and decode speed "
                         "(eval/bench_generate.py); each takes its own flags")
    ap.add_argument("--worker", choices=SCHEDULES, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path("eval/results/inference_h200.json" if args.size == "1b"
                        else f"out/inference_{args.size}.json")
    if args.reps < 3:
        ap.error("--reps must be >= 3")
    if args.worker:
        worker(args.worker, args.lengths, args.reps, args.rows, args.size)
        return 0

    rows_file = args.out.with_suffix(".rows.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows_file.unlink(missing_ok=True)
    for schedule in args.schedules:     # one process per schedule: clean peak-memory counters
        cmd = [sys.executable, "-m", "eval.bench", "--worker", schedule, "--rows", str(rows_file),
               "--reps", str(args.reps), "--size", args.size, "--lengths", *map(str, args.lengths)]
        if subprocess.run(cmd, env=os.environ).returncode:
            print(f"schedule {schedule} failed; its remaining lengths are missing", flush=True)
    rows = [json.loads(l) for l in rows_file.read_text().splitlines()] if rows_file.exists() else []
    add_agreement(rows)
    command = "python -m eval.bench " + " ".join(argv)
    cfg, armt = bench_config(args.size)
    # the output samples served the agreement column; the report keeps rows small
    report = {"command": command.strip(),
              "rows": [{k: v for k, v in r.items() if k != "sample"} for r in rows],
              "setting": f"{'Llama-3.2-1B' if args.size == '1b' else 'tiny'} shapes, bf16 random "
                         f"weights, T={armt.segment_size}, M={armt.num_mem_tokens}, "
                         f"d_mem={armt.d_mem}, batch 1, lm_head=identity"}
    table = markdown_table(rows)
    write_report(args.out, "Inference benchmark", report, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
