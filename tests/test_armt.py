"""ARMT sequential schedule against the float64 NumPy implementation of SPEC §1.2-1.3."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from armt_jax import layers, memory
from armt_jax.config import ArmtConfig
from armt_jax.sequential import sequential_forward
from conftest import TINY, as_float64, random_params


def run_both(rng, cfg, acfg, batch, length, output="logits"):
    params = random_params(rng, cfg, acfg)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    fwd = jax.jit(lambda p, t: sequential_forward(p, t, cfg, acfg, output=output))
    got = fwd(params, jnp.asarray(tokens))
    want = [ref.armt(params, tokens[b], cfg, acfg, output=output) for b in range(batch)]
    return got, want


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("length,batch", [(5, 1), (8, 2), (29, 2), (24, 1)])
def test_sequential_matches_numpy(rng, correction, length, batch):
    acfg = ArmtConfig(segment_size=8, num_mem_tokens=4, d_mem=16, correction=correction)
    got, want = run_both(rng, TINY, acfg, batch, length)
    assert got.out.shape == (batch, length, TINY.vocab_size)
    for b in range(batch):
        logits, A, z = want[b]
        assert ref.rel_err(got.out[b], logits) <= 1e-6
        for l in range(TINY.num_hidden_layers):
            if length > acfg.segment_size:   # after one write the state is non-zero
                assert np.abs(A[l]).max() > 0
            assert ref.rel_err(got.state.A[l, b], A[l]) <= 1e-6
            assert ref.rel_err(got.state.z[l, b], z[l]) <= 1e-6


def test_float64_model_matches_numpy_to_rounding(rng):
    """With float64 parameters (under jax.enable_x64) the model computes in float64 throughout
    (RMS norm, attention's softmax, the matmuls' accumulation, the memory) and meets the float64
    NumPy reference to rounding: the oracle that the schedule tests compare in float64."""
    acfg = ArmtConfig(segment_size=8, num_mem_tokens=4, d_mem=16)
    params = random_params(rng, TINY, acfg)
    tokens = rng.integers(0, TINY.vocab_size, (2, 29)).astype(np.int32)
    with jax.enable_x64(True):
        got = sequential_forward(as_float64(params), jnp.asarray(tokens), TINY, acfg)
    assert got.out.dtype == got.state.A.dtype == jnp.float64
    for b in range(2):
        logits, A, z = ref.armt(params, tokens[b], TINY, acfg)
        assert ref.rel_err(got.out[b], logits) <= 1e-12
        for l in range(TINY.num_hidden_layers):
            assert ref.rel_err(got.state.A[l, b], A[l]) <= 1e-12
            assert ref.rel_err(got.state.z[l, b], z[l]) <= 1e-12


def numpy_attention(q, k, v, keep, scale):
    """Grouped-query attention in float64 NumPy: softmax over the kept keys (keep broadcast to
    [B, H, S, Sk]); a query that keeps none gets uniform weights, as JAX gives it."""
    H, K = q.shape[2], k.shape[2]
    logits = np.einsum("bshd,bthd->bhst", q, np.repeat(k, H // K, axis=2)) * scale
    logits = np.where(keep, logits, -1e300)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", probs, np.repeat(v, H // K, axis=2))


@pytest.mark.parametrize("masked", [False, True])
def test_float64_attention_is_jax_attention_in_float64(rng, masked):
    """layers.dot_product_attention keeps float64 in float64 (JAX's softmax is float32 for every
    dtype) with JAX's semantics: grouped-query heads, causal alignment, a broadcast mask."""
    B, S, H, K, hd = 2, 5, 4, 2, 8
    q, k, v = (rng.standard_normal((B, S, n, hd)) for n in (H, K, K))
    mask = rng.random((B, 1, S, S)) < 0.7 if masked else None
    if masked:
        mask[..., 0] = True   # every query sees a key
    kw = dict(scale=hd ** -0.5, is_causal=not masked, mask=mask)
    want = jax.nn.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), **kw)
    with jax.enable_x64(True):
        got = layers.dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), **kw)
        assert got.dtype == jnp.float64
        # in float64, to float64 rounding: the NumPy softmax over the kept keys
        keep = np.tril(np.ones((S, S), bool)) if not masked else mask
        exact = numpy_attention(q, k, v, keep, hd ** -0.5)
        assert ref.rel_err(got, exact) <= 1e-13
        with pytest.raises(ValueError, match="cudnn"):   # not silently the XLA path
            layers.dot_product_attention(*(jnp.asarray(a) for a in (q, k, v)), **kw,
                                         implementation="cudnn")
    assert ref.rel_err(want, exact) <= 1e-6   # JAX's semantics (in float32)


@pytest.mark.parametrize("c", [1, 3])
def test_cache_attention_is_masked_attention(rng, c):
    """layers.cache_attention (a decode step against its KV cache, the value product split over
    the slots) is JAX's masked attention: in float64 to float64 rounding against NumPy's softmax
    over the kept slots (grouped-query heads, batch 2, a mask per row), in bf16 to bf16
    rounding of the XLA path's result; a query that keeps no slot gets uniform weights, as in
    JAX; slots that do not split evenly are refused."""
    B, C, H, K, hd = 2, 12, 4, 2, 8
    q, k, v = (rng.standard_normal((B, s, n, hd)) for s, n in ((c, H), (C, K), (C, K)))
    keep = rng.random((B, c, C)) < 0.6
    keep[0, 0] = False                       # keeps nothing
    keep[1, :, 0] = True
    scale = hd ** -0.5
    with jax.enable_x64(True):
        got = layers.cache_attention(*(jnp.asarray(a) for a in (q, k, v, keep)), scale=scale,
                                     parts=3)
        assert got.dtype == jnp.float64
    exact = numpy_attention(q, k, v, keep[:, None], scale)
    assert ref.rel_err(got, exact) <= 1e-13
    np.testing.assert_allclose(np.asarray(got[0, 0]), np.repeat(v[0].mean(0), H // K, axis=0),
                               rtol=1e-12)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    want = layers.dot_product_attention(*bf, mask=jnp.asarray(keep)[:, None], scale=scale,
                                        implementation="xla")
    got = layers.cache_attention(*bf, jnp.asarray(keep), scale=scale, parts=4)
    assert got.dtype == jnp.bfloat16
    assert ref.rel_err(np.asarray(got, np.float64), np.asarray(want, np.float64)) <= 1e-2
    with pytest.raises(ValueError, match="12 cache slots do not split into 5 parts"):
        layers.cache_attention(*bf, jnp.asarray(keep), scale=scale, parts=5)


def test_attention_impl_auto_takes_cudnn_where_it_serves():
    """attn_impl="auto" (every entry point's default) is cuDNN's fused attention on an NVIDIA GPU
    of compute capability >= 8 for unmasked bf16 / f16 heads of <= 128 (multiples of 8), and XLA
    for everything else; an unknown name is refused by name."""
    hopper = SimpleNamespace(platform="gpu", compute_capability="9.0")
    q = jnp.zeros((2, 4, 3, 64), jnp.bfloat16)
    assert layers.attention_impl("auto", q, device=hopper) == "cudnn"
    assert layers.attention_impl("auto", q.astype(jnp.float16), device=hopper) == "cudnn"
    xla_cases = {
        "masked (the decode's KV cache)": (q, jnp.ones((2, 1, 4, 4), bool), hopper),
        "float32": (q.astype(jnp.float32), None, hopper),
        "head size 256": (jnp.zeros((2, 4, 3, 256), jnp.bfloat16), None, hopper),
        "head size 60": (jnp.zeros((2, 4, 3, 60), jnp.bfloat16), None, hopper),
        "Turing": (q, None, SimpleNamespace(platform="gpu", compute_capability="7.5")),
        "a GPU without CUDA": (q, None, SimpleNamespace(platform="gpu")),
        "CPU": (q, None, SimpleNamespace(platform="cpu")),
    }
    for case, (query, mask, device) in xla_cases.items():
        assert layers.attention_impl("auto", query, mask, device) == "xla", case
    assert layers.attention_impl(None, q, device=hopper) == "xla"        # JAX's meaning of None
    assert layers.attention_impl("cudnn", q.astype(jnp.float32)) == "cudnn"   # asked for: kept
    with pytest.raises(ValueError, match="'flash'"):
        layers.attention_impl("flash", q)


def test_memory_changes_outputs(rng):
    """The memory must matter: zeroing W_mv and the read path must change later segments only."""
    acfg = ArmtConfig(segment_size=6, num_mem_tokens=2, d_mem=16)
    params = random_params(rng, TINY, acfg)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 18)), jnp.int32)
    out = sequential_forward(params, tokens, TINY, acfg).out
    params["memory"]["w_mv"] = jnp.zeros_like(params["memory"]["w_mv"])
    inert = sequential_forward(params, tokens, TINY, acfg).out
    np.testing.assert_array_equal(out[:, :6], inert[:, :6])      # first segment reads nothing
    assert ref.rel_err(out[:, 6:], inert[:, 6:]) > 1e-3


def test_hidden_and_last_logits(rng):
    acfg = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
    got, want = run_both(rng, TINY, acfg, 2, 21, output="hidden")
    assert got.out.shape == (2, 21, TINY.hidden_size)
    for b in range(2):
        assert ref.rel_err(got.out[b], want[b][0]) <= 1e-6
    params = random_params(rng, TINY, acfg)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 21)), jnp.int32)
    full = sequential_forward(params, tokens, TINY, acfg).out
    last = sequential_forward(params, tokens, TINY, acfg, output="last_logits").out
    assert last.shape == (2, 5, TINY.vocab_size)
    np.testing.assert_allclose(last, full[:, 16:], rtol=1e-6, atol=1e-6)


def test_loss_matches_logits(rng):
    acfg = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
    params = random_params(rng, TINY, acfg)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 19)), jnp.int32)
    mask = jnp.asarray(rng.random((2, 19)) < 0.5, jnp.float32)
    res = sequential_forward(params, tokens, TINY, acfg, compute_loss=True, loss_mask=mask)
    logp = jax.nn.log_softmax(np.asarray(res.out, np.float64), -1)
    nll = -np.take_along_axis(logp[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    m = np.asarray(mask)[:, 1:]
    np.testing.assert_allclose(res.loss, (nll * m).sum() / m.sum(), rtol=1e-5)


def test_gradients_flow_through_memory(rng):
    """BPTT: the loss of the second segment depends on W_mv (only through the memory)."""
    acfg = ArmtConfig(segment_size=6, num_mem_tokens=2, d_mem=16)
    params = random_params(rng, TINY, acfg)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 12)), jnp.int32)
    mask = jnp.zeros((1, 12)).at[:, 7:].set(1.0)
    loss = lambda p: sequential_forward(p, tokens, TINY, acfg, output="none", compute_loss=True,
                                        loss_mask=mask, remat=True).loss
    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["memory"]["w_mv"]).max()) > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_associate_gradient_matches_float64(rng):
    """memory._associate's hand-written VJP (dA and dz from one product) against the float64
    derivative of (k A) / (k . z + eps) and k . z + eps, both cotangents random, with DPFP-like
    keys (non-negative, a quarter non-zero) and one key nearly orthogonal to z (a tiny
    denominator, the case that amplifies errors)."""
    G, B, S, K, D = 2, 3, 6, 16, 9
    keys = np.abs(rng.standard_normal((G, B, S, K))) * (rng.random((G, B, S, K)) < 0.25)
    z = np.abs(rng.standard_normal((G, B, K)))
    keys[0, 0, 0] = 0.0
    keys[0, 0, 0, np.argmin(z[0, 0])] = 1e-3 * rng.random()   # k . z near eps
    A = rng.standard_normal((G, B, K, D))
    c_out, c_den = rng.standard_normal((G, B, S, D)), rng.standard_normal((G, B, S))
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    (out, den), vjp = jax.vjp(memory._associate, as32(keys), as32(A), as32(z))
    d_keys, d_A, d_z = vjp((as32(c_out), as32(c_den)))

    den64 = np.einsum("gbsk,gbk->gbs", keys, z) + memory.EPS
    out64 = np.einsum("gbsk,gbkd->gbsd", keys, A) / den64[..., None]
    d_num = c_out / den64[..., None]                       # d/d num of <c_out, num / den>
    d_den = c_den - np.sum(c_out * out64, -1) / den64       # num / den^2 = out / den
    want = {"out": out64, "den": den64,
            "d_keys": d_num @ np.swapaxes(A, -1, -2) + d_den[..., None] * z[:, :, None, :],
            "d_A": np.swapaxes(keys, -1, -2) @ d_num,
            "d_z": np.einsum("gbsk,gbs->gbk", keys, d_den)}
    got = {"out": out, "den": den, "d_keys": d_keys, "d_A": d_A, "d_z": d_z}
    for name, w in want.items():
        assert ref.rel_err(np.asarray(got[name], np.float64), w) <= 1e-5, name


def test_dpfp_definition(rng):
    u = rng.standard_normal((3, 5))
    np.testing.assert_allclose(memory.dpfp(jnp.asarray(u), 3), ref.phi(u, 3), rtol=1e-6)
    assert memory.dpfp(jnp.asarray(u), 3).shape == (3, 30)



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_memory_read_matches_float64(rng, dtype):
    """memory.read in each activation dtype against SPEC's formula in float64 on a random state
    (small activations, so the memory term is as large as h), and zero state adds exactly 0 to
    large activations (float16 cannot hold phi(q) / eps, the first segment's scale: a read that
    folded it into its operands would give NaN there)."""
    acfg = ArmtConfig(segment_size=4, num_mem_tokens=2, d_mem=16)
    mp = {k: v[:1] for k, v in random_params(rng, TINY, acfg)["memory"].items() if k != "mem_tokens"}
    D, dk = TINY.hidden_size, acfg.d_key
    x = jnp.asarray(0.25 * rng.standard_normal((1, 2, 5, D)), dtype)
    st = memory.MemoryState(jnp.asarray(rng.standard_normal((1, 2, dk, D)), jnp.float32),
                            jnp.asarray(rng.uniform(0, 2, (1, 2, dk)), jnp.float32))
    x64, A, z = (np.asarray(a, np.float64) for a in (x, *st))
    q = ref.phi(x64 @ np.asarray(mp["w_mq"][0], np.float64), 3)
    term = np.einsum("gbsk,gbkd->gbsd", q, A) / (np.einsum("gbsk,gbk->gbs", q, z) + 1e-5)[..., None]
    assert np.linalg.norm(term) >= 0.5 * np.linalg.norm(x64)
    tol = {jnp.float32: 1e-6, jnp.bfloat16: 5e-3, jnp.float16: 1e-3}[dtype]
    # the decode's read of a frozen state (operands transposed, A rounded once) is the same read
    frozen = lambda x, st: memory.read_frozen(memory.frozen_reader(mp, st, dtype), x, 3)
    for read in (lambda x, st: memory.read(mp, x, st, 3), frozen):
        got = read(x, st)
        assert got.dtype == dtype
        assert ref.rel_err(np.asarray(got, np.float64), x64 + term) <= tol
    x = jnp.asarray(4 * rng.standard_normal((1, 2, 5, D)), dtype)
    zero = memory.zero_state(1, 2, dk, D)
    for read in (lambda x, st: memory.read(mp, x, st, 3), frozen):
        np.testing.assert_array_equal(np.asarray(read(x, zero)), np.asarray(x))


def test_first_segment_gamma_is_exactly_one(rng):
    """With zero state the formula gives gamma = 1 - tiny; the first-segment rule forces 1."""
    acfg = ArmtConfig(segment_size=4, num_mem_tokens=2, d_mem=16)
    mp = {k: v[:1] for k, v in random_params(rng, TINY, acfg)["memory"].items() if k != "mem_tokens"}
    mem_out = jnp.asarray(rng.standard_normal((1, 1, 2, TINY.hidden_size)), jnp.float32)
    st = memory.zero_state(1, 1, acfg.d_key, TINY.hidden_size)
    z_first = memory.write(mp, mem_out, st, jnp.array([True]), 3, True).z
    k = memory.dpfp(jnp.einsum("gbmd,gdk->gbmk", mem_out, mp["w_mk"]), 3)
    np.testing.assert_allclose(z_first, k.sum(2), rtol=1e-7)


def test_loss_counts_only_real_tokens(rng):
    acfg = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
    params = random_params(rng, TINY, acfg)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 19)), jnp.int32)
    lengths = np.array([19, 11])
    res = sequential_forward(params, tokens, TINY, acfg, compute_loss=True,
                             lengths=jnp.asarray(lengths))
    logp = jax.nn.log_softmax(np.asarray(res.out, np.float64), -1)
    nll = -np.take_along_axis(logp[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    counted = np.arange(1, 19)[None, :] < lengths[:, None]
    np.testing.assert_allclose(res.loss, nll[counted].mean(), rtol=1e-5)


def test_lengths_are_validated(rng):
    acfg = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
    params = random_params(rng, TINY, acfg)
    with pytest.raises(ValueError, match="lengths must be integers of shape"):
        sequential_forward(params, jnp.zeros((2, 9), jnp.int32), TINY, acfg,
                           lengths=jnp.array([3.0, 4.0]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 9\].*\[-1, 10\]"):
        sequential_forward(params, jnp.zeros((2, 9), jnp.int32), TINY, acfg,
                           lengths=jnp.array([-1, 10]))


def test_token_ids_are_validated(rng):
    """Every entry point refuses concrete ids outside the vocabulary (JAX's out-of-bounds gather
    would read NaN embeddings, which attention spreads to every output), non-[B, n] tokens, and
    params without the memory's weights, each naming what is wrong."""
    from armt_jax.diagonal import diagonal_forward
    from armt_jax.generate import generate

    acfg = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
    params = random_params(rng, TINY, acfg)
    V = TINY.vocab_size
    tokens = np.asarray(rng.integers(0, V, (2, 11)), np.int32)
    entry_points = {
        "sequential": lambda t, p=params: sequential_forward(p, t, TINY, acfg),
        "diagonal": lambda t, p=params: diagonal_forward(p, t, TINY, acfg),
        "generate": lambda t, p=params: generate(p, t, TINY, acfg, max_new_tokens=1),
        "llama": lambda t, p=params: layers.llama_forward(p, t, TINY),
    }
    edge = tokens.copy()
    edge[1, 7], edge[0, 3] = V - 1, 0        # the vocabulary's ends are ids like any other
    for run in entry_points.values():
        run(jnp.asarray(edge))
        for bad, (b, i) in ((V, (1, 7)), (-1, (0, 3))):
            t = tokens.copy()
            t[b, i] = bad
            with pytest.raises(ValueError, match=rf"token id {bad} at \[{b}, {i}\].*\[0, {V}\)"):
                run(jnp.asarray(t))
        with pytest.raises(ValueError, match=r"\[batch, length\].*\(11,\)"):
            run(jnp.asarray(tokens[0]))
    plain = {k: v for k, v in params.items() if k != "memory"}
    for name in ("sequential", "diagonal", "generate"):
        with pytest.raises(ValueError, match="no 'memory'.*init_params"):
            entry_points[name](jnp.asarray(tokens), plain)


def test_eager_calls_compile_once_per_shape(rng):
    """Called outside jit, each entry point compiles once per shape: a second call with other
    tokens and lengths of the same shapes compiles nothing. sequential_forward and llama_forward
    used to trace and compile their scans again on every eager call (about 1.7 s a call for a
    tiny model on the CPU, so generate(schedule="sequential") paid it on every prompt)."""
    from armt_jax.diagonal import diagonal_forward
    from armt_jax.generate import generate

    acfg = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
    params = random_params(rng, TINY, acfg)
    entry_points = {
        "sequential": lambda t, n: sequential_forward(params, t, TINY, acfg, lengths=n),
        "sequential loss": lambda t, n: sequential_forward(
            params, t, TINY, acfg, output="none", compute_loss=True, lengths=n).loss,
        "diagonal": lambda t, n: diagonal_forward(params, t, TINY, acfg, lengths=n),
        "generate sequential": lambda t, n: generate(params, t, TINY, acfg, max_new_tokens=2,
                                                     schedule="sequential", lengths=n).tokens,
        "llama": lambda t, n: layers.llama_forward(params, t, TINY),
    }
    compiles = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for name, run in entry_points.items():
            draws = [(jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 19)), jnp.int32),
                      jnp.asarray(rng.integers(9, 20, 2), jnp.int32)) for _ in range(2)]
            jax.block_until_ready(run(*draws[0]))
            first = len(compiles)
            jax.block_until_ready(run(*draws[1]))
            extra = len(compiles) - first
            assert first > 0 and extra == 0, f"{name}: {extra} compilation(s) on the second call"
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
