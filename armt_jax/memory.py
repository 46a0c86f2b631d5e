"""The ARMT associative memory (SPEC §1.2) as pure functions on explicit state.

State of one layer for one sequence: A [d_key, D] and z [d_key], float32. Here every function works
on a group of layers and a batch at once: A [G, B, d_key, D], z [G, B, d_key], memory weights with
a leading group axis, activations [G, B, S, D].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

EPS = 1e-5
f32 = jnp.float32


class MemoryState(NamedTuple):
    A: jax.Array  # [..., d_key, D] float32
    z: jax.Array  # [..., d_key]   float32


def state_dtype(activation_dtype) -> jnp.dtype:
    """float32 for bf16/float32 activations (float64 only for float64 ones)."""
    return jnp.promote_types(activation_dtype, f32)


def zero_state(num_layers: int, batch: int, d_key: int, hidden: int, dtype=f32) -> MemoryState:
    return MemoryState(jnp.zeros((num_layers, batch, d_key, hidden), dtype),
                       jnp.zeros((num_layers, batch, d_key), dtype))


def dpfp(u: jax.Array, nu: int) -> jax.Array:
    """Deterministic parameter-free projection: [..., d] -> [..., 2 * nu * d]."""
    p = jnp.concatenate([jax.nn.relu(u), jax.nn.relu(-u)], axis=-1)
    return jnp.concatenate([p * jnp.roll(p, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


def _proj(x: jax.Array, w: jax.Array) -> jax.Array:
    """[G, B, S, D] @ [G, D, n] -> float32. Memory projections are narrow (n = d_mem, 1) or act on
    only M rows, so they stay plain XLA einsums rather than grouped-matmul kernel calls."""
    return jnp.einsum("gbsd,gdn->gbsn", x, w, preferred_element_type=state_dtype(x.dtype))


@jax.custom_vjp
def _associate(keys: jax.Array, A: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(keys @ A) / (keys . z + eps) and the denominator, keys [G, B, S, d_key]."""
    num = jnp.einsum("gbsk,gbkd->gbsd", keys, A)
    den = jnp.einsum("gbsk,gbk->gbs", keys, z) + EPS
    return num / den[..., None], den


def _associate_fwd(keys, A, z):
    out, den = _associate(keys, A, z)
    return (out, den), (keys, A, z, out, den)


def _associate_bwd(res, cotangents):
    """Autodiff's gradient, with dA and dz from one product: alone, dz = keys^T d_den (one
    column) became a column reduction that XLA fused with d_keys' split-K sum into a 70 us
    kernel per layer and segment on an H200 (eval/results/train_h200.md). dz thereby takes
    dA's matmul precision (JAX's default: TF32 for float32 on Hopper) instead of an exact
    float32 sum."""
    keys, A, z, out, den = res
    d_out, d_den = cotangents
    d_num = d_out / den[..., None]
    d_den = d_den - jnp.sum(d_out * out, axis=-1) / den
    d_keys = jnp.einsum("gbsd,gbkd->gbsk", d_num, A) + d_den[..., None] * z[:, :, None, :]
    d_Az = jnp.einsum("gbsk,gbsd->gbkd", keys, jnp.concatenate([d_num, d_den[..., None]], -1))
    return d_keys, d_Az[..., :-1], d_Az[..., -1]


_associate.defvjp(_associate_fwd, _associate_bwd)


def read(mp: dict, x: jax.Array, state: MemoryState, nu: int) -> jax.Array:
    """h <- h + phi(h W_mq) A / (phi(h W_mq) . z + eps) on every position. Zero state adds exactly 0.

    The big product phi(h W_mq) @ A (every position of every slot) takes its operands in the
    activation dtype with float32 accumulation: for bf16 models that keeps it on the tensor cores,
    while the state itself (and the whole write) stays float32. Its result stays float32 too:
    emitting bf16 (with 1/den folded into phi) saved ~7 ms of device time per 131072-token forward
    on an H200, but moved a bf16 model's memory state further from the float32 one (worst layer
    0.016 -> 0.021 on a draw of test_bf16_close_to_float32, over SPEC's 2e-2).
    """
    return _read(x, mp["w_mq"], state.A.astype(x.dtype), state.z, nu, transposed=False)


class FrozenReader(NamedTuple):
    """`read`'s operands for a memory state that stays fixed over many calls (generation's decode
    reads it once per token and layer), laid out for a few query rows: W_mq and A transposed, so
    that their contraction runs along the contiguous axis, and A rounded to the activation dtype
    once instead of on every call. Leading axes as in `read` ([G, ...] / [G, B, ...])."""
    w_mq_t: jax.Array   # [..., d_mem, D]
    a_t: jax.Array      # [..., B, D, d_key] activation dtype
    z: jax.Array        # [..., B, d_key] float32


def frozen_reader(mp: dict, state: MemoryState, dtype) -> FrozenReader:
    """The FrozenReader of memory weights mp and a state, for activations of `dtype`."""
    return FrozenReader(jnp.swapaxes(mp["w_mq"], -1, -2),
                        jnp.swapaxes(state.A.astype(dtype), -1, -2), state.z)


def read_frozen(reader: FrozenReader, x: jax.Array, nu: int) -> jax.Array:
    """`read` from a FrozenReader: the same operands and roundings, so the same values up to the
    order of float32 sums. For one decoded token (m = 1) XLA turns both products into reductions;
    with W_mq [D, d_mem] and A [d_key, D] as stored, they reduced along the strided axis: 6.7 and
    3.1 us a layer, the largest of a decode step's small kernels (H200, 1B,
    eval/results/generate_h200.md)."""
    return _read(x, reader.w_mq_t, reader.a_t, reader.z, nu, transposed=True)


def _read(x, w_mq, A, z, nu: int, transposed: bool) -> jax.Array:
    """read's formula; A already in x's dtype. transposed: w_mq [G, d_mem, D], A [G, B, D, d_key]
    (else [G, D, d_mem], [G, B, d_key, D])."""
    w_spec, a_spec = ("gnd", "gbdk") if transposed else ("gdn", "gbkd")
    q = dpfp(jnp.einsum(f"gbsd,{w_spec}->gbsn", x, w_mq,
                        preferred_element_type=state_dtype(x.dtype)), nu)
    num = jnp.einsum(f"gbsk,{a_spec}->gbsd", q.astype(x.dtype), A, preferred_element_type=q.dtype)
    den = jnp.einsum("gbsk,gbk->gbs", q, z) + EPS
    return (x.astype(q.dtype) + num / den[..., None]).astype(x.dtype)


def write(mp: dict, mem_out: jax.Array, state: MemoryState, first: jax.Array, nu: int,
          correction: bool) -> MemoryState:
    """Update (A, z) from a layer's output at the memory positions, mem_out [G, B, M, D].

    first: bool [G], true where the group's segment is the first of its sequence: there vbar = 0
    and gamma = 1 exactly (the formula would give 1 - tiny).
    """
    k = dpfp(_proj(mem_out, mp["w_mk"]), nu)                                 # [G, B, M, dk]
    v = _proj(mem_out, mp["w_mv"])                                           # [G, B, M, D]
    beta = jax.nn.sigmoid(_proj(mem_out, mp["w_mb"]) + mp["b_mb"][:, None, None, :])
    first = first[:, None, None]
    vbar, kz = _associate(k, state.A, state.z)
    vbar = jnp.where(first[..., None], 0.0, vbar)
    if correction:
        gamma = jax.lax.stop_gradient(
            jnp.clip(1.0 - kz / (jnp.sum(k * k, axis=-1) + EPS), 0.0, 1.0))
        gamma = jnp.where(first, 1.0, gamma)
    else:
        gamma = jnp.ones_like(kz)
    A = state.A + jnp.einsum("gbmk,gbmd->gbkd", k, beta * (v - vbar))
    z = state.z + jnp.einsum("gbm,gbmk->gbk", gamma, k)
    return MemoryState(A, z)
