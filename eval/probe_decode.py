"""Probe: what a decoded token costs, by variant of the compiled decode (generate's `_decode`).

Llama-3.2-1B shapes with the LM head, random bf16 weights and memory state; the last segment holds
`--context` tokens (1..T), then N tokens are decoded greedily with no EOS. ms / token =
(time(1 + N new tokens) - time(1 new token)) / N, medians of `--reps` runs. Variants: XLA or
"auto" grouped matmuls. Run it once per XLA_FLAGS setting to compare XLA's command buffers (CUDA
graphs), which a process takes from its environment.

    python eval/probe_decode.py --batches 1 8
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE \\
      python eval/probe_decode.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.bench import bench_config, bench_params     # noqa: E402
from eval.bench_generate import median_seconds          # noqa: E402


PRODUCTS = ("qkv", "o", "gate_up", "down")   # a layer's kernel calls, in order


def kernel_us_by_product(times: dict[str, list[float]], layers: int) -> dict[str, float]:
    """Mean device time (us) of the grouped-matmul kernel's calls by product, over the decode
    steps: the trace's calls in order, after the last segment's 4 per layer."""
    import numpy as np
    from eval.profile import kind_of
    calls = [t for name, ts in times.items() if kind_of(name) == "grouped_matmul_kernel" for t in ts]
    steps = np.asarray(calls[len(PRODUCTS) * layers:])
    if not steps.size or steps.size % len(PRODUCTS):
        return {}
    means = steps.reshape(-1, len(PRODUCTS)).mean(0) * 1e6
    return {p: round(float(t), 2) for p, t in zip(PRODUCTS, means)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="1b")
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--context", type=int, default=512, help="tokens of the last segment")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gmm-impls", nargs="+", choices=("xla", "auto"), default=["xla", "auto"])
    ap.add_argument("--profile", action="store_true",
                    help="trace one decode of 1 + N tokens per variant: device time by kernel")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per traced variant")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines appended here")
    ap.add_argument("--compiler-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA option for the decode's compilation (repeatable), e.g. "
                         "xla_gpu_enable_dynamic_slice_fusion=true")
    ap.add_argument("--dump-hlo", type=Path, default=None,
                    help="folder for each variant's optimised HLO of the decode (gzipped text)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from armt_jax.generate import _decode
    from armt_jax.memory import MemoryState, state_dtype
    from eval.profile import kernel_sources, parse_compiler_option, print_breakdown, \
        traced_kernel_times

    compiler_options = dict(map(parse_compiler_option, args.compiler_option))
    cfg, armt = bench_config(args.size)
    params = bench_params("diagonal", cfg, armt)
    T = armt.segment_size
    rows = []
    for batch in args.batches:
        rng = np.random.default_rng(batch)
        last = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, T)), jnp.int32)
        last_len = jnp.full((batch,), min(args.context, T), jnp.int32)
        L, dk, D = cfg.num_hidden_layers, armt.d_key, cfg.hidden_size
        dtype = state_dtype(jnp.bfloat16)
        state = MemoryState(jnp.asarray(1e-3 * rng.standard_normal((L, batch, dk, D)), dtype),
                            jnp.asarray(np.abs(rng.standard_normal((L, batch, dk))), dtype))
        operands = (params, state, last, last_len, jax.random.key(0))
        for gmm_impl in args.gmm_impls:
            options = dict(cfg=cfg, armt=armt, temperature=0.0, top_k=None, top_p=None, eos=(),
                           pad_id=0, attn_impl="auto", gmm_impl=gmm_impl)
            compiled = {k: _decode.lower(*operands, max_new_tokens=k, **options).compile(
                compiler_options or None) for k in (1, 1 + args.new_tokens)}
            run = lambda k: compiled[k](*operands).tokens
            one, _ = median_seconds(lambda: run(1), args.reps)
            many, _ = median_seconds(lambda: run(1 + args.new_tokens), args.reps)
            ms = 1e3 * (many - one) / args.new_tokens
            tokens = np.asarray(run(1 + args.new_tokens))
            row = {"batch": batch, "gmm_impl": gmm_impl, "compiler_options": compiler_options,
                   "first_token_s": one, "ms_per_token": ms,
                   "xla_flags": os.environ.get("XLA_FLAGS", ""),
                   "tokens_head": tokens[0, :8].tolist()}
            rows.append(row)
            print(f"batch {batch:3d}  {gmm_impl:4s}  first token {one * 1e3:7.2f} ms  "
                  f"{ms:6.3f} ms/token  tokens {row['tokens_head']}", flush=True)
            hlo = compiled[1 + args.new_tokens].as_text()
            if args.dump_hlo:
                args.dump_hlo.mkdir(parents=True, exist_ok=True)
                with gzip.open(args.dump_hlo / f"decode_b{batch}_{gmm_impl}.hlo.txt.gz", "wt") as f:
                    f.write(hlo)
            if args.profile:
                times, _ = traced_kernel_times(
                    lambda: jax.block_until_ready(run(1 + args.new_tokens)), 1)
                row["profile"] = print_breakdown(
                    f"decode of 1 + {args.new_tokens} tokens, batch {batch}, {gmm_impl}", times, 1,
                    kernel_sources(hlo), args.top)
                row["kernel_us_by_product"] = kernel_us_by_product(times, L)
                print("grouped-matmul kernel, us per decode-step call:",
                      row["kernel_us_by_product"], flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
