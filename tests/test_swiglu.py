"""Tests of kernels.grouped_matmul_swiglu (fused gate/up projection + SwiGLU) against a float64
NumPy oracle written here.

CPU tests run the fused Mosaic GPU kernel under Pallas' GPU interpret mode, which fills the
kernel's output with NaN before it runs (an unwritten element shows up). Inputs are fresh random
draws on every run; the seed is in every assertion message. The GPU test skips without a Hopper
GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (all_eqns, assert_batch_invariant, fresh_rng, rel_err_finite,
                      skip_deferral_on_one_core)

import kernels
from kernels import grouped_matmul_mgpu as mgpu_kernel
from kernels import ops

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _oracle(x, w, lo, hi, off, cot):
    """float64 forward h = silu(x @ gate) * (x @ up) and the gradients of sum(h * cot)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    g, F = x.shape[0], w.shape[2] // 2
    h, dx, dw = np.zeros((g, x.shape[1], F)), np.zeros_like(x), np.zeros_like(w)
    for i in range(lo, hi):
        gate, up = x[i] @ w[i + off][:, :F], x[i] @ w[i + off][:, F:]
        sig = 1 / (1 + np.exp(-gate))
        h[i] = gate * sig * up
        d_gate = cot[i] * up * sig * (1 + gate * (1 - sig))
        d_up = cot[i] * gate * sig
        d_gate_up = np.concatenate([d_gate, d_up], axis=-1)
        dx[i] = d_gate_up @ w[i + off].T
        dw[i + off] = x[i].T @ d_gate_up
    return h, dx, dw


def _operands(rng, g, gw, m, k, F, dtype):
    x = jnp.asarray(rng.standard_normal((g, m, k)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((gw, k, 2 * F)) / np.sqrt(k), jnp.float32).astype(dtype)
    return x, w


def _loss_and_grads(impl, config=None):
    def loss(x, w, lo, hi, off, cot):
        h = kernels.grouped_matmul_swiglu(x, w, (lo, hi), weight_offset=off, impl=impl,
                                          config=config)
        return jnp.sum(h.astype(jnp.float32) * cot), h
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _check(impl, dtype, g, gw, m, k, F, ranges, rng, info, config=None):
    """The forward (the fused kernel on impl "interpret" / "pallas") and, differentiated (whose
    forward runs unfused), the value and both gradients against the float64 oracle."""
    x, w = _operands(rng, g, gw, m, k, F, dtype)
    cot = rng.standard_normal((g, m, F))
    fn = _loss_and_grads(impl, config)
    forward = jax.jit(lambda x, w, lo, hi, off: kernels.grouped_matmul_swiglu(
        x, w, (lo, hi), weight_offset=off, impl=impl, config=config))
    for lo, hi, off in ranges:
        tag = f"{info} impl={impl} {jnp.dtype(dtype).name} lo={lo} hi={hi} off={off}"
        (_, h), (dx, dw) = fn(x, w, jnp.int32(lo), jnp.int32(hi), jnp.int32(off),
                              jnp.asarray(cot, jnp.float32))
        h_want, dx_want, dw_want = _oracle(x, w, lo, hi, off, cot)
        h_fused = forward(x, w, jnp.int32(lo), jnp.int32(hi), jnp.int32(off))
        for got, what in ((h, "differentiated"), (h_fused, "forward")):
            assert got.shape == (g, m, F) and got.dtype == dtype, f"{what} {tag}"
            assert rel_err_finite(got, h_want) <= TOL[dtype], f"{what} {tag}"
            idle = [i for i in range(g) if not lo <= i < hi]
            assert np.all(np.asarray(got, np.float32)[idle] == 0), f"{what} idle not zero {tag}"
        if hi > lo:
            assert rel_err_finite(dx, dx_want) <= TOL[dtype], f"dx {tag}"
            assert rel_err_finite(dw, dw_want) <= TOL[dtype], f"dw {tag}"
        assert np.all(np.asarray(dx, np.float32)[idle] == 0), f"idle dx not zero {tag}"
        unused = [i for i in range(gw) if not lo + off <= i < hi + off]
        assert np.all(np.asarray(dw, np.float32)[unused] == 0), f"unused dw not zero {tag}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["interpret", "xla"])
def test_swiglu_matches_float64_oracle(impl, dtype):
    """Forward and both gradients, a window of 3 groups reading 3 of 5 stacked weights at an
    offset, ragged m (72 rows: one full and one partial 64-row tile), over several ranges
    including nothing active and everything active."""
    rng, info = fresh_rng()
    lo = int(rng.integers(0, 3))
    ranges = [(0, 3, 2), (lo, int(rng.integers(lo, 4)), int(rng.integers(0, 3))), (1, 1, 0)]
    _check(impl, dtype, 3, 5, 72, 128, 128, ranges, rng, info)


def test_swiglu_idle_nan_does_not_leak():
    """NaN in an idle group's input reaches neither the output nor either gradient."""
    rng, info = fresh_rng()
    x, w = _operands(rng, 3, 3, 72, 128, 128, jnp.float32)
    x = x.at[0].set(jnp.nan)
    for impl in ("interpret", "xla"):
        h = kernels.grouped_matmul_swiglu(x, w, (1, 3), impl=impl)
        assert np.all(np.asarray(h[0]) == 0) and np.all(np.isfinite(np.asarray(h))), info
        dx, dw = jax.grad(lambda x, w, impl=impl: jnp.sum(
            kernels.grouped_matmul_swiglu(x, w, (1, 3), impl=impl)), argnums=(0, 1))(x, w)
        assert np.all(np.asarray(dx[0]) == 0) and np.all(np.isfinite(np.asarray(dx))), info
        assert np.all(np.asarray(dw[0]) == 0) and np.all(np.isfinite(np.asarray(dw))), info


def test_swiglu_mixed_dtypes():
    """bf16 activations with float32 weights: the product runs in float32 (forward and
    gradients, fused or not), the output comes back in bf16, gradients in each input's dtype."""
    rng, info = fresh_rng()
    x, w = _operands(rng, 2, 3, 72, 128, 128, jnp.float32)
    x = x.astype(jnp.bfloat16)
    cot = rng.standard_normal((2, 72, 128))
    h_want, dx_want, dw_want = _oracle(x, w, 0, 2, 1, cot)
    for impl in ("interpret", "xla"):
        (_, h), (dx, dw) = _loss_and_grads(impl)(x, w, jnp.int32(0), jnp.int32(2), jnp.int32(1),
                                                  jnp.asarray(cot, jnp.float32))
        assert h.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
        for got, want, what in ((h, h_want, "h"), (dx, dx_want, "dx"), (dw, dw_want, "dw")):
            assert rel_err_finite(got, want) <= 1e-2, f"{what} {impl} {info}"


def _kernel_calls(jaxpr) -> int:
    """Kernel launches in a jaxpr and every jaxpr nested in it: pallas_call, or in GPU
    interpret mode the mpmd_map it traces to (one per launch)."""
    return sum(eqn.primitive.name in ("pallas_call", "mpmd_map") for eqn in all_eqns(jaxpr))


def test_swiglu_training_costs_what_unfused_costs():
    """Inference runs the fused kernel alone; a gradient runs three kernel products (gate/up kept
    for the backward, dx, dw), not the fused kernel plus a recompute of gate/up. The forward value
    under differentiation (unfused) matches the fused one to rounding."""
    rng, info = fresh_rng()
    x, w = _operands(rng, 2, 2, 72, 128, 128, jnp.float32)
    def loss(x, w):
        return jnp.sum(kernels.grouped_matmul_swiglu(x, w, (0, 2), impl="interpret") ** 2)
    assert _kernel_calls(jax.make_jaxpr(loss)(x, w).jaxpr) == 1, info
    grad_fn = jax.value_and_grad(loss, argnums=(0, 1))
    assert _kernel_calls(jax.make_jaxpr(grad_fn)(x, w).jaxpr) == 3, info
    value, _ = grad_fn(x, w)
    assert abs(float(value) / float(loss(x, w)) - 1) <= 1e-5, info


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="auto means xla only on CPU")
def test_swiglu_auto_off_gpu_equals_xla():
    rng, _ = fresh_rng()
    x, w = _operands(rng, 2, 2, 72, 128, 128, jnp.float32)
    got = kernels.grouped_matmul_swiglu(x, w, (0, 1))
    want = kernels.grouped_matmul_swiglu(x, w, (0, 1), impl="xla")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_swiglu_errors_name_the_shapes():
    rng, _ = fresh_rng()
    x, w = _operands(rng, 2, 2, 72, 128, 128, jnp.float32)
    with pytest.raises(ValueError, match=r"even number.*\(2, 128, 255\)"):
        kernels.grouped_matmul_swiglu(x, w[..., :255], impl="xla")
    with pytest.raises(ValueError, match=r"grouped_matmul_swiglu.*cannot serve.*b \(2, 128, 192\)"):
        kernels.grouped_matmul_swiglu(x, w[..., :192], impl="interpret")  # F = 96: no 128 tile
    with pytest.raises(ValueError, match="unknown impl"):
        kernels.grouped_matmul_swiglu(x, w, impl="cuda")


@pytest.mark.skipif(jax.devices()[0].platform != "gpu" or not kernels.on_hopper(),
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("delay", [1, 0], ids=["one_wgmma_in_flight", "wait_each_step"])
def test_gpu_swiglu_compiled(delay):
    """The compiled fused kernel (SWIGLU_CONFIG: one wgmma group in flight; and waiting for each
    k-step's wgmma), bf16, a 1b-like row count (1152), a window of 4 groups over 8 stacked
    weights, several ranges."""
    rng, info = fresh_rng()
    config = None if delay else dataclasses.replace(mgpu_kernel.SWIGLU_CONFIG, delay_release=0)
    _check("pallas", jnp.bfloat16, 4, 8, 1152, 2048, 1024,
           [(0, 4, 4), (1, 3, 2), (3, 4, 0), (2, 2, 1)], rng, info, config=config)


@pytest.mark.parametrize("impl", ["interpret", pytest.param("pallas", marks=pytest.mark.skipif(
    jax.devices()[0].platform != "gpu" or not kernels.on_hopper(), reason="needs a Hopper GPU"))])
def test_swiglu_batch_invariant(impl):
    """As the grouped matmul: a group's fused result is bitwise the same whatever groups run
    with it and wherever its window starts (tests/test_grouped_matmul.py::test_batch_invariant)."""
    rng, info = fresh_rng()
    g, gw, m, k, F, dtype = (4, 4, 1152, 2048, 1024, jnp.bfloat16) if impl == "pallas" else (
        3, 3, 72, 128, 128, jnp.float32)
    x, w = _operands(rng, g, gw, m, k, F, dtype)
    assert_batch_invariant(lambda x, w, lo, hi, off: kernels.grouped_matmul_swiglu(
        x, w, (lo, hi), weight_offset=off, impl=impl), x, w, info)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu" or not kernels.on_hopper(),
                    reason="needs a Hopper GPU")
def test_gpu_swiglu_auto_is_the_fused_kernel():
    """On Hopper "auto" runs the fused kernel where it serves (bitwise the "pallas" result) and
    the unfused composition where it does not (F = 96: no 128-wide tile)."""
    rng, info = fresh_rng()
    x, w = _operands(rng, 2, 2, 1152, 256, 256, jnp.bfloat16)
    got = kernels.grouped_matmul_swiglu(x, w, (0, 2))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(
        kernels.grouped_matmul_swiglu(x, w, (0, 2), impl="pallas"), np.float32), err_msg=info)
    narrow = kernels.grouped_matmul_swiglu(x, w[..., :192], (0, 2))
    want = kernels.grouped_matmul_swiglu(x, w[..., :192], (0, 2), impl="xla")
    assert rel_err_finite(narrow, want) <= 1e-2, info


@pytest.mark.parametrize("name", ["rows_split", "columns_split", "wrap", "wrap_delay0",
                                  "deferred_epilogue"])
def test_swiglu_tile_schedules(name):
    """The fused kernel (a gate and an up tile per stage) under the default's row split (two
    warpgroups of 64 rows, as in SWIGLU_CONFIG) and a column split, on 2 stages, and on 3
    stages (2 k-steps per tile, so the ring wraps across tiles) with and without one wgmma
    group in flight, and with the activation's last 32 x 32 epilogue tile of each warpgroup
    stored under the next tile's first k-step, 4 simulated SMs with several tiles each."""
    if name == "deferred_epilogue":
        skip_deferral_on_one_core()
    rng, info = fresh_rng()
    rows_split = mgpu_kernel.TuningConfig(tile_m=64, tile_n=64,
                                          wg_dimension=mgpu_kernel.MatmulDimension.M,
                                          max_concurrent_steps=2)
    config = {
        "rows_split": rows_split,
        "columns_split": ops.INTERPRET_CONFIG,
        "wrap": dataclasses.replace(rows_split, max_concurrent_steps=3),
        "wrap_delay0": dataclasses.replace(rows_split, max_concurrent_steps=3, delay_release=0),
        "deferred_epilogue": dataclasses.replace(rows_split, epi_tile_m=32, epi_tile_n=32,
                                                 deferred_epi_tiles=1),
    }[name]
    x, w = _operands(rng, 3, 3, 200, 128, 256, jnp.float32)
    for lo, hi in [(0, 3), (1, 2)]:
        h = kernels.grouped_matmul_swiglu(x, w, (lo, hi), impl="interpret", config=config)
        want, _, _ = _oracle(x, w, lo, hi, 0, np.zeros((3, 200, 256)))
        assert rel_err_finite(h, want) <= 1e-5, f"{info} {name} lo={lo} hi={hi}"
