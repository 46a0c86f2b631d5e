"""Hugging Face Llama checkpoints (SPEC §4) <-> the parameter pytree of `armt_jax.params`."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.convert.files import existing_weight_files, open_model_dir, save_sharded
from armt_jax.convert.table import TRANSPOSE, Rule, TensorSource, read_params, write_tensors


def llama_table(model: str, head: str, layer: str) -> tuple[Rule, ...]:
    """The Llama part of a mapping table. model: prefix of `embed_tokens` / `norm`; head: prefix of
    `lm_head`; layer: prefix of one decoder layer's modules (with `{i}`)."""
    attn, mlp = f"{layer}self_attn.", f"{layer}mlp."
    return (
        # destination          source key template(s)                                  transform
        Rule("embed",            f"{model}embed_tokens.weight"),
        Rule("layers/attn_norm", f"{layer}input_layernorm.weight"),
        Rule("layers/w_qkv",     (f"{attn}q_proj.weight", f"{attn}k_proj.weight",
                                  f"{attn}v_proj.weight"),                             TRANSPOSE, split="qkv"),
        Rule("layers/b_qkv",     (f"{attn}q_proj.bias", f"{attn}k_proj.bias",
                                  f"{attn}v_proj.bias"),                                          split="qkv"),
        Rule("layers/w_o",       f"{attn}o_proj.weight",                                TRANSPOSE),
        Rule("layers/b_o",       f"{attn}o_proj.bias"),
        Rule("layers/mlp_norm",  f"{layer}post_attention_layernorm.weight"),
        Rule("layers/w_gate_up", (f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"),   TRANSPOSE, split="gate_up"),
        Rule("layers/w_down",    f"{mlp}down_proj.weight",                              TRANSPOSE),
        Rule("final_norm",       f"{model}norm.weight"),
        Rule("lm_head",          f"{head}lm_head.weight",                               TRANSPOSE),
    )


HF_TABLE = llama_table(model="model.", head="", layer="model.layers.{i}.")
# Present only when tied; accepted (and ignored) when it equals the embedding.
HF_TIED = {"lm_head.weight": "model.embed_tokens.weight"}
# Buffers that old transformers versions saved; not parameters.
HF_IGNORE = (r"\.rotary_emb\.inv_freq$",)


def _to_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def params_from_hf_tensors(tensors: TensorSource | Mapping[str, np.ndarray], cfg: LlamaConfig, *,
                           dtype=None, progress: bool | None = None) -> dict:
    """Hugging Face state dict (lazy source or {key: array}) -> Llama parameters (numpy)."""
    if not isinstance(tensors, TensorSource):
        tensors = TensorSource.from_arrays(tensors, "Hugging Face state dict")
    return read_params(tensors, HF_TABLE, cfg, None, tied=HF_TIED if cfg.tie_word_embeddings else None,
                       ignore=HF_IGNORE, dtype=dtype, progress=progress)


def hf_tensors_from_params(params: Mapping, cfg: LlamaConfig, *, progress: bool | None = None
                           ) -> dict[str, np.ndarray]:
    """Llama parameters -> Hugging Face state dict {key: numpy array}. `memory` params are not part
    of a Hugging Face Llama and are left out (with a warning)."""
    if "memory" in params:
        warnings.warn("the ARMT memory parameters have no place in a Hugging Face Llama checkpoint "
                      "and are left out", stacklevel=2)
        params = {k: v for k, v in params.items() if k != "memory"}
    return write_tensors(params, HF_TABLE, cfg, None, progress=progress)


def load_hf(path: str | os.PathLike, *, dtype=None, armt: ArmtConfig | None = None,
            key: jax.Array | int = 0, progress: bool | None = None, as_numpy: bool = False
            ) -> tuple[LlamaConfig, dict]:
    """Read a Hugging Face Llama directory (config.json + model.safetensors or sharded safetensors
    with model.safetensors.index.json; pytorch_model.bin if torch is installed).

    dtype: cast every parameter (default: keep the checkpoint's dtype). armt: also attach fresh ARMT
    parameters (`init_memory_params`, drawn with `key`). as_numpy: return numpy arrays instead of
    jax arrays. Returns (LlamaConfig, params)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory")
    cfg = LlamaConfig.from_json(path / "config.json")
    params = params_from_hf_tensors(open_model_dir(path, f"Hugging Face checkpoint {path}"), cfg,
                                    dtype=dtype, progress=progress)
    if armt is not None:
        from armt_jax.params import init_memory_params

        rng = jax.random.key(key) if isinstance(key, int) else key
        mem_dtype = params["embed"].dtype if dtype is None else dtype
        memory = init_memory_params(rng, cfg, armt, jnp.asarray(params["embed"]), dtype=mem_dtype)
        params["memory"] = jax.tree.map(np.asarray, memory) if as_numpy else memory
    return cfg, (params if as_numpy else _to_jax(params))


def hf_config_dict(cfg: LlamaConfig, params: Mapping | None = None) -> dict:
    """config.json content: `LlamaConfig.to_hf_dict` plus the weights' dtype as `torch_dtype`."""
    d = cfg.to_hf_dict()
    if params is not None and "embed" in params:
        d.setdefault("torch_dtype", str(np.dtype(params["embed"].dtype)))
    return d


def save_hf(path: str | os.PathLike, params: Mapping, cfg: LlamaConfig, *,
            max_shard_size: int | str = "5GB", overwrite: bool = False,
            progress: bool | None = None) -> list[Path]:
    """Write a Hugging Face Llama directory: config.json and model.safetensors, or shards of at most
    max_shard_size (e.g. "5GB", "200KB", or bytes) plus model.safetensors.index.json. Refuses to mix
    with weights already in `path` unless overwrite=True (then the old weight files are removed).
    Returns the safetensors files written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    old = existing_weight_files(path)
    if old:
        if not overwrite:
            raise FileExistsError(f"{path} already holds weights ({', '.join(p.name for p in old)}); "
                                  "pass overwrite=True to replace them")
        for p in old:
            p.unlink() if p.is_file() else shutil.rmtree(p)
    tensors = hf_tensors_from_params(params, cfg, progress=progress)
    files = save_sharded(path, tensors, max_shard_size, progress=progress)
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg, params), indent=2) + "\n")
    return files
