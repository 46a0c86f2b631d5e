"""The two schedules by name (SPEC §2): the same function, evaluated segment by segment or one
anti-diagonal of (segment, layer) cells at a time."""

from __future__ import annotations

from armt_jax.diagonal import diagonal_forward
from armt_jax.sequential import sequential_forward

SCHEDULES = {"sequential": sequential_forward, "diagonal": diagonal_forward}


def schedule_forward(schedule: str):
    """`sequential_forward` or `diagonal_forward` by name; a clear error for any other."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule]
