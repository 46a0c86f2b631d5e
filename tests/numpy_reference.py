"""An independent float64 NumPy implementation of SPEC §1 (Llama + ARMT), the tests' oracle.

Written straight from the SPEC, deliberately unlike the library: one segment at a time, no padding
(the segment is exactly [t text tokens; M memory tokens]), explicit per-head loops over an explicit
causal mask, llama3 RoPE frequencies computed in float64, per-layer state as plain arrays.
"""

from __future__ import annotations

import math

import numpy as np


def f64(tree):
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float64)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inv_freq(cfg) -> np.ndarray:
    dim = cfg.head_dim
    f = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2) / dim)
    s = cfg.rope_scaling
    if s is None:
        return f
    wavelen = 2 * math.pi / f
    old = s.original_max_position_embeddings
    out = []
    for fi, wl in zip(f, wavelen):
        if wl < old / s.high_freq_factor:
            out.append(fi)
        elif wl > old / s.low_freq_factor:
            out.append(fi / s.factor)
        else:
            smooth = (old / wl - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append((1 - smooth) * fi / s.factor + smooth * fi)
    return np.array(out)


def rope(x, positions, cfg):
    """x [S, heads, hd], HF rotate-half convention."""
    ang = positions[:, None] * inv_freq(cfg)[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def llama_layer(p, l, h, cfg):
    """One decoder layer on h [S, D] (one sequence)."""
    S = h.shape[0]
    H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Lp = p["layers"]
    x = rmsnorm(h, Lp["attn_norm"][l], cfg.rms_norm_eps)
    qkv = x @ Lp["w_qkv"][l]
    if "b_qkv" in Lp:
        qkv = qkv + Lp["b_qkv"][l]
    q = qkv[:, :H * hd].reshape(S, H, hd)
    k = qkv[:, H * hd:(H + K) * hd].reshape(S, K, hd)
    v = qkv[:, (H + K) * hd:].reshape(S, K, hd)
    pos = np.arange(S, dtype=np.float64)
    q, k = rope(q, pos, cfg), rope(k, pos, cfg)
    causal = np.tril(np.ones((S, S), bool))
    out = np.zeros((S, H, hd))
    for head_i in range(H):
        kv = head_i // (H // K)
        scores = q[:, head_i] @ k[:, kv].T / math.sqrt(hd)
        scores = np.where(causal, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, head_i] = w @ v[:, kv]
    attn = out.reshape(S, H * hd) @ Lp["w_o"][l]
    if "b_o" in Lp:
        attn = attn + Lp["b_o"][l]
    h = h + attn
    x = rmsnorm(h, Lp["mlp_norm"][l], cfg.rms_norm_eps)
    F = cfg.intermediate_size
    gu = x @ Lp["w_gate_up"][l]
    gate, up = gu[:, :F], gu[:, F:]
    return h + (gate / (1 + np.exp(-gate)) * up) @ Lp["w_down"][l]


def logits_of(p, h, cfg):
    h = rmsnorm(h, p["final_norm"], cfg.rms_norm_eps)
    w = p["embed"].T if cfg.tie_word_embeddings else p["lm_head"]
    return h @ w


def llama(p, tokens, cfg):
    """Full-attention Llama logits for one sequence of token ids."""
    p = f64(p)
    h = p["embed"][np.asarray(tokens)]
    for l in range(cfg.num_hidden_layers):
        h = llama_layer(p, l, h, cfg)
    return logits_of(p, h, cfg)


def phi(u, nu):
    p = np.concatenate([np.maximum(u, 0), np.maximum(-u, 0)], -1)
    return np.concatenate([p * np.roll(p, j, axis=-1) for j in range(1, nu + 1)], -1)


def armt(p, tokens, cfg, acfg, output="logits"):
    """ARMT over one sequence: returns (text outputs [n, V or D], [A_l], [z_l])."""
    p = f64(p)
    m, L, D = p["memory"], cfg.num_hidden_layers, cfg.hidden_size
    T, M, eps = acfg.segment_size, acfg.num_mem_tokens, 1e-5
    A = [np.zeros((acfg.d_key, D)) for _ in range(L)]
    z = [np.zeros(acfg.d_key) for _ in range(L)]
    outs = []
    tokens = np.asarray(tokens)
    for s_idx, start in enumerate(range(0, len(tokens), T)):
        seg = tokens[start:start + T]
        t = len(seg)
        h = np.concatenate([p["embed"][seg], m["mem_tokens"]], 0)
        for l in range(L):
            q = phi(h @ m["w_mq"][l], acfg.nu)
            h = h + (q @ A[l]) / (q @ z[l] + eps)[:, None]
            h = llama_layer(p, l, h, cfg)
            mem = h[t:t + M]
            k = phi(mem @ m["w_mk"][l], acfg.nu)
            v = mem @ m["w_mv"][l]
            b = 1 / (1 + np.exp(-(mem @ m["w_mb"][l] + m["b_mb"][l])))       # [M, 1]
            if s_idx == 0:
                vbar = np.zeros_like(v)
                gamma = np.ones(M)
            else:
                vbar = (k @ A[l]) / (k @ z[l] + eps)[:, None]
                gamma = np.clip(1 - (k @ z[l] + eps) / ((k * k).sum(-1) + eps), 0, 1)
            if not acfg.correction:
                gamma = np.ones(M)
            A[l] = A[l] + k.T @ (b * (v - vbar))
            z[l] = z[l] + gamma @ k
        text = h[:t]
        outs.append(logits_of(p, text, cfg) if output == "logits"
                    else rmsnorm(text, p["final_norm"], cfg.rms_norm_eps))
    return np.concatenate(outs, 0), A, z
