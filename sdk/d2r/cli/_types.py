"""Argument types shared by the commands: each parses one flag and refuses a bad value with a
message argparse prints next to the flag's name (before any work is done)."""

from __future__ import annotations

import argparse


def _int_at_least(value: str, low: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {value!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {n}")
    return n


def positive_int(value: str) -> int:
    return _int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    return _int_at_least(value, 0)


def codebook_size(value: str):
    """A number of visual words, or ``auto``."""
    if value == "auto":
        return value
    try:
        return positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of words (>= 1) or 'auto', got {value!r}") from None


def detector_spec(value: str) -> tuple[str | None, float | None]:
    """``NAME@THRESHOLD``, ``NAME`` or ``none`` -> (name or None, threshold or None)."""
    if value in ("none", ""):
        return None, None
    name, _, thresh = value.partition("@")
    if not thresh:
        return name, None
    try:
        t = float(thresh)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME@THRESHOLD (e.g. ssd@0.1), got {value!r}") from None
    if not 0.0 <= t <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a threshold in [0, 1] after @, got {value!r}")
    return name, t
