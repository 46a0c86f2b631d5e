"""How much of a kernel tile's time is fixed cost (epilogue, tile switch) rather than k-steps?

Times select_config's choice and XLA's einsum (cuBLAS) at k and 2k on the same output tiles,
G = 16, by device time (profiler trace). With T(k) = waves * (k_steps * t_step + t_fixed) + c,
2 T(k) - T(2k) = waves * t_fixed + c: the figure per wave estimates a tile's fixed cost. It
assumes a k-step costs the same at 2k, which fails where the operands outgrow the L2 cache
(8b o: 2 T(k) - T(2k) < 0). Run on a GPU:

    python3 eval/probe_tile_overhead.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eval import bench_grouped_matmul as bench
from kernels import tuning

SHAPES = [("1b o", 1152, 2048, 2048), ("1b qkv", 1152, 2048, 3072),
          ("3b o", 2176, 3072, 3072), ("8b o", 4224, 4096, 4096)]
GROUPS = 16


def main():
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("probe_tile_overhead times the Hopper kernel: it needs a GPU")
    key = jax.random.key(0)
    print("| product | config | k | waves | kernel us | cuBLAS us | 2T(k)-T(2k) kernel us"
          " | per wave | 2T(k)-T(2k) cuBLAS us |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m, k, n in SHAPES:
        cfg = tuning.select_config(GROUPS, m, k, n)
        waves = tuning._num_tiles(cfg, GROUPS, m, n) / tuning.num_sms_of_device()
        us = {}
        for kk in (k, 2 * k):
            key, sub = jax.random.split(key)
            a, w = bench._product_operands(sub, GROUPS, m, kk, n)
            bounds = (jnp.int32(0), jnp.int32(GROUPS))
            for impl, c in (("pallas", cfg), ("xla_einsum", None)):
                times = bench._device_times(bench._make_fn(impl, c), (a, w, *bounds))
                # the kernel's call also launches a tiny bounds concatenation; cuBLAS a memset
                us[impl, kk] = 1e6 * (sum(times.values()) if impl == "pallas"
                                      else max(times.values()))
        fixed = {impl: 2 * us[impl, k] - us[impl, 2 * k] for impl in ("pallas", "xla_einsum")}
        tile = f"{cfg.cta_tile_m}x{cfg.cta_tile_n}"
        print(f"| {name} | {tile} | {k} | {waves:.2f} | {us['pallas', k]:.0f} |"
              f" {us['xla_einsum', k]:.0f} | {fixed['pallas']:.1f} |"
              f" {fixed['pallas'] / waves:.2f} | {fixed['xla_einsum']:.1f} |")
        print(f"| {name} | {tile} | {2 * k} | | {us['pallas', 2 * k]:.0f} |"
              f" {us['xla_einsum', 2 * k]:.0f} | | | |", flush=True)


if __name__ == "__main__":
    main()
