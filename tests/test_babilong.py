"""BABILong building blocks (SPEC §5)."""

import json
from pathlib import Path

import pytest

from eval.babilong import (BabiSample, build_sample, parse_babi, read_babi, read_books, score,
                           sentences, strip_gutenberg)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORY = """1 Mary got the milk there.
2 John moved to the bedroom.
3 Where is Mary? \tkitchen\t1
4 Mary travelled to the hallway.
5 Where is the milk? \thallway\t1 4
1 Sandra went to the garden.
2 Where is Sandra? \tgarden\t1
"""


def test_parse_babi_stories_and_supporting_facts():
    samples = parse_babi(STORY)
    assert [s.answer for s in samples] == ["kitchen", "hallway", "garden"]
    assert samples[1].facts == ("Mary got the milk there.", "John moved to the bedroom.",
                                "Mary travelled to the hallway.")
    assert samples[1].supporting == (0, 2)
    assert samples[2].facts == ("Sandra went to the garden.",)          # a new story
    with pytest.raises(ValueError, match="line 1"):
        parse_babi("Mary went home.\n")


def test_strip_gutenberg_and_sentences():
    text = "header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nOne. Two!  Three?\n" \
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence"
    assert strip_gutenberg(text) == "One. Two!  Three?"
    assert sentences(strip_gutenberg(text)) == ["One.", "Two!", "Three?"]


def test_build_sample_inserts_facts_in_order_within_budget(rng):
    sample = BabiSample(("Fact one.", "Fact two.", "Fact three."), "Q?", "a", (0,))
    books = [" ".join(f"Noise {i} of book {b}." for i in range(200)) for b in range(3)]
    words = lambda s: len(s.split())
    row = build_sample(sample, books, 300, words, rng)
    text = row["input"]
    positions = [text.index(f) for f in sample.facts]
    assert positions == sorted(positions)
    assert 300 - 4 <= words(text) <= 300
    assert row["question"] == "Q?" and row["target"] == "a"


@pytest.mark.parametrize("output,target,question,task,want", [
    ("The milk is in the hallway.", "hallway", "Where is the milk?", 1, True),
    ("hallway or kitchen", "hallway", "Where is the milk?", 1, False),
    ("Bathroom. Then the kitchen.", "bathroom", "Where is John?", 1, True),   # first sentence
    ("kitchen <context> office", "kitchen", "Where is Mary?", 1, True),
    ("Fred gave it to Mary", "fred", "Who gave the apple to Mary?", 5, True),  # Mary in question
    ("none", "none", "How many objects is Mary carrying?", 7, True),           # not also "one"
    ("milk,apple", "apple,milk", "What is Mary carrying?", 8, True),
    ("apple", "apple,milk", "What is Mary carrying?", 8, False),
    ("n,w", "n,w", "How do you go from the garden to the office?", 19, True),
])
def test_score(output, target, question, task, want):
    assert score(output, target, question, task) is want


@pytest.mark.skipif(not (DATA / "tasks_1-20_v1-2.tar.gz").exists(), reason="no shared bAbI data")
def test_read_real_babi_archive():
    test = read_babi(DATA / "tasks_1-20_v1-2.tar.gz", 1, "test")
    assert len(test) == 1000 and test[0].answer in ("bathroom", "bedroom", "garden", "hallway",
                                                    "kitchen", "office")
    qa3_train = read_babi(DATA / "tasks_1-20_v1-2.tar.gz", 3, "train")   # falls back to en/
    assert len(qa3_train) == 1000
    with pytest.raises(FileNotFoundError, match="no bAbI data"):
        read_babi(DATA / "missing.tar.gz", 1)


def test_read_books_from_folder(tmp_path):
    (tmp_path / "a.txt").write_text("x\n*** START OF IT ***\nBody text.\n*** END OF IT ***\n")
    assert read_books(tmp_path) == ["Body text."]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt books"):
        read_books(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no books at"):
        read_books(tmp_path / "missing")


def test_books_from_an_archive_come_in_the_folders_order(tmp_path):
    """An archive and the folder it unpacks to give the books in one order (their paths'), so a
    seed draws the same BABILong samples from either; members stored out of order included."""
    import io
    import tarfile

    names = ["lib/b.txt", "lib/a.txt", "lib/sub/c.txt", "lib/0.txt"]
    with tarfile.open(tmp_path / "books.tar.gz", "w:gz") as tar:
        for name in names:
            data = f"*** START OF X ***\n{name} body.\n*** END OF X ***\n".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "books.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    from_archive = read_books(tmp_path / "books.tar.gz")
    assert from_archive == [f"{n} body." for n in sorted(names)]
    assert read_books(tmp_path / "unpacked") == read_books(tmp_path / "unpacked" / "lib") == from_archive


def test_read_babi_from_relative_folders(tmp_path, monkeypatch):
    """A bAbI folder given as ".", as the version folder itself, or as a parent: the version
    directory is matched on the resolved path; a missing task names both patterns tried."""
    (tmp_path / "en-10k").mkdir()
    (tmp_path / "en-10k" / "qa1_single-supporting-fact_train.txt").write_text(STORY)
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "qa3_three-supporting-facts_train.txt").write_text(STORY)
    monkeypatch.chdir(tmp_path)
    want = parse_babi(STORY)
    assert read_babi(".", 1, "train") == read_babi("en-10k", 1, "train") == want
    assert read_babi(tmp_path, 3, "train") == want   # from en/, the 1k version
    monkeypatch.chdir(tmp_path / "en-10k")
    assert read_babi(".", 1, "train") == want
    with pytest.raises(FileNotFoundError, match=r"no bAbI qa2 test file in \.: .*en-10k.* and .*/en/"):
        read_babi(".", 2, "test")


def _published_rows(n, task="q"):
    return [{"input": f"{task} context {i}.", "question": f"Where is {i}?", "target": f"room{i}",
             "extra": i} for i in range(n)]


def test_read_published_files(tmp_path):
    """The published set's files (SPEC §5): a JSON array (its qa{task}/{length}.json layout) or
    JSON lines (.json or .jsonl) give the rows {input, question, target} in order; found by task
    and length name below a root; a bad row, bad JSON, a missing file name what is wrong."""
    from eval.babilong import published_files, read_published_file

    (tmp_path / "data" / "qa1").mkdir(parents=True)
    (tmp_path / "data" / "qa2").mkdir()
    rows = _published_rows(3)
    want = [{k: r[k] for k in ("input", "question", "target")} for r in rows]
    (tmp_path / "data" / "qa1" / "4k.json").write_text(json.dumps(rows))
    (tmp_path / "data" / "qa2" / "4k.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    (tmp_path / "lines.json").write_text("\n".join(map(json.dumps, rows)))
    assert published_files(tmp_path, 1, "4k") == [tmp_path / "data" / "qa1" / "4k.json"]
    assert read_published_file(*published_files(tmp_path, 1, "4k")) == want
    assert read_published_file(*published_files(tmp_path / "data", 2, "4k")) == want
    assert read_published_file(tmp_path / "lines.json") == want
    assert published_files(tmp_path / "lines.json", 7, "1M") == [tmp_path / "lines.json"]

    with pytest.raises(FileNotFoundError, match=r"no BABILong qa1 16k file below .*qa1/16k\.json"):
        published_files(tmp_path, 1, "16k")
    with pytest.raises(FileNotFoundError, match="no published BABILong set at"):
        published_files(tmp_path / "missing", 1, "4k")
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], {"input": "x", "question": "q?"}]))
    with pytest.raises(ValueError, match=r"bad\.json, row 1: field\(s\) target missing"):
        read_published_file(tmp_path / "bad.json")
    (tmp_path / "junk.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"junk\.jsonl, line 2: neither a JSON array nor JSON lines"):
        read_published_file(tmp_path / "junk.jsonl")
    (tmp_path / "rows.csv").write_text("input,question,target\n")
    with pytest.raises(ValueError, match=r"rows\.csv: a published BABILong file is \.json"):
        read_published_file(tmp_path / "rows.csv")


def test_read_published_parquet_shards(tmp_path):
    """The set's earlier layout: parquet shards qa{task}/{length}-*.parquet, read in name order;
    without pyarrow an ImportError saying what to install."""
    from eval.babilong import published_files, read_published_file

    (tmp_path / "qa3").mkdir()
    shards = [tmp_path / "qa3" / f"32k-0000{i}-of-00002.parquet" for i in (1, 0)]
    rows = _published_rows(4, "p")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        for shard in shards:
            shard.write_bytes(b"PAR1")
        assert published_files(tmp_path, 3, "32k") == sorted(shards)
        with pytest.raises(ImportError, match="pip install pyarrow"):
            read_published_file(*published_files(tmp_path, 3, "32k"))
        return
    pq.write_table(pa.Table.from_pylist(rows[:2]), shards[1])
    pq.write_table(pa.Table.from_pylist(rows[2:]), shards[0])
    got = read_published_file(*published_files(tmp_path, 3, "32k"))
    assert [r["input"] for r in got] == [r["input"] for r in rows]
