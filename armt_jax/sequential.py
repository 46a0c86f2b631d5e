"""The sequential schedule (SPEC §2.1): for each segment, for each layer, read / layer / write.

`lax.scan` over segments, inside it `lax.scan` over layers with groups of one. This is the
correctness oracle of the diagonal schedule and the training schedule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from armt_jax.armt import (ArmtOutput, armt_layer_group, check_output, cross_entropy_sums,
                           layer_weights, segment, segment_input, sequence_lengths)
from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.layers import check_tokens, head, rope_tables
from armt_jax.memory import MemoryState, state_dtype, zero_state


def sequential_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, armt: ArmtConfig, *,
                       output: str = "logits", lengths: jax.Array | None = None,
                       loss_mask: jax.Array | None = None, compute_loss: bool = False,
                       remat: bool = False, attn_impl="auto", gmm_impl="auto") -> ArmtOutput:
    """Run ARMT over tokens [B, n].

    output: "logits" (text positions, [B, n, V] float32), "last_logits" (the last segment's,
    [B, t_last, V]), "hidden" (after the final norm, [B, n, D]) or "none".
    lengths: real tokens of each sequence [B] (default: n). Sequences of different lengths are
    right-padded to n; each one's memory stops after its own last segment, its outputs past its
    length are padding, and "last_logits" then gives [B, T, V], each sequence's own last segment
    (rows past its length in that segment are padding).
    compute_loss: mean next-token cross entropy over the whole sequence, counting target token i
    when loss_mask[:, i] is set (default: all) and i < lengths[b]. remat: recompute each segment, and
    its loss, in the backward pass (it keeps N x the memory state and each segment's output).
    """
    check_output(output)
    check_tokens(tokens, cfg.vocab_size)
    if loss_mask is not None and not compute_loss:   # as diagonal_forward: no silent no-op
        raise ValueError("loss_mask is given but compute_loss is False")
    # Checked here, where the values are concrete; the core is compiled once per shape (called
    # eagerly, its scans were traced and compiled anew on every call).
    seq_len = sequence_lengths(tokens, lengths)
    return _sequential_core(params, tokens, seq_len, loss_mask, cfg=cfg, armt=armt,
                            output=output, per_sequence=lengths is not None,
                            compute_loss=compute_loss, remat=remat, attn_impl=attn_impl,
                            gmm_impl=gmm_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "armt", "output", "per_sequence",
                                             "compute_loss", "remat", "attn_impl", "gmm_impl"))
def _sequential_core(params, tokens, seq_len, loss_mask, *, cfg: LlamaConfig, armt: ArmtConfig,
                     output, per_sequence, compute_loss, remat, attn_impl,
                     gmm_impl) -> ArmtOutput:
    T, M = armt.segment_size, armt.num_mem_tokens
    B, n = tokens.shape
    seg = segment(tokens, T, loss_mask, seq_len)
    N = seg.lengths.shape[0]
    lp, mp = layer_weights(params)
    dtype = params["embed"].dtype
    cos, sin = rope_tables(cfg, jnp.arange(T + M), dtype)
    # The layer scan slices groups of one ([1, ...]) straight out of [L, 1, ...] weights: a slice
    # the scan body reshaped itself would be a new value, which the backward pass saves per layer
    # (a copy of every weight per segment; the grouped matmul's VJP keeps w), while a scanned-over
    # input is forwarded to the backward without a copy.
    lp, mp = (jax.tree.map(lambda a: a[:, None], tree) for tree in (lp, mp))

    def run_segment(state: MemoryState, tok, length, first):
        def one_layer(x, per_layer):
            lp_l, mp_l, A, z = per_layer
            x, st = armt_layer_group(lp_l, mp_l, x,
                                     MemoryState(A[None], z[None]), mem_start=length[None],
                                     first=first[None], cos=cos, sin=sin, cfg=cfg, armt=armt,
                                     attn_impl=attn_impl, gmm_impl=gmm_impl)
            return x, (st.A[0], st.z[0])

        x = segment_input(params, tok, length)[None]
        x, (A, z) = jax.lax.scan(one_layer, x, (lp, mp, state.A, state.z))
        return MemoryState(A, z), x[0, :, :T]

    def segment_loss(h, tgt, tmask):
        return cross_entropy_sums(head(params, h, cfg, "logits"), tgt, tmask)

    if remat:
        # The loss too: its backward would otherwise keep each segment's [B, T, V] float32
        # softmax (Llama's V = 128256: 0.5 GB per 1024-token segment), all N of them.
        run_segment = jax.checkpoint(run_segment)
        segment_loss = jax.checkpoint(segment_loss)

    def step(carry, xs):
        state, last_h, loss_sum, count = carry
        tok, tgt, tmask, length, first, is_last = xs
        new_state, h = run_segment(state, tok, length, first)
        running = (length > 0)[None, :]                    # sequences not yet past their end
        state = MemoryState(jnp.where(running[..., None, None], new_state.A, state.A),
                            jnp.where(running[..., None], new_state.z, state.z))
        last_h = jnp.where(is_last[:, None, None], h, last_h)
        emit = None
        if output == "logits":
            emit = head(params, h, cfg, "logits")
        elif output == "hidden":
            emit = head(params, h, cfg, "hidden")
        if compute_loss:
            s, c = (cross_entropy_sums(emit, tgt, tmask) if output == "logits"
                    else segment_loss(h, tgt, tmask))
            loss_sum, count = loss_sum + s, count + c
        return (state, last_h, loss_sum, count), emit

    D, dk = cfg.hidden_size, armt.d_key
    init = (zero_state(cfg.num_hidden_layers, B, dk, D, state_dtype(dtype)),
            jnp.zeros((B, T, D), dtype), *[jnp.zeros((), state_dtype(dtype))] * 2)   # loss sums
    next_length = jnp.concatenate([seg.lengths[1:], jnp.zeros_like(seg.lengths[:1])])
    is_last = (seg.lengths > 0) & (next_length == 0)
    xs = (seg.tokens, seg.targets, seg.target_mask, seg.lengths, jnp.arange(N) == 0, is_last)
    (state, last_h, loss_sum, count), emitted = jax.lax.scan(step, init, xs)

    out = None
    if output in ("logits", "hidden"):
        out = emitted.swapaxes(0, 1).reshape(B, N * T, -1)[:, :n]
    elif output == "last_logits":
        last_rows = T if per_sequence else n - (N - 1) * T
        out = head(params, last_h[:, :last_rows], cfg, "logits")
    loss = loss_sum / jnp.maximum(count, 1.0) if compute_loss else None
    return ArmtOutput(out, loss, state)
