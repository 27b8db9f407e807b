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


def add_ray_arguments(parser, verb: str, title: str, shards: str) -> None:
    """The flags of a distributed ``d2r build`` / ``d2r add`` (``--ray``, ``--ray-workers``,
    ``--shards``, ``--resume``) as one group; ``verb``: what the command does ("build", "add"),
    ``shards``: what the shard folder holds."""
    r = parser.add_argument_group(f"{title} (needs the 'ray' extra: pip install 'd2r[ray]')")
    r.add_argument("--ray", metavar="auto|ADDRESS",
                   help=f"{verb} on a Ray cluster: 'auto' starts one on this machine, ADDRESS (host:port, as `ray start --head` "
                        f"prints) joins a running one; the bundle is byte for byte the one written without --ray")
    r.add_argument("--ray-workers", type=positive_int, metavar="N", help="workers to start (default: one per CPU of the cluster)")
    r.add_argument("--shards", metavar="DIR",
                   help=f"folder for {shards}, on a file system every node sees (default beside the bundle, "
                        "NAME.shards; removed when the bundle is written)")
    r.add_argument("--resume", action="store_true", help=f"continue a --ray {verb} that was killed, from its shards")
