"""Generation: prefill + read-only-memory KV-cached decoding (SPEC §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from armt_jax.config import ArmtConfig
from armt_jax.generate import generate, sample
from armt_jax.sequential import sequential_forward
from conftest import TINY, random_params

T = 8
ACFG = ArmtConfig(segment_size=T, num_mem_tokens=3, d_mem=16)


@pytest.mark.parametrize("n", [5, 2 * T, 2 * T + 3, 4 * T])
def test_greedy_matches_forward_argmax(rng, n):
    """While generation stays inside the last segment, greedy decoding must equal repeated full
    forward passes (the last segment's text never sees its memory tokens). Includes n = k*T."""
    params = random_params(rng, TINY, ACFG)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, n)), jnp.int32)
    steps = T - ((n - 1) % T) - 1 + 1          # tokens that still fit in the last segment, >= 1
    got = generate(params, tokens, TINY, ACFG, max_new_tokens=steps, eos_token_ids=(),
                   schedule="sequential")
    seq = tokens
    for i in range(steps):
        logits = sequential_forward(params, seq, TINY, ACFG, output="last_logits").out[:, -1]
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        np.testing.assert_array_equal(got.tokens[:, i], nxt)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(got.lengths, [steps, steps])


def test_schedules_give_identical_greedy_tokens(rng):
    params = random_params(rng, TINY, ACFG)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 5 * T + 2)), jnp.int32)
    a = generate(params, tokens, TINY, ACFG, max_new_tokens=12, schedule="sequential")
    b = generate(params, tokens, TINY, ACFG, max_new_tokens=12, schedule="diagonal")
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_eos_stops_and_pads(rng):
    params = random_params(rng, TINY, ACFG)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 11)), jnp.int32)
    free = generate(params, tokens, TINY, ACFG, max_new_tokens=6, eos_token_ids=())
    eos = int(free.tokens[0, 2])
    first_eos = int(np.argmax(np.asarray(free.tokens[0]) == eos))
    stopped = generate(params, tokens, TINY, ACFG, max_new_tokens=6, eos_token_ids=(eos,),
                       pad_id=-1)
    assert int(stopped.lengths[0]) == first_eos + 1
    np.testing.assert_array_equal(stopped.tokens[0, :first_eos + 1], free.tokens[0, :first_eos + 1])
    assert (np.asarray(stopped.tokens[0, first_eos + 1:]) == -1).all()
    # one EOS id as a plain int, as LlamaConfig.eos_token_id takes it
    as_int = generate(params, tokens, TINY, ACFG, max_new_tokens=6, eos_token_ids=eos, pad_id=-1)
    np.testing.assert_array_equal(as_int.tokens, stopped.tokens)
    with pytest.raises(ValueError, match=rf"eos_token_ids must lie in \[0, {TINY.vocab_size}\).*\[-1\]"):
        generate(params, tokens, TINY, ACFG, max_new_tokens=2, eos_token_ids=(eos, -1))


def test_one_decode_program_for_every_context_length(rng):
    """The last segment is decoded padded to T with its length traced, so contexts whose last
    segments differ in length share one compiled decode (it compiled once per length, up to T
    programs); the tokens are those of the forward's argmax (first) and of a separate call."""
    import importlib
    gen = importlib.import_module("armt_jax.generate")   # the module, not the function
    params = random_params(rng, TINY, ACFG)
    before = gen._decode._cache_size()
    for n in (T + 1, T + 4, 2 * T):   # last segments of 1, 4 and T tokens after one full one
        tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, n)), jnp.int32)
        out = generate(params, tokens, TINY, ACFG, max_new_tokens=7, schedule="sequential")
        logits = sequential_forward(params, tokens, TINY, ACFG).out
        np.testing.assert_array_equal(out.tokens[:, 0], np.argmax(logits[:, -1], -1))
    assert gen._decode._cache_size() - before == 1


def test_an_empty_context_is_named(rng):
    """A sequence of length 0 in a batch has nothing to continue: named by its index (the
    error was about a negative length the caller never passed)."""
    params = random_params(rng, TINY, ACFG)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (3, 12)), jnp.int32)
    with pytest.raises(ValueError, match=r"lengths must be >= 1, got 0 for sequence\(s\) \[1\]"):
        generate(params, tokens, TINY, ACFG, max_new_tokens=2, lengths=jnp.array([12, 0, 5]))


def test_sampling_filters(rng):
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    key = jax.random.key(int(rng.integers(1 << 30)))
    draws = jnp.stack([sample(logits, k, 1.0, 3, None) for k in jax.random.split(key, 64)])
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(np.isin(np.asarray(draws)[:, b], top3[b]).all() for b in range(4))
    draws = jnp.stack([sample(logits, k, 1.0, None, 1e-6) for k in jax.random.split(key, 16)])
    np.testing.assert_array_equal(draws, np.broadcast_to(np.argmax(logits, -1), draws.shape))
    np.testing.assert_array_equal(sample(logits, key, 0.0, None, None), np.argmax(logits, -1))


def test_sampling_needs_key(rng):
    params = random_params(rng, TINY, ACFG)
    with pytest.raises(ValueError, match="PRNG key"):
        generate(params, jnp.zeros((1, 3), jnp.int32), TINY, ACFG, max_new_tokens=2,
                 temperature=0.7)


@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_batch_of_different_lengths_equals_one_by_one(rng, schedule):
    """Right-padded contexts of different lengths (one a multiple of T, one shorter than T):
    every row generates what that context generates alone; the padding content is irrelevant."""
    params = random_params(rng, TINY, ACFG)
    lengths = np.array([3 * T + 2, 2 * T, 5])
    tokens = rng.integers(0, TINY.vocab_size, (3, lengths.max())).astype(np.int32)
    got = generate(params, jnp.asarray(tokens), TINY, ACFG, max_new_tokens=7, schedule=schedule,
                   lengths=jnp.asarray(lengths), eos_token_ids=())
    for b, n in enumerate(lengths):
        alone = generate(params, jnp.asarray(tokens[b:b + 1, :n]), TINY, ACFG, max_new_tokens=7,
                         schedule=schedule, eos_token_ids=())
        np.testing.assert_array_equal(got.tokens[b], alone.tokens[0])


def test_decode_through_the_kernel_in_interpret_mode(rng):
    """The decode's projections on the Mosaic GPU kernel (interpret mode, float32): one token of
    2 sequences is 2 rows (kernels/split_k.py: k split over the kernel's groups, the layer read
    out of the stacked weights through the weight offset), the last segment's 2 x 56 rows take
    the plain kernel. A decode chunk's hidden states and KV cache equal XLA's to float32
    rounding (a wrong layer or slice shows far above it), after a prefill with random W_mv."""
    import dataclasses
    import importlib

    from armt_jax import memory
    from armt_jax.armt import layer_weights
    from armt_jax.generate import prefill
    from armt_jax.layers import embed
    gen = importlib.import_module("armt_jax.generate")   # the module, not the function

    cfg = dataclasses.replace(TINY, vocab_size=64, hidden_size=128, intermediate_size=256,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              rope_scaling=None)
    acfg = ArmtConfig(segment_size=56, num_mem_tokens=8, d_mem=16)
    params = random_params(rng, cfg, acfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 2 * 56)), jnp.int32)
    state = prefill(params, tokens[:, :56], cfg, acfg, schedule="sequential", gmm_impl="xla")
    reader = memory.frozen_reader(layer_weights(params)[1], state, jnp.float32)
    L, C = cfg.num_hidden_layers, 8 * gen.CACHE_PARTS      # slots split evenly, as _decode sizes them
    cache = ((jnp.zeros((2, C, 2, 32)),) * 2,) * L
    outputs = {}
    for impl in ("interpret", "xla"):
        run = lambda cache, x, pos0, impl=impl: gen._decode_chunk(
            params, reader, cache, x, pos0, cfg, acfg, attn_impl="xla", gmm_impl=impl)
        h_segment, cache_impl = run(cache, embed(params, tokens[:, 56:]), jnp.zeros(2, jnp.int32))
        h_token, cache_impl = run(cache_impl, embed(params, tokens[:, :1]),
                                  jnp.full((2,), 56, jnp.int32))
        outputs[impl] = (h_segment, h_token, *(jnp.stack(kv) for kv in zip(*cache_impl)))
    for name, got, want in zip(("segment", "token", "k cache", "v cache"),
                               outputs["interpret"], outputs["xla"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
