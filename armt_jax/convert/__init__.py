"""Weight conversion: Hugging Face Llama, PyTorch ARMT state dicts <-> the parameter pytree.

Every format is one mapping table (`HF_TABLE`, `ARMT_TABLE`) read by one engine (`table.py`) in both
directions. Public entry points:

    load_hf(dir, dtype=None, armt=None) -> (LlamaConfig, params)      save_hf(dir, params, cfg)
    load_armt(path, cfg, armt, lora_r=None, lora_alpha=None) -> params
    save_armt(path, params, cfg, armt)
"""

from armt_jax.convert.armt import (
    ARMT_TABLE, armt_tensors_from_params, canonicalize, infer_armt_config, load_armt,
    params_from_armt_tensors, save_armt)
from armt_jax.convert.hf import (
    HF_TABLE, hf_config_dict, hf_tensors_from_params, load_hf, params_from_hf_tensors, save_hf)
from armt_jax.convert.table import (
    IDENTITY, SPLITS, TRANSPOSE, ConversionError, Rule, TensorSource, Transform, read_params,
    write_tensors)

__all__ = [
    "ARMT_TABLE", "HF_TABLE", "IDENTITY", "SPLITS", "TRANSPOSE", "ConversionError", "Rule",
    "TensorSource", "Transform", "armt_tensors_from_params", "canonicalize", "hf_config_dict",
    "hf_tensors_from_params", "infer_armt_config", "load_armt", "load_hf", "params_from_armt_tensors",
    "params_from_hf_tensors", "read_params", "save_armt", "save_hf", "write_tensors",
]
