"""The NNX module and the `armt` command."""

import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from armt_jax import cli
from armt_jax.config import ArmtConfig
from armt_jax.generate import generate
from armt_jax.model import ArmtModel
from armt_jax.sequential import sequential_forward
from conftest import TINY, random_params

ACFG = ArmtConfig(segment_size=8, num_mem_tokens=3, d_mem=16)


def test_module_calls_the_functional_core(rng):
    params = random_params(rng, TINY, ACFG)
    model = ArmtModel(TINY, ACFG, params=params)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 21)), jnp.int32)
    want = sequential_forward(params, tokens, TINY, ACFG).out
    np.testing.assert_array_equal(model(tokens, schedule="sequential").out, want)
    np.testing.assert_allclose(model(tokens).out, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        model(tokens, schedule="parallel")
    # the loss through either schedule (the diagonal one differentiable too: test_diagonal.py)
    mask = jnp.asarray(rng.random((2, 21)) < 0.6)
    losses = [model(tokens, schedule=s, output="none", compute_loss=True, loss_mask=mask).loss
              for s in ("sequential", "diagonal")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_module_trains_with_nnx_optimizer(rng):
    import optax
    model = ArmtModel(TINY, ACFG, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 20)), jnp.int32)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    loss_fn = lambda m: m(tokens, schedule="sequential", output="none", compute_loss=True).loss

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_module_rejects_mismatched_params(rng):
    params = random_params(rng, TINY, ACFG)
    params["layers"]["w_o"] = params["layers"]["w_o"][:, :-1]
    with pytest.raises(ValueError, match="layers/w_o"):
        ArmtModel(TINY, ACFG, params=params)


def test_cli_generate_from_checkpoint(rng, tmp_path, capsys):
    params = random_params(rng, TINY, ACFG)
    ArmtModel(TINY, ACFG, params=params).save(tmp_path / "ckpt")
    ids = rng.integers(0, TINY.vocab_size, 13)
    (tmp_path / "prompt.txt").write_text(" ".join(map(str, ids)))
    assert cli.main(["generate", str(tmp_path / "ckpt"), str(tmp_path / "prompt.txt"),
                     "--max-new-tokens", "5", "--schedule", "sequential"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    want = generate(params, jnp.asarray(ids[None], jnp.int32), TINY, ACFG, max_new_tokens=5)
    assert printed == [int(t) for t in want.tokens[0, :int(want.lengths[0])]]


def test_prompts_start_with_one_bos_whatever_the_tokenizer(rng, tmp_path, capsys):
    """`armt generate`, `train` and `eval` build a prompt alike (cli.prompt_encoder): the
    config's BOS, then the text without the tokenizer's special tokens, so a tokenizer file
    whose post-processor adds a BOS (Llama 3's) gives one BOS, as one without does; generate's
    output is the functional core's on those ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[UNK]", "<s>", "mary", "went", "to", "the", "garden"]
    cfg = dataclasses.replace(TINY, bos_token_id=1)
    for post in (False, True):
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if post:
            tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                               special_tokens=[("<s>", 1)])
            assert tok.encode("mary went").ids == [1, 2, 3]
        assert cli.prompt_encoder(tok, cfg)("mary went to the garden") == [1, 2, 3, 4, 5, 6]
    assert cli.prompt_encoder(tok, TINY)("mary went") == [2, 3]   # no BOS in the config

    params = random_params(rng, cfg, ACFG)
    ArmtModel(cfg, ACFG, params=params).save(tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    (tmp_path / "prompt.txt").write_text("mary went to the garden mary went to")
    assert cli.main(["generate", str(tmp_path / "ckpt"), str(tmp_path / "prompt.txt"),
                     "--max-new-tokens", "4"]) == 0
    want = generate(params, jnp.asarray([[1, 2, 3, 4, 5, 6, 2, 3, 4]], jnp.int32), cfg, ACFG,
                    max_new_tokens=4)
    assert capsys.readouterr().out.strip() == tok.decode(
        [int(t) for t in want.tokens[0, :int(want.lengths[0])]])


def test_cli_generate_names_missing_files(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no prompt file"):
        cli.main(["generate", str(tmp_path), str(tmp_path / "missing.txt")])
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("1 2 3")
    with pytest.raises(SystemExit) as stop:   # one line naming the checkpoint, no traceback
        cli.main(["generate", str(tmp_path / "no_checkpoint"), str(prompt)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "armt generate: error: no armt-jax checkpoint at" in err and "no_checkpoint" in err


def test_a_plain_llama_is_no_armt_model(rng, tmp_path, capsys):
    """A checkpoint without memory (`armt convert --from hf` without --with-memory) loads as a
    LlamaModel; as an ArmtModel, and so in `armt generate`, it is an error saying what to do
    (it was an AttributeError deep in generate), as is an ArmtModel without an ArmtConfig."""
    from armt_jax.config import ConfigError
    from armt_jax.layers import llama_forward
    from armt_jax.model import LlamaModel

    params = {k: v for k, v in random_params(rng, TINY, ACFG).items() if k != "memory"}
    from armt_jax.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "llama", params, TINY, None)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (1, 9)), jnp.int32)
    np.testing.assert_array_equal(LlamaModel.from_checkpoint(tmp_path / "llama")(tokens),
                                  llama_forward(params, tokens, TINY))
    with pytest.raises(ConfigError, match="holds a plain Llama, no ARMT memory.*--with-memory"):
        ArmtModel.from_checkpoint(tmp_path / "llama")
    with pytest.raises(ConfigError, match="ArmtModel needs an ArmtConfig, got None"):
        ArmtModel(TINY, None, params=params)
    (tmp_path / "prompt.txt").write_text("1 2 3")
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", str(tmp_path / "llama"), str(tmp_path / "prompt.txt")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "armt generate: error: checkpoint" in err and "no ARMT memory" in err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
    (["demo", "--tokens", "many"], "argument --tokens: invalid int >= 1 value: 'many'"),
    (["demo", "--hidden", "65", "--layers", "1"], "head_dim must be even"),
    (["generate", "ckpt", "p.txt", "--top-p", "1.5"], "argument --top-p: must be in (0, 1]"),
    (["generate", "ckpt", "p.txt", "--temperature", "-1"], "--temperature: must be at least 0"),
    (["train", "ckpt", "--babi", "b", "--books", "k", "--out", "o", "--tasks", "1", "21"],
     "argument --tasks: must be in 1..20, got 21"),
    (["train", "ckpt", "--babi", "b", "--books", "k", "--out", "o", "--accum-steps", "0"],
     "argument --accum-steps: must be at least 1"),
    (["eval", "ckpt", "--babi", "b", "--books", "k", "--out", "o", "--lengths", "0", "-1"],
     "argument --lengths: must be at least 0, got -1"),
    (["convert", "--from", "hf", "--to", "orbax", "in", "out", "--d-mem", "0"],
     "argument --d-mem: must be at least 1, got 0"),
])
def test_cli_refuses_bad_numbers_naming_the_option(argv, message, capsys):
    """A bad numeric option stops the command before anything loads or compiles, with one line
    naming the option and the allowed range (argparse's exit status 2), not a traceback."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and f"armt {argv[0]}: error:" in err and "Traceback" not in err


def test_cli_demo(capsys):
    assert cli.main(["demo", "--tokens", "300", "--layers", "2", "--hidden", "64",
                     "--segment-size", "64", "--num-mem-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "diagonal" in out and "tokens/s" in out


def test_cli_compilation_cache_keeps_compiled_programs(tmp_path):
    """`armt --compilation-cache DIR demo ...` (a fresh process: JAX reads the setting at its
    first compile) leaves the compiled programs in DIR, and the command still runs."""
    cache = tmp_path / "jax_cache"
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "armt_jax.cli", "--compilation-cache", str(cache), "demo",
         "--tokens", "200", "--layers", "2", "--hidden", "64", "--segment-size", "64",
         "--num-mem-tokens", "4"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokens/s" in done.stdout
    assert any(p.is_file() for p in cache.rglob("*")), "no compiled program in the cache"
