"""BABILong evaluation: plumbing with oracle answers, and `armt eval` end to end on a tiny model."""

import json
from pathlib import Path

import pytest

from armt_jax import cli
from armt_jax.config import ArmtConfig
from armt_jax.model import ArmtModel
from conftest import TINY, random_params
from eval.run_babilong import evaluate, markdown_table, write_report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BABI = DATA / "tasks_1-20_v1-2.tar.gz"
BOOKS = ["*** START OF X ***\n" + "The sun rose over the quiet hills. " * 300 + "\n*** END OF X"]
words = lambda s: len(s.split())
needs_data = pytest.mark.skipif(not BABI.exists(), reason="no shared bAbI data")


@needs_data
def test_oracle_and_wrong_answers(tmp_path):
    books = [BOOKS[0].split("\n")[1]]
    rows = evaluate(lambda prompts: ["Answer unknown."] * len(prompts), BABI, books, [1, 8],
                    [0, 60], words, samples=5, batch_size=2, progress=False)
    assert [r["accuracy"] for r in rows] == [0.0] * 4 and all(r["n"] == 5 for r in rows)

    seen = []                                  # the prompts, in order (evaluation is seeded)
    first = evaluate(lambda prompts: seen.extend(prompts) or [""] * len(prompts), BABI, books,
                     [1], [60], words, samples=3, progress=False)
    truth = {p: a["target"] for p, a in zip(seen, first[0]["answers"])}
    rows = evaluate(lambda prompts: [f"In the {truth[p]}." for p in prompts], BABI, books, [1],
                    [60], words, samples=3, progress=False)
    assert rows[0]["accuracy"] == 100.0
    assert "| qa1 | 100 |" in markdown_table(rows)
    write_report(rows, tmp_path, "oracle")
    assert (tmp_path / "babilong.png").stat().st_size > 1000
    assert json.loads((tmp_path / "babilong.json").read_text())["rows"][0]["n"] == 3


@needs_data
def test_cli_eval_end_to_end(rng, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = ["[UNK]"] + "mary john went to the garden hallway kitchen where is question answer".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = TINY.__class__(**{**TINY.to_dict(), "vocab_size": len(vocab), "rope_scaling": None})
    acfg = ArmtConfig(segment_size=16, num_mem_tokens=2, d_mem=16)
    ArmtModel(cfg, acfg, params=random_params(rng, cfg, acfg)).save(tmp_path / "ckpt")
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    books = tmp_path / "books"
    books.mkdir()
    (books / "b.txt").write_text(BOOKS[0])
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--babi", str(BABI), "--books", str(books),
                     "--tasks", "1", "--lengths", "0", "40", "--samples", "3",
                     "--max-new-tokens", "3", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "babilong.json").read_text())["rows"]
    assert [(r["task"], r["length"], r["n"]) for r in rows] == [(1, 0, 3), (1, 40, 3)]
    assert all(0 <= r["accuracy"] <= 100 for r in rows)
