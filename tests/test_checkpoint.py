"""Own checkpoints (Orbax + JSON configs): bit-exact round trips, configs included, and clear errors.

Parameters are fresh random bit patterns (NaN payloads, infinities and subnormals included), so a
round trip that passes through arithmetic or a lossy dtype cannot pass. `rng` comes from conftest.py.
"""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from armt_jax.checkpoint import CONFIG_FILE, load_checkpoint, load_configs, save_checkpoint
from armt_jax.config import ArmtConfig, LlamaConfig, RopeScaling
from armt_jax.params import expected_shapes

BF16 = np.dtype(ml_dtypes.bfloat16)
UINT = {4: np.uint32, 2: np.uint16}

CFG = LlamaConfig(vocab_size=29, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6,
                  rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
                  tie_word_embeddings=True, attention_bias=True, max_position_embeddings=4096,
                  bos_token_id=5, eos_token_id=(6, 7))
CFG_UNTIED = LlamaConfig(vocab_size=31, hidden_size=12, intermediate_size=20, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=4)
ARMT = ArmtConfig(segment_size=7, num_mem_tokens=3, d_mem=5, correction=False)


def random_bits(rng, cfg, armt, dtype) -> dict:
    dtype = np.dtype(dtype)
    uint = UINT[dtype.itemsize]
    return jax.tree.map(
        lambda s: rng.integers(0, np.iinfo(uint).max, size=s, dtype=uint, endpoint=True).view(dtype),
        expected_shapes(cfg, armt), is_leaf=lambda x: isinstance(x, tuple))


def assert_bits_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, (path, g.dtype, w.dtype, g.shape, w.shape)
        np.testing.assert_array_equal(g.view(UINT[g.dtype.itemsize]), w.view(UINT[w.dtype.itemsize]),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cfg,armt", [(CFG, ARMT), (CFG_UNTIED, None), (CFG_UNTIED, ArmtConfig(d_mem=3))],
                         ids=["tied_bias_armt", "untied_plain", "untied_armt"])
def test_round_trip_bit_exact(tmp_path, rng, cfg, armt, dtype):
    params = random_bits(rng, cfg, armt, dtype)
    as_jax = bool(rng.integers(2))  # numpy and jax inputs both work
    save_checkpoint(tmp_path / "ck", jax.tree.map(jax.numpy.asarray, params) if as_jax else params, cfg, armt)
    got, cfg2, armt2 = load_checkpoint(tmp_path / "ck")
    assert cfg2 == cfg and armt2 == armt
    assert isinstance(cfg2.eos_token_id, (int, tuple, type(None)))
    assert_bits_equal(got, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(got))
    assert load_configs(tmp_path / "ck") == (cfg, armt)
    meta = json.loads((tmp_path / "ck" / CONFIG_FILE).read_text())
    assert meta["llama"]["hidden_size"] == cfg.hidden_size
    assert (meta["armt"] is None) == (armt is None)


def test_overwrite(tmp_path, rng):
    first, second = (random_bits(rng, CFG, ARMT, np.float32) for _ in range(2))
    save_checkpoint(tmp_path, first, CFG, ARMT)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(tmp_path, second, CFG, ARMT)
    assert_bits_equal(load_checkpoint(tmp_path)[0], first)
    save_checkpoint(tmp_path, second, CFG, ARMT, overwrite=True)
    assert_bits_equal(load_checkpoint(tmp_path)[0], second)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="not an armt-jax checkpoint"):
        save_checkpoint(tmp_path / "other", second, CFG, ARMT, overwrite=True)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no armt-jax checkpoint at {tmp_path / 'nowhere'}"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no armt-jax checkpoint at .*empty.*lacks {CONFIG_FILE}"):
        load_checkpoint(tmp_path / "empty")


def test_params_must_match_configs(tmp_path, rng):
    params = random_bits(rng, CFG, ARMT, np.float32)
    with pytest.raises(ValueError, match="unexpected memory/mem_tokens"):
        save_checkpoint(tmp_path / "a", params, CFG, None)  # memory params but no ArmtConfig
    params["layers"]["w_o"] = params["layers"]["w_o"][:, :-1]
    with pytest.raises(ValueError, match=r"layers/w_o has shape \(2, 15, 16\), expected \(2, 16, 16\)"):
        save_checkpoint(tmp_path / "b", params, CFG, ARMT)
    assert not (tmp_path / "b" / CONFIG_FILE).exists()
