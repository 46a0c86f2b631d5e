"""The user-facing Flax NNX module. It holds the parameters (as nnx.Param leaves in the layout of
params.py) and the configs; every computation is a call into the functional core, so `nnx.jit`,
`nnx.grad` and `nnx.Optimizer` work on it and the schedules never depend on module state."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from armt_jax.armt import ArmtOutput
from armt_jax.config import ArmtConfig, ConfigError, LlamaConfig
from armt_jax.generate import GenerateOutput, generate
from armt_jax.layers import llama_forward
from armt_jax.params import check_shapes, init_params
from armt_jax.schedules import schedule_forward

_is_variable = lambda x: isinstance(x, nnx.Variable)


class _ParamsModule(nnx.Module):
    """Holds a parameter pytree as nnx.Param leaves; `param_tree()` gives the plain arrays back."""

    def _hold(self, params: dict) -> None:
        self.params = nnx.data(jax.tree.map(nnx.Param, params))

    def param_tree(self) -> dict:
        """The parameters as a plain pytree of arrays (what the functional core takes)."""
        return jax.tree.map(lambda v: v[...], self.params, is_leaf=_is_variable)


def _initial_params(name, cfg, armt, rngs, params, dtype) -> dict:
    if params is None:
        if rngs is None:
            raise ValueError(f"{name} needs either rngs (random init) or params")
        params = init_params(rngs.params(), cfg, armt, dtype)
    return params


class LlamaModel(_ParamsModule):
    """The plain Llama (full attention over the whole input), same parameter layout without
    `memory`: the Hugging Face model's function, and the baseline to compare ARMT with."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs | None = None,
                 params: dict | None = None, dtype=jnp.float32):
        params = _initial_params("LlamaModel", cfg, None, rngs, params, dtype)
        params = {k: v for k, v in params.items() if k != "memory"}
        check_shapes(params, cfg)
        self.cfg = cfg
        self._hold(params)

    def __call__(self, tokens: jax.Array, *, output: str = "logits", **kwargs) -> jax.Array:
        return llama_forward(self.param_tree(), tokens, self.cfg, output=output, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "LlamaModel":
        """The Llama of an Orbax checkpoint (its ARMT memory, if any, left out)."""
        from armt_jax.checkpoint import load_checkpoint
        params, cfg, _ = load_checkpoint(path)
        return cls(cfg, params=params)


class ArmtModel(_ParamsModule):
    """Llama with a per-layer associative memory.

        model = ArmtModel(LlamaConfig(...), ArmtConfig(...), rngs=nnx.Rngs(0))
        out = model(tokens)                           # diagonal schedule, text logits
        loss = model(tokens, output="none", compute_loss=True).loss   # the same either schedule
    """

    def __init__(self, cfg: LlamaConfig, armt: ArmtConfig, *, rngs: nnx.Rngs | None = None,
                 params: dict | None = None, dtype=jnp.float32):
        if not isinstance(armt, ArmtConfig):   # None would pass check_shapes with memoryless params
            raise ConfigError(f"ArmtModel needs an ArmtConfig, got {armt!r} (a plain Llama: "
                              f"LlamaModel)")
        params = _initial_params("ArmtModel", cfg, armt, rngs, params, dtype)
        check_shapes(params, cfg, armt)
        self.cfg, self.armt = cfg, armt
        self._hold(params)

    def __call__(self, tokens: jax.Array, *, schedule: str = "diagonal", output: str = "logits",
                 compute_loss: bool = False, loss_mask: jax.Array | None = None,
                 **kwargs) -> ArmtOutput:
        forward = schedule_forward(schedule)
        return forward(self.param_tree(), tokens, self.cfg, self.armt, output=output,
                       compute_loss=compute_loss, loss_mask=loss_mask, **kwargs)

    def generate(self, tokens: jax.Array, **kwargs) -> GenerateOutput:
        """See armt_jax.generate.generate."""
        return generate(self.param_tree(), tokens, self.cfg, self.armt, **kwargs)

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "ArmtModel":
        """An Orbax checkpoint written by `save` (configs stored beside the arrays)."""
        from armt_jax.checkpoint import load_checkpoint
        params, cfg, armt = load_checkpoint(path)
        if armt is None:
            raise ConfigError(f"checkpoint {path} holds a plain Llama, no ARMT memory: convert it "
                              f"with memory (armt convert --with-memory) or load it with "
                              f"LlamaModel.from_checkpoint")
        return cls(cfg, armt, params=params)

    def save(self, path: str | Path) -> None:
        from armt_jax.checkpoint import save_checkpoint
        save_checkpoint(path, self.param_tree(), self.cfg, self.armt)
