"""Hardware counters of the grouped-matmul kernel and cuBLAS on chosen products (Nsight Compute).

Where the kernel trails cuBLAS by a few percent at full load (8b down dx, 8b down, 3b qkv), the
device time alone does not say why: fewer cycles lost or a faster clock, tensor cores idle in the
main loop or in the epilogue, shared-memory bank conflicts, L2 / DRAM traffic. This script runs
each (product, config) once between cudaProfilerStart / Stop, so Nsight Compute profiles exactly
those launches, and writes the launch order to a manifest; ``--summarize`` reads the report back
and prints the chosen metrics side by side.

    ncu --profile-from-start off --clock-control none --set full -o OUT/products \\
        python3 eval/ncu_products.py --products 8b:down:dx,8b:down --configs auto,xla_einsum \\
        --manifest OUT/manifest.json
    python3 eval/ncu_products.py --summarize OUT/products.ncu-rep --manifest OUT/manifest.json

``--sass`` reads the source page (sampled warp stalls per SASS instruction) exported as CSV
(``bash eval/gpu_session.sh ncu_source``) and lists where each kernel's warps waited.

``--clock-control none`` leaves the GPU's clocks as they are (the card's settings are not ours
to change), so the SM clock each kernel ran at is one of the figures.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import glob
import gzip
import io
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from eval import bench_grouped_matmul as bench  # noqa: E402

# Metrics printed by --summarize (regular expressions over the raw page's metric names), in order.
SUMMARY_METRICS = (
    r"gpu__time_duration\.sum",
    r"sm__cycles_elapsed\.avg\.per_second",
    r"sm__cycles_elapsed\.max",
    r"sm__throughput\.avg\.pct_of_peak_sustained_elapsed",
    r"dram__bytes_(read|write)\.sum",
    r"lts__t_bytes\.sum",
    r"lts__t_sector_hit_rate\.pct",
    r"l1tex__data_bank_conflicts_pipe_lsu_mem_shared.*\.sum",
    r"smsp__inst_executed\.sum",
    r"smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio",
    r"launch__(grid_size|block_size|cluster_.*|registers_per_thread|shared_mem_per_block_dynamic)",
)


def profiler_library():
    """cudart, found beside the CUDA wheels JAX loads (or on the loader's path)."""
    candidates = []
    for root in sys.path:
        candidates += glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so*"), recursive=True)
    candidates += ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError(f"no libcudart found (tried {candidates})")


def run_products(products, config_names, manifest_path, seed=0):
    """Compile, check and warm up every (product, config), then run each once inside a profiler
    window. The manifest lists, in launch order, (product, config, the kernel's name pattern)."""
    calls = []
    key = jax.random.PRNGKey(seed)
    for spec in products:
        key, sub = jax.random.split(key)
        label, args, fns, failed = bench.full_load_calls(spec, config_names, sub)
        for name, why in failed:
            print(f"not profiled: {label} {name}: {why}", flush=True)
        for name, (fn, _) in fns.items():
            for _ in range(3):
                jax.block_until_ready(fn(*args))
            calls.append((label, name, fn, args))
    cudart = profiler_library()
    manifest = []
    for product, name, fn, args in calls:
        if cudart.cudaProfilerStart() != 0:
            raise RuntimeError("cudaProfilerStart failed")
        jax.block_until_ready(fn(*args))
        cudart.cudaProfilerStop()
        manifest.append({"product": product, "config": name,
                         "kernel": "nvjet|gemm|cutlass" if name == "xla_einsum" else "mosaic"})
        print(f"profiled {product} {name}", flush=True)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)


def read_raw(report_path):
    """The report's raw page: one dict per profiled kernel, metric name -> value string."""
    text = subprocess.run(["ncu", "--import", report_path, "--page", "raw", "--csv"],
                          check=True, capture_output=True, text=True).stdout
    rows = list(csv.reader(io.StringIO(text)))
    header, units, body = rows[0], rows[1], rows[2:]
    return [dict(zip(header, r)) for r in body], dict(zip(header, units))


def label_kernels(kernels, manifest):
    """[(label, kernel)]: for each manifest entry in launch order, the first profiled kernel after
    the previous entry's whose name matches the entry's pattern ("product / config"); entries
    without one are reported on stderr and left out."""
    labelled, rest = [], list(kernels)
    for entry in manifest:
        for i, k in enumerate(rest):
            if re.search(entry["kernel"], k.get("Kernel Name", ""), re.I):
                labelled.append((f"{entry['product']} / {entry['config']}", k))
                rest = rest[i + 1:]
                break
        else:
            print(f"no kernel matching {entry['kernel']!r} for {entry}", file=sys.stderr)
    return labelled


def summarize(report_path, manifest_path):
    kernels, units = read_raw(report_path)
    with open(manifest_path) as f:
        labelled = label_kernels(kernels, json.load(f))
    names = [n for pattern in SUMMARY_METRICS for n in sorted(units) if re.fullmatch(pattern, n)]
    print("| metric | unit | " + " | ".join(label for label, _ in labelled) + " |")
    print("|---|---|" + "---|" * len(labelled))
    for n in dict.fromkeys(names):
        print(f"| {n} | {units[n]} | " + " | ".join(k.get(n, "") for _, k in labelled) + " |")
    for label, k in labelled:
        print(f"{label}: {k.get('Kernel Name', '')[:160]}")


def read_sass(path):
    """[(kernel name, [row dict])] from the source page exported as CSV (``ncu --import REPORT
    --page source --csv --print-source sass``, optionally gzipped): one block per profiled
    kernel, each starting with a "Kernel Name" line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        blocks = f.read().split('"Kernel Name",')[1:]
    kernels = []
    for block in blocks:
        name, body = block.split("\n", 1)
        rows = list(csv.reader(io.StringIO(body)))
        header = rows[0]
        kernels.append((name.strip('",'), [dict(zip(header, r)) for r in rows[1:]
                                           if len(r) == len(header)]))
    return kernels


def summarize_sass(path, top: int = 12):
    """For each kernel of a source-page CSV, the ``top`` SASS instructions with the most sampled
    warp stalls: offset, executions, share of the kernel's samples and the main stall reasons.
    Samples the page's per-reason columns leave out (it has no column for waits on the wgmma
    unit, which the kernel-wide metrics count) show as "unlisted"."""
    for name, rows in read_sass(path):
        samples = lambda r: int(r["Warp Stall Sampling (All Samples)"] or 0)
        total = sum(map(samples, rows)) or 1
        base = int(rows[0]["Address"], 16)
        reasons = [c for c in rows[0] if c.startswith("stall_") and "(Not Issued)" not in c]
        print(f"\n{name}: samples {total}, instructions {len(rows)}\n")
        print("| offset | executed | samples | share | instruction | stall reasons |")
        print("|---|---:|---:|---:|---|---|")
        for r in sorted(rows, key=samples, reverse=True)[:top]:
            counts = {c[len("stall_"):]: int(r[c] or 0) for c in reasons}
            counts["unlisted"] = samples(r) - sum(counts.values())
            main = sorted(((v, c) for c, v in counts.items() if v), reverse=True)[:3]
            print(f"| {int(r['Address'], 16) - base:x} | {r['Instructions Executed']} |"
                  f" {samples(r)} | {100 * samples(r) / total:.1f} % | `{r['Source'].strip()}` |"
                  f" {', '.join(f'{c} {v}' for v, c in main)} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_product_arguments(p, "8b:down:dx,8b:down,3b:qkv")
    p.add_argument("--manifest", required=True, help="JSON: the profiled launches, in order")
    p.add_argument("--summarize", default=None, metavar="REPORT",
                   help="print SUMMARY_METRICS of an .ncu-rep written by a profiled run")
    p.add_argument("--sass", default=None, metavar="CSV",
                   help="print the instructions with the most sampled stalls from a source"
                        " page exported as CSV (gpu_session.sh ncu_source), kernel by kernel")
    args = p.parse_args(argv)
    if args.sass:
        summarize_sass(args.sass)
    elif args.summarize:
        summarize(args.summarize, args.manifest)
    else:
        run_products(args.products.split(","), args.configs.split(","), args.manifest)


if __name__ == "__main__":
    main()
