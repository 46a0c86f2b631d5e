"""BABILong building blocks (SPEC §5)."""

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
