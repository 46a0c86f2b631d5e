"""BABILong evaluation: accuracy per task and context length, as JSON, a markdown table and a heatmap.

For every (task, length) cell the first `samples` questions of the bAbI test split are diluted in
book text to the target length (counted in the model's tokenizer), the model answers greedily
(batched, contexts of different lengths padded), and `eval.babilong.score` judges the answer.
`evaluate_published` does the same on a local copy of the published set (lengths by its names,
"0k", "4k", ...; counted there in GPT-2 tokens).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.babilong import build_sample, published_files, read_babi, read_published_file, score
from train.data import PROMPT

AnswerFn = Callable[[list[str]], list[str]]   # prompts -> answers


def model_answer_fn(params, cfg, armt, encode, decode, *, max_new_tokens=16,
                    schedule="diagonal") -> AnswerFn:
    """Greedy answers of an ARMT model for a batch of prompts."""
    import jax.numpy as jnp
    from armt_jax.generate import generate

    def answer(prompts: list[str]) -> list[str]:
        ids = [encode(p) for p in prompts]
        n = -(-max(map(len, ids)) // armt.segment_size) * armt.segment_size
        tokens = np.zeros((len(ids), n), np.int32)
        for i, row in enumerate(ids):
            tokens[i, :len(row)] = row
        out = generate(params, jnp.asarray(tokens), cfg, armt, max_new_tokens=max_new_tokens,
                       schedule=schedule, lengths=jnp.asarray([len(r) for r in ids], jnp.int32))
        return [decode([int(t) for t in out.tokens[i, :int(out.lengths[i])]])
                for i in range(len(ids))]

    return answer


def evaluate(answer_fn: AnswerFn, babi_source, books: Sequence[str], tasks: Sequence[int],
             lengths: Sequence[int], count_tokens: Callable[[str], int], *, samples: int = 50,
             batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[dict]:
    """One row per (task, length): accuracy in percent, and every question's answer."""
    rows = []
    cells = [(t, n) for t in tasks for n in lengths]
    for task, length in tqdm(cells, desc="babilong", disable=not progress):
        questions = read_babi(babi_source, task, "test")[:samples]
        rng = np.random.default_rng([seed, task, length])
        built = [build_sample(q, books, length, count_tokens, rng) for q in questions]
        rows.append(_cell(answer_fn, built, task, length, batch_size))
    return rows


def evaluate_published(answer_fn: AnswerFn, root, tasks: Sequence[int], lengths: Sequence[str],
                       *, samples: int = 50, batch_size: int = 8, progress: bool = True
                       ) -> list[dict]:
    """`evaluate` on the published set below `root` (eval.babilong.published_files): the first
    `samples` rows of each (task, length) file, lengths by the set's names."""
    rows = []
    cells = [(t, n) for t in tasks for n in lengths]
    for task, length in tqdm(cells, desc="babilong", disable=not progress):
        data = read_published_file(*published_files(root, task, length))[:samples]
        rows.append(_cell(answer_fn, data, task, length, batch_size))
    return rows


def _cell(answer_fn: AnswerFn, data: list[dict], task: int, length, batch_size: int) -> dict:
    """One (task, length) row: the model's answers to `data` ({input, question, target}), batched,
    each scored, and the accuracy in percent."""
    records = []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        answers = answer_fn([PROMPT.format(input=r["input"], question=r["question"]) for r in chunk])
        records += [{"question": r["question"], "target": r["target"], "output": a,
                     "correct": score(a, r["target"], r["question"], task)}
                    for r, a in zip(chunk, answers)]
    accuracy = 100.0 * np.mean([r["correct"] for r in records]) if records else float("nan")
    return {"task": task, "length": length, "accuracy": accuracy, "n": len(records),
            "answers": records}


_SIZE = re.compile(r"^(\d+)([kKmM]?)$")


def length_order(length) -> tuple[int, str]:
    """Sort key of a length: a token count, or a name of the published set ("0k" < "4k" < "1M")."""
    if isinstance(length, int):
        return length, ""
    match = _SIZE.match(length)
    if not match:
        return 1 << 62, length
    scale = {"": 1, "k": 1000, "m": 1000 ** 2}[match[2].lower()]
    return int(match[1]) * scale, length


def length_label(length) -> str:
    return f"{length} tok" if isinstance(length, int) else str(length)


def markdown_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows}, key=length_order)
    acc = {(r["task"], r["length"]): r["accuracy"] for r in rows}
    lines = ["| task | " + " | ".join(length_label(n) for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for task in sorted({r["task"] for r in rows}):
        lines.append(f"| qa{task} | " + " | ".join(f"{acc[task, n]:.0f}" for n in lengths) + " |")
    return "\n".join(lines)


def heatmap(rows: list[dict], path: Path, title: str) -> bool:
    """Accuracy heatmap (tasks x lengths) as PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["length"] for r in rows}, key=length_order)
    grid = np.full((len(tasks), len(lengths)), np.nan)
    for r in rows:
        grid[tasks.index(r["task"]), lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 0.8 + 0.5 * len(tasks)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [f"{n}" for n in lengths])
    ax.set_yticks(range(len(tasks)), [f"qa{t}" for t in tasks])
    ax.set_xlabel("context tokens" if all(isinstance(n, int) for n in lengths)
                  else "context length (published set)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy, %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(rows: list[dict], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "babilong.json").write_text(json.dumps({"title": title, "rows": rows}, indent=1))
    table = markdown_table(rows)
    (out_dir / "babilong.md").write_text(f"# {title}\n\n{table}\n")
    if not heatmap(rows, out_dir / "babilong.png", title):
        print("matplotlib is not installed: no heatmap (pip install matplotlib)")
    print(table)
