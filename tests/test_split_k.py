"""Few-row products on the grouped-matmul kernel with k split over its groups (kernels/split_k.py):
a decode step's projections, one row per sequence, reading a layer of stacked weights in place.

CPU tests run the kernel in Pallas' GPU interpret mode (4 simulated SMs, 64 x 128 CTA tiles,
64-element k-steps); GPU tests skip unless the default device is a Hopper GPU."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from conftest import all_eqns, fresh_rng, rel_err_finite, weight_window_oracle
from kernels import ops, split_k

on_gpu = pytest.mark.skipif(
    jax.devices()[0].platform != "gpu" or not kernels.on_hopper(), reason="needs a Hopper GPU")


def _kernel_outputs(f, *args):
    """(shape, dtype) of every Pallas kernel output in f's jaxpr, nested jaxprs included (jax
    0.11 stages a Mosaic GPU kernel as an mpmd_map, earlier versions as a pallas_call)."""
    return [(tuple(v.aval.shape), v.aval.dtype)
            for eqn in all_eqns(jax.make_jaxpr(f)(*args).jaxpr)
            if eqn.primitive.name in ("pallas_call", "mpmd_map") for v in eqn.outvars]


@pytest.mark.parametrize("m", [1, 5, 8, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_few_rows_match_float64(m, dtype):
    """Forward and both gradients of x [G, m, k] @ w[g + off] (w: 5 stacked groups) for few rows
    (ragged: not multiples of 8), a random window and active range, against float64; idle groups
    and weights outside the window are exactly zero."""
    rng, info = fresh_rng()
    g, gw, k, n = 2, 5, 512, 128
    x = jnp.asarray(rng.standard_normal((g, m, k)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((gw, k, n)) / np.sqrt(k), jnp.float32).astype(dtype)
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)
    off = int(rng.integers(0, gw - g + 1))
    lo = int(rng.integers(0, g + 1))
    hi = int(rng.integers(lo, g + 1))
    info = f"{info} m={m} off={off} lo={lo} hi={hi} {jnp.dtype(dtype).name}"

    def loss(x, w, lo, hi, off):
        y = kernels.grouped_matmul(x, w, (lo, hi), weight_offset=off, impl="interpret")
        return jnp.sum(y.astype(jnp.float32) * cot), y

    args = (x, w, jnp.int32(lo), jnp.int32(hi), jnp.int32(off))
    # The forward is the split-k kernel: float32 partials of G * S groups (S = 2 on 4 SMs).
    splits = split_k.num_splits(g, k, n, ops.INTERPRET_CONFIG, ops.INTERPRET_NUM_SMS)
    assert splits == 2
    rows = -(-m // 8) * 8
    assert ((g * splits, rows, n), jnp.float32) in _kernel_outputs(
        lambda *a: loss(*a)[1], *args), info
    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(*args)
    y_want, dx_want, dw_want = weight_window_oracle(x, w, lo, hi, off, cot)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert y.dtype == dtype and y.shape == (g, m, n) and dw.shape == w.shape, info
    for name, got, want in (("y", y, y_want), ("dx", dx, dx_want), ("dw", dw, dw_want)):
        if np.abs(want).max() == 0:   # nothing active
            assert np.all(np.asarray(got, np.float32) == 0), f"{name} {info}"
        else:
            assert rel_err_finite(got, want) <= tol, f"{name} {info}"
    y32, dw32 = np.asarray(y, np.float32), np.asarray(dw, np.float32)
    for i in [*range(lo), *range(hi, g)]:
        assert np.all(y32[i] == 0), f"idle group {i} {info}"
    for i in [*range(lo + off), *range(hi + off, gw)]:
        assert np.all(dw32[i] == 0), f"dw of weight group {i} outside the window {info}"


def test_bfloat16_result_is_rounded_once():
    """The float32 partials are summed before the one rounding to bfloat16: the result equals
    the float64 product rounded to bfloat16 up to float32 summation error (a sum of S rounded
    bfloat16 partials would be off by several bfloat16 ulps where the partials cancel)."""
    rng, info = fresh_rng()
    k, n = 512, 128
    x = jnp.asarray(rng.standard_normal((1, 8, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((1, k, n)), jnp.bfloat16)
    y = np.asarray(kernels.grouped_matmul(x, w, impl="interpret"), np.float32)
    want = np.asarray(x[0], np.float64) @ np.asarray(w[0], np.float64)
    rounded = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32)
    ulp = np.abs(rounded) * 2.0 ** -7
    assert np.all(np.abs(y[0] - rounded) <= ulp + 1e-6), info


def test_number_of_splits():
    """S: the smallest power of two whose work items (groups x 128-column tiles x S) fill the
    132 SMs, k / S a multiple of the 128-element k-step."""
    cfg = split_k.CONFIG
    s = lambda g, k, n: split_k.num_splits(g, k, n, cfg, 132)
    # Llama-3.2-1B decode: qkv 24 column tiles, o 16, gate/up 128, down 16
    assert [s(1, 2048, 3072), s(1, 2048, 2048), s(1, 2048, 16384), s(1, 8192, 2048)] == [8, 16, 2, 16]
    # Llama-3.1-8B: qkv 48, o 32, gate/up 224, down 32 (k = 14336 = 112 k-steps)
    assert [s(1, 4096, 6144), s(1, 4096, 4096), s(1, 4096, 28672), s(1, 14336, 4096)] == [4, 8, 1, 8]
    assert s(16, 2048, 2048) == 1          # enough groups
    assert s(1, 384, 2048) == 1            # 3 k-steps do not split in two
    assert s(1, 512, 2048) == 4            # 4 k-steps: at most 4 slices


def test_routing():
    """Forward products of fewer than 64 rows take split-k on the kernel paths (not the plain
    kernel); 64 rows and transposed products do not; on the CPU "auto" is XLA; "pallas" off
    Hopper is an error naming the fix."""
    z = lambda *s: jnp.zeros(s, jnp.bfloat16)
    fwd = lambda x, w: kernels.grouped_matmul(x, w, impl="interpret")
    assert _kernel_outputs(fwd, z(1, 8, 256), z(1, 256, 128)) == [((4, 8, 128), jnp.float32)]
    assert _kernel_outputs(fwd, z(1, 64, 256), z(1, 256, 128)) == [((1, 64, 128), jnp.bfloat16)]
    dx = lambda dy, w: ops._dispatch(dy, w, jnp.array([0, 1, 0, 0]), transpose_lhs=False,
                                     transpose_rhs=True, out_dtype=jnp.bfloat16, out_groups=1,
                                     impl="interpret", config=None, strict=False)
    assert _kernel_outputs(dx, z(1, 8, 128), z(1, 256, 128)) == [((1, 8, 256), jnp.bfloat16)]
    # a k-step that does not divide k: no split path; the plain kernel serves it
    assert split_k.unsupported_reason((1, 8, 320), (1, 320, 128), jnp.bfloat16, split_k.CONFIG,
                                      132) is not None
    assert kernels.kernel_path("interpret") and not kernels.kernel_path("xla")
    assert kernels.kernel_path("auto") == kernels.kernel_path("pallas") == kernels.on_hopper()
    if not kernels.on_hopper():
        auto = lambda x, w: kernels.grouped_matmul(x, w, impl="auto")
        assert _kernel_outputs(auto, z(1, 8, 256), z(1, 256, 128)) == []
        with pytest.raises(ValueError, match=r"impl='pallas'.*Hopper"):
            kernels.grouped_matmul(z(1, 8, 256), z(1, 256, 128), impl="pallas")


DECODE_SHAPES = {  # Llama-3.2-1B (k, n) of the decode's products
    "qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048)}


@on_gpu
@pytest.mark.parametrize("name", list(DECODE_SHAPES))
def test_gpu_decode_products(name):
    """The 1B decode products at 1, 8 and 40 rows reading one of 4 stacked layers under "auto":
    the split-k kernel (lowered as Mosaic GPU), against float64; the SwiGLU op at 8 rows takes
    it too (unfused)."""
    rng, info = fresh_rng()
    k, n = DECODE_SHAPES[name]
    w = jnp.asarray(rng.standard_normal((4, k, n)) / np.sqrt(k), jnp.bfloat16)
    w64 = np.asarray(w, np.float64)
    product = jax.jit(lambda x, w, layer: kernels.grouped_matmul(x, w, weight_offset=layer))
    for m in (1, 8, 40):
        x = jnp.asarray(rng.standard_normal((1, m, k)), jnp.bfloat16)
        layer = int(rng.integers(0, 4))
        tag = f"{info} {name} m={m} layer={layer}"
        assert "mosaic_gpu" in product.lower(x, w, layer).as_text(), tag
        want = np.asarray(x[0], np.float64) @ w64[layer]
        assert rel_err_finite(product(x, w, layer)[0], want) <= 1e-2, tag
        if name == "gate_up" and m == 8:
            swiglu = jax.jit(lambda x, w, layer: kernels.grouped_matmul_swiglu(
                x, w, weight_offset=layer))
            assert "mosaic_gpu" in swiglu.lower(x, w, layer).as_text(), tag
            gate, up = np.split(want, 2, axis=-1)
            assert rel_err_finite(swiglu(x, w, layer)[0], gate / (1 + np.exp(-gate)) * up) <= 1e-2, tag


def test_float32_output_only_on_the_split_path():
    """The kernel writes float32 partials for split-k, but a plain product asking for a float32
    result from bfloat16 inputs stays off the kernel: "interpret" refuses it, naming the dtypes,
    "auto" runs XLA."""
    x, w = jnp.zeros((1, 64, 128), jnp.bfloat16), jnp.zeros((1, 128, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="output dtype float32 != input dtype bfloat16"):
        kernels.grouped_matmul(x, w, impl="interpret", preferred_element_type=jnp.float32)
    auto = kernels.grouped_matmul(x, w, impl="auto", preferred_element_type=jnp.float32)
    assert auto.dtype == jnp.float32
