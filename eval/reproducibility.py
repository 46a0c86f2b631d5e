"""Is a training step reproducible from process to process? Runs the first step of
`eval.bench_train`'s setting (same weights, same batch) in several fresh processes per variant of
XLA flags and compares what comes out bit for bit: the loss, the gradient norm and a fingerprint of
the updated weights (per leaf, the sum of its float32 bit patterns: any changed bit changes it).
Each process also runs the step a second time, to tell run-to-run nondeterminism inside a process
from choices made once per process (such as XLA's GEMM autotuning, whose per-fusion results each
process writes to its own cache directory, so they can be compared too).

    python -m eval.reproducibility --tokens 16384 --processes 3 \\
        --variant default= --variant deterministic=--xla_gpu_deterministic_ops=true
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def worker(args) -> dict:
    """One process: compile the step, run it twice on the same inputs, report both."""
    import jax
    import jax.numpy as jnp

    from eval.bench_train import make_batch, train_setting
    from train.step import make_train_step

    cfg, armt, params, optimizer, opt_state, attn = train_setting(args.size)
    data = jax.device_put(make_batch(cfg, 1, args.tokens))
    step = make_train_step(cfg, armt, optimizer, attn_impl=attn, gmm_impl=args.impl,
                           compute_dtype=jnp.bfloat16)

    @jax.jit
    def fingerprint(tree):
        bits = lambda a: jnp.sum(jax.lax.bitcast_convert_type(a, jnp.uint32), dtype=jnp.uint32)
        return jax.tree.map(bits, tree)

    runs = []
    for _ in range(2):
        new_params, _, metrics = step(params, opt_state, data)
        prints = jax.tree.leaves_with_path(fingerprint(new_params))
        runs.append({"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                     "fingerprint": {jax.tree_util.keystr(p): int(v) for p, v in prints}})
    return {"runs": runs, "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def autotune_entries(cache_dir: Path) -> dict[str, str]:
    """The per-fusion autotune results a process wrote (binary protos): file name -> a hash of
    the content (equal hashes: the same choice)."""
    if not cache_dir.is_dir():
        return {}
    return {str(p.relative_to(cache_dir)): hashlib.sha1(p.read_bytes()).hexdigest()[:12]
            for p in sorted(cache_dir.rglob("*")) if p.is_file()}


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not name or name.startswith("-"):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=XLA_FLAGS")
    return name, flags


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.reproducibility",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="1b")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--impl", choices=("xla", "auto"), default="xla")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per variant")
    ap.add_argument("--variant", type=parse_variant, action="append", default=[],
                    metavar="NAME=XLA_FLAGS",
                    help="extra XLA_FLAGS for a group of processes (repeatable; default: none)")
    ap.add_argument("--out", type=Path, default=Path("out/reproducibility"))
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)   # internal: write a result
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        args.worker.write_text(json.dumps(worker(args)))
        return 0
    if args.processes < 1:
        ap.error(f"--processes {args.processes} must be >= 1")
    variants = args.variant or [("default", "")]
    args.out.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for name, flags in variants:
        for i in range(args.processes):
            tag = f"{name}_{i}"
            cache = args.out / f"autotune_{tag}"
            env = dict(os.environ)
            env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flags,
                                                      f"--xla_gpu_per_fusion_autotune_cache_dir={cache}"]))
            result_file = args.out / f"worker_{tag}.json"
            cmd = [sys.executable, "-m", "eval.reproducibility", "--size", args.size, "--tokens",
                   str(args.tokens), "--impl", args.impl, "--worker", str(result_file)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{tag}: worker failed (rc {proc.returncode})\n{proc.stderr[-3000:]}")
                failed += 1
                continue
            r = json.loads(result_file.read_text())
            r.update(variant=name, flags=flags, process=i, autotune=autotune_entries(cache))
            results.append(r)
            first, second = r["runs"]
            print(f"{tag:24s} loss {first['loss']:.9g}  grad norm {first['grad_norm']:.9g}"
                  f"  second run identical: {first == second}"
                  f"  autotune entries: {len(r['autotune'])}", flush=True)
    summary = summarize(results)
    print(summary)
    (args.out / "reproducibility.json").write_text(json.dumps(
        {"command": "python -m eval.reproducibility " + " ".join(argv or sys.argv[1:]),
         "results": results}, indent=1))
    (args.out / "reproducibility.md").write_text(summary + "\n")
    return 1 if failed else 0


def summarize(results: list[dict]) -> str:
    """Per variant: how many distinct first-step outcomes, and which autotune entries differ
    between processes."""
    lines = []
    for name in dict.fromkeys(r["variant"] for r in results):
        group = [r for r in results if r["variant"] == name]
        outcomes = {json.dumps(r["runs"][0], sort_keys=True) for r in group}
        in_process = all(r["runs"][0] == r["runs"][1] for r in group)
        lines.append(f"{name}: {len(group)} processes, {len(outcomes)} distinct first steps,"
                     f" repeat in-process identical: {in_process}")
        keys = sorted(set().union(*(r["autotune"] for r in group)))
        differing = [k for k in keys if len({r["autotune"].get(k) for r in group}) > 1]
        lines.append(f"  autotune entries: {len(keys)}, differing between processes:"
                     f" {len(differing)}")
        for k in differing[:10]:
            lines.append(f"    {k}: " + ", ".join(r["autotune"].get(k, "absent") for r in group))
        if len(group) > 1:
            base = group[0]["runs"][0]["fingerprint"]
            for r in group[1:]:
                diff = [k for k, v in r["runs"][0]["fingerprint"].items() if base.get(k) != v]
                lines.append(f"  process {r['process']} vs 0: {len(diff)} of {len(base)} weight"
                             f" leaves differ{': ' + ', '.join(diff[:8]) if diff else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
