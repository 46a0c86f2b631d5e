"""Llama building blocks as pure functions, and the one function both schedules share:
`decoder_layer_group` applies a group of G decoder layers to a group of G inputs.

Group axis convention: layer weights carry a leading axis [G, ...] and activations [G, B, S, D];
group g of the activations goes through layer g of the weights. The sequential schedule calls this
with G = 1, the diagonal schedule with G = L (slot l holds a segment at layer l). Every matmul with
a per-layer weight goes through `kernels.grouped_matmul`, whose `active` range lets idle groups skip
work. With `layer_offset` the weights may hold more layers than there are groups: group g uses
layer g + layer_offset (the diagonal schedule's windows of slots read the full stacked weights, and
on the kernel path the big matrices are never copied).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from armt_jax.config import LlamaConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Hugging Face LlamaRMSNorm: normalise in float32 (float64 for float64 activations), cast
    back, then scale."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig, dtype=np.float32) -> np.ndarray:
    """Inverse frequencies with llama3 scaling, following transformers' float32 arithmetic (float64
    only for float64 activations)."""
    dim = cfg.head_dim
    f32 = np.dtype(dtype).type
    inv_freq = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim)))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = f32(s.original_max_position_embeddings / s.low_freq_factor)
    high_wavelen = f32(s.original_max_position_embeddings / s.high_freq_factor)
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(s.factor), inv_freq).astype(f32)
    smooth = ((f32(s.original_max_position_embeddings) / wavelen - f32(s.low_freq_factor))
              / f32(s.high_freq_factor - s.low_freq_factor)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / f32(s.factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def rope_tables(cfg: LlamaConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + [head_dim] (rotate-half layout: frequencies repeated)."""
    table_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    freqs = positions.astype(table_dtype)[..., None] * jnp.asarray(rope_inv_freq(cfg, table_dtype))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., S, heads, hd]; cos/sin broadcastable to [..., S, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


ATTN_IMPLS = ("auto", "cudnn", "xla", None)


def attention_impl(implementation, q, mask=None, device=None) -> str:
    """The attention implementation to run: "auto" takes cuDNN's fused (flash) attention on an
    NVIDIA GPU of compute capability >= 8.0 for bf16 / f16 heads of a size it serves (multiples
    of 8 up to 128) without an explicit mask (the schedules' causal segments), XLA for the rest
    (generate's masked KV cache, float32 / float64, the CPU). None is XLA, as in JAX. On the
    H200 XLA's attention made a 131072-token prefill 1.85x slower (eval/results/generate_h200.md).
    """
    if implementation not in ATTN_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTN_IMPLS}, got "
                         f"{implementation!r}")
    if implementation != "auto":
        return "xla" if implementation is None else implementation
    device = jax.devices()[0] if device is None else device
    capability = getattr(device, "compute_capability", None)   # "9.0" on CUDA devices
    on_nvidia = device.platform == "gpu" and capability is not None
    hd = q.shape[-1]
    if (on_nvidia and float(capability) >= 8.0 and mask is None
            and q.dtype in (jnp.bfloat16, jnp.float16) and hd % 8 == 0 and hd <= 128):
        return "cudnn"
    return "xla"


def dot_product_attention(q, k, v, *, scale: float, is_causal: bool = False, mask=None,
                          implementation="auto") -> jax.Array:
    """``jax.nn.dot_product_attention`` (q [B, S, H, hd]; k, v [B, Sk, K, hd], K dividing H), but
    float64 inputs stay float64: JAX's softmax runs in float32 for every dtype, which would make
    a float64 model (the tests' oracle for the schedules) no more exact than a float32 one.
    implementation: see `attention_impl`."""
    implementation = attention_impl(implementation, q, mask)
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, mask=mask,
                                            implementation=implementation)
    if implementation != "xla":
        raise ValueError(f"attention implementation={implementation!r} takes no float64 inputs")
    B, S, H, hd = q.shape
    K = k.shape[2]
    logits = jnp.einsum("bskgd,btkd->bkgst", q.reshape(B, S, K, H // K, hd), k) * scale
    keep = jnp.ones(logits.shape[-2:], bool)
    if is_causal:   # query s sees keys t <= s (JAX's alignment)
        keep = jnp.tril(keep)
    if mask is not None:   # [B or 1, H or 1, S, Sk]
        m = jnp.broadcast_to(mask, (mask.shape[0], H, S, logits.shape[-1]))
        keep = keep & m.reshape(mask.shape[0], K, H // K, S, -1)
    return jnp.einsum("bkgst,btkd->bskgd", masked_softmax(logits, keep), v).reshape(B, S, H, hd)


def masked_softmax(logits: jax.Array, keep: jax.Array) -> jax.Array:
    """Softmax over the last axis of the kept logits. Masked ones take a large finite negative, as
    JAX masks: a row with no key left gets uniform weights, not NaN."""
    return jax.nn.softmax(jnp.where(keep, logits, -0.7 * jnp.finfo(logits.dtype).max), axis=-1)


def cache_attention(q, k, v, keep, *, scale: float, parts: int) -> jax.Array:
    """JAX's masked attention (the XLA path of `jax.nn.dot_product_attention`: float32 logits,
    float32 softmax, probabilities in v's dtype, float32 sums, one rounding) for a few queries
    q [B, c, H, hd] against a KV cache k, v [B, C, K, hd] where keep [B, c, C] holds, with the
    value product split along the C slots into `parts` batch entries (C % parts == 0), summed
    after in float32. As one product over C it ran on one thread block per batch row and KV
    head, 9.9 us a layer for 1153 slots (H200, 1B, batch 1: eval/results/generate_h200.md)."""
    B, c, H, hd = q.shape
    C, K = k.shape[1], k.shape[2]
    if C % parts:
        raise ValueError(f"cache_attention: {C} cache slots do not split into {parts} parts")
    f = jnp.promote_types(q.dtype, jnp.float32)
    q = q.reshape(B, c, K, H // K, hd)
    logits = jnp.einsum("bckgd,btkd->bkgct", q, k, preferred_element_type=f) * scale
    probs = masked_softmax(logits, keep[:, None, None]).astype(v.dtype)
    probs = probs.reshape(B, K, H // K, c, parts, -1)
    out = jnp.einsum("bkgcpt,bptkd->bpckgd", probs, v.reshape(B, parts, C // parts, K, hd),
                     preferred_element_type=f).sum(axis=1)
    return out.astype(v.dtype).reshape(B, c, H, hd)


def layer_window(a: jax.Array, layer_offset, groups: int) -> jax.Array:
    """Layers [layer_offset, layer_offset + groups) of a stacked per-layer array (a copy: for the
    small ones, norms, biases and memory weights); all of it when layer_offset is None."""
    if layer_offset is None:
        return a
    return jax.lax.dynamic_slice_in_dim(a, layer_offset, groups, axis=0)


def _project(x, w, bias, active, gmm_impl, layer_offset=None):
    """[G, B, S, in] @ [G(+), in, out] (+ bias [G(+), out]) through the grouped matmul."""
    G, B, S, _ = x.shape
    y = kernels.grouped_matmul(x.reshape(G, B * S, -1), w, active=active,
                               weight_offset=layer_offset, impl=gmm_impl)
    if bias is not None:
        y = y + layer_window(bias, layer_offset, G)[:, None, :]
    return y.reshape(G, B, S, -1)


def qkv_heads(lp: dict, x: jax.Array, cos, sin, cfg: LlamaConfig, *, active=None, gmm_impl="auto",
              layer_offset=None):
    """Projections of x [G, B, S, D] to RoPE'd q [G*B, S, H, hd] and k, v [G*B, S, K, hd]."""
    G, B, S, _ = x.shape
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = _project(x, lp["w_qkv"], lp.get("b_qkv"), active, gmm_impl, layer_offset)
    q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
    q = apply_rope(q.reshape(G * B, S, H, hd), cos, sin)
    k = apply_rope(k.reshape(G * B, S, K, hd), cos, sin)
    return q, k, v.reshape(G * B, S, K, hd)


def attention_output(lp: dict, out: jax.Array, groups: int, *, active=None, gmm_impl="auto",
                     layer_offset=None):
    """Attention heads [G*B, S, H, hd] -> output projection [G, B, S, D]."""
    GB, S, H, hd = out.shape
    return _project(out.reshape(groups, GB // groups, S, H * hd), lp["w_o"], lp.get("b_o"), active,
                    gmm_impl, layer_offset)


def attention(lp: dict, x: jax.Array, cos, sin, cfg: LlamaConfig, *, active=None,
              attn_impl="auto", gmm_impl="auto", layer_offset=None) -> jax.Array:
    """Causal grouped-query self-attention of x [G, B, S, D] (already normalised)."""
    q, k, v = qkv_heads(lp, x, cos, sin, cfg, active=active, gmm_impl=gmm_impl,
                        layer_offset=layer_offset)
    out = dot_product_attention(q, k, v, scale=cfg.head_dim ** -0.5, is_causal=True,
                                implementation=attn_impl)
    return attention_output(lp, out, x.shape[0], active=active, gmm_impl=gmm_impl,
                            layer_offset=layer_offset)


def mlp(lp: dict, x: jax.Array, cfg: LlamaConfig, *, active=None, gmm_impl="auto",
        layer_offset=None) -> jax.Array:
    """down(silu(gate(x)) * up(x)); gate/up and the activation in one grouped product
    (`kernels.grouped_matmul_swiglu`, fused in the kernel on a Hopper GPU unless gmm_impl="xla")."""
    G, B, S, _ = x.shape
    h = kernels.grouped_matmul_swiglu(x.reshape(G, B * S, -1), lp["w_gate_up"], active=active,
                                      weight_offset=layer_offset, impl=gmm_impl)
    return _project(h.reshape(G, B, S, -1), lp["w_down"], None, active, gmm_impl, layer_offset)


def decoder_layer_group(lp: dict, x: jax.Array, cos, sin, cfg: LlamaConfig, *, active=None,
                        attn_impl="auto", gmm_impl="auto", layer_offset=None) -> jax.Array:
    """G Llama decoder layers on G inputs: h + Attn(RMSNorm(h)), then h + MLP(RMSNorm(h)).

    lp: layer weights with leading layer axis [G, ...] (or [L >= G, ...] with layer_offset: group
    g uses layer g + layer_offset, traced); x: [G, B, S, D]; cos/sin: [S, hd] or broadcastable to
    [G*B, S, hd]; active: optional (lo, hi) range of groups that do work.
    """
    G = x.shape[0]
    norm = lambda h, w: rms_norm(h, layer_window(w, layer_offset, G)[:, None, None, :],
                                 cfg.rms_norm_eps)
    x = x + attention(lp, norm(x, lp["attn_norm"]), cos, sin, cfg, active=active,
                      attn_impl=attn_impl, gmm_impl=gmm_impl, layer_offset=layer_offset)
    return x + mlp(lp, norm(x, lp["mlp_norm"]), cfg, active=active, gmm_impl=gmm_impl,
                   layer_offset=layer_offset)


def check_tokens(tokens: jax.Array, vocab_size: int | None = None) -> None:
    """tokens: integer ids [batch, length]. Ids outside [0, vocab_size) are refused where the
    tokens are concrete; under jit they cannot be checked, and the embedding lookup then reads
    NaN for them (JAX's out-of-bounds gather), which spreads through attention."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
    if vocab_size is None or isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    ids = np.asarray(tokens)
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        b, i = np.argwhere(outside)[0]
        raise ValueError(f"token id {ids[b, i]} at [{b}, {i}] is outside the vocabulary"
                         f" [0, {vocab_size}) ({int(outside.sum())} such ids)")


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0)


@jax.custom_vjp
def _logits_bf16(h: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


def _logits_bf16_fwd(h, w):
    return _logits_bf16(h, w), (h, w)


def _logits_bf16_bwd(residuals, g):
    # The float32 cotangent is rounded to bf16, so both backward products run at the forward's
    # precision (bf16 in, float32 accumulation). Left to autodiff they would mix float32 with bf16
    # operands and run as float32 (TF32) matmuls: the LM head's backward took 13.4 of 189 ms of
    # a 4096-token training step on an H200 (train_h200.md). bf16 keeps float32's exponent range;
    # float16 would flush the smallest logit gradients to zero, so it keeps autodiff's path.
    h, w = residuals
    g = g.astype(h.dtype)
    dh = jnp.einsum("...v,dv->...d", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("...d,...v->dv", h, g, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype)


_logits_bf16.defvjp(_logits_bf16_fwd, _logits_bf16_bwd)


def head(params: dict, h: jax.Array, cfg: LlamaConfig, output: str) -> jax.Array:
    """Final norm, then logits (float32) or the normalised hidden states."""
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if output == "hidden":
        return h
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    if h.dtype == w.dtype == jnp.bfloat16:
        return _logits_bf16(h, w)
    return jnp.einsum("...d,dv->...v", h, w,
                      preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))


def llama_forward(params: dict, tokens: jax.Array, cfg: LlamaConfig, *, output: str = "logits",
                  attn_impl="auto", gmm_impl="auto") -> jax.Array:
    """Plain Llama over the whole input (full attention): the Hugging Face model's function, and
    the baseline long-context users would otherwise pick."""
    if output not in ("logits", "hidden"):
        raise ValueError(f"llama_forward's output must be 'logits' or 'hidden', got {output!r}")
    check_tokens(tokens, cfg.vocab_size)      # concrete ids, before the compiled core
    return _llama_core(params, tokens, cfg=cfg, output=output, attn_impl=attn_impl,
                       gmm_impl=gmm_impl)


@functools.partial(jax.jit, static_argnames=("cfg", "output", "attn_impl", "gmm_impl"))
def _llama_core(params, tokens, *, cfg: LlamaConfig, output, attn_impl, gmm_impl) -> jax.Array:
    x = embed(params, tokens)[None]                                     # [1, B, n, D]
    cos, sin = rope_tables(cfg, jnp.arange(tokens.shape[1]), x.dtype)

    def one_layer(x, lp):
        return decoder_layer_group(lp, x, cos, sin, cfg, attn_impl=attn_impl,
                                   gmm_impl=gmm_impl), None

    # Layer groups of one sliced from [L, 1, ...] (as in sequential.py: no per-layer weight copy
    # saved for the backward pass).
    x, _ = jax.lax.scan(one_layer, x, jax.tree.map(lambda a: a[:, None], params["layers"]))
    return head(params, x[0], cfg, output)
