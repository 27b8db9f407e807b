"""The ``d2r`` command line.

Each subcommand lives in the module that owns its job and registers itself here through
``_SUBCOMMANDS``: a list of ``(module, function)`` pairs whose function takes the argparse
sub-parsers object and adds its parser with ``set_defaults(func=...)``. Modules that need
optional extras (converters, server) are imported lazily so ``d2r --version`` stays fast and
works with only the core installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .._version import __version__
from ..errors import D2RError

# (module, registration function). A module that cannot be imported (missing extra) is skipped
# and its commands are absent from --help; running them then says which extra to install.
_SUBCOMMANDS: list[tuple[str, str]] = [
    ("d2r.codebook", "register_cli"),
    ("d2r.commands", "register_cli"),
    ("d2r.warmup", "register_cli"),
    ("d2r.datasets", "register_cli"),
    ("d2r.evaluation", "register_cli"),
    ("d2r.landmarks", "register_cli"),
    ("d2r.cli.sync", "register_cli"),
    ("d2r_server.cli", "register_cli"),
    ("d2r_convert.cli", "register_cli"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2r",
        description="Detect-to-Retrieve visual search SDK: build, query and sync R-ASMK* indexes.",
    )
    parser.add_argument("--version", action="version", version=f"d2r {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, func_name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # an optional extra is not installed
            continue
        getattr(module, func_name)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except D2RError as exc:
        from .._progress import end_line

        end_line()  # never glue the error to an open progress counter
        print(f"d2r {args.command}: error: {exc}", file=sys.stderr)
        return 1

