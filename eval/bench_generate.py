"""Generation benchmark (SPEC §3): time to the first token after a long context, then decode speed.

Setting of eval/bench.py (Llama-3.2-1B shapes, random bf16 weights, random W_mv, T = 1024, M = 128,
d_mem = 64) but with the LM head, since generation samples from logits (the 1B model's tied
128256-word embedding). `armt_jax.generate` as `armt generate` calls it: greedy, attention
"auto" (cuDNN's fused attention on the schedules' segments, XLA on the decode's masked KV cache;
`--attn xla` for XLA throughout). For each attention choice, schedule, batch size and context
length, medians of `reps` runs after a warm-up:

  first token s   generate(max_new_tokens=1): the context's segments before the last one through
                  the memory (`prefill`), the last segment decoded with a KV cache, one token
  prefill s       prefill alone (the part that grows with the context)
  ms / token      (generate(max_new_tokens=1 + N) - generate(max_new_tokens=1)) / N, with no EOS
                  (every sequence decodes all N tokens)

Schedules name the prefill and the grouped matmuls, as in eval/bench.py: "diagonal_pallas" (the
Pallas kernels where they serve the shape: "auto"), "diagonal" and "sequential" (XLA). Decode
steps of m = batch rows go to XLA under "auto" where the kernel's tiles do not serve them (fewer
than 64 rows). The tokens each schedule generates are compared with the first schedule's
(bf16: greedy paths may part after some tokens).

    python -m eval.bench_generate --out eval/results/generate_h200.json
    python -m eval.bench_generate --size tiny --lengths 70 --new-tokens 4    # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import sys
import time
from pathlib import Path

from eval.bench import bench_config, bench_params, write_report

SCHEDULES = {"diagonal_pallas": ("diagonal", "auto"), "diagonal": ("diagonal", "xla"),
             "sequential": ("sequential", "xla")}
LENGTHS = (4096, 32768, 131072)


def median_seconds(fn, reps: int) -> tuple[float, list[float]]:
    """fn() once to compile and warm up, then the median of `reps` synchronised runs."""
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], times


def common_prefix(a, b) -> int:
    """Per sequence, how many leading tokens two generations share; the minimum over the batch."""
    import numpy as np
    same = np.asarray(a) == np.asarray(b)
    return int(np.min(np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))))


def run(schedules, lengths, batches, new_tokens: int, reps: int, size: str,
        attns=("auto",)) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from armt_jax.generate import generate, prefill

    cfg, armt = bench_config(size)
    params = bench_params("diagonal", cfg, armt)   # random W_mv too
    T = armt.segment_size
    device = jax.devices()[0]
    rows, reference = [], {}
    for batch in batches:
        for n in sorted(lengths):
            tokens = jnp.asarray(np.random.default_rng(n).integers(
                0, cfg.vocab_size, (batch, n)), jnp.int32)
            split = (-(-n // T) - 1) * T       # generate's prefix: every segment but the last
            for attn, name in itertools.product(attns, schedules):
                schedule, gmm_impl = SCHEDULES[name]
                gen = lambda k: generate(params, tokens, cfg, armt, max_new_tokens=k,
                                         schedule=schedule, eos_token_ids=(), attn_impl=attn,
                                         gmm_impl=gmm_impl)
                first_s, first_runs = median_seconds(lambda: gen(1).tokens, reps)
                all_s, all_runs = median_seconds(lambda: gen(1 + new_tokens).tokens, reps)
                prefill_s = float("nan")
                if split:
                    prefill_s, _ = median_seconds(lambda: prefill(
                        params, tokens[:, :split], cfg, armt, schedule=schedule,
                        attn_impl=attn, gmm_impl=gmm_impl).A, reps)
                out = np.asarray(gen(1 + new_tokens).tokens)
                ref = reference.setdefault((batch, n), (f"{name}/{attn}", out))
                per_token_s = (all_s - first_s) / new_tokens
                row = {
                    "schedule": name, "attn": attn, "batch": batch, "context": n,
                    "new_tokens": new_tokens,
                    "first_token_s": first_s, "first_token_runs": first_runs,
                    "prefill_s": prefill_s, "generate_s": all_s, "generate_runs": all_runs,
                    "ms_per_token": 1e3 * per_token_s,
                    "tokens_per_s": batch / per_token_s if per_token_s > 0 else float("nan"),
                    "tokens_as_" + ref[0]: common_prefix(out, ref[1]),
                    "device": device.device_kind, "jax": jax.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"),
                }
                rows.append(row)
                print(f"{name:16s} {attn:5s} batch {batch:2d} {n:7d} tok  first token "
                      f"{first_s:7.3f} s  prefill {prefill_s:7.3f} s  "
                      f"{row['ms_per_token']:6.2f} ms/token  {row['tokens_per_s']:7.0f} tok/s  "
                      f"same tokens as {ref[0]}: "
                      f"{row['tokens_as_' + ref[0]]}/{1 + new_tokens}", flush=True)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| schedule | attention | batch | context | first token s | prefill s | ms / token | "
             "tokens/s | tokens as the first schedule's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = next(v for k, v in r.items() if k.startswith("tokens_as_"))
        lines.append(f"| {r['schedule']} | {r['attn']} | {r['batch']} | {r['context']} | "
                     f"{r['first_token_s']:.3f} | {r['prefill_s']:.3f} | {r['ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {same} of {1 + r['new_tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.bench_generate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedules", nargs="+", choices=tuple(SCHEDULES),
                    default=["diagonal_pallas", "diagonal", "sequential"])
    ap.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS),
                    help="context lengths in tokens")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--attn", nargs="+", choices=("auto", "xla", "cudnn"), default=["auto"],
                    help="attention implementations (generate's attn_impl), each a set of rows")
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="tokens decoded after the first (the ms / token figure's N)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs after the warm-up (>= 3)")
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="1b",
                    help="mid / tiny: smaller models for CPU checks of this script")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: out/generate_<size>.json), a markdown table "
                         "beside it")
    args = ap.parse_args(argv)
    if args.reps < 3:
        ap.error("--reps must be >= 3")
    if args.new_tokens < 1:
        ap.error("--new-tokens must be >= 1")
    if min(args.lengths) < 1 or min(args.batches) < 1:
        ap.error("--lengths and --batches must be >= 1")
    out = args.out or Path(f"out/generate_{args.size}.json")
    rows = run(args.schedules, args.lengths, args.batches, args.new_tokens, args.reps, args.size,
               args.attn)
    cfg, armt = bench_config(args.size)
    command = "python -m eval.bench_generate " + " ".join(sys.argv[1:] if argv is None else argv)
    setting = (f"{'Llama-3.2-1B' if args.size == '1b' else args.size} shapes with the LM head, "
               f"bf16 random weights, T={armt.segment_size}, M={armt.num_mem_tokens}, "
               f"d_mem={armt.d_mem}, greedy")
    table = markdown_table(rows)
    write_report(out, "Generation benchmark",
                 {"command": command.strip(), "setting": setting, "rows": rows}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
