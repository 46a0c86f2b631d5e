"""XLA reference for the grouped matmul: the fallback path and the test oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def active_mask(num_groups: int, lo, hi) -> jax.Array:
    """bool[G]: True for the groups g with lo <= g < hi."""
    g = lax.iota(jnp.int32, num_groups)
    return (g >= lo) & (g < hi)


def grouped_matmul_reference(
    a, b, lo, hi, *, transpose_lhs: bool = False, transpose_rhs: bool = False, out_dtype=None
):
    """``out[g] = op(a[g]) @ op(b[g])`` for lo <= g < hi, zeros elsewhere.

    a: [G, M, K] ([G, K, M] if transpose_lhs); b: [G, K, N] ([G, N, K] if
    transpose_rhs). float32 accumulation; float32 inputs use full float32
    precision (no TF32). Idle groups are selected away after the einsum, so
    NaN/Inf in idle inputs cannot leak into the result. All G groups are
    computed: idle groups cost full price on this path.
    """
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    lhs = "gkm" if transpose_lhs else "gmk"
    rhs = "gnk" if transpose_rhs else "gkn"
    precision = (
        lax.Precision.HIGHEST if jnp.float32 in (jnp.dtype(a.dtype), jnp.dtype(b.dtype)) else None
    )
    out = jnp.einsum(
        f"{lhs},{rhs}->gmn", a, b, preferred_element_type=jnp.float32, precision=precision
    )
    mask = active_mask(a.shape[0], lo, hi)[:, None, None]
    return jnp.where(mask, out, 0).astype(out_dtype)
