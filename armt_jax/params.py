"""Parameter pytree layout and random initialisation.

Parameters are a plain nested dict of arrays. Per-layer weights are stacked on a leading layer axis
[L, ...]; that axis is also the group axis of the grouped matmuls of the diagonal schedule. Matmul
weights are stored as [in, out] (`x @ W`). The attention input projections are fused along the output
axis (q | k | v) and so are gate and up (gate | up): one grouped matmul each.

    embed        [V, D]
    final_norm   [D]
    lm_head      [D, V]                  absent when the embedding is tied
    layers/
      attn_norm  [L, D]
      w_qkv      [L, D, Hq*hd + 2*Hkv*hd]
      b_qkv      [L, Hq*hd + 2*Hkv*hd]   only with attention_bias
      w_o        [L, Hq*hd, D]
      b_o        [L, D]                  only with attention_bias
      mlp_norm   [L, D]
      w_gate_up  [L, D, 2*F]
      w_down     [L, F, D]
    memory/                              ARMT (SPEC §1.2); absent for a plain Llama
      mem_tokens [M, D]
      w_mq       [L, D, d_mem]
      w_mk       [L, D, d_mem]
      w_mv       [L, D, D]               zero at initialisation
      w_mb       [L, D, 1]
      b_mb       [L, 1]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from armt_jax.config import ArmtConfig, LlamaConfig

Params = dict


def expected_shapes(cfg: LlamaConfig, armt: ArmtConfig | None = None) -> dict:
    """The shape of every parameter, as a pytree of tuples with the layout above."""
    L, D, F, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    layers = {"attn_norm": (L, D), "w_qkv": (L, D, qkv), "w_o": (L, cfg.q_size, D),
              "mlp_norm": (L, D), "w_gate_up": (L, D, 2 * F), "w_down": (L, F, D)}
    if cfg.attention_bias:
        layers.update(b_qkv=(L, qkv), b_o=(L, D))
    shapes = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    if armt is not None:
        shapes["memory"] = {"mem_tokens": (armt.num_mem_tokens, D), "w_mq": (L, D, armt.d_mem),
                            "w_mk": (L, D, armt.d_mem), "w_mv": (L, D, D), "w_mb": (L, D, 1),
                            "b_mb": (L, 1)}
    return shapes


def check_shapes(params: Params, cfg: LlamaConfig, armt: ArmtConfig | None = None) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped parameter."""
    want = dict(_flatten(expected_shapes(cfg, armt)))
    have = {k: tuple(v.shape) for k, v in _flatten(params)}
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in have]
    problems += [f"unexpected {k} {s}" for k, s in have.items() if k not in want]
    problems += [f"{k} has shape {have[k]}, expected {s}" for k, s in want.items()
                 if k in have and have[k] != s]
    if problems:
        raise ValueError("parameters do not match the config: " + "; ".join(problems))


def _flatten(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def init_llama_params(key: jax.Array, cfg: LlamaConfig, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random Llama weights (normal(0, std) matrices, unit norms, zero biases)."""
    shapes = expected_shapes(cfg)
    keys = iter(jax.random.split(key, 16))
    params: Params = {"embed": std * jax.random.normal(next(keys), shapes["embed"], dtype),
                      "final_norm": jnp.ones(shapes["final_norm"], dtype), "layers": {}}
    if "lm_head" in shapes:
        params["lm_head"] = std * jax.random.normal(next(keys), shapes["lm_head"], dtype)
    for name, shape in shapes["layers"].items():
        if name.endswith("norm"):
            params["layers"][name] = jnp.ones(shape, dtype)
        elif name.startswith("b_"):
            params["layers"][name] = jnp.zeros(shape, dtype)
        else:
            params["layers"][name] = std * jax.random.normal(next(keys), shape, dtype)
    return params


def init_memory_params(key: jax.Array, cfg: LlamaConfig, armt: ArmtConfig, embed: jax.Array,
                       dtype=jnp.float32) -> Params:
    """ARMT parameters: memory tokens ~ N(0, std(embed)), projections like torch.nn.Linear's
    default (uniform +-1/sqrt(fan_in)), W_mv zero (SPEC §1.2)."""
    L, D, dm = cfg.num_hidden_layers, cfg.hidden_size, armt.d_mem
    k_mem, k_q, k_k, k_b, k_bb = jax.random.split(key, 5)
    bound = 1.0 / np.sqrt(D)
    uniform = lambda k, shape: jax.random.uniform(k, shape, dtype, -bound, bound)
    emb_std = jnp.std(embed.astype(jnp.float32))
    return {
        "mem_tokens": (emb_std * jax.random.normal(k_mem, (armt.num_mem_tokens, D))).astype(dtype),
        "w_mq": uniform(k_q, (L, D, dm)), "w_mk": uniform(k_k, (L, D, dm)),
        "w_mv": jnp.zeros((L, D, D), dtype),
        "w_mb": uniform(k_b, (L, D, 1)), "b_mb": uniform(k_bb, (L, 1)),
    }


def init_params(key: jax.Array, cfg: LlamaConfig, armt: ArmtConfig | None = None,
                dtype=jnp.float32) -> Params:
    k_llama, k_mem = jax.random.split(key)
    params = init_llama_params(k_llama, cfg, dtype)
    if armt is not None:
        params["memory"] = init_memory_params(k_mem, cfg, armt, params["embed"], dtype)
    return params


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)
