"""argparse types for the console commands' numeric options: a bad value stops the command at
parsing with a message naming the option and the allowed range (``armt demo: error: argument
--tokens: must be at least 1, got 0``), before any model is loaded or compiled."""

from __future__ import annotations

import argparse


def bounded(convert, low, high=None):
    """``convert(text)`` (int or float) within [low, high] (no upper bound where high is None)."""
    def parse(text: str):
        value = convert(text)   # a ValueError reads "invalid int >= 1 value: 'text'"
        if not (low <= value and (high is None or value <= high)):   # also refuses nan
            raise argparse.ArgumentTypeError(
                f"must be at least {low}, got {value}" if high is None
                else f"must be in {low}..{high}, got {value}")
        return value
    parse.__name__ = (f"{convert.__name__} >= {low}" if high is None
                      else f"{convert.__name__} in {low}..{high}")
    return parse


def probability(text: str) -> float:
    """A float in (0, 1] (top-p)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


positive_int = bounded(int, 1)
non_negative_int = bounded(int, 0)
