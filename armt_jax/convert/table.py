"""The conversion engine: a mapping table + named transforms, applied in either direction.

A table is a tuple of `Rule`s. Each rule names one destination parameter (a path in the layout of
`armt_jax.params`) and the source key template(s) it is built from:

    Rule("layers/w_qkv", ("model.layers.{i}.self_attn.q_proj.weight",
                          "model.layers.{i}.self_attn.k_proj.weight",
                          "model.layers.{i}.self_attn.v_proj.weight"), TRANSPOSE, split="qkv")

- `{i}` in a template: one source tensor per layer, stacked on a new leading axis (the layer axis).
- Several templates: the (transformed) tensors are concatenated along the last axis in the listed
  order; `split` names the split sizes (`SPLITS`, computed from the config) used by the reverse
  direction and by the shape checks.
- `transform`: what turns one source tensor into its slice of the parameter (TRANSPOSE for the
  [out, in] weights of torch `nn.Linear` -> [in, out] here). Transforms are their own inverses here.

Only rules whose destination exists in `expected_shapes(cfg, armt)` are active, so the table itself
has no conditions: biases appear with `attention_bias`, `lm_head` only when untied, `memory/*` only
with an ArmtConfig. Reading validates everything (missing, unknown and mis-shaped keys, all reported
in one `ConversionError`) from the tensor headers before any data is read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before any tensor is read)
import numpy as np

from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.params import expected_shapes

Shape = tuple[int, ...]


class ConversionError(ValueError):
    """A checkpoint that does not match the configuration or the format; the message names the keys."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """Source tensor (one layer, one part) <-> its slice of the parameter."""

    name: str
    to_param: Callable[[np.ndarray], np.ndarray]
    to_source: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[Shape], Shape]  # parameter-slice shape -> source shape


IDENTITY = Transform("identity", lambda x: x, lambda x: x, lambda s: tuple(s))
# torch nn.Linear.weight is [out, in]; parameters here are [in, out] (`x @ W`).
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x: x.T, lambda s: tuple(s)[::-1])

# Split sizes of fused parameters along their last axis, from the config.
SPLITS: dict[str, Callable[[LlamaConfig], tuple[int, ...]]] = {
    "qkv": lambda c: (c.q_size, c.kv_size, c.kv_size),
    "gate_up": lambda c: (c.intermediate_size, c.intermediate_size),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    dest: str                       # parameter path, "/"-separated
    src: tuple[str, ...]            # source key template(s); "{i}" = layer index
    transform: Transform = IDENTITY
    split: str | None = None        # key of SPLITS for fused destinations

    def __post_init__(self):
        if isinstance(self.src, str):
            object.__setattr__(self, "src", (self.src,))
        if (len(self.src) > 1) != (self.split is not None):
            raise ValueError(f"rule {self.dest}: a split is needed exactly when there are several sources")
        if len({"{i}" in s for s in self.src}) != 1:
            raise ValueError(f"rule {self.dest}: all sources must be per-layer or none")

    @property
    def stacked(self) -> bool:
        return "{i}" in self.src[0]


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One source tensor of one rule: `key` goes to `[layer, ..., start:stop]` of the parameter."""

    key: str
    shape: Shape
    layer: int | None
    start: int
    stop: int


def _flatten(tree: Mapping, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def plan(table: Iterable[Rule], cfg: LlamaConfig, armt: ArmtConfig | None = None
         ) -> list[tuple[Rule, Shape, list[_Entry]]]:
    """The active rules for this config, each with its parameter shape and source entries."""
    want = dict(_flatten(expected_shapes(cfg, armt)))
    out, covered = [], set()
    for rule in table:
        if rule.dest not in want:
            continue
        shape = tuple(want[rule.dest])
        covered.add(rule.dest)
        per_layer = shape[1:] if rule.stacked else shape
        sizes = SPLITS[rule.split](cfg) if rule.split else (per_layer[-1],)
        if sum(sizes) != per_layer[-1]:  # a table/config inconsistency, not a user error
            raise AssertionError(f"{rule.dest}: split {sizes} does not add up to {per_layer[-1]}")
        layers = range(shape[0]) if rule.stacked else [None]
        entries = []
        for layer in layers:
            start = 0
            for template, size in zip(rule.src, sizes):
                src_shape = rule.transform.source_shape(per_layer[:-1] + (size,))
                key = template.format(i=layer) if rule.stacked else template
                entries.append(_Entry(key, src_shape, layer, start, start + size))
                start += size
        out.append((rule, shape, entries))
    uncovered = sorted(set(want) - covered)
    if uncovered:
        raise AssertionError(f"the table has no rule for parameter(s) {', '.join(uncovered)}")
    return out


def _sort_index(rule_index: int, first_stacked: int, entry: _Entry, n_layers: int):
    """Checkpoint order: global tensors before the layers, then layer by layer, then the rest."""
    if entry.layer is not None:
        group = entry.layer
    else:
        group = -1 if rule_index < first_stacked else n_layers
    return (group, rule_index, entry.start)


# ---------------------------------------------------------------------------------------------------
# Source tensors
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceTensor:
    shape: Shape
    load: Callable[[], np.ndarray]
    origin: str  # the key as it is spelled in the checkpoint (for error messages)


class TensorSource:
    """Checkpoint tensors by key, read lazily: shapes come from headers, data only on `load`."""

    def __init__(self, entries: Mapping[str, SourceTensor], description: str = "checkpoint",
                 metadata: Mapping[str, str] | None = None):
        self.entries = dict(entries)
        self.description = description
        self.metadata = dict(metadata or {})   # string metadata of the files (safetensors header)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], description: str = "state dict") -> "TensorSource":
        def entry(k, v):
            a = np.asarray(v)
            return SourceTensor(tuple(a.shape), lambda: a, k)
        return cls({k: entry(k, v) for k, v in arrays.items()}, description)

    def keys(self):
        return self.entries.keys()

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, key: str) -> Shape:
        return self.entries[key].shape

    def origin(self, key: str) -> str:
        return self.entries[key].origin

    def load(self, key: str) -> np.ndarray:
        return self.entries[key].load()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm
    # progress=None: automatic (shown on a terminal, for checkpoints with many tensors).
    disable = (not progress) if progress is not None else (None if total >= 64 else True)
    return tqdm(total=total, desc=desc, unit="tensor", disable=disable, leave=False)


def _list(keys, limit: int = 50) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_params(source: TensorSource, table: Iterable[Rule], cfg: LlamaConfig,
                armt: ArmtConfig | None = None, *, tied: Mapping[str, str] | None = None,
                ignore: Iterable[str] = (), dtype=None, progress: bool | None = None) -> dict:
    """Build the parameter pytree (numpy arrays) from `source` with `table`.

    tied: {key: other}: `key` may be present although no active rule reads it, if it equals `other`
    bit for bit (e.g. `lm_head.weight` of a tied model). ignore: regexes of keys to skip silently.
    """
    steps = plan(table, cfg, armt)
    expected = {e.key: e.shape for _, _, entries in steps for e in entries}
    ignore_re = [re.compile(p) for p in ignore]
    tied = {k: v for k, v in (tied or {}).items() if k not in expected and k in source}

    missing = [k for k in expected if k not in source]
    unknown = [source.origin(k) for k in source.keys()
               if k not in expected and k not in tied and not any(r.search(k) for r in ignore_re)]
    misshaped = [f"{source.origin(k)} has shape {source.shape(k)}, expected {s}"
                 for k, s in expected.items() if k in source and source.shape(k) != s]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_list(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {_list(sorted(unknown))}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {'; '.join(misshaped)}")
    if problems:
        raise ConversionError(f"{source.description} does not match the configuration: "
                              + "; ".join(problems))
    for key, other in tied.items():
        if source.shape(key) != source.shape(other) or not same_bits(source.load(key), source.load(other)):
            raise ConversionError(
                f"{source.origin(key)} is present and differs from {source.origin(other)}, but the "
                "configuration ties them (tie_word_embeddings=true)")

    np_dtype = None if dtype is None else np.dtype(dtype)
    params: dict = {}
    with _progress(len(expected), f"reading {source.description}", progress) as bar:
        for rule, shape, entries in steps:
            pieces: dict[int | None, list[np.ndarray]] = {}
            for e in entries:
                pieces.setdefault(e.layer, []).append(rule.transform.to_param(source.load(e.key)))
                bar.update(1)
            rows = [p[0] if len(p) == 1 else np.concatenate(p, axis=-1) for p in pieces.values()]
            value = np.stack(rows) if rule.stacked else rows[0]
            value = np.ascontiguousarray(value)
            assert value.shape == shape, (rule.dest, value.shape, shape)
            if np_dtype is not None and value.dtype != np_dtype:
                value = value.astype(np_dtype)
            _set(params, rule.dest, value)
    return params


def write_tensors(params: Mapping, table: Iterable[Rule], cfg: LlamaConfig,
                  armt: ArmtConfig | None = None, *, progress: bool | None = None) -> dict[str, np.ndarray]:
    """The inverse of `read_params`: parameter pytree -> {source key: numpy array}, in checkpoint
    order (global tensors, then layer by layer). Parameters must match `expected_shapes(cfg, armt)`."""
    steps = plan(table, cfg, armt)
    flat = dict(_flatten(params))
    want = {rule.dest: shape for rule, shape, _ in steps}
    problems = [f"missing {d} {s}" for d, s in want.items() if d not in flat]
    problems += [f"unexpected {d} {tuple(np.shape(v))}" for d, v in flat.items() if d not in want]
    problems += [f"{d} has shape {tuple(np.shape(flat[d]))}, expected {s}" for d, s in want.items()
                 if d in flat and tuple(np.shape(flat[d])) != s]
    if problems:
        raise ConversionError("parameters do not match the configuration: " + "; ".join(problems))

    first_stacked = next((n for n, (r, _, _) in enumerate(steps) if r.stacked), len(steps))
    n_layers = cfg.num_hidden_layers
    order = []
    for n, (rule, _, entries) in enumerate(steps):
        order += [(_sort_index(n, first_stacked, e, n_layers), rule, e) for e in entries]
    order.sort(key=lambda t: t[0])

    arrays = {rule.dest: None for rule, _, _ in steps}
    out: dict[str, np.ndarray] = {}
    with _progress(len(order), "converting", progress) as bar:
        for _, rule, e in order:
            if arrays[rule.dest] is None:
                arrays[rule.dest] = np.asarray(flat[rule.dest])  # jax -> numpy; bf16 stays bf16
            value = arrays[rule.dest]
            if e.layer is not None:
                value = value[e.layer]
            value = rule.transform.to_source(value[..., e.start:e.stop])
            assert value.shape == e.shape, (e.key, value.shape, e.shape)
            out[e.key] = np.ascontiguousarray(value)
            bar.update(1)
    return out
