"""Reading and writing tensor files: safetensors (single or sharded, with an index) and torch `.bin`.

Reading is lazy (`TensorSource`: shapes from the headers, data on demand) so a checkpoint is validated
before any tensor is read. safetensors' numpy API is used with ml_dtypes, so bfloat16 stays bfloat16
bit for bit and torch is never needed for safetensors. `.bin` files need torch, imported lazily.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (numpy must know bfloat16 before safetensors hands one over)
import numpy as np

from armt_jax.convert.table import ConversionError, SourceTensor, TensorSource

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# ---- reading ------------------------------------------------------------------------------------------
def open_safetensors(files: list[Path], description: str,
                     key_to_file: Mapping[str, str] | None = None) -> TensorSource:
    """Lazy view over one or several safetensors files. With `key_to_file` (an index's weight_map)
    only the listed keys are exposed, each from its listed file."""
    from safetensors import safe_open

    handles = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{description}: tensor file {f} does not exist")
        handles[f.name] = safe_open(str(f), framework="numpy")

    def entry(handle, key):
        shape = tuple(handle.get_slice(key).get_shape())
        return SourceTensor(shape, lambda: handle.get_tensor(key), key)

    entries: dict[str, SourceTensor] = {}
    if key_to_file is not None:
        for key, fname in key_to_file.items():
            handle = handles.get(fname)
            if handle is None:
                raise ConversionError(f"{description}: the index maps {key} to {fname}, which is not listed")
            if key not in handle.keys():
                raise ConversionError(f"{description}: the index maps {key} to {fname}, which lacks it")
            entries[key] = entry(handle, key)
    else:
        for fname, handle in handles.items():
            for key in handle.keys():
                if key in entries:
                    raise ConversionError(f"{description}: key {key} occurs in several files")
                entries[key] = entry(handle, key)
    metadata = {}
    for handle in handles.values():
        metadata.update(handle.metadata() or {})
    return TensorSource(entries, description, metadata)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def open_torch_bin(path: Path, description: str) -> TensorSource:
    """A torch-pickled state dict (`torch.save(model.state_dict())`). Needs torch (imported here only)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (a .bin file is a torch pickle); install torch, or convert "
            "the file to safetensors first") from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("state_dict", "model", "module"):  # common training-script wrappers
        if isinstance(obj, dict) and set(obj) == {wrapper}:
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    entries = {}
    for key, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{path}: entry {key} is a {type(t).__name__}, not a tensor")
        entries[key] = SourceTensor(tuple(t.shape), lambda t=t: _torch_to_numpy(t), key)
    return TensorSource(entries, description)


def open_tensor_file(path: str | os.PathLike, description: str | None = None) -> TensorSource:
    """A single state-dict file: `.safetensors` or a torch pickle (`.bin`, `.pt`, `.pth`)."""
    path = Path(path)
    description = description or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    if path.suffix == ".safetensors":
        return open_safetensors([path], description)
    if path.suffix in (".bin", ".pt", ".pth"):
        return open_torch_bin(path, description)
    raise ConversionError(f"{path}: unknown tensor file type {path.suffix!r} (want .safetensors or .bin)")


def open_model_dir(path: str | os.PathLike, description: str | None = None) -> TensorSource:
    """The tensors of a Hugging Face style directory: `model.safetensors.index.json` (sharded),
    `model.safetensors`, or `pytorch_model.bin`, in that order of preference."""
    path = Path(path)
    description = description or str(path)
    index = path / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        return open_safetensors(files, description, weight_map)
    if (path / SAFE_SINGLE).exists():
        return open_safetensors([path / SAFE_SINGLE], description)
    if (path / TORCH_BIN).exists():
        return open_torch_bin(path / TORCH_BIN, description)
    raise FileNotFoundError(f"no weights in {path}: expected {SAFE_SINGLE}, {SAFE_INDEX} (+ shards) "
                            f"or {TORCH_BIN}")


# ---- writing ------------------------------------------------------------------------------------------
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (decimal, as Hugging Face) or "500MiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _nbytes(a: np.ndarray) -> int:
    return int(a.size) * a.dtype.itemsize


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata=dict(metadata or {"format": "pt"}))


def existing_weight_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir()
            if p.name in (SAFE_SINGLE, SAFE_INDEX, TORCH_BIN) or _SHARD_RE.match(p.name)]


def save_sharded(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_size: int | str,
                 progress: bool | None = None) -> list[Path]:
    """Write `tensors` (in their order) into `path` as `model.safetensors`, or as
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` when larger than
    max_shard_size. A single tensor larger than the limit gets a shard of its own."""
    from tqdm.auto import tqdm

    path = Path(path)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        n = _nbytes(value)
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += n
    if len(shards) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    disable = (not progress) if progress is not None else (None if len(shards) > 1 else True)
    for name, shard in tqdm(list(zip(names, shards)), desc="writing shards", unit="file",
                            disable=disable, leave=False):
        save_safetensors(path / name, shard)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": int(sum(int(v.size) for v in tensors.values())),
                              "total_size": int(sum(_nbytes(v) for v in tensors.values()))},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in sorted(shard)}}
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (path / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [path / n for n in names]
