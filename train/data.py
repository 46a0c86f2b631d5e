"""Training examples and batches for BABILong finetuning.

An example is BOS, the prompt (context, question), the answer and EOS; only the answer and EOS
count in the loss. Batches are right-padded to a multiple of the segment size with per-sequence
lengths, so a handful of shapes (hence compilations) cover every batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import numpy as np

PROMPT = "{input}\nQuestion: {question}\nAnswer:"


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: tuple[int, ...]
    loss_mask: tuple[int, ...]    # 1 where the token is a target of the loss


def qa_example(row: dict, encode: Callable[[str], list[int]], eos_id: int | None,
               bos_id: int | None = None) -> Example:
    """A BABILong row {input, question, target} -> (BOS +) prompt tokens + answer tokens (+ EOS);
    ``encode`` adds no special tokens."""
    prompt = ([bos_id] if bos_id is not None else []) + encode(
        PROMPT.format(input=row["input"], question=row["question"]))
    answer = encode(" " + row["target"]) + ([eos_id] if eos_id is not None else [])
    return Example(tuple(prompt + answer), (0,) * len(prompt) + (1,) * len(answer))


def pad_batch(examples: Sequence[Example], multiple: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """{tokens [B, n], loss_mask [B, n], lengths [B]} with n rounded up to `multiple`."""
    longest = max(len(e.tokens) for e in examples)
    n = -(-longest // multiple) * multiple
    tokens = np.full((len(examples), n), pad_id, np.int32)
    mask = np.zeros((len(examples), n), np.float32)
    for i, e in enumerate(examples):
        tokens[i, :len(e.tokens)] = e.tokens
        mask[i, :len(e.loss_mask)] = e.loss_mask
    lengths = np.array([len(e.tokens) for e in examples], np.int32)
    return {"tokens": tokens, "loss_mask": mask, "lengths": lengths}


def batches(make_example: Callable[[np.random.Generator], Example], batch_size: int,
            multiple: int, rng: np.random.Generator, pad_id: int = 0
            ) -> Iterator[dict[str, np.ndarray]]:
    """An endless stream of padded batches of freshly drawn examples."""
    while True:
        yield pad_batch([make_example(rng) for _ in range(batch_size)], multiple, pad_id)
