"""Model configuration: the Llama base model (read from a Hugging Face config.json) and the ARMT memory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration this library does not support; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ("llama3") RoPE frequency scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        # The config is a static argument of jitted functions, so it must hash: a list of EOS
        # ids (config.json's spelling) becomes a tuple, a rope_scaling dict a RopeScaling.
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError as e:
                raise ConfigError(f"rope_scaling: {e}") from None
        if self.head_dim % 2:   # rotary embeddings rotate pairs of dimensions
            raise ConfigError(f"head_dim must be even (rotary embeddings), got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ---- Hugging Face config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"model_type must be 'llama', got {model_type!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {act!r}")
        if d.get("mlp_bias", False):
            raise ConfigError("mlp_bias=true is not supported")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ConfigError(f"pretraining_tp must be 1, got {d['pretraining_tp']}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        heads = d["num_attention_heads"]
        if heads <= 0:   # before the division below
            raise ConfigError(f"num_attention_heads must be positive, got {heads}")
        head_dim = d["hidden_size"] // heads if d.get("head_dim") is None else d["head_dim"]
        kv_heads = heads if d.get("num_key_value_heads") is None else d["num_key_value_heads"]
        # transformers >= 5 folds rope_theta and rope_scaling into `rope_parameters`.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                      float(rope["high_freq_factor"]),
                                      int(rope["original_max_position_embeddings"]))
            except KeyError as e:
                raise ConfigError(f"rope_scaling of type llama3 lacks field {e.args[0]!r}") from None
        elif rope_type == "default":
            scaling = None
        else:
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'llama3' or none)")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=scaling, tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {
                "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)},
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": False, "max_position_embeddings": self.max_position_embeddings,
        }
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) \
                else self.eos_token_id
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)


# Reference sizes of SPEC §1.1 (used by benchmarks and demos; weights are random there).
LLAMA_3_2_1B = LlamaConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
    max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)


@dataclasses.dataclass(frozen=True)
class ArmtConfig:
    """Associative memory settings (SPEC §1.2-1.3)."""

    segment_size: int = 1024        # T: text tokens per segment
    num_mem_tokens: int = 16        # M
    d_mem: int = 64
    nu: int = 3                     # DPFP order
    correction: bool = True

    def __post_init__(self):
        for name in ("segment_size", "num_mem_tokens", "d_mem", "nu"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ArmtConfig.{name} must be positive, got {getattr(self, name)}")
        if self.nu > 2 * self.d_mem - 1:
            raise ConfigError(f"ArmtConfig.nu ({self.nu}) must be < 2 * d_mem")

    @property
    def d_key(self) -> int:
        return 2 * self.nu * self.d_mem

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArmtConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ArmtConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)
