"""Tests of kernels.grouped_matmul against the XLA einsum oracle.

CPU tests run the Mosaic GPU kernel itself under Pallas' GPU interpret mode
(impl="interpret", small tiles, 4 simulated SMs). Interpret mode fills every
buffer the kernel allocates (its output included) with NaN before the kernel
runs, so an output element the kernel fails to write shows up as NaN: the
output is poisoned before every call. Inputs are fresh random draws on every
run; the seed is part of every assertion message.

GPU tests (impl="pallas") skip unless the default device is a Hopper GPU.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

import kernels
from conftest import (assert_batch_invariant, fresh_rng, rel_err_finite,
                      skip_deferral_on_one_core, weight_window_oracle)
from kernels import grouped_matmul_mgpu as mgpu_kernel
from kernels import mgpu_tiles
from kernels import ops

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _operands(rng, g, m, k, n, dtype):
    x = jnp.asarray(rng.standard_normal((g, m, k)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), jnp.float32).astype(dtype)
    return x, w


def _random_range(rng, g):
    lo = int(rng.integers(0, g))
    hi = int(rng.integers(lo + 1, g + 1))
    return lo, hi


def _loss(x, w, lo, hi, cot, impl):
    y = kernels.grouped_matmul(x, w, (lo, hi), impl=impl)
    return jnp.sum(y.astype(jnp.float32) * cot)


# lo and hi are traced: one compilation per (impl, shape) serves every range.
_grad_fn = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)), static_argnums=5)
_fwd_fn = jax.jit(
    lambda x, w, lo, hi, impl: kernels.grouped_matmul(x, w, (lo, hi), impl=impl), static_argnums=4
)


def _loss_and_grads(impl, x, w, lo, hi, cot):
    return _grad_fn(x, w, jnp.int32(lo), jnp.int32(hi), cot, impl)


def _check_idle_zero(arr, lo, hi, what, info):
    arr = np.asarray(jnp.asarray(arr, jnp.float32))
    for g in [*range(0, lo), *range(hi, arr.shape[0])]:
        assert np.all(arr[g] == 0), f"{what}: idle group {g} not zero ({info})"


# --------------------------------------------------------------------------
# CPU: interpret mode against the einsum path.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_grads_match_einsum(dtype):
    rng, info = fresh_rng()
    g, m, k, n = 4, 72, 128, 128  # m = 72: ragged last row tile (tile 64)
    x, w = _operands(rng, g, m, k, n, dtype)
    lo, hi = _random_range(rng, g)
    info = f"{info} lo={lo} hi={hi} {jnp.dtype(dtype).name}"
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)

    y = kernels.grouped_matmul(x, w, (lo, hi), impl="interpret")
    y_ref = kernels.grouped_matmul(x, w, (lo, hi), impl="xla")
    assert y.dtype == x.dtype and y.shape == (g, m, n)
    assert rel_err_finite(y, y_ref) <= TOL[dtype], info
    _check_idle_zero(y, lo, hi, "output", info)

    (v, (dx, dw)) = _loss_and_grads("interpret", x, w, lo, hi, cot)
    (v_ref, (dx_ref, dw_ref)) = _loss_and_grads("xla", x, w, lo, hi, cot)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert rel_err_finite(dx, dx_ref) <= TOL[dtype], f"dx {info}"
    assert rel_err_finite(dw, dw_ref) <= TOL[dtype], f"dw {info}"
    _check_idle_zero(dx, lo, hi, "dx", info)
    _check_idle_zero(dw, lo, hi, "dw", info)


def test_ragged_contraction_in_dw_and_full_range():
    """m = 40 < one row tile: dw contracts over a ragged m (TMA zero fill)."""
    rng, info = fresh_rng()
    g, m, k, n = 3, 40, 64, 128
    x, w = _operands(rng, g, m, k, n, jnp.float32)
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)
    got = _loss_and_grads("interpret", x, w, 0, g, cot)
    want = _loss_and_grads("xla", x, w, 0, g, cot)
    assert rel_err_finite(got[0], want[0]) <= 1e-5, info
    for a, b, name in zip(got[1], want[1], ("dx", "dw")):
        assert rel_err_finite(a, b) <= 1e-5, f"{name} {info}"


def test_nothing_active():
    rng, info = fresh_rng()
    g, m, k, n = 3, 64, 64, 128
    x, w = _operands(rng, g, m, k, n, jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)
    for lo in (0, 3):
        y = _fwd_fn(x, w, jnp.int32(lo), jnp.int32(lo), "interpret")
        assert np.all(np.asarray(y, np.float32) == 0), f"lo=hi={lo} {info}"
    _, (dx, dw) = _loss_and_grads("interpret", x, w, 1, 1, cot)
    assert np.all(np.asarray(dx, np.float32) == 0), info
    assert np.all(np.asarray(dw, np.float32) == 0), info


def test_default_hopper_tiles_in_interpret_mode():
    """The GPU block sizes (128 x 256 CTA tiles, 4 stages), ragged m."""
    rng, info = fresh_rng()
    g, m, k, n = 3, 136, 256, 256
    x, w = _operands(rng, g, m, k, n, jnp.bfloat16)
    lo, hi = 1, 3
    y = kernels.grouped_matmul(x, w, (lo, hi), impl="interpret", config=mgpu_kernel.DEFAULT_CONFIG)
    y_ref = kernels.grouped_matmul(x, w, (lo, hi), impl="xla")
    assert rel_err_finite(y, y_ref) <= 1e-2, info
    _check_idle_zero(y, lo, hi, "output", info)


def test_wave_fill_and_the_ping_pong_choice():
    """select_config picks the ping-pong schedule where its half-size work items fill the SMs'
    last wave clearly better than the default CTA tiles (the H200 A/B of grouped_matmul_h200.md)
    and the 192 x 192 tiles would cost more (e.g. 3b qkv at G = 2, 3b gate_up at G = 1), and
    never for the backward products (not measured) or narrow n."""
    fill = mgpu_kernel.wave_fill
    assert fill(0, 132) == 1.0 and fill(132, 132) == 1.0 and fill(264, 132) == 1.0
    assert fill(133, 132) == pytest.approx(133 / 264) and fill(66, 132) == 0.5
    pick = lambda *dims, **kw: mgpu_kernel.select_config(*dims, num_sms=132, **kw)
    pp, default = mgpu_kernel.PINGPONG_CONFIG, mgpu_kernel.DEFAULT_CONFIG
    # 3b qkv at G = 2: 2 x 17 x 20 = 680 CTA tiles, 5.15 waves (fill 0.859); 1360 items: 10.3
    # (fill 0.937); 192 x 192 tiles: 384, cost 1.02 of ping-pong's
    assert pick(2, 2176, 3072, 5120) == pp and pick(1, 2176, 3072, 16384) == pp
    assert pick(2, 2176, 3072, 5120, transpose_lhs=True) != pp
    assert pick(2, 2176, 3072, 5120, transpose_rhs=True) != pp
    # ping-pong's choices before the 192 x 192 tiles took them (no more cost: 1b qkv at G = 4,
    # 1b gate_up at G = 1; test_wide_choice_off_full_load); at G = 16 1b qkv's 1728 tiles fill
    # 0.935 against ping-pong's 0.970, but 192 x 192 tiles take it (rule 3)
    for dims in [(4, 1152, 2048, 3072), (1, 1152, 2048, 16384), (16, 1152, 2048, 3072)]:
        assert pick(*dims) == mgpu_kernel.WIDE_THREE_WG_CONFIG, dims
    for dims in [(16, 1152, 2048, 16384), (16, 2176, 3072, 5120), (16, 2176, 3072, 3072),
                 (1, 1152, 2048, 3072)]:
        assert pick(*dims) == default, dims
    for dims in [(16, 4224, 4096, 4096), (32, 4224, 4096, 4096)]:   # the default tiles, in
        assert pick(*dims) == mgpu_kernel.ROW_STRIPE_CONFIG, dims   # rule 8's row stripes
    assert pick(16, 1152, 2048, 384) == mgpu_kernel.NARROW_CONFIG   # n no multiple of 256
    # the rule follows the SM count: 108 SMs (an A100-sized part) fill 1b qkv's tiles alike
    assert mgpu_kernel.select_config(16, 1152, 2048, 3072, num_sms=108) == default


def test_three_warpgroup_choice():
    """select_config takes 192 x 128 tiles of three warpgroups where tile_cost (waves x tile
    area) promises at most 0.85 of the default's time, at any G and for every product: the 1b
    products with few tiles (the H200 A/B: 1.20-1.30x the default's speed at G = 1), and no
    others (where the model promised no gain, the A/B found none); unless rules 6 / 7 take
    128 x 160 or 192 x 192 tiles in their place."""
    pick = lambda *dims, tl=False, tr=False: mgpu_kernel.select_config(
        *dims, transpose_lhs=tl, transpose_rhs=tr, num_sms=132)
    three = mgpu_kernel.THREE_WG_CONFIG
    assert three.cta_tile_m == 192 and three.cta_tile_n == 128
    assert pick(1, 1152, 2048, 2048) == three                      # 1b o: 96 vs 72 tiles
    assert pick(1, 1152, 8192, 2048) == three                      # 1b down
    # a dx product (128 x 160 / 192 x 192 tiles would cost 1.25 / 1.5 of these; the diagonal
    # shapes' dx products take those: test_sm_fit_dx_choice, test_wide_choice_off_full_load)
    assert pick(1, 1152, 2048, 5120, tr=True) == three
    assert pick(1, 2048, 1152, 3072, tl=True) == three             # 1b qkv dw: 264 vs 192 tiles
    assert pick(1, 3072, 2176, 3072, tl=True) == three             # 3b o dw
    assert pick(1, 2048, 1152, 2048, tl=True) != three             # 1b o dw: 2 waves vs 1
    assert pick(1, 1152, 2048, 3072) != three                      # 144 tiles: two waves
    assert pick(1, 1152, 2048, 16384) != three                     # cost 0.9 (192 x 192 tiles)
    # 1b o at G = 4: 384 tiles against 288, 3 waves each; 264 of 192 x 192, 2 waves, no more cost
    assert pick(4, 1152, 2048, 2048) == mgpu_kernel.WIDE_THREE_WG_CONFIG
    assert pick(8, 1152, 2048, 2048) != three                      # 6 vs 5 waves: cost 0.9
    assert pick(16, 1152, 2048, 2048) != three                     # even waves
    assert pick(1, 64, 2048, 2048) != three                        # too few rows to serve
    why = lambda cfg, swiglu=False: mgpu_kernel.unsupported_reason(
        (1, 1152, 2048), (1, 2048, 4096), jnp.bfloat16, jnp.bfloat16, config=cfg, swiglu=swiglu)
    assert why(three) is None
    assert "compute_wgs" in why(dataclasses.replace(three, compute_wgs=4))
    by_columns = dataclasses.replace(three, wg_dimension=mgpu_kernel.MatmulDimension.N)
    assert "compute_wgs" in why(by_columns)
    assert why(three, swiglu=True) is not None
    assert mgpu_kernel.tile_cost(three, 1, 1152, 2048, 132) == 192 * 128
    assert mgpu_kernel.tile_cost(mgpu_kernel.DEFAULT_CONFIG, 1, 1152, 8192, 132) == 3 * 128 * 256


def test_wide_three_warpgroup_choice():
    """select_config takes 192 x 192 tiles of three warpgroups for forward and dx products with
    whole 192-row tiles that span >= 8 waves of default tiles where tile_cost promises no more
    than the default's time:
    the 1b products at G = 16 (1-3 % faster than the choice before in two H200 A/B runs), not
    the 3b / 8b ones (cost 1.01-1.08, 0.3-5.6 % slower), not dw (slower). (Off full load,
    rule 7 takes them where they cost no more: test_wide_choice_off_full_load.)"""
    pick = lambda *dims, tl=False, tr=False: mgpu_kernel.select_config(
        *dims, transpose_lhs=tl, transpose_rhs=tr, num_sms=132)
    wide = mgpu_kernel.WIDE_THREE_WG_CONFIG
    assert (wide.cta_tile_m, wide.cta_tile_n) == (192, 192)
    for dims in [(16, 1152, 2048, 3072), (16, 1152, 2048, 2048), (16, 1152, 8192, 2048)]:
        assert pick(*dims) == wide, dims                          # 1b qkv, o, down
    for dims in [(16, 1152, 3072, 2048), (16, 1152, 2048, 2048), (16, 1152, 16384, 2048)]:
        assert pick(*dims, tr=True) == wide, dims                 # 1b qkv, o, gate/up dx
    assert pick(16, 1152, 2048, 8192, tr=True) != wide            # 1b down dx: cost 1.03
    assert pick(16, 1152, 2048, 16384) != wide                    # 1b gate/up: cost 1.01
    assert pick(16, 2048, 1152, 2048, tl=True) != wide            # 1b o dw
    for dims in [(16, 2176, 3072, 5120), (16, 2176, 3072, 3072), (16, 4224, 4096, 6144),
                 (16, 4224, 4096, 4096), (16, 4224, 14336, 4096)]:
        assert pick(*dims) != wide, dims                          # 3b, 8b (clusters: below)
    assert pick(1, 1152, 2048, 2048) != wide                      # 66 tiles (G = 2-8: rule 7)
    assert pick(1, 2176, 3072, 16384) != wide                     # 3b gate/up: ragged rows
    assert mgpu_kernel.tile_cost(wide, 16, 1152, 2048, 132) == 8 * 192 * 192
    why = lambda w_shape, tr: mgpu_kernel.unsupported_reason(
        (16, 1152, 2048), w_shape, jnp.bfloat16, jnp.bfloat16, transpose_rhs=tr, config=wide)
    assert why((16, 2048, 3072), False) is None and why((16, 3072, 2048), True) is None


def test_wide_choice_off_full_load():
    """For forward and dx products select_config takes the 192 x 192 tiles wherever tile_cost
    promises no more than its other choice's time, ragged rows and few waves included (rule 7;
    rule 3 asks for whole 192-row tiles and 8 waves of default tiles). In the H200 A/B runs
    s18_wide_select and s18_wide_fwd: on dx 1.02-1.20x the choice before at G = 2, 1.05-1.08x at
    G = 4, 1.11-1.13x at G = 8 (1b); forward 1.04-1.25x (1b qkv at G = 4, 8, 1b o at G = 2-8;
    3b o, down at G = 2). Not at G = 1 but on 1b down dx (1b: 66 tiles, cost 1.8; 3b: 1.2),
    not 3b at G >= 8 or 8b (cost 1.004-1.09), not where it cost more on the forward products
    (1b qkv at G = 2: 1.125, 0.90x; 3b gate_up at G = 4: 1.09, 0.95x), never for dw, never
    over the clustered 192 x 192 tiles."""
    pick = lambda *dims: mgpu_kernel.select_config(*dims, transpose_rhs=True, num_sms=132)
    fwd = lambda *dims: mgpu_kernel.select_config(*dims, num_sms=132)
    wide = mgpu_kernel.WIDE_THREE_WG_CONFIG
    for g in (2, 4, 8):
        assert fwd(g, 1152, 2048, 2048) == wide, g               # 1b o (cost 0.75, 1.0, 1.0)
        assert fwd(g, 1152, 8192, 2048) == wide, g               # 1b down (same m, n)
    for g in (4, 8):
        assert fwd(g, 1152, 2048, 3072) == wide, g               # 1b qkv (cost 0.96)
    assert fwd(2, 1152, 2048, 3072) != wide                      # cost 1.125
    assert fwd(2, 2176, 3072, 3072) == wide and fwd(2, 2176, 8192, 3072) == wide   # 3b o, down
    for g in (4, 8):
        assert fwd(g, 2176, 3072, 16384) != wide, g              # 3b gate_up: cost 1.07-1.09
    assert fwd(16, 4224, 4096, 6144) == mgpu_kernel.WIDE_CLUSTER_N_CONFIG   # 8b qkv: clusters
    assert mgpu_kernel.select_config(2, 2048, 1152, 2048, transpose_lhs=True,
                                     num_sms=132) != wide        # dw
    for g in (2, 4, 8, 16):
        for k in (3072, 2048, 16384):                            # 1b qkv, o, gate/up dx
            assert pick(g, 1152, k, 2048) == wide, (g, k)
    for g in (2, 4):
        for k in (5120, 3072, 16384):                            # 3b qkv, o, gate/up dx
            assert pick(g, 2176, k, 3072) == wide, (g, k)        # 12 row tiles, the last 64
    for g in (1, 8, 16):
        assert pick(g, 2176, 3072, 3072) != wide, g              # cost 1.2, 1.04, 1.08
    assert pick(1, 1152, 2048, 2048) == mgpu_kernel.SM_FIT_DX_CONFIG          # cost 1.8
    assert pick(16, 1152, 2048, 8192) == mgpu_kernel.DEFAULT_CONFIG           # cost 1.03
    for g in (1, 2, 4, 8, 16):
        for k, n in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:   # 8b dx:
            assert pick(g, 4224, k, n) == mgpu_kernel.ROW_STRIPE_CONFIG, (g, k, n)   # rule 8
    # the forward products keep rule 3's conditions (1b qkv at G = 2: 1.6 waves of defaults)
    assert mgpu_kernel.select_config(2, 1152, 2048, 3072, num_sms=132) != wide
    cost = lambda c, g, m, n: mgpu_kernel.tile_cost(c, g, m, n, 132)
    assert cost(wide, 2, 1152, 2048) == 36864                    # 132 tiles: one wave
    assert cost(wide, 2, 2176, 3072) == 3 * 36864                # 384 tiles: 2.9 waves


def test_wide_cluster_choice():
    """select_config takes the 192 x 192 tiles in 2-CTA clusters along n where the unclustered
    ones qualify but for a tile_cost of at most 1.01 of the default's and the column tiles pair
    up: 8b qkv and gate/up forward (cost 1.008, 1.005; 32 and 150 column tiles), 1.6-8.0 %
    faster than the default in the H200 A/B at G = 1, 8, 16. Not 8b o or down (cost 1.037;
    0.6-1.9 % slower), not 8b down dx (75 column tiles; clustered along m it won one run and
    lost the next), not the 3b shapes (ragged rows), not the 1b ones (unclustered tiles where
    they cost no more than the default; no gain from clusters there), and not dw."""
    pick = lambda *dims, tl=False, tr=False: mgpu_kernel.select_config(
        *dims, transpose_lhs=tl, transpose_rhs=tr, num_sms=132)
    along_n, along_m = mgpu_kernel.WIDE_CLUSTER_CONFIGS
    assert mgpu_kernel.WIDE_CLUSTER_N_CONFIG == along_n
    assert along_n.cluster_dimension == mgpu_kernel.MatmulDimension.N
    assert along_m.cluster_dimension == mgpu_kernel.MatmulDimension.M
    for c in (along_n, along_m):
        assert (c.cta_tile_m, c.cta_tile_n) == (192, 192)
        assert dataclasses.replace(c, cluster_dimension=None, deferred_epi_tiles=1) == (
            mgpu_kernel.WIDE_THREE_WG_CONFIG)   # clusters take no deferred epilogue tiles
    default = mgpu_kernel.ROW_STRIPE_CONFIG   # the default tiles on the 8b shapes (rule 8)
    for g in (1, 8, 16):
        assert pick(g, 4224, 4096, 28672) == along_n, g         # 8b gate/up (28 waves at G = 1)
    for g in (8, 16):
        assert pick(g, 4224, 4096, 6144) == along_n, g          # 8b qkv (cost 1.008)
    assert pick(1, 4224, 4096, 6144) == default                 # 6 waves of default tiles
    assert pick(2, 4224, 4096, 6144) == default                 # cost 1.031
    assert pick(16, 4224, 4096, 14336, tr=True) == default      # 8b down dx: 75 column tiles
    for dims in [(16, 4224, 4096, 4096), (16, 4224, 14336, 4096)]:            # 8b o, down
        assert pick(*dims) == default, dims
    for dims in [(16, 4224, 6144, 4096), (16, 4224, 4096, 4096), (16, 4224, 28672, 4096)]:
        assert pick(*dims, tr=True) == default, dims            # 8b qkv, o, gate/up dx
    assert pick(16, 4096, 4224, 6144, tl=True) == mgpu_kernel.DW_ROW_STRIPE_CONFIG  # 8b qkv dw
    default = mgpu_kernel.DEFAULT_CONFIG                        # 1b / 3b: the default order
    assert pick(16, 2176, 3072, 16384) == default               # 3b gate/up: ragged rows
    assert pick(16, 1152, 2048, 16384) == default               # 1b gate/up: cost 1.0125
    assert pick(16, 1152, 2048, 3072) == mgpu_kernel.WIDE_THREE_WG_CONFIG   # 1b qkv: 0.96
    # along n needs an even number of column tiles, along m an even number of row tiles
    why = lambda c, m, n: mgpu_kernel.unsupported_reason(
        (16, m, 4096), (16, 4096, n), jnp.bfloat16, jnp.bfloat16, config=c)
    assert why(along_n, 4224, 6144) is None and "even number" in why(along_n, 4224, 14336)
    assert why(along_m, 4224, 14336) is None and "even number" in why(along_m, 4032, 6144)


def test_every_choice_serves_its_product():
    """select_config's choice for every product of the Llama-1B/3B/8B diagonal shapes (forward,
    dx, dw; G = 1 ... 16; bf16, 132 SMs) is one the kernel serves (unsupported_reason None):
    otherwise "auto" would run that product on the XLA path without a word."""
    from eval.bench_grouped_matmul import MODELS, PRODUCTS

    for model, shapes in MODELS.items():
        for name, m, k, n in shapes:
            for product, dims in PRODUCTS.items():
                (pm, pk, pn), transpose = dims(m, k, n)
                tl, tr = transpose or (False, False)
                for g in (1, 2, 4, 8, 16):
                    cfg = mgpu_kernel.select_config(g, pm, pk, pn, transpose_lhs=tl,
                                                    transpose_rhs=tr, num_sms=132)
                    a = (g, pk, pm) if tl else (g, pm, pk)
                    b = (g, pn, pk) if tr else (g, pk, pn)
                    why = mgpu_kernel.unsupported_reason(a, b, jnp.bfloat16, jnp.bfloat16,
                                                         transpose_lhs=tl, transpose_rhs=tr,
                                                         config=cfg)
                    assert why is None, (model, name, product, g, cfg, why)


def test_row_stripe_choice():
    """select_config's rule 8: forward and dx products on the default tiles whose groups span at
    least 24 row tiles (the 8b shapes' m = 4224: 33) walk row stripes of 12 tiles along n; the 3b
    shapes (17 row tiles) and the clustered 8b forward products keep their choice. dw products
    take the stripes where their k x m operand (token rows x dw's rows) holds >= 12 Mi elements:
    the 8b dw products (16.5-57.8 Mi) and 3b down dw (17.0 Mi), not 1b down dw (9.0 Mi) or the
    other 3b dw products (6.4 Mi); rule 9 then defers all their epilogue tiles."""
    pick = lambda *dims, tl=False, tr=False: mgpu_kernel.select_config(
        *dims, transpose_lhs=tl, transpose_rhs=tr, num_sms=132)
    stripes = mgpu_kernel.ROW_STRIPE_CONFIG
    assert (stripes.grid_minor_dim, stripes.grid_tile_width) == (mgpu_kernel.MatmulDimension.M, 12)
    assert dataclasses.replace(stripes, grid_minor_dim=mgpu_kernel.MatmulDimension.N,
                               grid_tile_width=1) == mgpu_kernel.DEFAULT_CONFIG
    for g in (1, 16):
        assert pick(g, 4224, 14336, 4096) == stripes                 # 8b down
        assert pick(g, 4224, 4096, 14336, tr=True) == stripes        # 8b down dx
        assert pick(g, 4224, 4096, 4096) == stripes                  # 8b o
    assert pick(16, 4224, 4096, 28672) == mgpu_kernel.WIDE_CLUSTER_N_CONFIG   # 8b gate/up
    assert pick(16, 2176, 8192, 3072) == mgpu_kernel.DEFAULT_CONFIG  # 3b down: 17 row tiles
    dw = lambda g, m, k, n: pick(g, m, k, n, tl=True)      # (G, dw's rows, token rows, n)
    dw_stripes = mgpu_kernel.DW_ROW_STRIPE_CONFIG
    assert dw_stripes == dataclasses.replace(stripes, deferred_epi_tiles=4)
    for g in (1, 16):
        assert dw(g, 14336, 4224, 4096) == dw_stripes                # 8b down dw
        assert dw(g, 4096, 4224, 28672) == dw_stripes                # 8b gate/up dw
        assert dw(g, 8192, 2176, 3072) == dw_stripes                 # 3b down dw
    for m, k, n in [(8192, 1152, 2048), (3072, 2176, 3072), (3072, 2176, 16384)]:
        assert dw(16, m, k, n) == mgpu_kernel.DW_CONFIG, (m, k, n)   # 1b down, 3b o, gate/up
    # the bound itself: 4096 x 3072 is 12 Mi elements; one token row fewer keeps the default order
    assert dw(16, 4096, 3072, 4096) == dw_stripes
    assert dw(16, 4096, 3071, 4096) == mgpu_kernel.DW_CONFIG


def test_dw_defers_all_epilogue_tiles():
    """select_config's rule 9: dw products (18-66 k-steps per tile) on the default tiles or the
    row stripes store all 4 epilogue tiles of a warpgroup under the next tile's first k-steps;
    the forward and dx products of the same sizes keep 1, and dw products that rules 2-7 give
    other tiles keep those."""
    from eval.bench_grouped_matmul import diagonal_products

    pick = lambda *dims, tl=False, tr=False: mgpu_kernel.select_config(
        *dims, transpose_lhs=tl, transpose_rhs=tr, num_sms=132)
    dw_default = mgpu_kernel.DW_CONFIG
    assert dw_default == dataclasses.replace(   # the default's CTA tiles, split by rows
        mgpu_kernel.DEFAULT_CONFIG, deferred_epi_tiles=4, tile_m=64, tile_n=256,
        wg_dimension=mgpu_kernel.MatmulDimension.M)
    assert (dw_default.cta_tile_m, dw_default.cta_tile_n) == (128, 256)
    epilogue_tiles = (dw_default.tile_m * dw_default.tile_n
                      // (dw_default.epi_tile_m * dw_default.epi_tile_n))
    assert dw_default.deferred_epi_tiles == epilogue_tiles == 4
    products = diagonal_products()   # the 36 products of the Llama-1B/3B/8B diagonal shapes
    assert sum(label.endswith(" dw") for label in products) == 12
    for label, ((m, k, n), transpose) in products.items():
        tl, tr = transpose or (False, False)
        cfg = pick(16, m, k, n, tl=tl, tr=tr)
        if label.endswith(" dw"):
            assert tl and cfg in (dw_default, mgpu_kernel.DW_ROW_STRIPE_CONFIG), (label, cfg)
        else:
            assert cfg.deferred_epi_tiles <= 1, (label, cfg)
    assert pick(1, 2048, 1152, 3072, tl=True) == mgpu_kernel.THREE_WG_CONFIG   # 1b qkv dw, G = 1


@pytest.mark.parametrize("dim", list(mgpu_kernel.MatmulDimension), ids=str)
def test_tile_orders_cover_every_tile(dim):
    """The planar snake visits every (m, n) tile of a group exactly once for stripe widths that
    leave a narrower last stripe (33 x 56 tiles in stripes of 12: 8b down dx under
    ROW_STRIPE_CONFIG), and the interpret-mode kernel in stripes of 2 row (column) tiles computes
    the forward and dx products of 5 ragged row tiles x 3 column tiles like the XLA path."""
    for shape, width in (((33, 56), 12), ((33, 16), 12), ((5, 3), 2)):
        coords = jax.vmap(lambda i: jnp.stack(plgpu.planar_snake(i, shape, dim, width)))(
            jnp.arange(shape[0] * shape[1], dtype=jnp.int32))
        seen = {tuple(c) for c in np.asarray(coords).tolist()}
        assert seen == {(i, j) for i in range(shape[0]) for j in range(shape[1])}, (shape, width)

    rng, info = fresh_rng()
    config = dataclasses.replace(ops.INTERPRET_CONFIG, grid_minor_dim=dim, grid_tile_width=2)
    g, m, k, n = 3, 5 * 64 - 8, 128, 384    # 5 x 3 CTA tiles of 64 x 128, the last row ragged
    x, w = _operands(rng, g, m, k, n, jnp.float32)
    _check_ranges_against_xla(x, w, config, rng, info)
    dy = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)
    for lo, hi in [(0, g), _random_range(rng, g)]:
        dx = mgpu_kernel.grouped_matmul_mgpu(
            dy, w, jnp.array([lo, hi], jnp.int32), transpose_rhs=True, config=config,
            interpret=plgpu.InterpretGPUParams(), num_sms=ops.INTERPRET_NUM_SMS)
        want = jnp.einsum("gmn,gkn->gmk", dy[lo:hi], w[lo:hi],
                          precision=jax.lax.Precision.HIGHEST)
        assert rel_err_finite(dx[lo:hi], want) <= 1e-5, f"{info} dx lo={lo} hi={hi}"
        _check_idle_zero(dx, lo, hi, "dx", info)


def test_ring_of_stages_wraps_across_tiles():
    """The cooperative schedule's one ring of stages runs on across a CTA's tiles at any number
    of k-steps: the dw products' (the diagonal's rows / 64: 18, 34, 66, which select_config runs
    on the default 4 stages) against float64 in interpret mode, 18 k-steps on 4 stages, 4 groups
    of 4 x 4 tiles on 4 simulated SMs, one wgmma group in flight. A delayed release of more
    than one wgmma group, or of as many as the stages, is refused."""
    pick = lambda *dims: mgpu_kernel.select_config(*dims, transpose_lhs=True, num_sms=132)
    for dims in [(16, 2048, 1152, 3072), (16, 8192, 2176, 3072), (16, 14336, 4224, 4096),
                 (1, 14336, 4224, 4096), (1, 2048, 1152, 2048)]:
        assert pick(*dims) in (mgpu_kernel.DW_CONFIG,            # dw: 18 / 34 / 66 k-steps,
                               mgpu_kernel.DW_ROW_STRIPE_CONFIG), dims   # any tile order
    why = lambda c: mgpu_kernel.unsupported_reason(
        (16, 1152, 2048), (16, 1152, 3072), jnp.bfloat16, jnp.bfloat16, transpose_lhs=True,
        config=c)
    assert why(mgpu_kernel.DEFAULT_CONFIG) is None
    for bad in (dict(delay_release=2), dict(delay_release=1, max_concurrent_steps=1)):
        assert "delay_release" in why(dataclasses.replace(mgpu_kernel.DEFAULT_CONFIG, **bad))
    rng, info = fresh_rng()
    g, m, k, n = 4, 256, 1152, 512
    x = jnp.asarray(rng.standard_normal((g, k, m)), jnp.float32)   # dw's x, read transposed
    dy = jnp.asarray(rng.standard_normal((g, k, n)), jnp.float32)
    cfg = dataclasses.replace(ops.INTERPRET_CONFIG, max_concurrent_steps=4, epi_slots=1)
    assert cfg.delay_release == 1
    want = np.einsum("gkm,gkn->gmn", np.float64(x), np.float64(dy))
    got = ops._run_kernel(x, dy, jnp.array([0, g, 0, 0], jnp.int32), True, False, None,
                          "interpret", cfg)
    assert rel_err_finite(got, want) <= 1e-5, info


def test_pingpong_hopper_tiles_in_interpret_mode():
    """The ping-pong schedule with its GPU block sizes (128 x 128 tiles per warpgroup, a ring
    of 6 stages that 8 k-steps wrap around), ragged m, bf16."""
    rng, info = fresh_rng()
    g, m, k, n = 3, 136, 512, 256
    x, w = _operands(rng, g, m, k, n, jnp.bfloat16)
    lo, hi = 1, 3
    y = kernels.grouped_matmul(x, w, (lo, hi), impl="interpret",
                               config=mgpu_kernel.PINGPONG_CONFIG)
    y_ref = kernels.grouped_matmul(x, w, (lo, hi), impl="xla")
    assert rel_err_finite(y, y_ref) <= 1e-2, info
    _check_idle_zero(y, lo, hi, "output", info)


@pytest.mark.parametrize("impl", ["interpret", "xla"])
def test_weight_offset_reads_a_window_of_stacked_weights(impl):
    """x holds 3 groups, w 5: group g uses w[g + off]; dw has w's shape, zero outside."""
    rng, info = fresh_rng()
    g, gw, m, k, n = 3, 5, 72, 128, 128
    x, _ = _operands(rng, g, m, k, n, jnp.float32)
    _, w = _operands(rng, gw, m, k, n, jnp.float32)
    off = int(rng.integers(0, gw - g + 1))
    lo, hi = _random_range(rng, g)
    info = f"{info} off={off} lo={lo} hi={hi} {impl}"
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)

    def loss(x, w, lo, hi, off):
        y = kernels.grouped_matmul(x, w, (lo, hi), weight_offset=off, impl=impl)
        return jnp.sum(y * cot), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        x, w, jnp.int32(lo), jnp.int32(hi), jnp.int32(off))
    y_want, dx_want, dw_want = weight_window_oracle(x, w, lo, hi, off, cot)
    assert y.shape == (g, m, n) and dw.shape == w.shape, info
    assert rel_err_finite(y, y_want) <= 1e-5, info
    assert rel_err_finite(dx, dx_want) <= 1e-5, f"dx {info}"
    assert rel_err_finite(dw, dw_want) <= 1e-5, f"dw {info}"
    _check_idle_zero(y, lo, hi, "output", info)
    _check_idle_zero(dw, lo + off, hi + off, "dw", info)


@pytest.mark.parametrize(
    "config",
    [dataclasses.replace(ops.INTERPRET_CONFIG, max_concurrent_steps=3),
     dataclasses.replace(ops.INTERPRET_CONFIG, max_concurrent_steps=3, delay_release=0),
     mgpu_kernel.TuningConfig(tile_m=64, tile_n=192, wg_dimension=mgpu_kernel.MatmulDimension.M,
                              max_concurrent_steps=2),
     dataclasses.replace(ops.INTERPRET_CONFIG, epi_tile_m=32, epi_tile_n=32, epi_slots=4),
     dataclasses.replace(ops.INTERPRET_CONFIG, pingpong=True, max_concurrent_steps=3),
     dataclasses.replace(ops.INTERPRET_CONFIG, pingpong=True, max_concurrent_steps=3,
                         early_turn=False)],
    ids=["ring", "ring_delay0", "rows_split_64x192", "epi_slots_4", "pingpong",
         "pingpong_late_turn"])
def test_tile_schedules(config):
    """The cooperative schedule on one ring of 3 stages (4 k-steps per tile, so the ring wraps
    mid-tile), with one wgmma group in flight and without, the row-split 128 x 192 tiles (2
    stages), 4 epilogue slots of 32 x 32, and the ping-pong schedule (the warpgroups of a CTA
    on alternate 64 x 64 tiles, one ring of 3 stages), over 4 simulated SMs: all 4 groups give
    every CTA several tiles, one group leaves some CTAs a single tile, ragged m."""
    rng, info = fresh_rng()
    g, m, k, n = 4, 72, 256, 384            # 2 x 3 tiles of 64 x 128 (1 x 2 of 128 x 192)
    x, w = _operands(rng, g, m, k, n, jnp.float32)
    _check_ranges_against_xla(x, w, config, rng, info)


def _check_ranges_against_xla(x, w, config, rng, info):
    """The interpret-mode kernel under ``config`` against the XLA path (float32) over all
    groups, one middle group and a random range; idle groups exactly zero."""
    g = x.shape[0]
    for lo, hi in [(0, g), (1, 2), _random_range(rng, g)]:
        y = kernels.grouped_matmul(x, w, (lo, hi), impl="interpret", config=config)
        y_ref = kernels.grouped_matmul(x, w, (lo, hi), impl="xla")
        assert rel_err_finite(y, y_ref) <= 1e-5, f"{info} lo={lo} hi={hi}"
        _check_idle_zero(y, lo, hi, "output", info)


def _check_window_gradients(cfg, rng, info, dims, windows, max_offset):
    """Forward, dx (w read transposed) and dw (x read transposed, landing at the weight offset)
    of the interpret-mode kernel under ``cfg`` against float64, for each (lo, hi, off) window and
    one random one; float32 operands, dims = (G, Gw, m, k, n); idle groups exactly zero."""
    g, gw, m, k, n = dims
    x, _ = _operands(rng, g, m, k, n, jnp.float32)
    _, w = _operands(rng, gw, m, k, n, jnp.float32)
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)

    def loss(x, w, lo, hi, off):
        y = kernels.grouped_matmul(x, w, (lo, hi), weight_offset=off, impl="interpret",
                                   config=cfg)
        return jnp.sum(y * cot), y

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    for lo, hi, off in [*windows, _random_range(rng, g) + (int(rng.integers(0, max_offset + 1)),)]:
        tag = f"{info} lo={lo} hi={hi} off={off}"
        (_, y), (dx, dw) = grad_fn(x, w, jnp.int32(lo), jnp.int32(hi), jnp.int32(off))
        y_want, dx_want, dw_want = weight_window_oracle(x, w, lo, hi, off, cot)
        for got, want, what in ((y, y_want, "y"), (dx, dx_want, "dx"), (dw, dw_want, "dw")):
            if np.any(want):
                assert rel_err_finite(got, want) <= 1e-5, f"{what} {tag}"
            else:
                assert not np.any(np.asarray(got)), f"{what} {tag}"
        _check_idle_zero(y, lo, hi, "output", tag)
        _check_idle_zero(dw, lo + off, hi + off, "dw", tag)


@pytest.mark.parametrize("delay, early_turn", [(0, True), (1, True), (1, False)],
                         ids=["wait_each_step", "one_wgmma_in_flight", "late_turn"])
def test_pingpong_gradients_with_weight_offset(delay, early_turn):
    """The ping-pong schedule runs all three products of a training step (the forward, dx with
    w read transposed, dw with x read transposed, landing at the weight offset) against float64,
    over ranges that leave each of the 4 simulated SMs an odd, an even and no tile count (the
    warpgroups' turns must balance in each case), ragged m; the turn passed once the last
    wgmma of a main loop is issued (early_turn) or done."""
    rng, info = fresh_rng()
    cfg = dataclasses.replace(ops.INTERPRET_CONFIG, pingpong=True, max_concurrent_steps=3,
                              delay_release=delay, early_turn=early_turn)
    # 12 tiles per group: 9, 6, 3 and 0 tiles per SM; then a random window
    _check_window_gradients(cfg, rng, info, (3, 5, 136, 192, 256),
                            [(0, 3, 2), (0, 2, 1), (1, 2, 0), (2, 2, 1)], max_offset=2)


@pytest.mark.parametrize("defer, k", [(1, 256), (3, 256), (4, 256), (4, 64)],
                         ids=["one", "three", "all_four", "more_than_the_k_steps"])
def test_deferred_epilogue_tiles(defer, k):
    """The cooperative schedule storing a tile's last epilogue tiles under the next tile's first
    k-steps (4 epilogue tiles of 32 x 32 per warpgroup, 2 slots): one, three or all of them
    deferred, and more than the tile's one k-step (clipped to it). The forward and both
    gradients against float64 over windows that leave the 4 simulated SMs several tiles, one,
    or none (the last tile's deferred stores come after the loop; a CTA without tiles stores
    nothing), ragged m, idle groups zero."""
    skip_deferral_on_one_core()
    rng, info = fresh_rng()
    cfg = dataclasses.replace(ops.INTERPRET_CONFIG, max_concurrent_steps=3, epi_tile_m=32,
                              epi_tile_n=32, deferred_epi_tiles=defer)
    assert len(mgpu_tiles.epilogue_tiles(cfg)) == 4 and cfg.num_out_slots == 2
    # 3 x 2 tiles of 64 x 128 per group: 18, 6 and 0 tiles over 4 SMs, then a random window
    _check_window_gradients(cfg, rng, info, (3, 4, 136, k, 256),
                            [(0, 3, 1), (1, 2, 0), (2, 2, 1)], max_offset=1)


def test_row_split_with_all_epilogue_tiles_deferred():
    """Rule 9's dw tiles in miniature: the CTA tile split by rows between the warpgroups (64-row
    slices; on dw, of an operand stored m-minor, so each slice is a column slice of the shared
    tile) with all 4 epilogue tiles of a warpgroup deferred. The forward and both gradients
    against float64 over windows that leave the 4 simulated SMs several tiles, one, or none;
    ragged m, idle groups zero."""
    skip_deferral_on_one_core()
    rng, info = fresh_rng()
    cfg = dataclasses.replace(mgpu_kernel.DW_CONFIG, tile_n=128, max_concurrent_steps=3,
                              epi_tile_m=32)
    assert cfg.wg_dimension == mgpu_kernel.MatmulDimension.M and cfg.cta_tile_m == 128
    assert len(mgpu_tiles.epilogue_tiles(cfg)) == cfg.deferred_epi_tiles == 4
    _check_window_gradients(cfg, rng, info, (3, 4, 200, 256, 256),
                            [(0, 3, 1), (1, 2, 0), (2, 2, 1)], max_offset=1)


def test_deferred_epilogue_tiles_refused_where_not_implemented():
    """Ping-pong (whose epilogue already runs under the other warpgroup's main loop), 2-CTA
    clusters (with which an interpret-mode run hung) and a negative count are refused, naming
    the field, not silently ignored."""
    why = lambda c: mgpu_kernel.unsupported_reason(
        (4, 1152, 2048), (4, 2048, 3072), jnp.bfloat16, jnp.bfloat16, config=c)
    assert why(mgpu_kernel.PINGPONG_CONFIG) is None
    assert "deferred" in why(dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG,
                                                 deferred_epi_tiles=1))
    assert "deferred_epi_tiles=-1" in why(dataclasses.replace(mgpu_kernel.DEFAULT_CONFIG,
                                                             deferred_epi_tiles=-1))
    assert why(mgpu_kernel.WIDE_CLUSTER_N_CONFIG) is None
    assert "clusters" in why(dataclasses.replace(mgpu_kernel.WIDE_CLUSTER_N_CONFIG,
                                                 deferred_epi_tiles=1))
    x, w = jnp.zeros((2, 64, 64), jnp.float32), jnp.zeros((2, 64, 128), jnp.float32)
    with pytest.raises(ValueError, match="deferred"):
        kernels.grouped_matmul(x, w, impl="interpret", config=dataclasses.replace(
            ops.INTERPRET_CONFIG, pingpong=True, deferred_epi_tiles=1))


@pytest.mark.parametrize("wgs", [2, 3])
def test_warpgroups_split_rows_with_ragged_n(wgs):
    """Two or three compute warpgroups splitting a 128- or 192-row CTA tile, with a ragged last
    column tile (n = 192 on 128-column tiles: TMA zero-fills the loads and clips the stores past
    n) and ragged m: the forward and both gradients (dx reads w transposed, its n = k is ragged
    too; dw lands at the weight offset) against float64, idle groups zero; 5 k-steps on a ring
    of 2 stages, one wgmma group in flight."""
    rng, info = fresh_rng()
    cfg = dataclasses.replace(mgpu_kernel.THREE_WG_CONFIG, compute_wgs=wgs, epi_slots=1,
                              max_concurrent_steps=2)
    assert cfg.cta_tile_m == 64 * wgs and cfg.cta_tile_n == 128   # float32: <= 208 KiB
    _check_window_gradients(cfg, rng, info, (3, 4, 200, 320, 192), [(0, 3, 1)], max_offset=1)


@pytest.mark.parametrize("name", list(mgpu_kernel.SM_FIT_VARIANTS))
def test_column_tiles_sized_to_the_sms(name):
    """The 192 x 96 and 128 x 160 tiles (32-column epilogue tiles: 3 or 5 per warpgroup, 2
    slots) on 2 stages, float32 (96 / 160 columns are 384 / 640-byte rows: the 128-byte
    swizzle; bf16 below): the forward and both gradients against float64, with ragged column tiles
    on every product (n = 256, k = 448: 2.7 / 4.7 tiles of 96, 1.6 / 2.8 of 160) and ragged m,
    at a weight offset; idle groups zero."""
    rng, info = fresh_rng()
    cfg = dataclasses.replace(mgpu_kernel.SM_FIT_VARIANTS[name], max_concurrent_steps=2)
    assert len(mgpu_tiles.epilogue_tiles(cfg)) == cfg.tile_n // 32
    _check_window_gradients(cfg, rng, info, (3, 4, 200, 448, 256), [(0, 3, 1)], max_offset=1)


def test_warpgroup_tiles_wider_than_one_wgmma():
    """128 x 320 CTA tiles split by rows: each warpgroup's 64 x 320 tile in two wgmma
    accumulators (columns 0-191 and 192-319 here; 0-255 and 256-319 in the bf16 test below),
    each stored to its own columns. The forward and both gradients against float64, float32
    (k-steps of 32, 2 stages, for shared memory), with ragged column tiles on every product
    (n = 704: 2.2 tiles of 320, the last one's second chunk wholly past n; dx's n = k = 384:
    1.2) and ragged m, at a weight offset; idle groups zero. Unsupported where one accumulator
    is assumed (ping-pong, the fused SwiGLU), and chunks no wgmma takes."""
    rng, info = fresh_rng()
    cfg = dataclasses.replace(mgpu_kernel.WIDE_ROW_SPLIT_CONFIG, tile_k=32,
                              max_concurrent_steps=2, wgmma_n=192)
    assert cfg.n_chunks == ((0, 192), (192, 128)) and (cfg.cta_tile_m, cfg.cta_tile_n) == (128, 320)
    _check_window_gradients(cfg, rng, info, (3, 4, 200, 384, 704), [(0, 3, 1)], max_offset=1)
    why = lambda c, **kw: mgpu_kernel.unsupported_reason(
        (1, 256, 256), (1, 256, 1280), jnp.bfloat16, jnp.bfloat16, config=c, **kw)
    assert why(mgpu_kernel.WIDE_ROW_SPLIT_CONFIG) is None and why(cfg) is None
    assert "tile_n=320 > wgmma_n=256" in why(mgpu_kernel.WIDE_ROW_SPLIT_CONFIG, swiglu=True)
    assert "tile_n=320 > wgmma_n=256" in why(dataclasses.replace(
        mgpu_kernel.PINGPONG_CONFIG, tile_m=64, tile_n=320, max_concurrent_steps=3))
    for bad in (0, 96, 320):
        assert f"wgmma_n={bad}" in why(dataclasses.replace(cfg, wgmma_n=bad))


def _check_every_product(run, rng, tag, dims, windows):
    """The forward, dx (w read transposed), dw (x read transposed) and transposed forward
    (w^T @ x^T: both read transposed) products of ``run(a, b, bounds, transpose_lhs,
    transpose_rhs)`` against the XLA path on fresh bf16 operands, dims = (G, Gw, m, k, n): for
    each (lo, hi, off) window, forward and dx read the weights at offset off, dw and the
    transposed forward (whose weights are the left operand) land at their own groups; idle
    groups exactly zero."""
    g, gw, m, k, n = dims
    x = jnp.asarray(rng.standard_normal((g, m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((gw, k, n)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((g, m, n)), jnp.bfloat16)
    products = {"fwd": (x, w, False, False, (g, m, n)), "dx": (dy, w, False, True, (g, m, k)),
                "dw": (x, dy, True, False, (g, k, n)), "fwd_t": (w[:g], x, True, True, (g, n, m))}
    for lo, hi, off in windows:
        for product, (a, b, tl, tr, out_shape) in products.items():
            b_off = off if product in ("fwd", "dx") else 0
            where = f"{tag} {product} G={g} lo={lo} hi={hi} off={b_off}"
            bounds = jnp.array([lo, hi, b_off, 0], jnp.int32)
            got = run(a, b, bounds, tl, tr)
            want = kernels.grouped_matmul_reference(a, b, bounds, transpose_lhs=tl,
                                                    transpose_rhs=tr)
            assert got.shape == out_shape, where
            if hi > lo:
                assert rel_err_finite(got, want) <= 1e-2, where
            _check_idle_zero(got, lo, hi, product, where)


NARROW_COLUMN_VARIANTS = {**mgpu_kernel.SM_FIT_VARIANTS, **mgpu_kernel.COLUMN_SPLIT_VARIANTS}


def test_warpgroup_tiles_wider_than_one_wgmma_bf16():
    """The 128 x 320 tiles as the GPU runs them (bf16, k-steps of 64, 3 stages; b stored n-minor
    sliced at column 256 for the second wgmma): every product in interpret mode against the
    XLA path, 2 groups of 360 x 384 x 704 (ragged rows and column tiles, on the transposed
    forward too; forward and dx at a weight offset), idle groups zero."""
    rng, info = fresh_rng()
    cfg = mgpu_kernel.WIDE_ROW_SPLIT_CONFIG
    run = lambda a, b, bounds, tl, tr: mgpu_kernel.grouped_matmul_mgpu(
        a, b, bounds, transpose_lhs=tl, transpose_rhs=tr, config=cfg,
        interpret=plgpu.InterpretGPUParams(), num_sms=4)
    _check_every_product(run, rng, f"{info} rows_128x320", (2, 3, 360, 384, 704),
                         [(0, 2, 1), (1, 2, 0)])


@pytest.mark.parametrize("name", list(NARROW_COLUMN_VARIANTS))
def test_column_tiles_sized_to_the_sms_bf16(name):
    """The same tiles in bf16, and 192 x 192 tiles split into two 192 x 96 warpgroup tiles, where
    b stored n-minor (forward, dw) has 192- or 320-byte rows (or 96-column slices) and both
    operands take a 64-byte swizzle: every product in interpret mode against the XLA path
    (2 groups of 192 x 448 x 320: ragged column tiles; forward and dx at a weight offset),
    idle groups zero. (Whether the compiled kernel reads the swizzled tiles right is the GPU
    tests' to check: test_gpu_column_tiles_sized_to_the_sms, test_gpu_weight_offset.)"""
    rng, info = fresh_rng()
    cfg = dataclasses.replace(NARROW_COLUMN_VARIANTS[name], max_concurrent_steps=2)
    run = lambda a, b, bounds, tl, tr: mgpu_kernel.grouped_matmul_mgpu(
        a, b, bounds, transpose_lhs=tl, transpose_rhs=tr, config=cfg,
        interpret=plgpu.InterpretGPUParams(), num_sms=4)
    _check_every_product(run, rng, f"{info} {name}", (2, 3, 192, 448, 320), [(0, 2, 1), (1, 2, 0)])


def test_sm_fit_dx_choice():
    """select_config takes the 128 x 160 tiles for dx products where tile_cost promises at most
    0.94 of its other choice's time (and the 192 x 192 tiles no less): the 1b qkv / o / gate_up
    dx products at G = 1 (cost 0.83 of the 192 x 128 tiles'; 1.12-1.13x in the H200 A/B) and
    the 3b dx products at G = 1 (cost 0.88-0.94; 1.00-1.10x); not 1b down dx at G = 1 (cost
    1.11; 0.90x), not G = 16 (cost 1.02-1.05; 0.87-0.96x), not the forward or dw products
    (b stored n-minor, a 64-byte swizzle: 0.65-0.90x at G = 1, 2 in the H200 A/B)."""
    pick = lambda *dims, tl=False, tr=False: mgpu_kernel.select_config(
        *dims, transpose_lhs=tl, transpose_rhs=tr, num_sms=132)
    fit = mgpu_kernel.SM_FIT_DX_CONFIG
    assert (fit.cta_tile_m, fit.cta_tile_n) == (128, 160)
    cost = lambda c, g, m, n: mgpu_kernel.tile_cost(c, g, m, n, 132)
    # 1b dx at G = 1: 9 x 13 = 117 tiles of 128 x 160 (one wave) against 96 of 192 x 128
    assert cost(fit, 1, 1152, 2048) / cost(mgpu_kernel.THREE_WG_CONFIG, 1, 1152, 2048) == (
        pytest.approx(160 * 128 / (192 * 128)))
    for k in (3072, 2048, 16384):                                # 1b qkv, o, gate/up dx
        assert pick(1, 1152, k, 2048, tr=True) == fit, k
    for k, n in [(5120, 3072), (3072, 3072), (16384, 3072), (3072, 8192)]:
        assert pick(1, 2176, k, n, tr=True) == fit, (k, n)       # 3b qkv, o, gate/up, down dx
    assert pick(1, 1152, 2048, 8192, tr=True) != fit             # 1b down dx: cost 1.11
    assert pick(4, 1152, 2048, 2048, tr=True) != fit             # 4 waves against 3
    for dims in [(16, 1152, 2048, 2048), (16, 2176, 3072, 3072), (16, 2176, 3072, 8192),
                 (1, 4224, 4096, 4096), (1, 4224, 4096, 14336)]:
        assert pick(*dims, tr=True) != fit, dims                 # G = 16; 8b at G = 1
    assert pick(1, 1152, 2048, 2048) != fit                      # forward
    assert pick(1, 2048, 1152, 2048, tl=True) != fit             # dw
    # the rule follows the SM count: 78 SMs take 1b o dx's 117 tiles in two waves
    assert mgpu_kernel.select_config(1, 1152, 2048, 2048, transpose_rhs=True,
                                     num_sms=78) != fit


def test_tiles_that_do_not_lower_or_cover_are_refused():
    """bf16 column tiles of 96 or 160 serve every product (b stored n-minor: a 64-byte swizzle
    on both operands), column tiles whose rows are no multiple of 64 bytes do not with b stored
    n-minor (forward, dw), and epilogue tiles that do not divide the warpgroup tile (which
    would leave columns unwritten) are refused, naming the sizes; through grouped_matmul as a
    ValueError."""
    why = lambda c, **kw: mgpu_kernel.unsupported_reason(
        (1, 1152, 2048), (1, 2048, 2048), jnp.bfloat16, jnp.bfloat16, config=c, **kw)
    for cfg in mgpu_kernel.SM_FIT_VARIANTS.values():
        assert why(cfg, transpose_rhs=True) is None and why(cfg) is None
        assert mgpu_kernel.unsupported_reason(   # dw: x^T @ dy
            (1, 1152, 2048), (1, 1152, 2048), jnp.bfloat16, jnp.bfloat16, config=cfg,
            transpose_lhs=True) is None
        assert "epilogue tiles of 64 x 64" in why(dataclasses.replace(cfg, epi_tile_n=64),
                                                  transpose_rhs=True)
    odd = dataclasses.replace(mgpu_kernel.SM_FIT_DX_CONFIG, tile_n=48, epi_tile_n=16)
    assert why(odd, transpose_rhs=True) is None          # k-minor rows: the k-step's 128 bytes
    assert "tile_n=48" in why(odd) and "64-byte rows" in why(odd)   # 96-byte rows
    # a and b share the swizzle their minor dims both allow
    swizzles = lambda a, b: [t[1].swizzle for t in mgpu_tiles.operand_transforms(
        jnp.bfloat16, a, b)]
    assert swizzles(64, 256) == [128, 128] and swizzles(64, 96) == [64, 64]
    # and that a warpgroup's slice along the minor dim allows: 96 of 192 columns
    slices = lambda **kw: [t[1].swizzle for t in mgpu_tiles.operand_transforms(
        jnp.bfloat16, 64, 192, **kw)]
    assert slices() == [128, 128] and slices(b_slice=96) == [64, 64]
    assert slices(a_slice=64, b_slice=128) == [128, 128]
    assert swizzles(192, 160) == [64, 64] and swizzles(64, 64) == [128, 128]
    x, w = jnp.zeros((2, 64, 64), jnp.float32), jnp.zeros((2, 64, 128), jnp.float32)
    with pytest.raises(ValueError, match="epilogue tiles of 64 x 48"):
        kernels.grouped_matmul(x, w, impl="interpret", config=dataclasses.replace(
            ops.INTERPRET_CONFIG, epi_tile_n=48))


@pytest.mark.parametrize("wgs", [2, 3])
@pytest.mark.parametrize("dim", ["N", "M"])
def test_two_cta_clusters_with_multicast(dim, wgs):
    """Clusters of 2 CTAs on neighbouring tiles sharing one operand tile by TMA multicast:
    along n (A shared; 4 column tiles) and along m (B shared; 4 row tiles of 64, or 2 of 192
    with three compute warpgroups, the last ragged); 4 k-steps per tile on 2 or 3 stages, one
    wgmma group in flight: the ring wraps across the pairs of tiles."""
    rng, info = fresh_rng()
    dimension = mgpu_kernel.MatmulDimension[dim]
    if wgs == 2:
        g, m, k, n = (3, 136, 256, 512) if dim == "N" else (3, 232, 256, 256)
        config = dataclasses.replace(ops.INTERPRET_CONFIG, cluster_dimension=dimension,
                                     max_concurrent_steps=3)
    else:   # 192 x 128 CTA tiles of three 64 x 128 warpgroups, 2 stages (float32 shared memory)
        g, m, k, n = (3, 136, 256, 512) if dim == "N" else (3, 376, 256, 256)
        config = dataclasses.replace(mgpu_kernel.THREE_WG_CONFIG, epi_slots=1,
                                     max_concurrent_steps=2, cluster_dimension=dimension)
    x, w = _operands(rng, g, m, k, n, jnp.float32)
    _check_ranges_against_xla(x, w, config, rng, f"{info} {dim}")
    # an odd number of tiles along the cluster dimension is refused, naming it
    with pytest.raises(ValueError, match="cluster along"):
        one_row_tile = 64 if wgs == 2 else 136
        kernels.grouped_matmul(x[:, :one_row_tile] if dim == "M" else x, w[..., :384],
                               impl="interpret", config=config)


@pytest.mark.parametrize("dim", ["N", "M"])
def test_clusters_run_a_training_steps_products(dim):
    """2-CTA clusters run the forward, dx (w read transposed) and dw (x read transposed,
    landing at the weight offset) against float64, idle groups zero: 4 row and 4 column tiles
    of 64 x 128 in the forward (even along either cluster dimension in all three products), 4
    k-steps on 3 stages, one wgmma group in flight. (Interpret mode runs a multicast copy as a
    plain copy on each CTA: this checks the pairing of the tiles, the ring's indexing and the
    zero tiles; the multicast itself is the GPU tests' job.)"""
    rng, info = fresh_rng()
    cfg = dataclasses.replace(ops.INTERPRET_CONFIG, max_concurrent_steps=3,
                              cluster_dimension=mgpu_kernel.MatmulDimension[dim])
    _check_window_gradients(cfg, rng, f"{info} {dim}", (3, 4, 256, 256, 512), [(0, 3, 1)],
                            max_offset=1)


def _assert_one_compilation(x, w, impl, tol, info):
    """One jitted step over traced (lo, hi) serves every range, each equal to the XLA path."""
    traces = []

    @jax.jit
    def step(x, w, lo, hi):
        traces.append(None)
        return kernels.grouped_matmul(x, w, (lo, hi), impl=impl)

    for lo, hi in [(0, 4), (1, 3), (3, 4), (2, 2)]:
        y = step(x, w, jnp.int32(lo), jnp.int32(hi))
        y_ref = _fwd_fn(x, w, jnp.int32(lo), jnp.int32(hi), "xla")
        assert rel_err_finite(y, y_ref) <= tol, f"{info} lo={lo} hi={hi}"
        _check_idle_zero(y, lo, hi, "output", info)
    assert len(traces) == 1, f"traced {len(traces)} times"


def test_traced_range_one_compilation():
    rng, info = fresh_rng()
    g, m, k, n = 4, 64, 64, 128
    x, w = _operands(rng, g, m, k, n, jnp.float32)
    # Interpret mode registers global state on its first run, which changes the
    # tracing context once: warm it up before counting traces.
    kernels.grouped_matmul(x, w, (0, 1), impl="interpret").block_until_ready()
    _assert_one_compilation(x, w, "interpret", 1e-5, info)


def test_xla_path_accumulates_in_float32():
    """The XLA path emits bf16 straight from the einsum; its error against a float64 oracle must
    stay at one bf16 rounding of the output (~1e-3), far below what bf16 accumulation over
    k = 4096 would give. On the H200 too (the GPU stage selects it)."""
    rng, info = fresh_rng()
    g, m, k, n = 2, 128, 4096, 128
    x, w = _operands(rng, g, m, k, n, jnp.bfloat16)
    y = _fwd_fn(x, w, jnp.int32(0), jnp.int32(g), "xla")
    assert y.dtype == jnp.bfloat16
    want = np.einsum("gmk,gkn->gmn", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert rel_err_finite(y, want) <= 3e-3, f"{info} on {jax.devices()[0].platform}"


def test_idle_nan_does_not_leak():
    rng, info = fresh_rng()
    g, m, k, n = 3, 64, 64, 128
    x, w = _operands(rng, g, m, k, n, jnp.float32)
    x = x.at[0].set(jnp.nan)
    w = w.at[2].set(jnp.inf)
    for impl in ("interpret", "xla"):
        y = kernels.grouped_matmul(x, w, (1, 2), impl=impl)
        y = np.asarray(y)
        assert np.all(np.isfinite(y)), f"{impl} {info}"
        assert np.all(y[0] == 0) and np.all(y[2] == 0), f"{impl} {info}"


def test_active_none_means_all_groups():
    rng, info = fresh_rng()
    x, w = _operands(rng, 2, 64, 64, 128, jnp.float32)
    y = kernels.grouped_matmul(x, w, impl="interpret")
    want = jnp.einsum("gmk,gkn->gmn", x, w, precision="highest")
    assert rel_err_finite(y, want) <= 1e-5, info


def test_plain_matmul_skips_the_mask():
    """Without an active range the XLA path is the plain einsum (no select over groups, so XLA
    may hand it to cuBLAS unfused; with a weight offset, after a slice), with the same values
    and gradients as the explicit full range."""
    rng, info = fresh_rng()
    x, w = _operands(rng, 2, 24, 64, 64, jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 24, 64)), jnp.float32)
    plain = lambda x, w: jnp.sum(kernels.grouped_matmul(x, w, impl="xla") * cot)
    ranged = lambda x, w: jnp.sum(kernels.grouped_matmul(x, w, (0, 2), impl="xla") * cot)
    # a weight offset without a range (the decode's layer offset): the slice, no mask
    offset = lambda x, w: jnp.sum(kernels.grouped_matmul(x, w, weight_offset=0, impl="xla") * cot)
    for f in (plain, jax.grad(plain, argnums=(0, 1)), offset, jax.grad(offset, argnums=(0, 1))):
        assert "select_n" not in str(jax.make_jaxpr(f)(x, w)), info
    assert "select_n" in str(jax.make_jaxpr(ranged)(x, w))
    for got, want in zip(jax.tree.leaves(jax.value_and_grad(plain, argnums=(0, 1))(x, w)),
                         jax.tree.leaves(jax.value_and_grad(ranged, argnums=(0, 1))(x, w))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=info)


def test_auto_off_gpu_is_xla_and_small_n_routes_to_xla():
    rng, info = fresh_rng()
    x, w = _operands(rng, 3, 24, 64, 64, jnp.bfloat16)  # n = 64: not a kernel shape
    for active in [(0, 3), (1, 2)]:
        y = kernels.grouped_matmul(x, w, active, impl="auto")
        y_ref = kernels.grouped_matmul(x, w, active, impl="xla")
        np.testing.assert_array_equal(
            np.asarray(y, np.float32), np.asarray(y_ref, np.float32), err_msg=info
        )
    x1, w1 = _operands(rng, 3, 24, 64, 1, jnp.bfloat16)  # n = 1 (memory proj.)
    y = kernels.grouped_matmul(x1, w1, (0, 2), impl="auto")
    assert y.shape == (3, 24, 1)
    _check_idle_zero(y, 0, 2, "output", info)
    # The backward of a kernel-served forward may route to XLA (here dx with
    # N = k = 64 is no kernel shape under the GPU tiles): grads still work.
    xs, ws = _operands(rng, 2, 64, 64, 256, jnp.bfloat16)
    dx, dw = jax.grad(
        lambda a, b: jnp.sum(kernels.grouped_matmul(a, b, impl="auto").astype(jnp.float32)),
        argnums=(0, 1),
    )(xs, ws)
    assert dx.shape == xs.shape and dw.shape == ws.shape


def test_errors():
    x = jnp.zeros((2, 64, 64), jnp.bfloat16)
    w = jnp.zeros((2, 64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="cuda_fast"):
        kernels.grouped_matmul(x, w, impl="cuda_fast")
    with pytest.raises(ValueError, match=r"\(2, 64, 64\).*\(3, 64, 128\)"):
        kernels.grouped_matmul(x, jnp.zeros((3, 64, 128), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"\(2, 32, 128\)"):
        kernels.grouped_matmul(x, jnp.zeros((2, 32, 128), jnp.bfloat16), impl="xla")
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        kernels.grouped_matmul(x[0], w, impl="xla")
    # Explicit kernel impls refuse problems the kernel cannot serve.
    with pytest.raises(ValueError, match=r"\(2, 64, 1\)"):
        kernels.grouped_matmul(x, jnp.zeros((2, 64, 1), jnp.bfloat16), impl="interpret")
    with pytest.raises(ValueError, match="float32"):
        kernels.grouped_matmul(x.astype(jnp.float32), w.astype(jnp.float32), impl="pallas")
    if not kernels.on_hopper():    # a shape the kernel serves, off Hopper: an error naming the fix
        xs, ws = jnp.zeros((2, 128, 64), jnp.bfloat16), jnp.zeros((2, 64, 512), jnp.bfloat16)
        for op in (kernels.grouped_matmul, kernels.grouped_matmul_swiglu):
            with pytest.raises(ValueError, match=r"impl='pallas'.*Hopper.*impl='interpret'"):
                op(xs, ws, impl="pallas")
    with pytest.raises(ValueError, match="active"):
        kernels.grouped_matmul(x, w, active=3)
    with pytest.raises(ValueError, match=r"Gw >= G.*\(1, 64, 128\)"):
        kernels.grouped_matmul(x, w[:1], weight_offset=0)


def test_impl_names():
    assert kernels.IMPLS == ("auto", "pallas", "xla", "interpret")
    assert ops.INTERPRET_CONFIG.tile_k == 64


# --------------------------------------------------------------------------
# GPU: the Mosaic GPU kernel (impl="pallas") on a Hopper GPU.
# --------------------------------------------------------------------------

on_gpu = pytest.mark.skipif(
    jax.devices()[0].platform != "gpu" or not kernels.on_hopper(), reason="needs a Hopper GPU"
)

GPU_SHAPES = [
    # (G, m, k, n): diagonal-step shapes of Llama-3.2-1B and ragged edges.
    (4, 1152, 2048, 3072),
    (3, 1152, 8192, 2048),
    (3, 1000, 2048, 512),  # ragged m, small n
    (2, 264, 1024, 1024),  # m < 2 row tiles, ragged
]


@on_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_pallas_matches_xla(shape):
    rng, info = fresh_rng()
    g, m, k, n = shape
    x, w = _operands(rng, g, m, k, n, jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)
    for lo, hi in [(0, g), _random_range(rng, g), (1, 1)]:
        tag = f"{info} shape={shape} lo={lo} hi={hi}"
        y = _fwd_fn(x, w, jnp.int32(lo), jnp.int32(hi), "pallas")
        y_ref = _fwd_fn(x, w, jnp.int32(lo), jnp.int32(hi), "xla")
        assert rel_err_finite(y, y_ref) <= 1e-2, tag
        _check_idle_zero(y, lo, hi, "output", tag)
        _, (dx, dw) = _loss_and_grads("pallas", x, w, lo, hi, cot)
        _, (dx_ref, dw_ref) = _loss_and_grads("xla", x, w, lo, hi, cot)
        assert rel_err_finite(dx, dx_ref) <= 1e-2, f"dx {tag}"
        assert rel_err_finite(dw, dw_ref) <= 1e-2, f"dw {tag}"
        _check_idle_zero(dx, lo, hi, "dx", tag)
        _check_idle_zero(dw, lo, hi, "dw", tag)


@on_gpu
@pytest.mark.parametrize("name", list(mgpu_kernel.SM_FIT_VARIANTS))
def test_gpu_column_tiles_sized_to_the_sms(name):
    """The 192 x 96 / 128 x 160 tiles compiled, bf16, against the XLA path, idle groups zero:
    all four products (the transposed forward w^T @ x^T too) at the 1b o shape (G = 1; 2048
    columns, a ragged last column tile) and the 1b qkv shape (G = 4; forward and dx read
    windows of 6 stacked weights at offsets, dw lands at its own groups). The forward and dw
    read b n-minor through a 64-byte swizzle on both operands (mgpu_tiles.operand_transforms)."""
    rng, info = fresh_rng()
    cfg = mgpu_kernel.SM_FIT_VARIANTS[name]
    fns = {(tl, tr): jax.jit(lambda a, b, bounds, tl=tl, tr=tr: mgpu_kernel.grouped_matmul_mgpu(
        a, b, bounds, transpose_lhs=tl, transpose_rhs=tr, config=cfg))
        for tl, tr in [(False, False), (False, True), (True, False), (True, True)]}
    run = lambda a, b, bounds, tl, tr: fns[tl, tr](a, b, bounds)
    _check_every_product(run, rng, f"{info} {name}", (1, 1, 1152, 2048, 2048),
                         [(0, 1, 0), (1, 1, 0)])
    _check_every_product(run, rng, f"{info} {name}", (4, 6, 1152, 2048, 3072),
                         [(0, 4, 2), (1, 3, 0), (2, 2, 1)])


@on_gpu
def test_gpu_traced_range_one_compilation():
    rng, info = fresh_rng()
    x, w = _operands(rng, 4, 1152, 2048, 2048, jnp.bfloat16)
    _assert_one_compilation(x, w, "pallas", 1e-2, info)


@pytest.mark.parametrize("impl", ["interpret", pytest.param("pallas", marks=on_gpu)])
def test_batch_invariant(impl):
    """A group's result does not depend on how many groups run with it or where its window
    starts: every output tile is one CTA's k-loop in a fixed order. So the sequential schedule
    (one layer at a time) and the diagonal one (all slots at once) get bitwise the same products
    from the kernel; what differs between them comes from other operations."""
    rng, info = fresh_rng()
    g, m, k, n, dtype = (4, 1152, 2048, 3072, jnp.bfloat16) if impl == "pallas" else (
        3, 72, 128, 128, jnp.float32)
    x, w = _operands(rng, g, m, k, n, dtype)
    assert_batch_invariant(lambda x, w, lo, hi, off: kernels.grouped_matmul(
        x, w, (lo, hi), weight_offset=off, impl=impl), x, w, info)


GPU_CONFIGS = {
    # the default: 4 stages, one wgmma group in flight (dw's 18 k-steps: the ring wraps
    # mid-tile), and waiting for each k-step's wgmma
    "default": mgpu_kernel.DEFAULT_CONFIG,
    "delay0": dataclasses.replace(mgpu_kernel.DEFAULT_CONFIG, delay_release=0),
    "rows_split_64x192": mgpu_kernel.TuningConfig(
        tile_m=64, tile_n=192, wg_dimension=mgpu_kernel.MatmulDimension.M),
    # the default's 128 x 256 CTA tiles split by rows (a 64 x 256 wgmma per warpgroup; dw's
    # choice since s26, "dw" below)
    "rows_64x256": mgpu_kernel.ROW_SPLIT_CONFIG,
    "narrow": mgpu_kernel.NARROW_CONFIG,
    # 2-CTA clusters (the shared operand tile multicast) on the default tiles
    "cluster_n": mgpu_kernel.TuningConfig(cluster_dimension=mgpu_kernel.MatmulDimension.N),
    "stages3_slots4": mgpu_kernel.TuningConfig(max_concurrent_steps=3, epi_slots=4),
    "pingpong": mgpu_kernel.PINGPONG_CONFIG,   # one wgmma in flight
    "pingpong_delay0": dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG, delay_release=0),
    "pingpong_late_turn": dataclasses.replace(mgpu_kernel.PINGPONG_CONFIG, early_turn=False),
    # the last 2 of 4 epilogue tiles of a tile stored under the next tile's first k-steps (the
    # 192 x 192 tiles below defer 1 of 3)
    "default_defer2": dataclasses.replace(mgpu_kernel.DEFAULT_CONFIG, deferred_epi_tiles=2),
    # the default tiles in row stripes of 12 tiles (select_config's rule 8; at the test shapes'
    # few row tiles a single stripe narrower than 12)
    "row_stripes": mgpu_kernel.ROW_STRIPE_CONFIG,
    # dw's choices (rule 9): all 4 epilogue tiles deferred; in the default order split by rows
    # (since s26), in row stripes by columns; and the default order split by columns (to s25)
    "dw": mgpu_kernel.DW_CONFIG,
    "dw_row_stripes": mgpu_kernel.DW_ROW_STRIPE_CONFIG,
    "dw_columns": mgpu_kernel.DW_COLUMN_SPLIT_CONFIG,
    # k-steps of 32 elements (8 stages): B stored k-major (forward, dw) and A stored k-major
    # (dw) take a 64-byte swizzle, as wgmma reads them in k-groups of one swizzle's width
    "k32": dataclasses.replace(mgpu_kernel.DW_COLUMN_SPLIT_CONFIG, tile_k=32,
                               max_concurrent_steps=8),
    # three compute warpgroups (192-row CTA tiles; ragged n at the 1b shapes' n = 2048), the
    # 192 x 192 ones also in clusters along n and m
    **mgpu_kernel.THREE_WG_VARIANTS,
    # two warpgroups splitting 192 x 192 tiles by columns (a 64-byte swizzle with b n-minor)
    **mgpu_kernel.COLUMN_SPLIT_VARIANTS,
    # 128 x 320 tiles split by rows, two wgmma accumulators per warpgroup (ragged column tiles
    # at the test shape's n = 3072)
    **mgpu_kernel.WIDE_ROW_SPLIT_VARIANTS,
}


SWIGLU_GPU_CONFIGS = {
    "swiglu": mgpu_kernel.SWIGLU_CONFIG,
    "swiglu_delay0": dataclasses.replace(mgpu_kernel.SWIGLU_CONFIG, delay_release=0),
}


@pytest.mark.parametrize("name", [*GPU_CONFIGS, *SWIGLU_GPU_CONFIGS,
                                  *mgpu_kernel.SM_FIT_VARIANTS])
def test_every_config_lowers_for_the_gpu(name):
    """Every GPU tile schedule lowers to Mosaic GPU for CUDA, on any machine (cross-platform
    lowering): the forward, both backward products and the transposed forward (w^T @ x^T;
    transposed operand views) at the 1b qkv shape, bf16, 132 SMs, where the config serves
    them (e.g. not the 192-column tiles on dx), and the fused SwiGLU.
    Lowering errors of a new schedule show up here in CPU CI, before any GPU time; compiling to
    PTX and running stay the GPU tests' job."""
    S = jax.ShapeDtypeStruct
    g, m, k, n = 4, 1152, 2048, 3072
    bounds = S((4,), jnp.int32)
    swiglu = name in SWIGLU_GPU_CONFIGS
    if swiglu:
        cfg, cases = SWIGLU_GPU_CONFIGS[name], {"fwd": (S((g, m, k), jnp.bfloat16),
                                                        S((g, k, 2 * n), jnp.bfloat16), False,
                                                        False)}
    else:
        cfg = {**GPU_CONFIGS, **mgpu_kernel.SM_FIT_VARIANTS}[name]
        cases = {"fwd": (S((g, m, k), jnp.bfloat16), S((g, k, n), jnp.bfloat16), False, False),
                 "dx": (S((g, m, n), jnp.bfloat16), S((g, k, n), jnp.bfloat16), False, True),
                 "dw": (S((g, m, k), jnp.bfloat16), S((g, m, n), jnp.bfloat16), True, False),
                 "fwd_t": (S((g, k, n), jnp.bfloat16), S((g, m, k), jnp.bfloat16), True, True)}
    lowered = 0
    for case, (a, b, tl, tr) in cases.items():
        if mgpu_kernel.unsupported_reason(a.shape, b.shape, a.dtype, a.dtype, transpose_lhs=tl,
                                          transpose_rhs=tr, config=cfg, swiglu=swiglu):
            continue   # e.g. the 192-column tiles and dx's n = 2048
        f = jax.jit(lambda a, b, bd, tl=tl, tr=tr: mgpu_kernel.grouped_matmul_mgpu(
            a, b, bd, transpose_lhs=tl, transpose_rhs=tr, config=cfg, num_sms=132,
            swiglu=swiglu))
        text = f.trace(a, b, bounds).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text, f"{name} {case}: no Mosaic GPU kernel in the lowering"
        lowered += 1
    assert lowered >= 1
    if name in NARROW_COLUMN_VARIANTS:   # forward and dw too: a 64-byte swizzle on a and b
        assert lowered == 4


def test_kernel_probes_lower_for_the_gpu_and_stay_off_interpret_mode():
    """eval/probe_ring.py's diagnostics (the kernel without its loads, without its wgmma,
    without both) lower to Mosaic GPU for CUDA on any machine, so a GPU session does not find a
    broken probe, on the ring and on ping-pong; they compute a wrong product, so interpret mode
    (the CPU path) refuses them, naming the probe, and a misspelt probe is refused, not
    ignored."""
    S = jax.ShapeDtypeStruct
    a, b, bounds = (S((4, 1152, 2048), jnp.bfloat16), S((4, 1152, 3072), jnp.bfloat16),
                    S((2,), jnp.int32))
    for probe, config in itertools.product(
            ({"no_loads"}, {"no_mma"}, {"no_loads", "no_mma"}),
            (mgpu_kernel.DW_CONFIG, mgpu_kernel.PINGPONG_CONFIG)):
        f = jax.jit(lambda a, b, bd, probe=frozenset(probe), config=config:
                    mgpu_kernel.grouped_matmul_mgpu(a, b, bd, transpose_lhs=True, config=config,
                                                    num_sms=132, _probe=probe))
        text = f.trace(a, b, bounds).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text, (probe, config)
    x, w = jnp.zeros((2, 64, 64), jnp.float32), jnp.zeros((2, 64, 128), jnp.float32)
    with pytest.raises(ValueError, match="no_loads"):
        mgpu_kernel.grouped_matmul_mgpu(x, w, jnp.array([0, 2], jnp.int32),
                                        config=ops.INTERPRET_CONFIG, interpret=True,
                                        _probe=frozenset({"no_loads"}))
    with pytest.raises(ValueError, match="unknown probes.*no_load'"):
        mgpu_kernel.grouped_matmul_mgpu(x, w, jnp.array([0, 2], jnp.int32),
                                        config=ops.INTERPRET_CONFIG, interpret=True,
                                        _probe=frozenset({"no_load"}))


@on_gpu
def test_gpu_auto_runs_plain_single_group_matmuls_on_the_kernel():
    """"auto" on a Hopper GPU keeps single-group products without a range (the sequential
    schedule's, a training step's) on the kernel, forward and both backward products, also in
    the SwiGLU op's backward: cuBLAS is faster on most of them alone, but a training step is
    faster with the kernel, which reads the layer scan's operand slices in place
    (eval/results/train_h200.md)."""
    S = jax.ShapeDtypeStruct
    m, k, n = 1152, 2048, 2048
    x1, w1 = S((1, m, k), jnp.bfloat16), S((1, k, n), jnp.bfloat16)
    total = lambda y: jnp.sum(y.astype(jnp.float32))
    gmm = lambda x, w: total(kernels.grouped_matmul(x, w, impl="auto"))
    backward = lambda x, w, dy: ops._gmm_bwd("auto", jnp.bfloat16, None, True,
                                             (x, w, jnp.array([0, 1, 0])), dy)[:2]
    swiglu = lambda x, w: total(kernels.grouped_matmul_swiglu(x, w, impl="auto"))
    kernel_calls = lambda f, *a: jax.jit(f).lower(*a).as_text().count("mosaic_gpu")
    assert kernel_calls(gmm, x1, w1) >= 1
    assert kernel_calls(backward, x1, w1, S((1, m, n), jnp.bfloat16)) >= 2     # dx and dw
    w_gate_up = S((1, k, 2 * n), jnp.bfloat16)
    assert kernel_calls(jax.grad(swiglu, argnums=(0, 1)), x1, w_gate_up) >= 3   # fwd, dx, dw


@pytest.fixture(scope="module")
def weight_offset_case():
    """Operands (fresh each session), cotangent and float64 oracles of test_gpu_weight_offset:
    a window of 4 slots over 8 stacked weights at the 1b qkv shape, four (lo, hi, off) windows.
    Shared by the configs, so that the float64 products run once, not once per config."""
    rng, info = fresh_rng()
    g, gw, m, k, n = 4, 8, 1152, 2048, 3072
    x, _ = _operands(rng, g, m, k, n, jnp.bfloat16)
    _, w = _operands(rng, gw, m, k, n, jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((g, m, n)), jnp.float32)
    windows = {(lo, hi, off): weight_window_oracle(x, w, lo, hi, off, cot)
               for lo, hi, off in [(0, g, 4), (1, 3, 2), (3, 4, 0), (2, 2, 1)]}
    return x, w, cot, windows, info


@on_gpu
@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_gpu_weight_offset(name, weight_offset_case):
    """A window of 4 slots reading layers [off, off + 4) of 8 stacked weights, forward and
    both gradients, under several tile schedules (1b qkv shape: 32 k-steps)."""
    x, w, cot, windows, info = weight_offset_case
    cfg = GPU_CONFIGS[name]

    def loss(x, w, lo, hi, off):
        y = kernels.grouped_matmul(x, w, (lo, hi), weight_offset=off, impl="pallas", config=cfg)
        return jnp.sum(y.astype(jnp.float32) * cot), y

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    for (lo, hi, off), (y_want, dx_want, dw_want) in windows.items():
        tag = f"{info} lo={lo} hi={hi} off={off} config={name}"
        (_, y), (dx, dw) = grad_fn(x, w, jnp.int32(lo), jnp.int32(hi), jnp.int32(off))
        assert rel_err_finite(y, y_want) <= 1e-2, tag
        assert rel_err_finite(dx, dx_want) <= 1e-2, f"dx {tag}"
        assert rel_err_finite(dw, dw_want) <= 1e-2, f"dw {tag}"
        _check_idle_zero(y, lo, hi, "output", tag)
        _check_idle_zero(dw, lo + off, hi + off, "dw", tag)
