"""Training: the step (gradient accumulation exactness, loss goes down), data, `armt train`."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from armt_jax import cli
from armt_jax.config import ArmtConfig
from armt_jax.model import ArmtModel
from armt_jax.sequential import sequential_forward
from conftest import TINY, random_params
from train.data import Example, pad_batch, qa_example
from train.step import make_train_step

ACFG = ArmtConfig(segment_size=8, num_mem_tokens=2, d_mem=16)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_batch(rng, batch=4):
    """Random lengths and loss masks; the first example spans 3-4 segments and has loss tokens
    in its last one, so the memory weights always get a gradient (a draw without loss tokens
    past the first segment leaves W_mv's gradient exactly zero, which failed the W_mv check)."""
    examples = []
    for i in range(batch):
        n = int(rng.integers(17, 30) if i == 0 else rng.integers(5, 30))
        mask = (rng.random(n) < 0.5).astype(int)
        if i == 0:
            mask[-4:] = 1
        examples.append(Example(tuple(rng.integers(1, TINY.vocab_size, n)), tuple(mask)))
    return {k: jnp.asarray(v) for k, v in pad_batch(examples, ACFG.segment_size).items()}


def test_pad_batch_and_qa_example():
    encode = lambda s: [ord(c) % 50 for c in s]
    ex = qa_example({"input": "ab", "question": "q?", "target": "yes"}, encode, eos_id=7)
    assert ex.tokens[-1] == 7 and sum(ex.loss_mask) == len(" yes") + 1
    assert ex.loss_mask[-5:] == (1, 1, 1, 1, 1) and ex.loss_mask[0] == 0
    b = pad_batch([ex, Example((1, 2, 3), (0, 1, 1))], multiple=8)
    assert b["tokens"].shape[1] % 8 == 0 and list(b["lengths"]) == [len(ex.tokens), 3]
    assert b["loss_mask"][1, 3:].sum() == 0


def test_accumulation_equals_one_big_batch(rng):
    params = random_params(rng, TINY, ACFG)
    batch = random_batch(rng)
    sgd = optax.sgd(0.1)
    one = make_train_step(TINY, ACFG, sgd, accum_steps=1)
    two = make_train_step(TINY, ACFG, sgd, accum_steps=2)
    p1, _, m1 = one(params, sgd.init(params), batch)
    p2, _, m2 = two(params, sgd.init(params), batch)
    want = sequential_forward(params, batch["tokens"], TINY, ACFG, output="none",
                              compute_loss=True, loss_mask=batch["loss_mask"],
                              lengths=batch["lengths"]).loss
    np.testing.assert_allclose(m1["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m2["loss"], want, rtol=1e-5)
    for a, b, p in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
        np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(p1["memory"]["w_mv"] - params["memory"]["w_mv"]).max()) > 0


def test_loss_goes_down(rng):
    params = random_params(rng, TINY, ACFG)
    batch = random_batch(rng)
    adam = optax.adam(1e-2)
    step = make_train_step(TINY, ACFG, adam)
    state = adam.init(params)
    losses = []
    for _ in range(12):
        params, state, metrics = step(params, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.skipif(not (DATA / "tasks_1-20_v1-2.tar.gz").exists(), reason="no shared bAbI data")
def test_cli_train_end_to_end(rng, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]"] + sorted({w for w in "mary john sandra daniel went moved travelled journeyed "
                                "back to the bathroom bedroom garden hallway kitchen office where "
                                "is question answer".split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = TINY.__class__(**{**TINY.to_dict(), "vocab_size": len(words), "rope_scaling": None})
    ArmtModel(cfg, ACFG, params=random_params(rng, cfg, ACFG)).save(tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    books = tmp_path / "books"
    books.mkdir()
    (books / "b.txt").write_text("*** START OF X ***\n" + "Mary went to the garden. " * 200
                                 + "\n*** END OF X ***\n")
    out = tmp_path / "run"
    assert cli.main(["train", str(tmp_path / "ckpt"), "--babi", str(DATA / "tasks_1-20_v1-2.tar.gz"),
                     "--books", str(books), "--tasks", "1", "--context-tokens", "40",
                     "--steps", "3", "--batch-size", "2", "--warmup", "1",
                     "--out", str(out)]) == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3] and all(np.isfinite(l["loss"]) for l in lines)
    assert ArmtModel.from_checkpoint(out / "step_3").cfg == cfg
