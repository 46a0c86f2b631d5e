"""Where the device time of one forward goes: a per-kernel breakdown from the JAX profiler.

Runs each schedule of eval/bench.py (same model and weights) at one length, traces a few
synchronised runs with `jax.profiler`, and sums the device kernels' time by kernel name and by
kind (matmul, our grouped-matmul kernel, attention, copies and slices, other fusions). Printed as
a table; the full per-kernel sums go to <out>/profile_<schedule>_<tokens>.json. Only GPU traces
carry device kernels: on a CPU the tables stay empty (the wall time is still measured).

    python -m eval.profile --schedules sequential diagonal diagonal_pallas --tokens 8192
    python -m eval.profile --schedules diagonal --tokens 8192 \\
        --compiler-option xla_gpu_enable_dynamic_slice_fusion=true
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from eval.bench import SCHEDULES, bench_config, bench_params, forward_fn

KINDS = (   # first match wins; applied to lower-cased kernel names
    ("grouped_matmul_kernel", re.compile(r"mosaic|_kernel$|grouped_matmul")),
    ("attention", re.compile(r"sdpa|flash|fmha|attention|cudnn")),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|gmma|triton_dot|dot")),
    ("copy_slice", re.compile(r"copy|slice|memcpy|memset|concatenate|transpose")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if pattern.search(low)), "other")


def device_kernel_times(xspace_path: str) -> tuple[dict[str, list[float]], list[str]]:
    """{kernel name: [durations in s]} over the GPU planes' stream lines, and the line names."""
    from jax.profiler import ProfileData
    data = ProfileData.from_file(xspace_path)
    times: dict[str, list[float]] = collections.defaultdict(list)
    gpu_lines = [(plane.name, line) for plane in data.planes
                 if plane.name.startswith("/device:GPU") for line in plane.lines]
    lines_seen = [f"{plane} | {line.name}" for plane, line in gpu_lines]
    # Kernels sit on the 'Stream #..' lines; 'XLA Ops' / 'XLA Modules' are summaries of them.
    streams = [line for _, line in gpu_lines if "stream" in line.name.lower()]
    for line in streams or [line for _, line in gpu_lines if "xla" not in line.name.lower()]:
        for event in line.events:
            times[event.name].append(event.duration_ns * 1e-9)
    return times, lines_seen


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*?\b([a-z][a-z0-9-]*)\((.*)$")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (?:\{(.*)\}|\"(.*)\")$")


def _stack_tables(hlo_text: str) -> dict[str, dict[int, str | dict[str, str]]]:
    """The module's FileNames / FunctionNames / FileLocations / StackFrames tables, by id."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (row := _TABLE_ROW.match(line)):
            key, fields, text = row.groups()
            current[int(key)] = text if text is not None else dict(
                item.split("=", 1) for item in fields.split())
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            current = None
    return tables


def kernel_sources(hlo_text: str, user_files: tuple[str, ...] = ("armt_jax/", "kernels/")
                   ) -> dict[str, str]:
    """{kernel name: source lines} from an optimised HLO module's text.

    Kernels in a GPU trace are named after their HLO instruction with "." -> "_"
    ("loop_add_fusion.2" runs as "loop_add_fusion_2"). For a fusion the lines are those of the
    operations inside it (its fused computation), innermost frame in the library's own files where
    there is one, e.g. "layers.py:140 mlp; layers.py:31 rms_norm"."""
    t = _stack_tables(hlo_text)
    files, funcs = t.get("FileNames", {}), t.get("FunctionNames", {})
    locations, frames = t.get("FileLocations", {}), t.get("StackFrames", {})

    def where(frame_id: int) -> str | None:
        """The innermost frame of the chain in the library's files (else the innermost one)."""
        chain, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc = locations.get(int(frames[frame_id]["file_location_id"]), {})
            file = files.get(int(loc.get("file_name_id", 0)), "?")
            func = funcs.get(int(loc.get("function_name_id", 0)), "?")
            chain.append((file, f"{os.path.basename(file)}:{loc.get('line', '?')} {func}"))
            frame_id = int(frames[frame_id]["parent_frame_id"])
        mine = [text for file, text in chain if any(u in file for u in user_files)]
        return (mine or [text for _, text in chain] or [None])[0]

    computation_frames: dict[str, list[int]] = collections.defaultdict(list)
    instructions: dict[str, tuple[list[int], str | None]] = {}
    computation = None
    for line in hlo_text.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        if not (m := _INSTRUCTION.match(line)):
            continue
        frame = [int(f) for f in _FRAME.findall(line)]
        computation_frames[computation].extend(frame)
        calls = _CALLS.search(line) if m.group(2) == "fusion" else None
        instructions[m.group(1)] = (frame, calls.group(1) if calls else None)
    sources = {}
    for name, (frame, called) in instructions.items():
        ids = computation_frames.get(called, []) if called else []
        texts = list(dict.fromkeys(w for i in ids or frame if (w := where(i))))
        if texts:
            sources[name.replace(".", "_")] = "; ".join(texts[:4]) + (" ..." if len(texts) > 4
                                                                       else "")
    return sources


def traced_kernel_times(run_once, calls: int) -> tuple[dict[str, list[float]], list[str]]:
    """Calls `run_once()` `calls` times under `jax.profiler` and returns `device_kernel_times`
    of the trace."""
    import jax
    with tempfile.TemporaryDirectory(prefix="armt_profile_") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(calls):
            run_once()
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {trace_dir}")
        return device_kernel_times(paths[0])


def print_breakdown(title: str, times: dict[str, list[float]], runs: int,
                    sources: dict[str, str], top: int) -> dict:
    """Prints device time by kind and the `top` kernels (with their source lines) of `runs`
    traced runs; returns the per-run sums as a JSON-ready dict."""
    per_run = {name: sum(ts) / runs for name, ts in times.items()}
    counts = {name: len(ts) / runs for name, ts in times.items()}
    by_kind = collections.Counter()
    for name, t in per_run.items():
        by_kind[kind_of(name)] += t
    busy = sum(per_run.values())
    print(f"\n## {title}, device busy {busy * 1e3:.2f} ms, {sum(counts.values()):.0f} kernels"
          " per run", flush=True)
    print("| kind | ms per run | share of busy |\n|---|---:|---:|")
    for kind, t in by_kind.most_common():
        print(f"| {kind} | {t * 1e3:.2f} | {t / busy:.1%} |")
    print("\n| kernel | kind | ms per run | calls per run | us per call | source |"
          "\n|---|---|---:|---:|---:|---|")
    for name, t in sorted(per_run.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {name[:70]} | {kind_of(name)} | {t * 1e3:.2f} | {counts[name]:.0f} | "
              f"{t / counts[name] * 1e6:.1f} | {sources.get(name, '')} |")
    return {"busy_s_per_run": busy, "by_kind_s": dict(by_kind),
            "kernels": {k: {"s_per_run": per_run[k], "calls_per_run": counts[k],
                            "source": sources.get(k, "")} for k in per_run}}


def profile(schedule: str, n: int, runs: int, compiler_options: dict, out_dir: Path, top: int,
            dump_hlo: bool = False, size: str = "1b") -> dict:
    """Profiles one schedule; prints the tables, writes and returns the summary."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    cfg, armt = bench_config(size)
    params = bench_params(schedule, cfg, armt)
    tokens = jnp.asarray(np.random.default_rng(n).integers(0, cfg.vocab_size, (1, n)), jnp.int32)
    compiled = jax.jit(forward_fn(schedule, cfg, armt)).lower(params, tokens).compile(
        compiler_options=compiler_options or None)
    compiled(params, tokens).block_until_ready()                 # warm-up
    walls = []

    def run_once():
        t0 = time.perf_counter()
        compiled(params, tokens).block_until_ready()
        walls.append(time.perf_counter() - t0)

    times, lines_seen = traced_kernel_times(run_once, runs)
    wall = float(np.median(walls))
    tag = f"{schedule}{'+' + ','.join(compiler_options) if compiler_options else ''}"
    hlo = compiled.as_text()
    breakdown = print_breakdown(f"{tag}, {n} tokens: wall {wall * 1e3:.2f} ms (traced runs)",
                                times, runs, kernel_sources(hlo), top)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    if dump_hlo:
        with gzip.open(out_dir / f"hlo_{safe}_{n}.txt.gz", "wt") as f:
            f.write(hlo)
    summary = {
        "schedule": schedule, "tokens": n, "compiler_options": compiler_options,
        "wall_s_median": wall, **breakdown, "trace_lines": lines_seen,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    (out_dir / f"profile_{safe}_{n}.json").write_text(json.dumps(summary, indent=1))
    return summary


def parse_compiler_option(text: str) -> tuple[str, bool | int | float | str]:
    """"xla_NAME=VALUE" -> (name, value) for jit's compiler_options (an argparse type). XLA wants
    typed values: true/false -> bool, numbers -> int or float, else the string."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("xla_"):
        raise argparse.ArgumentTypeError(f"expected xla_NAME=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=["sequential", "diagonal"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=2, help="traced runs (after one warm-up)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed per schedule")
    ap.add_argument("--compiler-option", type=parse_compiler_option, action="append", default=[],
                    metavar="xla_NAME=VALUE",
                    help="XLA compiler option for these compilations only (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--size", choices=("1b", "mid", "tiny"), default="1b",
                    help="model size (mid / tiny: smaller models for CPU checks of this script)")
    ap.add_argument("--dump-hlo", action="store_true",
                    help="also write the optimised HLO of each program (gzip) to --out")
    args = ap.parse_args(argv)
    for schedule in args.schedules:
        profile(schedule, args.tokens, args.runs, dict(args.compiler_option), args.out, args.top,
                args.dump_hlo, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
