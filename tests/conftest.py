"""Shared test helpers: tiny configs and fully random parameters (W_mv included: it is zero at
initialisation, which would hide memory bugs)."""

from __future__ import annotations

import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from armt_jax.config import ArmtConfig, LlamaConfig, RopeScaling
from armt_jax.params import expected_shapes

TINY = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                   rope_theta=10000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16),
                   tie_word_embeddings=False)


def random_params(rng: np.random.Generator, cfg: LlamaConfig, armt: ArmtConfig | None = None,
                  dtype=np.float32) -> dict:
    """Every parameter random and non-trivial: norm weights near 1, unit-variance embeddings and
    memory tokens, matrices ~ 0.5/sqrt(fan_in) (memory query/key projections 1/sqrt(fan_in)).

    The scale keeps float32 round-off well under the 1e-6 tolerance: the memory correction divides
    by k.z + 1e-5, which amplifies round-off when a key is nearly orthogonal to z (common for very
    sparse DPFP keys, d_mem <= 8), so tests use d_mem >= 16."""
    def draw(path, shape):
        name = path[-1]
        if name.endswith("norm"):
            return 1.0 + 0.2 * rng.standard_normal(shape)
        if name in ("embed", "mem_tokens"):
            return rng.standard_normal(shape)
        fan_in = shape[-2] if len(shape) >= 2 else 1
        scale = 1.0 if name in ("w_mq", "w_mk") else 0.5
        return scale * rng.standard_normal(shape) / np.sqrt(fan_in)

    def build(tree, path=()):
        if isinstance(tree, dict):
            return {k: build(v, path + (k,)) for k, v in tree.items()}
        return jnp.asarray(draw(path, tree), dtype)

    return build(expected_shapes(cfg, armt))


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drop JAX's compiled programs after each test module. Each compiled CPU program holds
    memory maps (its code); with every program of the suite alive, the process's map count
    climbed past 34000 within one test module (sampled every 30 s), and XLA's CPU compiler
    crashed (SIGSEGV /
    SIGABRT) late in the session, near Linux's default limit of 65530 maps
    (vm.max_map_count). After each module the count falls back to about 1500."""
    yield
    jax.clear_caches()


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)


def skip_deferral_on_one_core():
    """Interpret-mode runs with deferred epilogue tiles hang on a single CPU core (pinned to one,
    every one of them did, and none without deferral): two simulated threads wait at a kernel
    barrier inside callbacks on XLA's CPU threads while the other two block inside XLA's
    execute call, the CPU idle (kernels/tuning.py, unsupported_reason)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("deferred epilogue tiles in interpret mode hang on a single CPU core")


def as_float64(params):
    """The parameters in float64 (call inside ``jax.enable_x64``)."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)


def fresh_rng() -> tuple[np.random.Generator, str]:
    """A generator on a fresh seed, and "seed=..." for assertion messages."""
    seed = int(np.random.SeedSequence().entropy % (2**63))
    return np.random.default_rng(seed), f"seed={seed}"


def rel_err_finite(got, want) -> float:
    """Relative L2 error in float64; fails on any non-finite value in `got` (an output element
    the kernel never wrote shows up as the NaN that interpret mode poisons buffers with)."""
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    assert np.all(np.isfinite(got)), "non-finite values (unwritten output?)"
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def weight_window_oracle(x, w, lo, hi, off, cot):
    """float64 NumPy: y[g] = x[g] @ w[g + off] on [lo, hi), zeros elsewhere; the gradients of
    sum(y * cot) (dw zero outside the window's active groups): (y, dx, dw)."""
    x64, w64, c64 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, w, cot))
    g = x64.shape[0]
    y = np.zeros((g, x64.shape[1], w64.shape[2]))
    dx, dw = np.zeros_like(x64), np.zeros_like(w64)
    for i in range(lo, hi):
        y[i] = x64[i] @ w64[i + off]
        dx[i] = c64[i] @ w64[i + off].T
        dw[i + off] = x64[i].T @ c64[i]
    return y, dx, dw


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (jit, while, switch branches...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from all_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from all_eqns(sub)


def assert_batch_invariant(op, x, w, info):
    """`op(x, w, lo, hi, offset)` run on a window of groups at a weight offset gives bitwise the
    rows of the run over all groups (a kernel tile's k-loop does not depend on the group count)."""
    run = jax.jit(op)
    i32 = jnp.int32
    g = x.shape[0]
    everything = np.asarray(run(x, w, i32(0), i32(g), i32(0)), np.float32)
    for lo, hi in [(1, 2), (0, g - 1), (g - 1, g)]:
        part = run(x[lo:hi], w, i32(0), i32(hi - lo), i32(lo))
        np.testing.assert_array_equal(np.asarray(part, np.float32), everything[lo:hi],
                                      err_msg=f"{info} window [{lo}, {hi})")
