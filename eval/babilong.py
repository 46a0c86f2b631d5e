"""BABILong building blocks (SPEC §5): bAbI tasks, background books, sample construction, scoring.

    samples = read_babi("tasks_1-20_v1-2.tar.gz", task=1, split="test")
    books = read_books("pg_books.tar.gz")
    row = build_sample(samples[0], books, target_tokens=4000, count_tokens=len_in_tokens, rng=rng)
    correct = score(model_output, row["target"], row["question"], task=1)
    rows = read_published_file(*published_files("babilong/data", task=1, length="4k"))

Paths may be the distributed archives or their unpacked folders; nothing is hard-coded. Token
budgets are counted with the `count_tokens` function the caller passes (say which tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
YES_NO = ("no", "yes")
LABELS: dict[int, tuple[str, ...]] = {
    1: ROOMS, 2: ROOMS, 3: ROOMS, 4: ROOMS, 11: ROOMS, 12: ROOMS, 13: ROOMS,
    5: ("bill", "fred", "jeff", "mary", "apple", "football", "milk"),
    6: YES_NO, 9: YES_NO, 17: YES_NO, 18: YES_NO,
    7: ("none", "one", "two", "three"),
    8: ("apple", "football", "milk", "nothing"),
    10: ("maybe", "no", "yes"),
    14: ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    15: ("cat", "mouse", "sheep", "wolf"),
    16: ("gray", "green", "white", "yellow"),
    19: ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    20: ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}


@dataclasses.dataclass(frozen=True)
class BabiSample:
    facts: tuple[str, ...]        # every statement of the story before the question, in order
    question: str
    answer: str
    supporting: tuple[int, ...]   # indices into `facts`


def parse_babi(text: str) -> list[BabiSample]:
    """bAbI format: `ID text` lines, questions `ID question<TAB>answer<TAB>ids`; IDs restart per
    story."""
    samples, facts, index_of = [], [], {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        num, _, rest = line.partition(" ")
        if not num.isdigit():
            raise ValueError(f"bAbI line {line_no} does not start with an id: {line!r}")
        if int(num) == 1:
            facts, index_of = [], {}
        if "\t" in rest:
            question, answer, support = (part.strip() for part in rest.split("\t"))
            samples.append(BabiSample(tuple(facts), question, answer,
                                      tuple(index_of[int(i)] for i in support.split())))
        else:
            index_of[int(num)] = len(facts)
            facts.append(rest.strip())
    return samples


def _read_member(source: str | Path, pattern: str) -> tuple[str, str]:
    """(name, text) of the first file (by name) matching `pattern`, a regex on its absolute
    path (folder) or on "/" + its name (.tar.gz archive), so that "/en-10k/" matches however the
    folder was named on the command line (".", "en-10k", a parent)."""
    source = Path(source)
    if source.is_dir():
        hits = sorted(p for p in source.rglob("*") if re.search(pattern, p.resolve().as_posix()))
        if hits:
            return hits[0].as_posix(), hits[0].read_text()
    elif source.exists():
        with tarfile.open(source) as tar:
            hits = sorted((m for m in tar if m.isfile() and re.search(pattern, "/" + m.name)),
                          key=lambda m: m.name)
            if hits:
                return hits[0].name, tar.extractfile(hits[0]).read().decode()
    else:
        raise FileNotFoundError(f"no bAbI data at {source}")
    raise FileNotFoundError(f"no file matching {pattern!r} in {source}")


def read_babi(source: str | Path, task: int, split: str = "test", *, version: str = "en-10k"
              ) -> list[BabiSample]:
    """Samples of task qa{task} from the bAbI v1.2 archive or folder. A file missing from
    `version` (en-10k lacks qa3 train) is read from `en`, the 1k version."""
    if task not in LABELS:
        raise ValueError(f"task must be 1..20, got {task}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    name = rf"qa{task}_[a-z-]+_{split}\.txt$"
    patterns = [rf"/{version}/{name}"] + ([rf"/en/{name}"] if version != "en" else [])
    for pattern in patterns:
        try:
            return parse_babi(_read_member(source, pattern)[1])
        except FileNotFoundError:
            if not Path(source).exists():
                raise
    raise FileNotFoundError(f"no bAbI qa{task} {split} file in {source}: looked for paths matching "
                            f"{' and '.join(repr(p) for p in patterns)}")


def strip_gutenberg(text: str) -> str:
    """The text between the `*** START OF` and `*** END OF` marker lines (all of it if absent)."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
    return text[start.end() if start else 0:end.start() if end else len(text)].strip()


def read_books(source: str | Path) -> list[str]:
    """Every book of a folder or .tar.gz archive of Project Gutenberg .txt files, markers cut, in
    the order of their paths."""
    source = Path(source)
    # In order of their paths (in the folder, in the archive), so that a seed draws the same
    # books from an archive as from the folder it unpacks to.
    if source.is_dir():
        texts = [p.read_text(encoding="utf-8")
                 for p in sorted(source.rglob("*.txt"), key=lambda p: p.relative_to(source).as_posix())]
    elif source.exists():
        with tarfile.open(source) as tar:
            members = sorted((m for m in tar if m.isfile() and m.name.endswith(".txt")),
                             key=lambda m: m.name)
            texts = [tar.extractfile(m).read().decode("utf-8") for m in members]
    else:
        raise FileNotFoundError(f"no books at {source}")
    if not texts:
        raise FileNotFoundError(f"no .txt books in {source}")
    return [strip_gutenberg(t) for t in texts]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(" ".join(text.split()))) if s]


def build_sample(sample: BabiSample, books: Sequence[str], target_tokens: int,
                 count_tokens: Callable[[str], int], rng: np.random.Generator) -> dict:
    """One BABILong row: background sentences from a random place of a random book fill the token
    budget left after the facts; the facts go in order at sorted random sentence boundaries."""
    facts_tokens = sum(count_tokens(f) for f in sample.facts)
    budget = target_tokens - facts_tokens
    noise: list[str] = []
    while budget > 0:
        book = sentences(books[rng.integers(len(books))])
        if not book:
            continue
        start = int(rng.integers(len(book)))
        for sentence in book[start:]:
            cost = count_tokens(sentence)
            if cost > budget:
                budget = 0
                break
            noise.append(sentence)
            budget -= cost
    slots = np.sort(rng.integers(0, len(noise) + 1, len(sample.facts)))
    parts, previous = [], 0
    for fact, slot in zip(sample.facts, slots):
        parts += noise[previous:slot] + [fact]
        previous = slot
    parts += noise[previous:]
    return {"input": " ".join(parts), "question": sample.question, "target": sample.answer}


def score(output: str, target: str, question: str, task: int) -> bool:
    """BABILong's scoring: lowercase, keep the first sentence, cut at <context> / <example>; the
    task's labels found there, minus those in the question, must be exactly the target (qa8: all
    of its comma-separated targets and nothing else). Labels match as whole words, so "none" does
    not also count as "one", nor "nothing" as "no"."""
    text = output.lower()
    for stop in ("<context>", "<example>"):
        text = text.split(stop)[0]
    text = text.split(".")[0]
    occurs = lambda label, s: re.search(rf"(?<![a-z]){re.escape(label)}(?![a-z])", s) is not None
    labels = {label for label in LABELS[task] if not occurs(label, question.lower())}
    found = {label for label in labels if occurs(label, text)}
    targets = set(target.lower().split(",")) if task == 8 else {target.lower()}
    return found == targets


# ---- the published BABILong set (SPEC §5): rows {input, question, target} per task and length --
PUBLISHED_FIELDS = ("input", "question", "target")
PUBLISHED_SUFFIXES = (".json", ".jsonl", ".parquet")


def published_files(root: str | Path, task: int, length: str) -> list[Path]:
    """The file(s) of task qa{task} at length `length` (the set's names: "0k", "4k", "1M", ...)
    in a local copy of the published set: ``qa{task}/{length}.json`` (its current layout),
    ``.jsonl`` or ``.parquet``, or parquet shards ``qa{task}/{length}-*.parquet`` (an earlier
    one), anywhere below `root`; a file given as `root` is returned as it is."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"no published BABILong set at {root}")
    patterns = [f"qa{task}/{length}{suffix}" for suffix in PUBLISHED_SUFFIXES]
    patterns.append(f"qa{task}/{length}-*.parquet")
    for pattern in patterns:
        if hits := sorted(root.rglob(pattern)):
            return hits
    raise FileNotFoundError(f"no BABILong qa{task} {length} file below {root} (looked for "
                            f"{', '.join(patterns)})")


def read_published_file(*paths: str | Path) -> list[dict]:
    """The rows {input, question, target} (strings) of published BABILong files, in order: a JSON
    array or JSON lines (.json, .jsonl), or parquet (.parquet: needs pyarrow). A row without one
    of the three fields is an error naming the file and the row."""
    rows = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"no BABILong file at {path}")
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); "
                                  f"the set's .json files need nothing") from None
            records = pq.read_table(path).to_pylist()
        elif path.suffix in (".json", ".jsonl"):
            records = _json_records(path)
        else:
            raise ValueError(f"{path}: a published BABILong file is {', '.join(PUBLISHED_SUFFIXES)}")
        for i, record in enumerate(records):
            bad = [k for k in PUBLISHED_FIELDS
                   if not isinstance(record, dict) or not isinstance(record.get(k), str)]
            if bad:
                raise ValueError(f"{path}, row {i}: field(s) {', '.join(bad)} missing or not text "
                                 f"(a row holds {', '.join(PUBLISHED_FIELDS)})")
            rows.append({k: record[k] for k in PUBLISHED_FIELDS})
    return rows


def _json_records(path: Path) -> list:
    """A JSON array (or one object), else JSON lines."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: neither a JSON array nor JSON lines "
                                 f"({e.msg})") from None
    return records
