"""Where does a product's time go in the kernel: feeding the tensor cores, or computing?

Times select_config's choice, or named configs (on the ring of stages, kernels/ring_mgpu.py, or
ping-pong, kernels/pingpong_mgpu.py), as it is; without its loads (the memory warpgroup signals
each stage without loading it, so the compute warpgroups run their wgmma on whatever the stage
holds); without its wgmma (the loads, barriers and epilogue stores alone); without both
(barriers and stores); and cuBLAS through XLA's einsum. All at G = 16, by device time (profiler
traces, median over rounds in rotated order). Where the kernel without loads runs at cuBLAS's
time, its loss is in feeding; where it does not, in the compute warpgroups' own work. The
probes compute a wrong product, so nothing else may use them. Run on a GPU:

    python3 eval/probe_ring.py --products 1b:down:dw,1b:qkv:dw,1b:down
    python3 eval/probe_ring.py --products 1b:down:dw --configs auto,pingpong_delay1
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from armt_jax.cli_args import positive_int  # noqa: E402
from eval import bench_grouped_matmul as bench  # noqa: E402
from kernels import grouped_matmul_mgpu as mgpu  # noqa: E402

GROUPS = 16
# name -> the kernel's probe set (grouped_matmul_mgpu.PROBES; None: cuBLAS)
VARIANTS = {"kernel": frozenset(), "no loads": frozenset({"no_loads"}),
            "no wgmma": frozenset({"no_mma"}), "neither": frozenset({"no_loads", "no_mma"}),
            "cuBLAS": None}


def product_calls(spec: str, config_name: str, key):
    """(label, config, args, {variant: jitted call}) for a product "model:shape[:fwd|dx|dw]"
    and a config ("auto" or a SWEEP name of eval/bench_grouped_matmul.py)."""
    label, (m, k, n), transpose = bench.product_spec(spec)
    tl, tr = transpose or (False, False)
    config = bench.resolve_config(config_name, GROUPS, m, k, n, tl, tr)
    a, b = bench._product_operands(key, GROUPS, m, k, n, transpose)
    bounds = jnp.array([0, GROUPS], jnp.int32)
    calls = {}
    for name, probe in VARIANTS.items():
        if probe is None:
            calls[name] = bench._make_fn("xla_einsum", None, transpose)
            continue
        calls[name] = jax.jit(lambda a, b, lo, hi, probe=probe: mgpu.grouped_matmul_mgpu(
            a, b, jnp.stack([lo, hi]), transpose_lhs=tl, transpose_rhs=tr, config=config,
            _probe=probe))
    return label, config, (a, b, bounds[0], bounds[1]), calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", default="1b:down:dw,1b:qkv:dw,3b:qkv:dw,1b:down",
                   help="comma-separated model:shape[:fwd|dx|dw], G = 16, all groups active")
    p.add_argument("--configs", default="auto",
                   help="comma-separated: auto (select_config's choice) or SWEEP names")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds in rotated order")
    args = p.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("probe_ring times the Hopper kernel: it needs a GPU")
    print("| product | config | tile | " + " | ".join(f"{v} us" for v in VARIANTS)
          + " | speed vs cuBLAS: kernel | no loads |")
    print("|---|---|---|" + "---:|" * (len(VARIANTS) + 2))
    key = jax.random.key(0)
    for spec, config_name in itertools.product(args.products.split(","),
                                                args.configs.split(",")):
        key, sub = jax.random.split(key)
        label, config, call_args, calls = product_calls(spec, config_name, sub)
        tile = (f"{config.tile_m}x{config.tile_n} ping-pong" if config.pingpong
                else f"{config.cta_tile_m}x{config.cta_tile_n}")
        names = list(calls)
        us = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                times = bench._device_times(calls[name], call_args)
                # one big launch per call beside small ones (cuBLAS's memset, the kernel
                # call's bounds concatenation): the big one
                us[name].append(1e6 * max(times.values()))
        med = {name: statistics.median(v) for name, v in us.items()}
        print(f"| {label} | {config_name} | {tile} | "
              + " | ".join(f"{med[n]:.0f}" for n in names)
              + f" | {med['cuBLAS'] / med['kernel']:.3f} | {med['cuBLAS'] / med['no loads']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
