"""Fused gate/up projection and SwiGLU: ``silu(x[g] @ w_gate) * (x[g] @ w_up)`` per group.

The first half of a Llama MLP as one grouped product: ``w`` holds [gate | up]
columns (``[G(+), k, 2F]``, the layout of the stacked ``w_gate_up`` weights) and
the result is ``[G, m, F]``. On the kernel path the activation is applied to the
float32 accumulators in the epilogue, so the 2F-wide intermediate never reaches
memory; the unfused path writes it and reads it back (on the 1B model at 131072
tokens that elementwise pass alone took ~30 ms of a ~0.6 s forward on an H200,
eval/results/profile_h200/diagonal_pallas_131072.json).

Implementations (``impl``, as for ``grouped_matmul``):

* ``"xla"``: the XLA grouped matmul, then ``silu(gate) * up`` (the oracle);
* ``"pallas"`` / ``"interpret"``: the fused Mosaic GPU kernel
  (``grouped_matmul_mgpu(..., swiglu=True)``); ValueError if it cannot serve the
  problem;
* ``"auto"``: the fused kernel on a Hopper GPU when it serves the problem, else
  the unfused composition of ``grouped_matmul(impl="auto")`` and the activation.
  On an H200 (eval/results/grouped_matmul_h200.md, profiled device time) the
  fused op takes 0.92 / 0.94 / 0.96 of the unfused one's time on the 1B / 3B /
  8B gate/up shapes, and the 131072-token diagonal forward 0.97;
* with fewer than 64 rows (a decode step's) every impl runs unfused: the
  gate/up product takes ``kernels/split_k.py`` on the kernel paths (H200, 1B
  gate/up at 8 rows: 38 us against the fused kernel's 50,
  eval/results/generate_h200.md).

Active range and weight offset work as in ``grouped_matmul``: idle groups give
zeros and no gradient. Under differentiation the forward runs unfused and keeps
the [gate | up] product for the backward (the fused kernel serves inference: a
training step would otherwise pay a second gate/up matmul to recompute it); dx
and dw are ``grouped_matmul``'s backward products.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import grouped_matmul_mgpu as mgpu_kernel
from kernels import ops, split_k


def grouped_matmul_swiglu(x, w, active=None, *, weight_offset=None, impl: str = "auto",
                          config: mgpu_kernel.TuningConfig | None = None):
    """``silu(x[g] @ w[g + o][:, :F]) * (x[g] @ w[g + o][:, F:])`` for lo <= g < hi, else 0.

    Args:
      x: [G, m, k]; w: [G, k, 2F] (or [Gw >= G, k, 2F] with ``weight_offset``).
      active, weight_offset: as for ``grouped_matmul`` (traced values allowed).
      impl: "auto" | "pallas" | "xla" | "interpret" (module docstring).
      config: a TuningConfig for the fused kernel (default SWIGLU_CONFIG, or the small
        interpret-mode tiles under "interpret").

    Returns:
      [G, m, F] in x.dtype.
    """
    ops._check_impl(impl)
    ops._check_operands(x, w, weight_offset is not None)
    if w.shape[2] % 2:
        raise ValueError(f"grouped_matmul_swiglu: w needs [gate | up] columns (an even number),"
                         f" got w {tuple(w.shape)}")
    bounds = jnp.stack(ops.active_range_and_offset(x, w, active, weight_offset))
    all_groups = active is None
    few_rows = x.shape[1] < split_k.MAX_ROWS   # a decode step's: split-k gate/up, unfused
    if not few_rows and (impl in ("pallas", "interpret")
                         or (impl == "auto" and _fused_serves(x, w, config))):
        return _fused(impl, config, all_groups, x, w, bounds)
    return _unfused(x, w, bounds, impl, all_groups)


def _fused_config(impl, config):
    return config or (ops.INTERPRET_CONFIG if impl == "interpret" else mgpu_kernel.SWIGLU_CONFIG)


def _fused_serves(x, w, config):
    """Whether "auto" takes the fused kernel: a Hopper GPU and a problem it serves."""
    return ops._kernel_serves(x, w, jnp.promote_types(x.dtype, w.dtype), False, False, "auto",
                              _fused_config("auto", config), strict=False, swiglu=True)


def _swiglu(gate_up):
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _gate_up(x, w, bounds, impl, all_groups, out_dtype=None):
    lo, hi, offset = bounds
    return ops.grouped_matmul(x, w, None if all_groups else (lo, hi), weight_offset=offset,
                              impl=impl, preferred_element_type=out_dtype)


def _unfused(x, w, bounds, impl, all_groups):
    return _swiglu(_gate_up(x, w, bounds, impl, all_groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(impl, config, all_groups, x, w, bounds):
    del all_groups
    lo, hi, offset = bounds
    cfg = _fused_config(impl, config)
    ops._kernel_serves(x, w, jnp.promote_types(x.dtype, w.dtype), False, False, impl, cfg,
                       strict=True, swiglu=True)   # raises, naming the shapes, if it cannot
    out = ops._run_kernel(x, w, ops._bounds(lo, hi, offset, 0), False, False, x.shape[0], impl,
                          cfg, swiglu=True)
    return out.astype(x.dtype)


def _fused_fwd(impl, config, all_groups, x, w, bounds):
    # Differentiated, the forward runs unfused and keeps [gate | up] for the backward: one
    # grouped matmul, where the fused kernel would need a second one (a recompute) there. So
    # training costs what the unfused path costs; the forward value under differentiation is the
    # unfused one (it differs from the fused result by bf16 rounding).
    del config
    # in the kernel's (promoted) dtype, as the fused kernel computes it: bf16 x with float32 w
    # runs a float32 product
    gate_up = _gate_up(x, w, bounds, impl, all_groups, jnp.promote_types(x.dtype, w.dtype))
    return _swiglu(gate_up).astype(x.dtype), (x, w, bounds, gate_up)


def _fused_bwd(impl, config, all_groups, res, dh):
    del config
    x, w, bounds, gate_up = res
    _, activation_vjp = jax.vjp(_swiglu, gate_up)
    (d_gate_up,) = activation_vjp(dh.astype(gate_up.dtype))
    # dx, dw of the gate/up product: grouped_matmul's own backward (active groups only)
    return ops._gmm_bwd(impl, gate_up.dtype, None, all_groups, (x, w, bounds), d_gate_up)


_fused.defvjp(_fused_fwd, _fused_bwd)
