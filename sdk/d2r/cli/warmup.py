"""``d2r warmup``: compile every Numba kernel once after install (see :mod:`d2r.warmup`)."""

from __future__ import annotations

import argparse
import sys

from ..manifest import DEFAULT_FEATURES


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one local-feature model")
    return names


def run(args) -> int:
    from ..warmup import warm_up

    warm_up(args.features, backend=args.backend, log=lambda m: print(m, file=sys.stderr))
    return 0


def register(sub) -> None:
    p = sub.add_parser("warmup", help="compile the Numba kernels once after install, so the first query is as fast as the next")
    p.add_argument("--features", type=_names, default=[DEFAULT_FEATURES],
                   help=f"comma-separated local-feature models to warm up (default {DEFAULT_FEATURES})")
    p.add_argument("--backend", default="tflite", choices=["tflite", "onnx"])
    p.set_defaults(func=run)
