"""Registers and spills of the Hopper kernel's compiled configs, from ptxas.

Compiles each (product, config) pair at G = 16 with Mosaic GPU's ``MOSAIC_GPU_DUMP_PTXAS`` set,
so that ptxas reports each kernel's registers per thread and spill bytes, and prints one
table row per pair: where a config runs more cycles than expected, spills are the first thing
to rule out. Run on a GPU:

    python3 eval/ptxas_report.py --products 3b:qkv --configs auto,rows_128x320
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = 16
_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_lines(text: str) -> tuple[str, str]:
    """(registers, spill stores / loads in bytes) from ptxas' verbose output of one kernel."""
    used, spills = _USED.findall(text), _SPILLS.findall(text)
    return (",".join(used) or "?",
            ",".join(f"{s}/{ld}" for s, ld in spills) or "?")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", default="3b:qkv",
                   help="comma-separated model:shape[:fwd|dx|dw], G = 16")
    p.add_argument("--configs", default="auto",
                   help="comma-separated: auto (select_config's choice) or SWEEP names")
    args = p.parse_args(argv)
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"   # read when a kernel is compiled

    import jax
    import jax.numpy as jnp

    from eval import bench_grouped_matmul as bench
    from kernels import grouped_matmul_mgpu as mgpu

    if jax.devices()[0].platform != "gpu":
        raise SystemExit("ptxas_report compiles for the GPU: it needs one")
    print("| product | config | tile | registers / thread | spill stores / loads (bytes) |")
    print("|---|---|---|---:|---:|")
    for spec, name in itertools.product(args.products.split(","), args.configs.split(",")):
        label, (m, k, n), transpose = bench.product_spec(spec)
        tl, tr = transpose or (False, False)
        config = bench.resolve_config(name, GROUPS, m, k, n, tl, tr)
        a, b = bench._product_operands(jax.random.key(0), GROUPS, m, k, n, transpose)
        fn = jax.jit(lambda a, b, config=config, tl=tl, tr=tr: mgpu.grouped_matmul_mgpu(
            a, b, jnp.array([0, GROUPS], jnp.int32), transpose_lhs=tl, transpose_rhs=tr,
            config=config))
        # ptxas writes to the process' stdout / stderr (file descriptors 1 and 2): catch both
        with tempfile.TemporaryFile(mode="w+") as log:
            sys.stdout.flush()
            saved = os.dup(1), os.dup(2)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                fn.lower(a, b).compile()
            finally:
                sys.stdout.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
            log.seek(0)
            registers, spills = ptxas_lines(log.read())
        print(f"| {label} | {name} | {config.cta_tile_m}x{config.cta_tile_n} | {registers} |"
              f" {spills} |", flush=True)


if __name__ == "__main__":
    main()
