"""The Llama base model against Hugging Face transformers (golden logits from
tests/fixtures/make_hf_fixtures.py: transformers 5.24, float32, eager attention)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.convert import load_armt, load_hf, save_armt
from armt_jax.layers import llama_forward
from armt_jax.sequential import sequential_forward
from conftest import random_params

FIXTURES = Path(__file__).parent / "fixtures" / "hf_tiny"
NAMES = ["gqa_tied_llama3", "mha_untied_sharded", "mqa_bias"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    cfg, params = load_hf(FIXTURES / name)
    golden = np.load(FIXTURES / name / "golden.npz")
    fwd = jax.jit(lambda p, t: llama_forward(p, t, cfg))
    for ids, want in ((golden["input_ids"], golden["logits"]),
                      (golden["input_ids"][:, :5], golden["logits_short"])):
        got = fwd(params, jnp.asarray(ids))
        assert got.shape == want.shape
        assert ref.rel_err(got, want) <= 1e-5, name


def test_nnx_llama_module_matches_transformers():
    from armt_jax.model import LlamaModel
    cfg, params = load_hf(FIXTURES / "mha_untied_sharded")
    golden = np.load(FIXTURES / "mha_untied_sharded" / "golden.npz")
    model = LlamaModel(cfg, params=params)
    assert ref.rel_err(model(jnp.asarray(golden["input_ids"])), golden["logits"]) <= 1e-5


def test_fixture_configs_cover_the_features():
    """The fixtures must exercise what the test claims: GQA, MQA, tied/untied, llama3 RoPE,
    head_dim != hidden/heads, attention bias."""
    cfgs = {n: LlamaConfig.from_json(FIXTURES / n) for n in NAMES}
    c = cfgs["gqa_tied_llama3"]
    assert c.rope_scaling is not None and c.tie_word_embeddings
    assert c.head_dim != c.hidden_size // c.num_attention_heads
    assert 1 < c.num_key_value_heads < c.num_attention_heads
    assert not cfgs["mha_untied_sharded"].tie_word_embeddings
    assert cfgs["mqa_bias"].attention_bias and cfgs["mqa_bias"].num_key_value_heads == 1


def test_numpy_reference_matches_transformers():
    """The float64 oracle used by the ARMT tests agrees with transformers too."""
    cfg, params = load_hf(FIXTURES / "gqa_tied_llama3")
    golden = np.load(FIXTURES / "gqa_tied_llama3" / "golden.npz")
    got = ref.llama(params, golden["input_ids"][0], cfg)
    assert ref.rel_err(got, golden["logits"][0]) <= 1e-5


def test_legacy_llama32_config():
    cfg = LlamaConfig.from_json(FIXTURES / "legacy_config_llama3")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim) == (16, 2048, 64)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 32.0
    assert cfg.tie_word_embeddings


def test_armt_checkpoint_gives_same_logits(rng, tmp_path):
    cfg, _ = load_hf(FIXTURES / "gqa_tied_llama3")
    acfg = ArmtConfig(segment_size=8, num_mem_tokens=3, d_mem=16)
    params = random_params(rng, cfg, acfg)
    path = save_armt(tmp_path / "armt.safetensors", params, cfg, acfg, layer_prefix="layers")
    loaded = load_armt(path, cfg, acfg)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 19)), jnp.int32)
    want = sequential_forward(params, tokens, cfg, acfg)
    got = sequential_forward(loaded, tokens, cfg, acfg)
    np.testing.assert_array_equal(got.out, want.out)
    np.testing.assert_array_equal(got.state.A, want.state.A)
