"""Few-row products (a decode step's m = batch rows) on the grouped-matmul kernel, k split.

A product with fewer rows than one wgmma tile (64) does almost no math per weight it reads, so
its speed is how fast its weights stream in. Its n / 128 column tiles alone would keep few SMs
busy (the 1B model's o and down projections: 16 of 132), so the contraction is split into S
slices: group g's weights [k, n] are read as S groups [k/S, n] (a free reshape of the stored
[Gw, k, n] to [Gw * S, k/S, n]), x [G, m, k] as [G * S, m, k/S], and the kernel computes every
slice as a group of its own, writing float32 partial products that are summed afterwards (one
rounding to the output dtype, as a single float32 accumulation).

The point, besides the spread over the SMs: the kernel reads the layer of stacked weights that
the weight offset names in place. In the decode's layer scan XLA copies each layer's MLP weights
out of the stack before its GEMM: 0.8 ms of a 2.7 ms token on the 1B model, H200
(eval/results/generate_h200.md).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import grouped_matmul_mgpu as mgpu_kernel

MAX_ROWS = 64   # products with fewer rows take this path (one wgmma tile is 64 rows)

# 64 x 128 CTA tiles (two 64 x 64 warpgroups along n), 128-element k-steps, 4 stages; one
# float32 epilogue slot per warpgroup. H200, 1B decode shapes with 8 rows: eval/probe_skinny.py.
CONFIG = mgpu_kernel.TuningConfig(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=4,
                                  epi_slots=1)


def num_splits(num_groups: int, k: int, n: int, config: mgpu_kernel.TuningConfig,
               num_sms: int) -> int:
    """The smallest power of two S whose num_groups * column tiles * S work items fill the SMs,
    while k / S stays a multiple of the k-step."""
    items = num_groups * pl.cdiv(n, config.cta_tile_n)
    splits = 1
    while items * splits < num_sms and k % (2 * splits * config.tile_k) == 0:
        splits *= 2
    return splits


def split_shapes(a_shape, b_shape, splits: int):
    """Shapes of split_operands' results: a [G*S, m8, k/S] (rows padded to a multiple of 8),
    b [Gb*S, k/S, n]."""
    (g, m, k), (gb, _, n) = a_shape, b_shape
    return (g * splits, -(-m // 8) * 8, k // splits), (gb * splits, k // splits, n)


def split_operands(a, b, bounds, splits: int):
    """a [G, m, k] -> [G*S, m8, k/S], b [Gb, k, n] -> [Gb*S, k/S, n] (a view), bounds (lo, hi,
    b_off, out_off) scaled to slices."""
    g, m, k = a.shape
    a_shape, b_shape = split_shapes(a.shape, b.shape, splits)
    rows = a_shape[1]
    if rows != m:
        a = jnp.pad(a, ((0, 0), (0, rows - m), (0, 0)))
    a = a.reshape(g, rows, splits, k // splits).transpose(0, 2, 1, 3).reshape(a_shape)
    return a, b.reshape(b_shape), bounds * splits


def unsupported_reason(a_shape, b_shape, dtype, config, num_sms: int,
                       interpret: bool = False) -> str | None:
    """Why split_k_matmul cannot serve a [G, m, k] @ b [Gb, k, n] (None: it can)."""
    g, m, k = a_shape
    if m >= MAX_ROWS:
        return f"m={m} rows: {MAX_ROWS} or more take the kernel's own tiles"
    if k % config.tile_k:
        return f"k={k} not a multiple of the {config.tile_k}-element k-step"
    splits = num_splits(g, k, b_shape[2], config, num_sms)
    return mgpu_kernel.unsupported_reason(*split_shapes(a_shape, b_shape, splits), dtype,
                                          jnp.float32, config=config, interpret=interpret)


def split_k_matmul(a, b, bounds, *, out_dtype, config, num_sms: int, interpret=None,
                   splits: int | None = None):
    """``out[g] = a[g] @ b[g + b_off]`` for lo <= g < hi, zeros elsewhere; a [G, m, k] with
    m < MAX_ROWS, b [Gb, k, n]; bounds int32 (lo, hi, b_off, out_off) with out_off = 0.
    splits: S (default num_splits'); k / S must be a multiple of the k-step."""
    g, m, k = a.shape
    n = b.shape[2]
    splits = splits or num_splits(g, k, n, config, num_sms)
    a_split, b_split, bounds = split_operands(a, b, bounds, splits)
    parts = mgpu_kernel.grouped_matmul_mgpu(a_split, b_split, bounds, config=config,
                                            num_sms=num_sms, interpret=interpret,
                                            out_dtype=jnp.float32)
    out = parts.reshape(g, splits, a_split.shape[1], n).sum(axis=1)
    return out[:, :m].astype(out_dtype)
