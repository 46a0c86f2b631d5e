"""Weight conversion: Hugging Face Llama and PyTorch ARMT formats <-> the parameter pytree.

The expected key names and layouts are written out here independently of the converter's tables
(SPEC §4), and the committed fixtures under tests/fixtures/hf_tiny were written by `transformers`.
Values are fresh random bit patterns (NaN payloads, infinities, subnormals included) where only bits
are moved, so "bit-exact" means bit-exact. `rng` (conftest.py) prints its seed for a failing run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from armt_jax.config import ArmtConfig, LlamaConfig, RopeScaling
from armt_jax.convert import (
    ConversionError, hf_tensors_from_params, infer_armt_config, load_armt,
    load_hf, params_from_armt_tensors, params_from_hf_tensors, save_armt, save_hf)
from armt_jax.convert.cli import convert_main
from armt_jax.convert.files import open_tensor_file
from armt_jax.params import expected_shapes

FIXTURES = Path(__file__).parent / "fixtures" / "hf_tiny"
BF16 = np.dtype(ml_dtypes.bfloat16)
UINT = {4: np.uint32, 2: np.uint16}


# ---- helpers ------------------------------------------------------------------------------------
def tiny_cfg(**kw) -> LlamaConfig:
    base = dict(vocab_size=37, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                max_position_embeddings=128, bos_token_id=1, eos_token_id=(2, 3))
    base.update(kw)
    return LlamaConfig(**base)


CONFIGS = {
    "gqa_untied": tiny_cfg(),
    "gqa_tied_llama3": tiny_cfg(tie_word_embeddings=True, eos_token_id=2,
                                rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32)),
    "mha_bias_untied": tiny_cfg(num_key_value_heads=4, attention_bias=True, head_dim=6),
    "mqa_bias_tied": tiny_cfg(num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True,
                              num_hidden_layers=2),
}
ARMT = ArmtConfig(segment_size=16, num_mem_tokens=5, d_mem=4)


def random_bits(rng, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    return rng.integers(0, np.iinfo(UINT[dtype.itemsize]).max, size=shape, dtype=UINT[dtype.itemsize],
                        endpoint=True).view(dtype)


def random_normal(rng, shape, dtype) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def random_params(rng, cfg, armt=None, dtype=np.float32, draw=random_bits) -> dict:
    return jax.tree.map(lambda s: draw(rng, s, dtype), expected_shapes(cfg, armt),
                        is_leaf=lambda x: isinstance(x, tuple))


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(UINT[x.dtype.itemsize])


def assert_bits_equal(got: dict, want: dict):
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
        assert g.shape == w.shape, (k, g.shape, w.shape)
        np.testing.assert_array_equal(bits(g), bits(w), err_msg=k)


def read_dir(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of every safetensors file in a directory, straight from safetensors."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as h:
            for k in h.keys():
                assert k not in out, k
                out[k] = h.get_tensor(k)
    return out


def hf_expected_params(raw: dict[str, np.ndarray], cfg: LlamaConfig) -> dict:
    """The parameter layout of armt_jax.params, built by hand from Hugging Face tensors."""
    L = cfg.num_hidden_layers
    lay = lambda i, name: raw[f"model.layers.{i}.{name}"]
    stack = lambda f: np.stack([f(i) for i in range(L)])
    p = {"embed": raw["model.embed_tokens.weight"], "final_norm": raw["model.norm.weight"], "layers": {
        "attn_norm": stack(lambda i: lay(i, "input_layernorm.weight")),
        "mlp_norm": stack(lambda i: lay(i, "post_attention_layernorm.weight")),
        "w_qkv": stack(lambda i: np.concatenate([lay(i, f"self_attn.{n}_proj.weight").T for n in "qkv"], 1)),
        "w_o": stack(lambda i: lay(i, "self_attn.o_proj.weight").T),
        "w_gate_up": stack(lambda i: np.concatenate([lay(i, "mlp.gate_proj.weight").T,
                                                     lay(i, "mlp.up_proj.weight").T], 1)),
        "w_down": stack(lambda i: lay(i, "mlp.down_proj.weight").T)}}
    if cfg.attention_bias:
        p["layers"]["b_qkv"] = stack(lambda i: np.concatenate([lay(i, f"self_attn.{n}_proj.bias")
                                                               for n in "qkv"]))
        p["layers"]["b_o"] = stack(lambda i: lay(i, "self_attn.o_proj.bias"))
    if not cfg.tie_word_embeddings:
        p["lm_head"] = raw["lm_head.weight"].T
    return p


def hf_state_dict(p: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors written by hand from parameters (the inverse of hf_expected_params)."""
    c = np.ascontiguousarray
    q, kv, F = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    sd = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]}
    if "lm_head" in p:
        sd["lm_head.weight"] = c(p["lm_head"].T)
    lp = p["layers"]
    for i in range(cfg.num_hidden_layers):
        b = f"model.layers.{i}."
        w = lp["w_qkv"][i]
        sd |= {b + "input_layernorm.weight": lp["attn_norm"][i],
               b + "post_attention_layernorm.weight": lp["mlp_norm"][i],
               b + "self_attn.q_proj.weight": c(w[:, :q].T),
               b + "self_attn.k_proj.weight": c(w[:, q:q + kv].T),
               b + "self_attn.v_proj.weight": c(w[:, q + kv:].T),
               b + "self_attn.o_proj.weight": c(lp["w_o"][i].T),
               b + "mlp.gate_proj.weight": c(lp["w_gate_up"][i][:, :F].T),
               b + "mlp.up_proj.weight": c(lp["w_gate_up"][i][:, F:].T),
               b + "mlp.down_proj.weight": c(lp["w_down"][i].T)}
        if cfg.attention_bias:
            bq = lp["b_qkv"][i]
            sd |= {b + "self_attn.q_proj.bias": bq[:q], b + "self_attn.k_proj.bias": bq[q:q + kv],
                   b + "self_attn.v_proj.bias": bq[q + kv:], b + "self_attn.o_proj.bias": lp["b_o"][i]}
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def armt_state_dict(p: dict, cfg: LlamaConfig, prefix: str = "model") -> dict[str, np.ndarray]:
    """An ARMT state dict with SPEC §4's key names. prefix: "model" (memory_cell.model.model.layers.i.),
    "layers" (memory_cell.layers.i. alias) or "both"."""
    c = np.ascontiguousarray
    sd = {"memory_cell.memory": p["memory"]["mem_tokens"]}
    for k, v in hf_state_dict(p, cfg).items():
        if k.startswith("model.layers."):
            i, rest = re.match(r"model\.layers\.(\d+)\.(.*)", k).groups()
            for b in {"model": ["memory_cell.model.model.layers."], "layers": ["memory_cell.layers."],
                      "both": ["memory_cell.model.model.layers.", "memory_cell.layers."]}[prefix]:
                sd[f"{b}{i}.layer.{rest}"] = v
        else:
            sd["memory_cell.model." + k] = v
    m = p["memory"]
    for i in range(cfg.num_hidden_layers):
        for b in {"model": ["memory_cell.model.model.layers."], "layers": ["memory_cell.layers."],
                  "both": ["memory_cell.model.model.layers.", "memory_cell.layers."]}[prefix]:
            sd |= {f"{b}{i}.W_mq.weight": c(m["w_mq"][i].T), f"{b}{i}.W_mk.weight": c(m["w_mk"][i].T),
                   f"{b}{i}.W_mv.weight": c(m["w_mv"][i].T), f"{b}{i}.W_mb.weight": c(m["w_mb"][i].T),
                   f"{b}{i}.W_mb.bias": c(m["b_mb"][i])}
    return sd


# ---- Hugging Face: round trips ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_round_trip_bit_exact(tmp_path, rng, name, dtype):
    cfg = CONFIGS[name]
    params = random_params(rng, cfg, dtype=dtype)
    save_hf(tmp_path / "a", params, cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")) == ["model.safetensors"]
    raw = read_dir(tmp_path / "a")
    assert_bits_equal(raw, hf_state_dict(params, cfg))  # the exact HF names, orientation and splits
    assert ("lm_head.weight" in raw) == (not cfg.tie_word_embeddings)
    cfg1, p1 = load_hf(tmp_path / "a", progress=False)
    assert cfg1 == cfg
    assert_bits_equal(p1, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(p1))
    save_hf(tmp_path / "b", p1, cfg1, progress=False)
    cfg2, p2 = load_hf(tmp_path / "b", progress=False)
    assert cfg2 == cfg
    assert_bits_equal(p2, params)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["torch_dtype"] == np.dtype(dtype).name


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_hf_sharded_round_trip(tmp_path, rng, dtype):
    cfg = CONFIGS["mha_bias_untied"]
    params = random_params(rng, cfg, dtype=dtype)
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    files = save_hf(tmp_path / "a", params, cfg, max_shard_size=size // 4, progress=False)
    assert len(files) >= 4
    names = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert names == [f"model-{k:05d}-of-{len(files):05d}.safetensors" for k in range(1, len(files) + 1)]
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    raw_by_file = {f.name: set(safe_open(str(f), "numpy").keys()) for f in files}
    assert index["weight_map"] == {k: f for f, keys in raw_by_file.items() for k in keys}
    assert index["metadata"]["total_size"] == size
    for f in files:  # no shard over the limit unless it holds a single tensor
        keys = raw_by_file[f.name]
        assert len(keys) == 1 or sum(v.nbytes for k, v in read_dir(tmp_path / "a").items() if k in keys) <= size // 4
    cfg1, p1 = load_hf(tmp_path / "a", progress=False)
    assert cfg1 == cfg
    assert_bits_equal(p1, params)
    save_hf(tmp_path / "b", p1, cfg1, max_shard_size="1GB", progress=False)  # sharded -> single file
    assert not (tmp_path / "b" / "model.safetensors.index.json").exists()
    assert_bits_equal(load_hf(tmp_path / "b", progress=False)[1], params)


def test_hf_dtype_cast_and_overwrite(tmp_path, rng):
    cfg = CONFIGS["gqa_tied_llama3"]
    params = random_params(rng, cfg, dtype=np.float32, draw=random_normal)
    save_hf(tmp_path, params, cfg, progress=False)
    _, p = load_hf(tmp_path, dtype="bfloat16", progress=False)
    assert_bits_equal(p, jax.tree.map(lambda x: x.astype(BF16), params))
    with pytest.raises(FileExistsError, match="model.safetensors"):
        save_hf(tmp_path, params, cfg, progress=False)
    params2 = random_params(rng, cfg, dtype=np.float32)
    save_hf(tmp_path, params2, cfg, max_shard_size=2000, overwrite=True, progress=False)
    assert not (tmp_path / "model.safetensors").exists()
    assert_bits_equal(load_hf(tmp_path, progress=False)[1], params2)


def test_hf_attach_fresh_memory(tmp_path, rng):
    cfg = CONFIGS["gqa_untied"]
    save_hf(tmp_path, random_params(rng, cfg, dtype=BF16, draw=random_normal), cfg, progress=False)
    _, p = load_hf(tmp_path, armt=ARMT, key=int(rng.integers(1 << 30)), progress=False)
    shapes = expected_shapes(cfg, ARMT)["memory"]
    assert {k: v.shape for k, v in p["memory"].items()} == shapes
    assert all(v.dtype == BF16 for v in p["memory"].values())
    assert not np.asarray(p["memory"]["w_mv"]).any()  # SPEC §1.2: W_mv starts at zero
    assert np.asarray(p["memory"]["w_mq"]).astype(np.float32).std() > 0
    with pytest.warns(UserWarning, match="memory"):  # export drops the memory, loudly
        assert "memory_cell.memory" not in hf_tensors_from_params(p, cfg, progress=False)


# ---- Hugging Face: the committed transformers fixtures -------------------------------------------
FIXTURE_NAMES = ["gqa_tied_llama3", "mha_untied_sharded", "mqa_bias"]


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"fixture directory {path} is absent (tests/fixtures/make_hf_fixtures.py makes it)")
    return path


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_params_equal_raw_tensors(name):
    path = fixture_dir(name)
    hf_config = json.loads((path / "config.json").read_text())
    raw = read_dir(path)
    cfg, params = load_hf(path, progress=False)
    assert cfg.hidden_size == hf_config["hidden_size"]
    assert cfg.num_key_value_heads == hf_config["num_key_value_heads"]
    assert cfg.tie_word_embeddings == hf_config["tie_word_embeddings"]
    assert cfg.attention_bias == hf_config["attention_bias"]
    want = hf_expected_params(raw, cfg)
    assert_bits_equal(params, want)
    # every tensor of the checkpoint went somewhere
    assert sorted(raw) == sorted(hf_state_dict(want, cfg))
    if name == "mha_untied_sharded":
        assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_reexport_is_identical(tmp_path, name):
    path = fixture_dir(name)
    cfg, params = load_hf(path, progress=False)
    save_hf(tmp_path, params, cfg, max_shard_size="100KB", progress=False)
    assert_bits_equal(read_dir(tmp_path), read_dir(path))
    assert LlamaConfig.from_json(tmp_path) == cfg


# ---- Hugging Face: errors -----------------------------------------------------------------------
def test_tied_lm_head_present(rng):
    cfg = CONFIGS["gqa_tied_llama3"]
    params = random_params(rng, cfg)
    sd = hf_state_dict(params, cfg)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()  # equal: ignored
    assert_bits_equal(params_from_hf_tensors(sd, cfg, progress=False), params)
    sd["lm_head.weight"] = random_params(rng, cfg)["embed"]
    with pytest.raises(ConversionError, match=r"lm_head\.weight .*differs"):
        params_from_hf_tensors(sd, cfg, progress=False)


def test_missing_and_unknown_keys_reported_together(rng):
    cfg = CONFIGS["mha_bias_untied"]
    sd = hf_state_dict(random_params(rng, cfg), cfg)
    i = int(rng.integers(cfg.num_hidden_layers))
    gone = [f"model.layers.{i}.self_attn.k_proj.bias", "lm_head.weight"]
    for k in gone:
        del sd[k]
    sd["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        params_from_hf_tensors(sd, cfg, progress=False)
    msg = str(e.value)
    assert "2 missing" in msg and "1 unknown" in msg
    for k in gone + ["model.layers.0.self_attn.extra.weight"]:
        assert k in msg


def test_misshaped_tensor_names_key_and_shapes(rng):
    cfg = CONFIGS["gqa_untied"]
    sd = hf_state_dict(random_params(rng, cfg), cfg)
    key = "model.layers.1.self_attn.v_proj.weight"  # [kv, D] = (16, 24); give it the transposed shape
    sd[key] = np.ascontiguousarray(sd[key].T)
    with pytest.raises(ConversionError, match=re.escape(f"{key} has shape (24, 16), expected (16, 24)")):
        params_from_hf_tensors(sd, cfg, progress=False)


def test_export_rejects_misshaped_params(rng):
    cfg = CONFIGS["gqa_untied"]
    params = random_params(rng, cfg)
    params["layers"]["w_o"] = params["layers"]["w_o"][:, :, :-1]
    with pytest.raises(ConversionError, match=r"layers/w_o has shape \(3, 32, 23\), expected \(3, 32, 24\)"):
        hf_tensors_from_params(params, cfg)


def test_missing_weights_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["gqa_untied"].to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_hf(tmp_path)


# ---- ARMT state dicts ---------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["model", "layers", "both"])
@pytest.mark.parametrize("name", ["gqa_untied", "mqa_bias_tied"])
def test_armt_state_dict_loads(tmp_path, rng, name, prefix):
    cfg = CONFIGS[name]
    params = random_params(rng, cfg, ARMT)
    assert bits(params["memory"]["w_mv"]).any()
    sd = armt_state_dict(params, cfg, prefix)
    assert_bits_equal(params_from_armt_tensors(sd, cfg, ARMT, progress=False), params)
    save_file(sd, str(tmp_path / "armt.safetensors"))
    assert_bits_equal(load_armt(tmp_path / "armt.safetensors", cfg, ARMT, progress=False), params)


def test_armt_memory_weight_layout(rng):
    """W_mq [d_mem, D] -> w_mq [D, d_mem]; W_mb [1, D] -> w_mb [D, 1]; W_mb.bias [1] -> b_mb[l];
    W_mv (square, so only values tell) transposed."""
    cfg = CONFIGS["gqa_untied"]
    params = random_params(rng, cfg, ARMT, draw=random_normal)
    sd = armt_state_dict(params, cfg)
    p = params_from_armt_tensors(sd, cfg, ARMT, progress=False)
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    i = int(rng.integers(L))
    b = f"memory_cell.model.model.layers.{i}."
    assert sd[b + "W_mq.weight"].shape == (ARMT.d_mem, D) and p["memory"]["w_mq"].shape == (L, D, ARMT.d_mem)
    assert sd[b + "W_mb.weight"].shape == (1, D) and sd[b + "W_mb.bias"].shape == (1,)
    np.testing.assert_array_equal(p["memory"]["w_mv"][i], sd[b + "W_mv.weight"].T)
    assert not np.array_equal(p["memory"]["w_mv"][i], sd[b + "W_mv.weight"])
    np.testing.assert_array_equal(p["memory"]["w_mb"][i][:, 0], sd[b + "W_mb.weight"][0])
    np.testing.assert_array_equal(p["memory"]["b_mb"][i], sd[b + "W_mb.bias"])
    np.testing.assert_array_equal(p["memory"]["mem_tokens"], sd["memory_cell.memory"])


def test_armt_alias_disagreement_names_key(rng):
    cfg = CONFIGS["gqa_untied"]
    sd = armt_state_dict(random_params(rng, cfg, ARMT), cfg, "both")
    key = "memory_cell.layers.1.W_mv.weight"
    sd[key] = sd[key].copy()
    bits(sd[key]).flat[int(rng.integers(sd[key].size))] ^= 1  # one bit of one element differs
    with pytest.raises(ConversionError, match=re.escape(key)):
        params_from_armt_tensors(sd, cfg, ARMT, progress=False)


def test_armt_tied_head_and_errors(rng):
    cfg = CONFIGS["mqa_bias_tied"]
    params = random_params(rng, cfg, ARMT)
    sd = armt_state_dict(params, cfg, "layers")
    sd["memory_cell.model.lm_head.weight"] = sd["memory_cell.model.model.embed_tokens.weight"]  # torch keeps it
    assert_bits_equal(params_from_armt_tensors(sd, cfg, ARMT, progress=False), params)
    bad = dict(sd)
    del bad["memory_cell.layers.1.W_mk.weight"]
    bad["memory_cell.layers.0.W_mz.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError, match=r"missing .*memory_cell\.model\.model\.layers\.1\.W_mk\.weight.*"
                                              r"unknown .*memory_cell\.layers\.0\.W_mz\.weight"):
        params_from_armt_tensors(bad, cfg, ARMT, progress=False)
    bad = dict(sd)
    bad["memory_cell.memory"] = np.zeros((ARMT.num_mem_tokens + 1, cfg.hidden_size), np.float32)
    with pytest.raises(ConversionError, match=re.escape("memory_cell.memory has shape (6, 24), expected (5, 24)")):
        params_from_armt_tensors(bad, cfg, ARMT, progress=False)
    bad = dict(sd)
    bad["memory_cell.layers.0.W_mb.bias"] = np.zeros((), np.float32)
    with pytest.raises(ConversionError, match=re.escape("memory_cell.layers.0.W_mb.bias has shape (), expected (1,)")):
        params_from_armt_tensors(bad, cfg, ARMT, progress=False)


@pytest.mark.parametrize("layer_prefix", ["model", "layers", "both"])
def test_armt_export_round_trip(tmp_path, rng, layer_prefix):
    cfg = CONFIGS["mha_bias_untied"]
    params = random_params(rng, cfg, ARMT, dtype=BF16)
    out = save_armt(tmp_path / "out.safetensors", params, cfg, ARMT, layer_prefix=layer_prefix, progress=False)
    raw = read_dir(tmp_path)
    assert_bits_equal(raw, armt_state_dict(params, cfg, layer_prefix))
    assert_bits_equal(load_armt(out, cfg, ARMT, progress=False), params)


@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_lora_merge(rng, dtype):
    cfg = CONFIGS["gqa_untied"]
    r, alpha = 3, 7.0
    params = random_params(rng, cfg, ARMT, dtype=dtype, draw=random_normal)
    sd = armt_state_dict(params, cfg, "both")
    peft, lora = {}, {}
    for k, v in sd.items():
        m = re.match(r"(memory_cell\.(?:model\.model\.layers|layers)\.\d+\.layer\.self_attn\.[qv]_proj)\.weight$", k)
        if m:
            mod = m[1]
            if mod.startswith("memory_cell.layers."):  # the alias holds the very same adapters
                canon = mod.replace("memory_cell.layers.", "memory_cell.model.model.layers.")
                a, b = lora[canon]
            else:
                a = random_normal(rng, (r, v.shape[1]), dtype)
                b = random_normal(rng, (v.shape[0], r), dtype)
                lora[mod] = (a, b)
            peft |= {f"{mod}.base_layer.weight": v, f"{mod}.lora_A.default.weight": a,
                     f"{mod}.lora_B.default.weight": b}
        else:
            peft[k] = v
    peft = {k.replace("memory_cell.model.", "memory_cell.model.base_model.model.", 1): v for k, v in peft.items()}
    assert any(".lora_A.default." in k and k.startswith("memory_cell.model.base_model.model.") for k in peft)

    got = params_from_armt_tensors(peft, cfg, ARMT, lora_r=r, lora_alpha=alpha, progress=False)
    # direct numpy computation in float64: W = W0 + (alpha / r) * B @ A, then the checkpoint dtype
    q, kv = cfg.q_size, cfg.kv_size
    for i in range(cfg.num_hidden_layers):
        for name, cols in (("q", slice(0, q)), ("v", slice(q + kv, q + 2 * kv))):
            key = f"memory_cell.model.model.layers.{i}.layer.self_attn.{name}_proj"
            a, b = (x.astype(np.float64) for x in lora[key])
            w = sd[key + ".weight"].astype(np.float64) + (alpha / r) * b @ a
            merged = np.asarray(got["layers"]["w_qkv"][i][:, cols])
            assert merged.dtype == dtype
            tol = 1e-5 if dtype == np.float32 else 1e-2
            np.testing.assert_allclose(merged.astype(np.float64), w.T, rtol=tol, atol=tol * np.abs(w).max())
            assert not np.array_equal(merged, params["layers"]["w_qkv"][i][:, cols])  # the merge did something
    # untouched weights stay bit-exact
    np.testing.assert_array_equal(bits(got["layers"]["w_o"]), bits(params["layers"]["w_o"]))
    np.testing.assert_array_equal(bits(got["layers"]["w_qkv"][:, :, q:q + kv]),
                                  bits(params["layers"]["w_qkv"][:, :, q:q + kv]))
    assert_bits_equal(got["memory"], params["memory"])

    with pytest.raises(ConversionError, match=r"LoRA .*lora_r and lora_alpha"):
        params_from_armt_tensors(peft, cfg, ARMT, progress=False)
    with pytest.raises(ConversionError, match=r"lora_A\.default\.weight has shape \(3, 24\), expected \(4, 24\)"):
        params_from_armt_tensors(peft, cfg, ARMT, lora_r=4, lora_alpha=alpha, progress=False)


def test_infer_armt_config(tmp_path, rng):
    cfg = CONFIGS["gqa_untied"]
    armt = ArmtConfig(segment_size=9, num_mem_tokens=int(rng.integers(1, 8)), d_mem=int(rng.integers(2, 9)))
    save_file(armt_state_dict(random_params(rng, cfg, armt), cfg, "layers"), str(tmp_path / "a.safetensors"))
    got = infer_armt_config(tmp_path / "a.safetensors", segment_size=9, correction=None)
    assert got == armt


def test_armt_config_travels_in_the_file(tmp_path, rng):
    """save_armt stores the ArmtConfig in the safetensors metadata, so the segment size and the
    correction flag (in no tensor's shape) come back; overrides still win. A file without it (the
    PyTorch code's) needs the segment size given, and metadata that contradicts the tensors'
    shapes is an error naming both."""
    cfg = CONFIGS["gqa_untied"]
    armt = ArmtConfig(segment_size=int(rng.integers(2, 64)), num_mem_tokens=int(rng.integers(1, 8)),
                      d_mem=int(rng.integers(2, 9)), correction=False)
    path = save_armt(tmp_path / "a.safetensors", random_params(rng, cfg, armt), cfg, armt, progress=False)
    assert infer_armt_config(path) == armt
    assert infer_armt_config(path, segment_size=armt.segment_size + 1, correction=None) == ArmtConfig(
        **{**armt.to_dict(), "segment_size": armt.segment_size + 1})
    with safe_open(str(path), framework="numpy") as f:   # what PyTorch's loaders look for
        assert f.metadata()["format"] == "pt"

    tensors = {k: f.get_tensor(k) for f in [safe_open(str(path), framework="numpy")] for k in f.keys()}
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ConversionError, match=r"plain\.safetensors: the segment size .* 1008"):
        infer_armt_config(tmp_path / "plain.safetensors")
    assert infer_armt_config(tmp_path / "plain.safetensors", segment_size=7) == ArmtConfig(
        segment_size=7, num_mem_tokens=armt.num_mem_tokens, d_mem=armt.d_mem)   # correction on

    lying = {**armt.to_dict(), "d_mem": armt.d_mem + 1}
    save_file(tensors, str(tmp_path / "lying.safetensors"),
              metadata={"armt_config": json.dumps(lying)})
    with pytest.raises(ConversionError, match=rf"metadata says d_mem={armt.d_mem + 1}, .* d_mem={armt.d_mem}"):
        infer_armt_config(tmp_path / "lying.safetensors")
    save_file(tensors, str(tmp_path / "junk.safetensors"), metadata={"armt_config": "{\"T\": 5}"})
    with pytest.raises(ConversionError, match=r"junk\.safetensors: its metadata 'armt_config' is no ArmtConfig"):
        infer_armt_config(tmp_path / "junk.safetensors")


def test_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "armt.bin").write_bytes(b"not really a pickle")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match="needs PyTorch"):
        open_tensor_file(tmp_path / "armt.bin")


def test_bin_with_torch(tmp_path, rng):
    torch = pytest.importorskip("torch")
    cfg = CONFIGS["gqa_untied"]
    params = random_params(rng, cfg, ARMT, dtype=BF16)
    sd = armt_state_dict(params, cfg, "both")
    torch.save({k: torch.from_numpy(bits(v).astype(np.int16)).view(torch.bfloat16) for k, v in sd.items()},
               tmp_path / "armt.bin")
    assert_bits_equal(load_armt(tmp_path / "armt.bin", cfg, ARMT, progress=False), params)


# ---- the CLI --------------------------------------------------------------------------------------
def test_cli_round_trip(tmp_path, rng):
    cfg = CONFIGS["mqa_bias_tied"]
    params = random_params(rng, cfg, ARMT, dtype=BF16)
    save_file(armt_state_dict(params, cfg, "layers"), str(tmp_path / "armt.safetensors"))
    save_hf(tmp_path / "base", {k: v for k, v in params.items() if k != "memory"}, cfg, progress=False)
    flags = ["--segment-size", "16", "--no-progress"]  # M and d_mem are read off the checkpoint
    assert convert_main(["--from", "armt", "--to", "orbax", str(tmp_path / "armt.safetensors"),
                         str(tmp_path / "ck"), "--config-dir", str(tmp_path / "base"), *flags]) == 0
    assert convert_main(["--from", "orbax", "--to", "armt", str(tmp_path / "ck"), str(tmp_path / "armt2"),
                         "--armt-layer-prefix", "layers", "--no-progress"]) == 0
    assert_bits_equal(read_dir(tmp_path / "armt2"), read_dir(tmp_path))  # byte-for-byte the same tensors
    assert convert_main(["--from", "armt", "--to", "hf", str(tmp_path / "armt2"), str(tmp_path / "hf"),
                         *flags]) == 0  # config.json found beside the weights
    assert_bits_equal(load_hf(tmp_path / "hf")[1], {k: v for k, v in params.items() if k != "memory"})
    assert convert_main(["--from", "hf", "--to", "orbax", str(tmp_path / "hf"), str(tmp_path / "ck2"),
                         "--dtype", "float32", "--with-memory", "--num-mem-tokens", "3", "--d-mem", "2",
                         "--no-correction", "--no-progress"]) == 0
    from armt_jax.checkpoint import load_checkpoint
    p2, cfg2, armt2 = load_checkpoint(tmp_path / "ck2")
    assert cfg2 == cfg and armt2 == ArmtConfig(num_mem_tokens=3, d_mem=2, correction=False)
    # orbax -> armt -> orbax keeps the settings no tensor holds (segment size, correction)
    assert convert_main(["--from", "orbax", "--to", "armt", str(tmp_path / "ck2"), str(tmp_path / "armt3"),
                         "--no-progress"]) == 0
    assert convert_main(["--from", "armt", "--to", "orbax", str(tmp_path / "armt3"), str(tmp_path / "ck3"),
                         "--no-progress"]) == 0
    assert load_checkpoint(tmp_path / "ck3")[2] == armt2
    # a PyTorch state dict without the segment size: named, no traceback
    with pytest.raises(SystemExit, match="armt convert: error: .*segment size.*--segment-size"):
        convert_main(["--from", "armt", "--to", "orbax", str(tmp_path / "armt.safetensors"),
                      str(tmp_path / "ck4"), "--config-dir", str(tmp_path / "base"), "--no-progress"])
    # memory settings without memory to apply them to
    with pytest.raises(SystemExit, match="--num-mem-tokens, --no-correction configure ARMT memory"):
        convert_main(["--from", "hf", "--to", "orbax", str(tmp_path / "hf"), str(tmp_path / "ck5"),
                      "--num-mem-tokens", "3", "--no-correction", "--no-progress"])
    assert p2["embed"].dtype == np.float32 and p2["memory"]["w_mq"].shape == (2, 24, 2)
    np.testing.assert_array_equal(p2["embed"], params["embed"].astype(np.float32))
