"""Generation (SPEC §3): prefill the context with either schedule, then decode the final segment.

The context's complete segments before the last one go through the memory (reads and writes) with
the sequential or diagonal schedule; the last segment (1..T tokens, also when the context length is a
multiple of T) and every generated token are then decoded with a KV cache in read-only-memory mode:
each token reads the frozen per-layer (A, z), no memory tokens are appended, nothing is written. The
last segment's logits are therefore exactly those of a forward pass over the context.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from armt_jax import memory
from armt_jax.armt import layer_weights, sequence_lengths
from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.layers import (attention_impl, attention_output, cache_attention, check_tokens,
                             dot_product_attention, embed, head, layer_window, mlp, qkv_heads,
                             rms_norm, rope_tables)
from armt_jax.memory import MemoryState, state_dtype, zero_state
from armt_jax.schedules import schedule_forward


# A decode step's attention splits its cache slots into this many parts (layers.cache_attention).
CACHE_PARTS = 8


class GenerateOutput(NamedTuple):
    tokens: jax.Array    # [B, max_new_tokens], pad_id after a sequence's EOS
    lengths: jax.Array   # [B] generated tokens per sequence, EOS included


def prefill(params, tokens, cfg: LlamaConfig, armt: ArmtConfig, *, schedule="diagonal",
            lengths=None, attn_impl="auto", gmm_impl="auto") -> MemoryState:
    """Memory state after every segment of `tokens` (through reads and writes)."""
    forward = schedule_forward(schedule)
    return forward(params, tokens, cfg, armt, output="none", lengths=lengths, attn_impl=attn_impl,
                   gmm_impl=gmm_impl).state


def generate(params, tokens, cfg: LlamaConfig, armt: ArmtConfig, *, max_new_tokens: int,
             schedule: str = "diagonal", lengths: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_ids=None, pad_id: int = 0, key: jax.Array | None = None, attn_impl="auto",
             gmm_impl="auto") -> GenerateOutput:
    """Continue `tokens` [B, n] (contexts of different lengths: right-padded, with `lengths` [B]).
    Greedy when temperature == 0, else sampling with optional top-k / top-p (then `key` is
    required). Stops a sequence at any of eos_token_ids (default: the config's) or after
    max_new_tokens."""
    check_tokens(tokens, cfg.vocab_size)
    B, n = tokens.shape
    if n == 0:
        raise ValueError("generate needs a non-empty context")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    T = armt.segment_size
    if lengths is None:
        split = (-(-n // T) - 1) * T                   # start of the last (decoded) segment
        # padded to a whole segment, its length traced: one decode program for every n
        last = jnp.pad(tokens[:, split:], ((0, 0), (0, split + T - n)))
        last_len = jnp.full((B,), n - split, jnp.int32)
        prefix = (tokens[:, :split], None) if split else None
    else:                                              # each sequence's own last segment
        seq_len = sequence_lengths(tokens, lengths)
        if not isinstance(seq_len, jax.core.Tracer) and not bool(jnp.all(seq_len > 0)):
            empty = [int(b) for b in np.flatnonzero(np.asarray(seq_len) == 0)]
            raise ValueError(f"generate continues a context: lengths must be >= 1, got 0 for "
                             f"sequence(s) {empty}")
        split = (seq_len + T - 1) // T * T - T                                       # [B]
        padded = jnp.pad(tokens, ((0, 0), (0, T)))
        last = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, T))(padded, split)
        last_len = seq_len - split
        prefix = (tokens, split) if n > T else None
    if prefix is not None:
        state = prefill(params, prefix[0], cfg, armt, schedule=schedule, lengths=prefix[1],
                        attn_impl=attn_impl, gmm_impl=gmm_impl)
    else:
        state = zero_state(cfg.num_hidden_layers, B, armt.d_key, cfg.hidden_size,
                           state_dtype(params["embed"].dtype))
    if eos_token_ids is None:
        eos = cfg.eos_token_ids
    else:
        eos = (eos_token_ids,) if isinstance(eos_token_ids, (int, np.integer)) else tuple(eos_token_ids)
        if bad := [e for e in eos if not 0 <= int(e) < cfg.vocab_size]:
            raise ValueError(f"eos_token_ids must lie in [0, {cfg.vocab_size}) (the vocabulary), got {bad}")
        eos = tuple(int(e) for e in eos)
    key = jax.random.key(0) if key is None else key
    return _decode(params, state, last, last_len, key, cfg=cfg, armt=armt,
                   max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                   top_p=top_p, eos=eos, pad_id=pad_id, attn_impl=attn_impl, gmm_impl=gmm_impl)


def sample(logits: jax.Array, key, temperature: float, top_k: int | None, top_p: float | None):
    """Next token from float32 logits [B, V]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs      # keep the smallest set reaching top_p
        sorted_logits = jnp.where(mass_before >= top_p, -jnp.inf, sorted_logits)
        logits = jnp.full_like(logits, -jnp.inf).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode_chunk(params, reader: memory.FrozenReader, cache, x, pos0, cfg: LlamaConfig,
                  armt: ArmtConfig, attn_impl, gmm_impl):
    """Tokens' activations x [B, c, D] at positions pos0[b].. through every layer, reading the
    frozen memory (`reader`, leading axis L), attending to the KV cache (per layer a pair k, v
    [B, C, K, hd]) which they extend. Returns final hidden and the cache.

    Cache slot = position. Rows a chunk writes past a sequence's real tokens are overwritten by
    its later tokens before any query can see them (a query at p attends to slots <= p).

    The layers are unrolled, each with a cache array of its own: in a layer scan over a stacked
    [L, ...] cache, XLA copied each layer's cache out before attention's dots, and every index
    computed from the traced layer number (the grouped matmul's bounds, the slices of norms and
    memory operands) was a kernel of its own, 1-4 us each at a decode step's sizes (H200, 1B,
    batch 1: eval/results/generate_h200.md). Each layer is one call of the jitted `_decode_layer`,
    so JAX lowers its kernels once, not once per layer. The kernel paths read the stacked matmul
    weights in place at the layer's offset; the XLA path copies the layer's slices either way."""
    B, c, _ = x.shape
    C = cache[0][0].shape[1]
    positions = pos0[:, None] + jnp.arange(c)                                    # [B, c]
    cos, sin = rope_tables(cfg, positions, x.dtype)
    mask = (jnp.arange(C)[None, None, :] <= positions[:, :, None])[:, None]      # [B, 1, c, C]
    slots = (jnp.arange(B)[:, None], positions)
    lp, _ = layer_weights(params)
    in_place = kernels.kernel_path(gmm_impl)
    new_cache = []
    for layer, kv in enumerate(cache):
        one = lambda a: a[layer:layer + 1]
        weights, offset = (lp, layer) if in_place else (jax.tree.map(one, lp), None)
        x, kv = _decode_layer(weights, offset, jax.tree.map(one, reader), kv, x, cos, sin, mask,
                              slots, cfg=cfg, armt=armt, attn_impl=attn_impl, gmm_impl=gmm_impl)
        new_cache.append(kv)
    return x, tuple(new_cache)


@functools.partial(jax.jit, static_argnames=("cfg", "armt", "attn_impl", "gmm_impl"))
def _decode_layer(weights, offset, reader_l, kv, x, cos, sin, mask, slots, *, cfg, armt,
                  attn_impl, gmm_impl):
    """One layer of `_decode_chunk`: weights stacked (with the layer's `offset`) or the layer's
    own (offset None), reader_l [1, ...], kv its cache pair."""
    norm = lambda h, w: rms_norm(h, layer_window(w, offset, 1)[:, None, None, :], cfg.rms_norm_eps)
    write = lambda cache, new: cache.at[slots].set(
        new.astype(cache.dtype), mode="promise_in_bounds", unique_indices=True,
        indices_are_sorted=True)
    h = memory.read_frozen(reader_l, x[None], armt.nu)
    q, k, v = qkv_heads(weights, norm(h, weights["attn_norm"]), cos, sin, cfg, gmm_impl=gmm_impl,
                        layer_offset=offset)
    k_cache, v_cache = write(kv[0], k), write(kv[1], v)
    scale = cfg.head_dim ** -0.5
    if q.shape[1] == 1 and attention_impl(attn_impl, q, mask) == "xla":     # a decode step
        out = cache_attention(q, k_cache, v_cache, mask[:, 0], scale=scale, parts=CACHE_PARTS)
    else:
        out = dot_product_attention(q, k_cache, v_cache, mask=mask, scale=scale,
                                    implementation=attn_impl)
    h = h + attention_output(weights, out, 1, gmm_impl=gmm_impl, layer_offset=offset)
    h = h + mlp(weights, norm(h, weights["mlp_norm"]), cfg, gmm_impl=gmm_impl, layer_offset=offset)
    return h[0], (k_cache, v_cache)


@functools.partial(jax.jit, static_argnames=("cfg", "armt", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos", "pad_id", "attn_impl",
                                             "gmm_impl"))
def _decode(params, state, last_segment, last_len, key, *, cfg, armt, max_new_tokens, temperature,
            top_k, top_p, eos, pad_id, attn_impl, gmm_impl) -> GenerateOutput:
    """last_segment [B, t]: each sequence's last segment, its first last_len[b] tokens real."""
    B, t = last_segment.shape
    L, K, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    dtype = params["embed"].dtype
    # a multiple of CACHE_PARTS; no query attends to the slots past t + max_new_tokens
    C = -(-(t + max_new_tokens) // CACHE_PARTS) * CACHE_PARTS
    cache = tuple((jnp.zeros((B, C, K, hd), dtype), jnp.zeros((B, C, K, hd), dtype))
                  for _ in range(L))
    # the memory is read-only here: its read operands are laid out once for all tokens
    reader = memory.frozen_reader(layer_weights(params)[1], state, dtype)
    run = functools.partial(_decode_chunk, params, reader, cfg=cfg, armt=armt, attn_impl=attn_impl,
                            gmm_impl=gmm_impl)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)

    h, cache = run(cache, embed(params, last_segment), jnp.zeros((B,), jnp.int32))
    h_last = jnp.take_along_axis(h, (last_len - 1)[:, None, None], axis=1)[:, 0]
    key, sub = jax.random.split(key)
    first = sample(head(params, h_last, cfg, "logits"), sub, temperature, top_k, top_p)
    done = jnp.isin(first, eos_ids)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(carry):
        i, cache, prev, done, out, key = carry
        h, cache = run(cache, embed(params, prev[:, None]), last_len + i - 1)
        key, sub = jax.random.split(key)
        nxt = sample(head(params, h[:, -1], cfg, "logits"), sub, temperature, top_k, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, i].set(nxt)
        return i + 1, cache, nxt, done | jnp.isin(nxt, eos_ids), out, key

    _, _, _, _, out, _ = jax.lax.while_loop(cond, step, (jnp.int32(1), cache, first, done, out, key))
    is_eos = jnp.isin(out, eos_ids)
    first_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return GenerateOutput(out, first_eos.astype(jnp.int32))
