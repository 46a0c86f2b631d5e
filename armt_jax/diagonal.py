"""Diagonal batching (SPEC §2.2): every (segment, layer) cell of one anti-diagonal at once.

Cell (s, l) needs (s, l-1) through activations and (s-1, l) through the memory of layer l, so all
cells with s + l = k are independent. Step k runs them together: slot l of a buffer [L, B, T+M, D]
holds the input of segment k - l to layer l, and the step is one call of `armt_layer_group` with
the stacked weights (slot l uses layer l: grouped matmuls). Layer l's memory state stays in slot l,
so the recurrence is carried for free. Each slot's output is written one slot up, in place, where it
is the next step's input of the next layer; slot L-1's output is the finished segment; slot 0
receives the next segment's embeddings. A full step reads the buffer whole (no slice, no shift).

Slots outside the active range (ramp-up k < L-1, ramp-down k > N-1) are idle: their state is kept by
a select (so NaN/Inf in idle rows cannot leak) and they emit nothing. A step whose active range is
narrower than L runs on a window of 1, 2, 4, ... slots that covers it, and inside the window the
grouped matmul skips idle slots, so ramps (and inputs with N < L) do not pay for idle slots.

Compilation: the input is padded to a bucket of segments (powers of two) and the true length is a
traced value, so every length within a bucket reuses one program; the step loop is a `while_loop`
whose trip count is the true number of steps, so padding costs memory (token and output buffers)
but no compute.

Training (`compute_loss=True`): the same step runs in a `lax.scan` over all N + L - 1 steps of the
input (reverse-mode differentiable, each step rematerialised with `remat`), the finished segments
are its outputs and the loss a second scan over them, one segment's logits at a time. With remat
each window size is also its own remat: a differentiated `switch` returns the union of all its
branches' residuals, zero-filled where a branch does not compute them, so without it every ramp
step wrote zeros for the full window's activations (42 ms of a 506 ms H200 step at 16384 tokens).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from armt_jax.armt import (ArmtOutput, Segmentation, armt_layer_group, check_output,
                           cross_entropy_sums, layer_weights, segment, segment_input,
                           sequence_lengths)
from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.layers import check_tokens, head, rope_tables
from armt_jax.memory import state_dtype, zero_state


def bucket_segments(num_segments: int) -> int:
    """Segments a compiled program is sized for: the next power of two."""
    return 1 << max(num_segments - 1, 0).bit_length()


def diagonal_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, armt: ArmtConfig, *,
                     output: str = "logits", lengths: jax.Array | None = None,
                     loss_mask: jax.Array | None = None, compute_loss: bool = False,
                     remat: bool = False, attn_impl="auto", gmm_impl="auto",
                     bucket: int | None = None) -> ArmtOutput:
    """Same results as `sequential_forward` (outputs: "logits", "last_logits", "hidden", "none";
    per-sequence `lengths`, `loss_mask` and `compute_loss` as there).

    compute_loss (training): the mean masked next-token cross entropy, differentiable; it takes
    output="none" (the loss is summed segment by segment, no logits kept) and runs a scan over
    every step of the input's segment count N: one program per N, like the sequential training
    step (to share one between counts, pad the tokens and pass `lengths`: the extra steps run
    idle). remat:
    recompute each diagonal step in the backward pass; the backward then keeps each step's slot
    buffer and memory state, (N + L - 1) x (L x B x (T + M) x D activations + the state), where
    the sequential schedule keeps N x the state (Llama-1B shapes, d_mem = 64, 16384 tokens,
    bf16: 31 x (75 + 50) MB against 16 x 50 MB). Without remat every step keeps the residuals
    of every window size (the differentiated switch's union of its branches' residuals): for
    tests and small inputs.
    bucket: segments to size an inference program for (default: next power of two of the
    segment count).
    """
    check_output(output)
    check_tokens(tokens, cfg.vocab_size)
    B, n = tokens.shape
    if n == 0:
        raise ValueError("tokens has length 0")
    if compute_loss:
        if output != "none":
            raise ValueError(f"diagonal_forward computes the loss with output='none' only, got "
                             f"output={output!r} (sequential_forward returns both)")
        if bucket is not None:
            raise ValueError("bucket sizes inference programs; compute_loss runs the input's own "
                             "segment count")
        seq_len = sequence_lengths(tokens, lengths)
        seg = segment(tokens, armt.segment_size, loss_mask, seq_len)
        loss_sum, count, state = _diagonal_loss_core(params, seg, seq_len, cfg=cfg, armt=armt,
                                                     remat=remat, attn_impl=attn_impl,
                                                     gmm_impl=gmm_impl)
        return ArmtOutput(None, loss_sum / jnp.maximum(count, 1.0), state)
    if loss_mask is not None:
        raise ValueError("loss_mask is given but compute_loss is False")
    T = armt.segment_size
    N = -(-n // T)
    Nb = bucket_segments(N) if bucket is None else bucket
    if Nb < N:
        raise ValueError(f"bucket={Nb} segments is smaller than the input's {N} segments")
    padded = jnp.pad(tokens, ((0, 0), (0, Nb * T - n)))
    out, state = _diagonal_core(params, padded, sequence_lengths(tokens, lengths), cfg=cfg,
                                armt=armt, output=output, attn_impl=attn_impl, gmm_impl=gmm_impl)
    if output in ("logits", "hidden"):
        out = out[:, :n]
    elif output == "last_logits" and lengths is None:
        out = out[:, :n - (N - 1) * T]
    return ArmtOutput(out, None, state)


def _diagonal_step(params, tokens, seq_len, *, cfg: LlamaConfig, armt: ArmtConfig, attn_impl,
                   gmm_impl, remat_windows: bool = False):
    """The step of the diagonal loop, `step(k, x_buf, state) -> (x_buf, state, finished)`, for
    tokens [B, N*T] (padded) and true lengths seq_len [B]; finished [B, T, D] is the final
    activation of segment k - (L-1) (garbage while k < L-1). Also returns each sequence's true
    number of segments [B] (traced). Both the inference loop and the training scan run it.
    remat_windows: each window's branch a `jax.checkpoint`, so its residuals for the backward are
    the switch's operands (shared by all branches) and not its own activations, which every other
    branch would have to fill with zeros (module docstring)."""
    L, T, M = cfg.num_hidden_layers, armt.segment_size, armt.num_mem_tokens
    padded_len = tokens.shape[1]
    dtype = params["embed"].dtype
    lp, mp = layer_weights(params)
    cos, sin = rope_tables(cfg, jnp.arange(T + M), dtype)
    seq_segments = (seq_len + T - 1) // T                     # [B]
    num_segments = jnp.max(seq_segments)
    slots = jnp.arange(L)

    # Ramp-up and ramp-down steps have fewer active slots than L (and N < L never fills them):
    # such a step runs on a window of the next size in `windows` that holds its active range,
    # so idle slots cost nothing but the window's rounding. The window's slots read their layers
    # from the full stacked weights at an offset (no copy of the big matrices on the kernel path;
    # the XLA path slices them).
    windows = sorted({min(L, 1 << i) for i in range(L.bit_length() + 1)})

    def run_window(w, x_buf, state, lengths, first, active, lo, hi):
        """Slots [start, start + w) of the step; returns the buffer with their outputs written one
        slot up, slot L-1's output (the finished segment when the window ends at L-1) and the
        state, kept where a slot is idle."""
        start = jnp.clip(lo, 0, L - w)                          # [start, start + w) covers [lo, hi)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, w, axis=0) if w < L else a
        state_w = jax.tree.map(take, state)
        x_w, new_w = armt_layer_group(
            lp, mp, take(x_buf), state_w, mem_start=take(lengths), first=take(first), cos=cos,
            sin=sin, cfg=cfg, armt=armt, active=(lo - start, hi - start), attn_impl=attn_impl,
            gmm_impl=gmm_impl, layer_offset=start if w < L else None)
        # Idle slots keep their state (inside the branch, so the select fuses with the update).
        active_w = take(active)
        keep = lambda new, old: jnp.where(active_w.reshape(active_w.shape + (1,) * (old.ndim - 2)),
                                          new, old)
        new_w = jax.tree.map(keep, new_w, state_w)
        # Slot l's output is slot l+1's next input, written in place. The window's last output goes
        # to slot start + w; when that is L it is the finished segment, and the write (clamped to
        # L-1) is overwritten by the next one.
        if w < L:
            x_buf = jax.lax.dynamic_update_slice_in_dim(x_buf, x_w[w - 1:],
                                                        jnp.minimum(start + w, L - 1), axis=0)
        if w > 1:
            x_buf = jax.lax.dynamic_update_slice_in_dim(x_buf, x_w[:w - 1], start + 1, axis=0)
        if w == L:
            return x_buf, x_w[L - 1], new_w
        put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, start, axis=0)
        return x_buf, x_w[w - 1], jax.tree.map(put, state, new_w)

    def step(k, x_buf, state):
        seg = k - slots                                              # segment held by each slot
        active = (seg >= 0)[:, None] & (seg[:, None] < seq_segments[None, :])   # [L, B]
        lengths = jnp.clip(seq_len[None, :] - seg[:, None] * T, 0, T)          # [L, B]
        start = jnp.clip(k, 0, padded_len // T - 1) * T
        x0 = segment_input(params, jax.lax.dynamic_slice_in_dim(tokens, start, T, axis=1),
                           lengths[0])
        x_buf = jax.lax.dynamic_update_slice_in_dim(x_buf, x0[None], 0, axis=0)
        lo = jnp.maximum(k - num_segments + 1, 0)
        hi = jnp.minimum(k + 1, L)
        window = jnp.searchsorted(jnp.asarray(windows), hi - lo)   # smallest window >= active
        branches = [functools.partial(run_window, w) for w in windows]
        if remat_windows:
            branches = [jax.checkpoint(b) for b in branches]
        x_buf, last_out, state = jax.lax.switch(
            window, branches,
            x_buf, state, lengths, seg == 0, active, lo, hi)
        return x_buf, state, last_out[:, :T]

    return step, seq_segments


def _initial_carry(cfg: LlamaConfig, armt: ArmtConfig, batch: int, dtype, idle_fill: float):
    """x_buf[l] is slot l's input for the coming step. Outputs are written one slot up in place, so
    the buffer never shifts, and a full step reads it whole (no copy per step)."""
    L, S, D = cfg.num_hidden_layers, armt.segment_size + armt.num_mem_tokens, cfg.hidden_size
    return (jnp.full((L, batch, S, D), idle_fill, dtype),
            zero_state(L, batch, armt.d_key, D, state_dtype(dtype)))


@functools.partial(jax.jit, static_argnames=("cfg", "armt", "output", "attn_impl", "gmm_impl",
                                             "idle_fill"))
def _diagonal_core(params, tokens, seq_len, *, cfg: LlamaConfig, armt: ArmtConfig, output: str,
                   attn_impl, gmm_impl, idle_fill: float = 0.0):
    """tokens [B, Nb*T] (padded), seq_len [B]: true lengths (traced). Returns (padded output, final
    state).

    idle_fill: the value idle slots start with (tests use NaN to prove it cannot leak).
    """
    L, T, D = cfg.num_hidden_layers, armt.segment_size, cfg.hidden_size
    B, padded_len = tokens.shape
    dtype = params["embed"].dtype
    step, seq_segments = _diagonal_step(params, tokens, seq_len, cfg=cfg, armt=armt,
                                        attn_impl=attn_impl, gmm_impl=gmm_impl)

    if output in ("logits", "hidden"):
        width = cfg.vocab_size if output == "logits" else D
        out_dtype = jnp.promote_types(dtype, jnp.float32) if output == "logits" else dtype
        out0 = jnp.zeros((B, padded_len, width), out_dtype)
    else:
        out0 = jnp.zeros((B, T, D), dtype)          # last finished segment's final activations

    def body(carry):
        k, x_buf, state, out = carry
        x_buf, state, finished = step(k, x_buf, state)
        # Slot L-1 finishes segment k-L+1. During ramp-up that is negative and the write lands on
        # segment 0's rows, which segment 0 overwrites later: a plain in-place update, no cond
        # (a cond around the update would copy the whole output buffer every step).
        if output in ("logits", "hidden"):
            done = jnp.maximum(k - (L - 1), 0)
            out = jax.lax.dynamic_update_slice_in_dim(
                out, head(params, finished, cfg, output).astype(out.dtype), done * T, axis=1)
        else:   # keep each sequence's own last segment
            is_last = k - (L - 1) == seq_segments - 1                           # [B]
            out = jnp.where(is_last[:, None, None], finished, out)
        return k + 1, x_buf, state, out

    init = (jnp.asarray(0, jnp.int32), *_initial_carry(cfg, armt, B, dtype, idle_fill), out0)
    num_steps = jnp.max(seq_segments) + L - 1
    _, _, state, out = jax.lax.while_loop(lambda c: c[0] < num_steps, body, init)
    if output == "last_logits":
        out = head(params, out, cfg, "logits")
    elif output == "none":
        out = None
    return out, state


@functools.partial(jax.jit, static_argnames=("cfg", "armt", "remat", "attn_impl", "gmm_impl"))
def _diagonal_loss_core(params, seg: Segmentation, seq_len, *, cfg: LlamaConfig, armt: ArmtConfig,
                        remat: bool, attn_impl, gmm_impl):
    """Summed masked cross entropy and its count through the diagonal schedule, and the final
    state; differentiable: the step loop is a `lax.scan` over all N + L - 1 steps of the padded
    input (steps past the longest sequence's last are idle), each step rematerialised with remat,
    and the loss a second scan over the finished segments (a segment's logits at a time)."""
    L = cfg.num_hidden_layers
    N, B, T = seg.tokens.shape
    dtype = params["embed"].dtype
    tokens = seg.tokens.swapaxes(0, 1).reshape(B, N * T)
    step, _ = _diagonal_step(params, tokens, seq_len, cfg=cfg, armt=armt, attn_impl=attn_impl,
                             gmm_impl=gmm_impl, remat_windows=remat)

    def body(carry, k):
        x_buf, state, finished = step(k, *carry)
        return (x_buf, state), finished

    def segment_loss(sums, xs):
        h, targets, mask = xs
        s, c = cross_entropy_sums(head(params, h, cfg, "logits"), targets, mask)
        return (sums[0] + s, sums[1] + c), None

    if remat:
        body, segment_loss = jax.checkpoint(body), jax.checkpoint(segment_loss)
    (_, state), finished = jax.lax.scan(body, _initial_carry(cfg, armt, B, dtype, 0.0),
                                        jnp.arange(N + L - 1))
    # Step k finishes segment k - (L-1): the first L-1 steps finish none.
    zero = jnp.zeros((), state_dtype(dtype))   # float32 (float64 for a float64 model)
    (loss_sum, count), _ = jax.lax.scan(segment_loss, (zero, zero),
                                        (finished[L - 1:], seg.targets, seg.target_mask))
    return loss_sum, count, state
