"""Configuration parsing: Hugging Face config.json fields, and errors that name the field."""

import json

import pytest

from armt_jax.config import ArmtConfig, ConfigError, LlamaConfig

BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_defaults_and_head_dim():
    cfg = LlamaConfig.from_hf_dict(BASE)
    assert cfg.head_dim == 16 and cfg.rope_scaling is None and not cfg.tie_word_embeddings
    assert LlamaConfig.from_hf_dict({**BASE, "head_dim": 32}).head_dim == 32


def test_both_rope_spellings_agree():
    legacy = {**BASE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}
    v5 = {**BASE, "rope_parameters": {**legacy["rope_scaling"], "rope_theta": 500000.0}}
    assert LlamaConfig.from_hf_dict(legacy) == LlamaConfig.from_hf_dict(v5)
    default = {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    cfg = LlamaConfig.from_hf_dict(default)
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling is None


def test_hf_dict_round_trip(tmp_path):
    cfg = LlamaConfig.from_hf_dict({**BASE, "tie_word_embeddings": True, "eos_token_id": [1, 2],
                                    "rope_scaling": {"type": "llama3", "factor": 8.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert LlamaConfig.from_json(tmp_path) == cfg
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.eos_token_ids == (1, 2)


@pytest.mark.parametrize("change,field", [
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
    ({"head_dim": 63}, "head_dim must be even"),
])
def test_unsupported_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_dict({**BASE, **change})


@pytest.mark.parametrize("field", ["num_attention_heads", "num_key_value_heads"])
@pytest.mark.parametrize("value", [0, -2])
def test_head_counts_must_be_positive(field, value):
    """Named, not a ZeroDivisionError or a negative kv_size."""
    with pytest.raises(ConfigError, match=f"{field} must be positive, got {value}"):
        LlamaConfig.from_hf_dict({**BASE, field: value})


def test_a_config_built_by_hand_hashes():
    """jit takes the config as a static argument: config.json's spellings given directly (a
    list of EOS ids, a rope_scaling dict) are normalised, so it hashes and equals the parsed one."""
    parsed = LlamaConfig.from_hf_dict({**BASE, "eos_token_id": [7, 9], "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    fields = {**parsed.to_dict(), "eos_token_id": [7, 9]}
    assert isinstance(fields["rope_scaling"], dict)   # to_dict's spelling
    by_hand = LlamaConfig(**fields)
    assert by_hand == parsed and hash(by_hand) == hash(parsed) and by_hand.eos_token_id == (7, 9)
    with pytest.raises(ConfigError, match="rope_scaling"):
        LlamaConfig(**{**fields, "rope_scaling": {"factor": 8.0}})


def test_missing_fields_are_named():
    d = dict(BASE)
    del d["vocab_size"], d["intermediate_size"]
    with pytest.raises(ConfigError, match="vocab_size, intermediate_size"):
        LlamaConfig.from_hf_dict(d)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_json(tmp_path)


def test_armt_config_checks():
    assert ArmtConfig().d_key == 384
    with pytest.raises(ConfigError, match="segment_size"):
        ArmtConfig(segment_size=0)
    with pytest.raises(ConfigError, match="unknown ArmtConfig field"):
        ArmtConfig.from_dict({"segment_len": 4})
