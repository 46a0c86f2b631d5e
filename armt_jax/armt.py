"""ARMT cells and segments: what both schedules share.

A cell is (segment s, layer l): memory read, decoder layer, memory write. `armt_layer_group` runs a
group of cells at once (group axis first, see layers.py). Segment layout in a buffer of S = T + M
rows: the segment's t text tokens, then the M memory tokens, then T - t padding rows. With that
layout the RoPE position of every row is simply its row index (text 0..t-1, memory t..t+M-1) and
plain causal attention is exact: padding rows come after every real row, so no real query sees them.
Padding never reaches the memory write, which reads the M rows starting at t.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from armt_jax import memory
from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.layers import decoder_layer_group, embed, layer_window
from armt_jax.memory import MemoryState

OUTPUTS = ("logits", "last_logits", "hidden", "none")


class ArmtOutput(NamedTuple):
    out: jax.Array | None   # logits [B, n, V] / last segment's logits / hidden [B, n, D] / None
    loss: jax.Array | None  # mean masked next-token cross entropy, when asked
    state: MemoryState      # final per-layer (A [L, B, d_key, D], z [L, B, d_key])


def layer_weights(params: dict) -> tuple[dict, dict]:
    """Per-layer Llama weights and per-layer memory weights (both stacked [L, ...])."""
    if "memory" not in params:
        raise ValueError("params have no 'memory' (ARMT) weights, only a plain Llama's: make them"
                         " with init_params(key, cfg, armt) or load_hf(path, armt=armt)")
    mp = {k: v for k, v in params["memory"].items() if k != "mem_tokens"}
    return params["layers"], mp


def armt_layer_group(lp: dict, mp: dict, x: jax.Array, state: MemoryState, *, mem_start: jax.Array,
                     first: jax.Array, cos, sin, cfg: LlamaConfig, armt: ArmtConfig, active=None,
                     attn_impl="auto", gmm_impl="auto",
                     layer_offset=None) -> tuple[jax.Array, MemoryState]:
    """G ARMT cells at once: x [G, B, T+M, D], state leaves [G, B, ...], mem_start [G, B] (= text
    length t of each group's segment of each sequence), first [G] (segment is its sequence's
    first). The caller keeps the old state where a cell is idle. layer_offset (traced): the weights
    hold more layers than G and group g uses layer g + layer_offset."""
    mp = jax.tree.map(lambda a: layer_window(a, layer_offset, x.shape[0]), mp)
    x = memory.read(mp, x, state, armt.nu)
    x = decoder_layer_group(lp, x, cos, sin, cfg, active=active, attn_impl=attn_impl,
                            gmm_impl=gmm_impl, layer_offset=layer_offset)
    take = lambda xs, t: jax.lax.dynamic_slice_in_dim(xs, t, armt.num_mem_tokens, axis=0)
    mem_out = jax.vmap(jax.vmap(take))(x, mem_start)
    return x, memory.write(mp, mem_out, state, first, armt.nu, armt.correction)


def segment_input(params: dict, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """[B, T] token ids of one segment (the first length[b] real) -> its input rows [B, T+M, D]."""
    mem = params["memory"]["mem_tokens"]
    x = embed(params, tokens)
    B, T, D = x.shape
    x = jnp.concatenate([x, jnp.zeros((B, mem.shape[0], D), x.dtype)], axis=1)
    put = lambda xb, t: jax.lax.dynamic_update_slice_in_dim(xb, mem.astype(x.dtype), t, axis=0)
    return jax.vmap(put)(x, length)


def sequence_lengths(tokens: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Per-sequence lengths [B] (int32); default: every sequence fills the whole array."""
    B, n = tokens.shape
    if lengths is None:
        return jnp.full((B,), n, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers of shape {(B,)}, got {lengths.dtype} "
                         f"{lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):          # concrete: check the values too
        bad = [int(v) for v in np.asarray(lengths) if not 0 <= v <= n]
        if bad:   # 0 is allowed: that sequence keeps its zero state (generate's empty prefixes)
            raise ValueError(f"lengths must lie in [0, {n}] (the padded length), got {bad}")
    return lengths.astype(jnp.int32)


def segment_lengths(seq_len: jax.Array, num_segments: int, segment_size: int) -> jax.Array:
    """Text tokens of each sequence in each segment, [N, B]; 0 once a sequence has ended."""
    starts = jnp.arange(num_segments)[:, None] * segment_size
    return jnp.clip(seq_len[None, :] - starts, 0, segment_size)


class Segmentation(NamedTuple):
    tokens: jax.Array       # [N, B, T], padded with 0
    targets: jax.Array      # [N, B, T] next token of every position
    target_mask: jax.Array  # [N, B, T] float32, 1 where the target counts in the loss
    lengths: jax.Array      # [N, B] text tokens of each sequence in each segment


def segment(tokens: jax.Array, segment_size: int, loss_mask: jax.Array | None = None,
            lengths: jax.Array | None = None) -> Segmentation:
    """Cut [B, n] tokens into left-aligned segments of T; a sequence's last one may be shorter.
    lengths [B]: real tokens of each sequence (default n); later positions are padding. The
    callers have checked tokens (layers.check_tokens)."""
    B, n = tokens.shape
    if n == 0:
        raise ValueError("tokens has length 0")
    T = segment_size
    N = -(-n // T)
    pad = N * T - n
    seq_len = sequence_lengths(tokens, lengths)
    padded = jnp.pad(tokens, ((0, 0), (0, pad)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad + 1)))
    mask = jnp.ones((B, n), jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    if mask.shape != (B, n):
        raise ValueError(f"loss_mask has shape {mask.shape}, expected {(B, n)}")
    mask = mask * (jnp.arange(n)[None, :] < seq_len[:, None])
    # position p predicts token p+1; it counts when that target exists and is unmasked
    target_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, pad + 1)))
    to_segments = lambda a: a.reshape(B, N, T).swapaxes(0, 1)
    return Segmentation(to_segments(padded), to_segments(targets), to_segments(target_mask),
                        segment_lengths(seq_len, N, T))


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Summed masked cross entropy and the count of counted targets."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


