"""Sustained-load A/B of grouped-matmul configs and cuBLAS, with the GPU's clock and power.

At full load the 8b products run at the H200's power limit, where the SM clock, and so the time
per call, follows the energy a kernel spends per cycle (Nsight Compute, runs s21_ncu_*: on 8b
down dx the kernel took 0.3-0.5 % more cycles than cuBLAS but ran at a 3-4 % lower clock,
reading 1.7-1.9x the DRAM bytes). The bench's profiled A/B (eval/bench_grouped_matmul.py --ab) times bursts
of a few calls, whose clock depends on what ran just before: identical configs read up to 5 %
apart there. This script instead runs each config back to back for ``--seconds`` per round (a
window long enough for the clock to settle), rounds in rotated order, while ``nvidia-smi`` samples
the SM clock and the power draw; per window it reports the time per call, the mean clock and
power over the window's settled part, the cycles per call (time x clock) and the energy per call.
With ``--trace_calls N`` it then traces N back-to-back calls of each config (``traced_window``):
the device time per call against the wall time per call, to tell gaps between calls from the
kernels' own time (the windows' cycles per call read 9-24 % above ncu's counted cycles in
session 22; run s23_sustained_trace found the GPU idle 14-19 % of a traced loop's time between
calls on the 0.2-0.4 ms 1b qkv / o dw products, for the kernel and cuBLAS alike). With
``--chain K`` every dispatch runs K products one after another in one jitted call (``chained``),
so the host's per-call work falls between dispatches of K products, not between products; times
per call are then per product.

    python3 eval/sustained_ab.py --products 8b:down:dx,8b:down \\
        --configs auto,xla_einsum,default_gn4 --seconds 2 --rounds 3 --out OUT/sustained.json

Needs a GPU and nvidia-smi. Configs: "auto" (select_config's choice), "xla_einsum" (cuBLAS: XLA's
plain batched einsum) or names of eval/bench_grouped_matmul.py's SWEEP, each optionally in
another tile order ("auto@gm12": bench_grouped_matmul.resolve_config).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from eval import bench_grouped_matmul as bench  # noqa: E402

# Samples in a window's first SETTLE_S seconds are left out: the clock is still moving there.
SETTLE_S = 0.4
SMI_FIELDS = ("clocks.sm", "power.draw.instant", "temperature.gpu")


class GpuSampler:
    """nvidia-smi's clock / power / temperature samples every ``period_ms``, each stamped with
    the host's ``time.perf_counter()`` on arrival (a few ms late, the same for every config)."""

    def __init__(self, period_ms: int = 20):
        self.samples: list[tuple[float, float, float, float]] = []
        fields = list(SMI_FIELDS)
        query = lambda: ["nvidia-smi", f"--query-gpu={','.join(fields)}",
                         "--format=csv,noheader,nounits"]
        if subprocess.run(query(), capture_output=True).returncode:
            fields[1] = "power.draw"   # drivers without the instantaneous reading
            subprocess.run(query(), check=True, capture_output=True)
        self.fields = tuple(fields)
        self._proc = subprocess.Popen(query() + ["-lms", str(period_ms)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._proc.stdout:
            try:
                values = [float(v) for v in line.split(",")]
            except ValueError:   # "[N/A]" or a message: not a sample
                continue
            self.samples.append((time.perf_counter(), *values))

    def window(self, t0: float, t1: float) -> dict:
        inside = [s for s in self.samples if t0 + SETTLE_S <= s[0] <= t1]
        if not inside:
            raise RuntimeError(f"no nvidia-smi samples in a {t1 - t0:.2f} s window"
                               f" ({len(self.samples)} samples in all)")
        mean = lambda i: statistics.fmean(s[i] for s in inside)
        return {"clock_mhz": mean(1), "power_w": mean(2), "temp_c": mean(3), "samples": len(inside)}

    def close(self):
        self._proc.terminate()
        self._proc.wait()


def chained(fn, k: int):
    """One jitted call running ``fn(*args)`` k times in sequence: (the last result, the sum of
    every result's first element). Each call's operands pass through ``lax.optimization_barrier``
    together with the previous call's result, so XLA can neither merge the k identical calls nor
    start one before the previous one is done; the sum keeps every call's result in use (else
    all but the last are dead code). The device runs the k products back to back without
    waiting on the host between them, plus one tiny kernel for the sum."""
    if k < 1:
        raise ValueError(f"chain of {k} calls: needs at least 1")
    first = lambda y: y[(0,) * y.ndim].astype(jnp.float32)

    def run(*args):
        out = fn(*args)
        check = first(out)
        for _ in range(k - 1):
            args, out = jax.lax.optimization_barrier((args, out))
            out = fn(*args)
            check = check + first(out)
        return out, check

    return jax.jit(run)


def compiled_calls(calls: dict, args, chain: int = 1) -> dict:
    """name -> the config's call (``chained`` ``chain`` times where chain > 1), compiled and
    run once, so no window times a compile (the chained calls are new jitted functions: before
    this, each product's first window of the first config timed one, some 20 ms a product)."""
    fns = {name: fn if chain == 1 else chained(fn, chain) for name, (fn, _) in calls.items()}
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    return fns


def back_to_back(fn, args, *, calls: int | None = None, seconds: float | None = None):
    """Calls fn back to back, a sync every 8 calls (keeps the queue short), for ``calls`` calls
    or until a sync finds ``seconds`` passed; (calls made, start, end) in perf_counter time."""
    made, t0 = 0, time.perf_counter()
    while True:
        out = fn(*args)
        made += 1
        if made % 8 == 0 or made == calls:
            jax.block_until_ready(out)
            if made == calls or (seconds is not None and time.perf_counter() - t0 >= seconds):
                return made, t0, time.perf_counter()


def run_window(fn, args, seconds: float, sampler: GpuSampler,
               products_per_call: int = 1) -> dict:
    """Calls fn back to back for about ``seconds``; the time per product (``products_per_call``
    of them in each call: ``chained``) and the window's clock and power."""
    calls, t0, t1 = back_to_back(fn, args, seconds=seconds)
    ms = (t1 - t0) / (calls * products_per_call) * 1e3
    gpu = sampler.window(t0, t1)
    return {"ms_per_call": ms, "calls": calls, **gpu,
            "mcycles_per_call": ms * gpu["clock_mhz"] / 1e3,
            "joules_per_call": ms * gpu["power_w"] / 1e3}


def traced_window(fn, args, calls: int, products_per_call: int = 1) -> dict:
    """``calls`` calls back to back as in run_window under jax.profiler, after a throwaway
    trace of 8: the device time per call (every kernel of a call, medians over the calls:
    bench_grouped_matmul.per_call_seconds; None where the trace holds no device kernels, as on
    a CPU) and the traced stretch's wall time per call. A window's ms_per_call well above the
    device time means the GPU idled between calls; time x nvidia-smi's clock well above ncu's
    counted cycles without such gaps would point at the clock reading. Both per product where
    each call runs ``products_per_call`` of them (``chained``); the kernel launches per call
    show that a chain ran all of its products."""
    from eval.profile import traced_kernel_times

    traced_kernel_times(lambda: back_to_back(fn, args, calls=8), 1)
    stretch = []
    times, _ = traced_kernel_times(
        lambda: stretch.append(back_to_back(fn, args, calls=calls)), 1)
    (_, t0, t1), = stretch
    device_s = sum(bench.per_call_seconds(times, calls).values()) if times else None
    per_product = 1e3 / products_per_call
    return {"device_ms_per_call": None if device_s is None else device_s * per_product,
            "traced_ms_per_call": (t1 - t0) / calls * per_product, "traced_calls": calls,
            "launches_per_call": sum(map(len, times.values())) / calls if times else None}


def summarize(results: list[dict], baseline: str = "xla_einsum") -> str:
    """Markdown: per product and config, medians over the rounds, and the baseline's median time
    over the config's (>1: the config is faster)."""
    keys = list(dict.fromkeys((r["product"], r["config"]) for r in results))
    median = lambda p, c, f: statistics.median(
        r[f] for r in results if (r["product"], r["config"]) == (p, c))
    lines = ["| product | config | ms/call | range | clock MHz | power W | Mcycles/call |"
             " J/call | speedup vs cuBLAS | rounds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p, c in keys:
        times = [r["ms_per_call"] for r in results if (r["product"], r["config"]) == (p, c)]
        base = ((median(p, baseline, "ms_per_call") / median(p, c, "ms_per_call"))
                if (p, baseline) in keys else None)
        lines.append(
            f"| {p} | {c} | {median(p, c, 'ms_per_call'):.3f} | {min(times):.3f}-{max(times):.3f} |"
            f" {median(p, c, 'clock_mhz'):.0f} | {median(p, c, 'power_w'):.0f} |"
            f" {median(p, c, 'mcycles_per_call'):.3f} | {median(p, c, 'joules_per_call'):.2f} |"
            f" {'' if base is None else f'{base:.3f}'} | {len(times)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_product_arguments(p, "8b:down:dx,8b:down")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one config's window")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True, help="JSON: every window, and the run's metadata")
    p.add_argument("--trace_calls", type=int, default=0,
                   help="after a product's rounds, trace this many back-to-back calls of each"
                        " config: device time per call against wall time per call (0: off)")
    p.add_argument("--chain", type=int, default=1,
                   help="products per dispatch, run back to back in one jitted call; times"
                        " are per product (1: one product per dispatch)")
    args = p.parse_args(argv)
    if args.chain < 1:
        p.error(f"--chain {args.chain}: needs at least 1 product per dispatch")
    sampler = GpuSampler()
    results, skipped, traces = [], [], []
    date = datetime.datetime.now(datetime.timezone.utc).isoformat()

    def write():
        with open(args.out, "w") as f:
            json.dump({"date": date, "command": "python3 " + " ".join(sys.argv),
                       "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                       "settle_s": SETTLE_S, "chain": args.chain, "smi_fields": sampler.fields,
                       "skipped": skipped, "windows": results, "traces": traces}, f, indent=1)

    key = jax.random.PRNGKey(0)
    try:
        for spec in args.products.split(","):
            key, sub = jax.random.split(key)
            label, call_args, calls, failed = bench.full_load_calls(
                spec, args.configs.split(","), sub)
            for name, why in failed:
                skipped.append(f"{label} {name}: {why}")
                print(f"not timed: {label} {name}: {why}", flush=True)
            fns = compiled_calls(calls, call_args, args.chain)
            configs = {name: tuning for name, (_, tuning) in calls.items()}
            order = list(fns)
            for r in range(args.rounds):
                for name in order[r % len(order):] + order[:r % len(order)]:
                    row = {"product": label, "config": name, "tuning": configs[name], "round": r,
                           **run_window(fns[name], call_args, args.seconds, sampler,
                                        args.chain)}
                    results.append(row)
                    print(f"{label:12s} {name:16s} round {r}: {row['ms_per_call']:.3f} ms/call"
                          f" at {row['clock_mhz']:.0f} MHz, {row['power_w']:.0f} W,"
                          f" {row['mcycles_per_call']:.3f} Mcycles", flush=True)
            for name in order if args.trace_calls else ():
                trace = {"product": label, "config": name,
                         **traced_window(fns[name], call_args, args.trace_calls, args.chain)}
                traces.append(trace)
                device = trace["device_ms_per_call"]
                print(f"{label:12s} {name:16s} traced: device "
                      f"{'-' if device is None else f'{device:.3f}'} ms/call, wall"
                      f" {trace['traced_ms_per_call']:.3f} ms/call,"
                      f" {trace['launches_per_call']} launches per dispatch", flush=True)
            del call_args, calls, fns
            write()   # after every product: a run cut short by a timeout keeps what it timed
    finally:
        sampler.close()
    print(summarize(results))
    for line in skipped:
        print("skipped", line)


if __name__ == "__main__":
    main()
