"""argparse types for the console commands' numeric options: a bad value stops the command at
parsing with a message naming the option and the allowed range (``armt demo: error: argument
--tokens: must be at least 1, got 0``), before any model is loaded or compiled."""

from __future__ import annotations

import argparse


def int_at_least(low: int):
    """An int >= low."""
    def parse(text: str) -> int:
        value = int(text)   # a ValueError reads "invalid int >= low value: 'text'"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def int_in(low: int, high: int):
    """An int in [low, high]."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value
    parse.__name__ = f"int in {low}..{high}"
    return parse


def float_at_least(low: float):
    """A float >= low."""
    def parse(text: str) -> float:
        value = float(text)
        if not value >= low:   # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"float >= {low}"
    return parse


def probability(text: str) -> float:
    """A float in (0, 1] (top-p)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
