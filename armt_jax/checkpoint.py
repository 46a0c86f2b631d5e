"""Own checkpoints: parameters with Orbax, the model and ARMT configuration beside them as JSON.

Layout of a checkpoint directory:

    <path>/armt_jax_config.json   {"format": "armt-jax", "version": 1, "llama": {...}, "armt": {...} | null}
    <path>/params/                Orbax (StandardCheckpointer) pytree in the layout of armt_jax.params

Arrays are stored in their own dtype (bfloat16 stays bfloat16) and come back bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.params import check_shapes

CONFIG_FILE = "armt_jax_config.json"
PARAMS_DIR = "params"
FORMAT = "armt-jax"
VERSION = 1


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_checkpoint(path: str | os.PathLike, params: dict, llama_cfg: LlamaConfig,
                    armt_cfg: ArmtConfig | None = None, *, overwrite: bool = False) -> Path:
    """Save `params` (jax or numpy arrays) and both configurations to the directory `path`.
    The parameters must match the configurations (`check_shapes`). An existing checkpoint at `path`
    is replaced only with overwrite=True."""
    import orbax.checkpoint as ocp

    check_shapes(params, llama_cfg, armt_cfg)
    path = Path(path).absolute()
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
        if not is_checkpoint(path):
            raise FileExistsError(f"{path} is not an armt-jax checkpoint; refusing to overwrite it")
        shutil.rmtree(path / PARAMS_DIR)
        (path / CONFIG_FILE).unlink()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "version": VERSION, "llama": llama_cfg.to_dict(),
            "armt": None if armt_cfg is None else armt_cfg.to_dict()}
    # Written last: its presence marks a complete checkpoint.
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_configs(path: str | os.PathLike) -> tuple[LlamaConfig, ArmtConfig | None]:
    """Only the configurations of a checkpoint."""
    path = Path(path).absolute()
    if not is_checkpoint(path):
        what = "does not exist" if not path.exists() else f"lacks {CONFIG_FILE} or {PARAMS_DIR}/"
        raise FileNotFoundError(f"no armt-jax checkpoint at {path}: the path {what}")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not an armt-jax checkpoint config "
                         f"(format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {meta.get('version')} is not supported "
                         f"(this library reads version {VERSION})")
    llama = LlamaConfig.from_dict(meta["llama"])
    armt = None if meta.get("armt") is None else ArmtConfig.from_dict(meta["armt"])
    return llama, armt


def load_checkpoint(path: str | os.PathLike, *, device: jax.Device | None = None
                    ) -> tuple[dict, LlamaConfig, ArmtConfig | None]:
    """Load (params, llama_cfg, armt_cfg) saved by `save_checkpoint`. Arrays are placed on `device`
    (default: the first device), whatever devices they were saved from."""
    import orbax.checkpoint as ocp

    llama, armt = load_configs(path)
    params_dir = Path(path).absolute() / PARAMS_DIR
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype),
                                                             sharding=sharding), tree)
        params = ckptr.restore(params_dir, target)
    check_shapes(params, llama, armt)
    return params, llama, armt
