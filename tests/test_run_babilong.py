"""BABILong evaluation: plumbing with oracle answers, and `armt eval` end to end on a tiny model."""

import json
import re
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


def _word_level_checkpoint(rng, path, words: str) -> None:
    """A tiny random ARMT checkpoint at `path` with a word-level tokenizer.json over `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = ["[UNK]"] + words.split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = TINY.__class__(**{**TINY.to_dict(), "vocab_size": len(vocab), "rope_scaling": None})
    acfg = ArmtConfig(segment_size=16, num_mem_tokens=2, d_mem=16)
    ArmtModel(cfg, acfg, params=random_params(rng, cfg, acfg)).save(path)
    tok.save(str(path / "tokenizer.json"))


@needs_data
def test_cli_eval_end_to_end(rng, tmp_path):
    _word_level_checkpoint(rng, tmp_path / "ckpt",
                           "mary john went to the garden hallway kitchen where is question answer")
    books = tmp_path / "books"
    books.mkdir()
    (books / "b.txt").write_text(BOOKS[0])
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--babi", str(BABI), "--books", str(books),
                     "--tasks", "1", "--lengths", "0", "40", "--samples", "3",
                     "--max-new-tokens", "3", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "babilong.json").read_text())["rows"]
    assert [(r["task"], r["length"], r["n"]) for r in rows] == [(1, 0, 3), (1, 40, 3)]
    assert all(0 <= r["accuracy"] <= 100 for r in rows)


def _write_published(root, tasks, lengths, n=3):
    """A miniature published set: qa{task}/{length}.json holding n rows each."""
    for task in tasks:
        (root / f"qa{task}").mkdir(parents=True, exist_ok=True)
        for length in lengths:
            rows = [{"input": f"Mary went to the kitchen. ({length} {i})", "question": "Where is Mary?",
                     "target": "kitchen"} for i in range(n)]
            (root / f"qa{task}" / f"{length}.json").write_text(json.dumps(rows))


def test_published_set_oracle_and_table(tmp_path):
    """evaluate_published: every row of each (task, length) file up to `samples` is asked, in
    order, and scored; lengths by the set's names sort by size in the table ("16k" after "4k")."""
    from eval.run_babilong import evaluate_published

    _write_published(tmp_path, [1, 2], ["16k", "0k", "4k"], n=4)
    asked = []
    rows = evaluate_published(lambda prompts: asked.extend(prompts) or ["In the kitchen."] * len(prompts),
                              tmp_path, [1, 2], ["16k", "0k", "4k"], samples=3, batch_size=2,
                              progress=False)
    assert [(r["task"], r["length"], r["n"], r["accuracy"]) for r in rows] == [
        (t, n, 3, 100.0) for t in (1, 2) for n in ("16k", "0k", "4k")]
    assert "(16k 0)" in asked[0] and "(16k 2)" in asked[2] and len(asked) == 18
    assert markdown_table(rows).splitlines()[0] == "| task | 0k | 4k | 16k |"
    wrong = evaluate_published(lambda prompts: ["In the garden."] * len(prompts), tmp_path, [1],
                               ["0k"], samples=3, progress=False)
    assert wrong[0]["accuracy"] == 0.0
    write_report(rows, tmp_path / "out", "published")
    assert (tmp_path / "out" / "babilong.png").stat().st_size > 1000


def test_cli_eval_on_the_published_set(rng, tmp_path, capsys):
    """`armt eval --published DIR --lengths 0k 4k` needs neither --babi nor --books; lengths that
    do not fit the data source are refused before anything loads, naming them."""
    _word_level_checkpoint(rng, tmp_path / "ckpt", "mary went to the kitchen where is question answer")
    _write_published(tmp_path / "set", [1], ["0k", "4k"])
    assert cli.main(["eval", str(tmp_path / "ckpt"), "--published", str(tmp_path / "set"),
                     "--tasks", "1", "--lengths", "0k", "4k", "--samples", "2",
                     "--max-new-tokens", "2", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "babilong.json").read_text())["rows"]
    assert [(r["task"], r["length"], r["n"]) for r in rows] == [(1, "0k", 2), (1, "4k", 2)]
    base = ["eval", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o2")]
    for argv, message in [
            (["--published", str(tmp_path / "set"), "--lengths", "0k", "1024"],
             "with --published, --lengths are the set's names (0k, 4k, ...), got [1024]"),
            (["--babi", "b", "--books", "k", "--lengths", "4k"],
             "--lengths 4k name lengths of the published set: pass --published"),
            (["--lengths", "1024"], "needs --babi and --books"),
    ]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli.main(base + argv)
