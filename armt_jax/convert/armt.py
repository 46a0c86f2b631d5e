"""State dicts of the PyTorch ARMT code (SPEC §4) <-> the parameter pytree of `armt_jax.params`.

Reading goes in two table-driven stages:
1. `KEY_REWRITES` bring every key to its canonical spelling: the PEFT prefix
   (`memory_cell.model.base_model.model.` -> `memory_cell.model.`), the `memory_cell.layers.{i}.`
   alias of the per-layer modules (-> `memory_cell.model.model.layers.{i}.`; both spellings may be
   present and must then agree bit for bit), and LoRA (`X.base_layer.weight`, `X.lora_A.<adapter>.weight`
   [r, in], `X.lora_B.<adapter>.weight` [out, r] -> `X.weight = W0 + (alpha / r) * B @ A`, computed in
   float32 and cast back to W0's dtype).
2. `ARMT_TABLE` maps canonical keys to parameters, like the Hugging Face table.
Writing uses `ARMT_TABLE` backwards (merged weights, no LoRA); the per-layer prefix is selectable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.convert.files import open_model_dir, open_tensor_file, save_safetensors
from armt_jax.convert.hf import HF_IGNORE, llama_table
from armt_jax.convert.table import (
    TRANSPOSE, ConversionError, Rule, SourceTensor, TensorSource, read_params, same_bits, write_tensors)

CELL = "memory_cell."
BLOCK = "memory_cell.model.model.layers.{i}."  # one ARMT layer: the memory weights + `.layer` (Llama)
ALIAS = "memory_cell.layers.{i}."              # the same modules, registered a second time

ARMT_TABLE: tuple[Rule, ...] = llama_table(
    model="memory_cell.model.model.", head="memory_cell.model.", layer=BLOCK + "layer.") + (
    # destination           source key template        transform
    Rule("memory/mem_tokens", "memory_cell.memory"),
    Rule("memory/w_mq",       BLOCK + "W_mq.weight",    TRANSPOSE),   # [d_mem, D] -> [D, d_mem]
    Rule("memory/w_mk",       BLOCK + "W_mk.weight",    TRANSPOSE),
    Rule("memory/w_mv",       BLOCK + "W_mv.weight",    TRANSPOSE),   # [D, D], [out, in]
    Rule("memory/w_mb",       BLOCK + "W_mb.weight",    TRANSPOSE),   # [1, D] -> [D, 1]
    Rule("memory/b_mb",       BLOCK + "W_mb.bias"),                   # [1]
)
ARMT_TIED = {"memory_cell.model.lm_head.weight": "memory_cell.model.model.embed_tokens.weight"}

# Stage 1, in order: (regex on the key, replacement).
PEFT_PREFIX = (r"^memory_cell\.model\.base_model\.model\.", "memory_cell.model.")
LAYER_ALIAS = (r"^memory_cell\.layers\.(\d+)\.", r"memory_cell.model.model.layers.\1.")
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")

LAYER_PREFIXES = {"model": (BLOCK,), "layers": (ALIAS,), "both": (BLOCK, ALIAS)}


def _rename(source: TensorSource, pattern: str, repl: str, *, merge_equal: bool) -> TensorSource:
    """Rename keys matching `pattern`. A renamed key colliding with an existing one is an error,
    unless merge_equal (aliases): then the shapes must agree now and the values when read."""
    regex = re.compile(pattern)
    entries = {k: v for k, v in source.entries.items() if not regex.search(k)}
    for key, t in source.entries.items():
        if not regex.search(key):
            continue
        new = regex.sub(repl, key, count=1)
        other = entries.get(new)
        if other is None:
            entries[new] = t
            continue
        if not merge_equal:
            raise ConversionError(f"{source.description}: {t.origin} and {other.origin} name the same tensor")
        if other.shape != t.shape:
            raise ConversionError(
                f"{source.description}: {t.origin} has shape {t.shape} but its alias {other.origin} "
                f"has shape {other.shape}")

        def load(a=other, b=t):
            x, y = a.load(), b.load()
            if not same_bits(x, y):
                raise ConversionError(f"{source.description}: {b.origin} differs from its alias "
                                      f"{a.origin}; the two spellings must hold the same tensor")
            return x
        entries[new] = SourceTensor(other.shape, load, other.origin)
    return TensorSource(entries, source.description, source.metadata)


def _merge_lora(source: TensorSource, lora_r: int | None, lora_alpha: float | None) -> TensorSource:
    """Fold LoRA adapters into their base weights: W = W0 + (alpha / r) * B @ A (float32)."""
    entries: dict[str, SourceTensor] = {}
    lora: dict[str, dict[str, str]] = {}
    for key, t in source.entries.items():
        m = LORA_KEY.match(key)
        if m:
            parts = lora.setdefault(m["module"], {})
            if m["part"] in parts:
                raise ConversionError(f"{source.description}: {t.origin}: several LoRA adapters on "
                                      f"{m['module']} ({source.origin(parts[m['part']])}); only one is supported")
            parts[m["part"]] = key
            continue
        m = BASE_LAYER_KEY.match(key)
        new = f"{m['module']}.{m['param']}" if m else key
        if new in entries:
            raise ConversionError(f"{source.description}: {t.origin} and {entries[new].origin} name the same tensor")
        entries[new] = t
    if not lora:
        return TensorSource(entries, source.description, source.metadata)
    if lora_r is None or lora_alpha is None:
        example = source.origin(next(iter(next(iter(lora.values())).values())))
        raise ConversionError(f"{source.description} holds LoRA adapters (e.g. {example}); pass lora_r and "
                              "lora_alpha (the published BABILong model: r=8, alpha=32) to merge them")
    scale = float(lora_alpha) / float(lora_r)
    for module, parts in sorted(lora.items()):
        base_key = f"{module}.weight"
        for need in ("lora_A", "lora_B"):
            if need not in parts:
                have = source.origin(next(iter(parts.values())))
                raise ConversionError(f"{source.description}: {have} has no matching {need} weight")
        a_key, b_key = parts["lora_A"], parts["lora_B"]
        if base_key not in entries:
            raise ConversionError(f"{source.description}: LoRA weights {source.origin(a_key)} have no base "
                                  f"weight ({module}.base_layer.weight)")
        base = entries[base_key]
        if len(base.shape) != 2:
            raise ConversionError(f"{source.description}: {base.origin} has shape {base.shape}; "
                                  "LoRA needs a 2-D weight")
        out_dim, in_dim = base.shape
        for key, want in ((a_key, (lora_r, in_dim)), (b_key, (out_dim, lora_r))):
            if source.shape(key) != want:
                raise ConversionError(f"{source.description}: {source.origin(key)} has shape "
                                      f"{source.shape(key)}, expected {want} (lora_r={lora_r})")

        def load(base=base, a=source.entries[a_key], b=source.entries[b_key]):
            w0 = base.load()
            delta = b.load().astype(np.float32) @ a.load().astype(np.float32)
            return (w0.astype(np.float32) + np.float32(scale) * delta).astype(w0.dtype)
        entries[base_key] = SourceTensor(base.shape, load, base.origin)
    return TensorSource(entries, source.description, source.metadata)


def canonicalize(source: TensorSource, *, lora_r: int | None = None,
                 lora_alpha: float | None = None) -> TensorSource:
    """Stage 1: PEFT prefix, `memory_cell.layers.{i}.` alias, LoRA merge (see the module docstring)."""
    source = _rename(source, *PEFT_PREFIX, merge_equal=False)
    source = _rename(source, *LAYER_ALIAS, merge_equal=True)
    return _merge_lora(source, lora_r, lora_alpha)


def open_armt(path: str | os.PathLike) -> TensorSource:
    """An ARMT state dict: a .safetensors / .bin file, or a directory holding one."""
    path = Path(path)
    description = f"ARMT checkpoint {path}"
    if path.is_dir():
        return open_model_dir(path, description)
    return open_tensor_file(path, description)


def params_from_armt_tensors(tensors: TensorSource | Mapping[str, np.ndarray], cfg: LlamaConfig,
                             armt: ArmtConfig, *, lora_r: int | None = None,
                             lora_alpha: float | None = None, dtype=None,
                             progress: bool | None = None) -> dict:
    """ARMT state dict (lazy source or {key: array}) -> parameters incl. `memory` (numpy)."""
    if not isinstance(tensors, TensorSource):
        tensors = TensorSource.from_arrays(tensors, "ARMT state dict")
    tensors = canonicalize(tensors, lora_r=lora_r, lora_alpha=lora_alpha)
    return read_params(tensors, ARMT_TABLE, cfg, armt, tied=ARMT_TIED if cfg.tie_word_embeddings else None,
                       ignore=HF_IGNORE, dtype=dtype, progress=progress)


def load_armt(path: str | os.PathLike | Mapping[str, np.ndarray], cfg: LlamaConfig, armt: ArmtConfig,
              *, lora_r: int | None = None, lora_alpha: float | None = None, dtype=None,
              progress: bool | None = None, as_numpy: bool = False) -> dict:
    """Read a PyTorch ARMT checkpoint (safetensors or .bin file, a directory with one, or an in-memory
    state dict) into parameters, given the base model's LlamaConfig and the ArmtConfig.
    LoRA adapters, if present, are merged with lora_r and lora_alpha (both required then)."""
    source = path if isinstance(path, Mapping) else open_armt(path)
    params = params_from_armt_tensors(source, cfg, armt, lora_r=lora_r, lora_alpha=lora_alpha,
                                      dtype=dtype, progress=progress)
    return params if as_numpy else jax.tree.map(jnp.asarray, params)


def armt_tensors_from_params(params: Mapping, cfg: LlamaConfig, armt: ArmtConfig, *,
                             layer_prefix: str = "model", progress: bool | None = None
                             ) -> dict[str, np.ndarray]:
    """Parameters -> ARMT state dict. layer_prefix: where per-layer tensors go: "model"
    (`memory_cell.model.model.layers.{i}.`, SPEC's spelling), "layers" (`memory_cell.layers.{i}.`,
    as safetensors' save_model wrote the published checkpoints) or "both"."""
    if layer_prefix not in LAYER_PREFIXES:
        raise ValueError(f"layer_prefix must be one of {', '.join(LAYER_PREFIXES)}, got {layer_prefix!r}")
    tensors = write_tensors(params, ARMT_TABLE, cfg, armt, progress=progress)
    block_re = re.compile(r"^memory_cell\.model\.model\.layers\.(\d+)\.")
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        m = block_re.match(key)
        if not m:
            out[key] = value
            continue
        for prefix in LAYER_PREFIXES[layer_prefix]:
            out[prefix.format(i=m[1]) + key[m.end():]] = value
    return out


# The safetensors metadata key under which `save_armt` stores the ArmtConfig (as JSON): the
# segment size and the correction flag are in no tensor's shape.
ARMT_CONFIG_METADATA = "armt_config"


def save_armt(path: str | os.PathLike, params: Mapping, cfg: LlamaConfig, armt: ArmtConfig, *,
              layer_prefix: str = "model", progress: bool | None = None) -> Path:
    """Write an ARMT state dict as one safetensors file (a directory gets `model.safetensors`),
    with the ArmtConfig as JSON in its metadata (`ARMT_CONFIG_METADATA`), which
    `infer_armt_config` reads back; PyTorch's loaders ignore it."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, armt_tensors_from_params(params, cfg, armt, layer_prefix=layer_prefix,
                                                    progress=progress),
                     metadata={"format": "pt", ARMT_CONFIG_METADATA: json.dumps(armt.to_dict())})
    return path


def _stored_armt_config(source: TensorSource) -> dict:
    """The ArmtConfig fields `save_armt` wrote into the file's metadata ({} if none)."""
    text = source.metadata.get(ARMT_CONFIG_METADATA)
    if text is None:
        return {}
    try:
        stored = json.loads(text)
        ArmtConfig.from_dict(stored)   # unknown fields, bad values
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source.description}: its metadata {ARMT_CONFIG_METADATA!r} is no "
                              f"ArmtConfig ({e}): {text[:200]}") from None
    return stored


def infer_armt_config(source: TensorSource | str | os.PathLike, **overrides) -> ArmtConfig:
    """The ArmtConfig of an ARMT checkpoint: `overrides` (those not None) first, then what
    `save_armt` stored in the file's metadata, then num_mem_tokens and d_mem read off the shapes
    (`memory_cell.memory` [M, D], `W_mq.weight` [d_mem, D]; they must agree with the metadata).
    The segment size is in no shape: a file without the metadata (the PyTorch code's, e.g. the
    published checkpoints: 1008 text tokens) needs ``segment_size`` given, else ConversionError.
    ``correction`` defaults to on, as the published checkpoints used."""
    if not isinstance(source, TensorSource):
        source = open_armt(source)
    stored = _stored_armt_config(source)
    source = _rename(_rename(source, *PEFT_PREFIX, merge_equal=False), *LAYER_ALIAS, merge_equal=True)
    found = {}
    if "memory_cell.memory" in source:
        found["num_mem_tokens"] = source.shape("memory_cell.memory")[0]
    for key in (BLOCK.format(i=0) + "W_mq.weight", BLOCK.format(i=0) + "W_mq.base_layer.weight"):
        if key in source:
            found["d_mem"] = source.shape(key)[0]
            break
    for name, value in found.items():
        if name in stored and stored[name] != value:
            raise ConversionError(f"{source.description}: its metadata says {name}={stored[name]}, "
                                  f"its tensors' shapes {name}={value}")
    config = {**stored, **found, **{k: v for k, v in overrides.items() if v is not None}}
    if "segment_size" not in config:
        raise ConversionError(
            f"{source.description}: the segment size (text tokens per segment) is in neither the "
            f"file's metadata nor its tensors; pass segment_size (armt convert: --segment-size; "
            f"the published ARMT checkpoints used 1008)")
    return ArmtConfig(**config)
