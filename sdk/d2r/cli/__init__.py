"""The ``d2r`` command line.

Each command is one small module of this package (``build``, ``add``, ``query``, ``codebook``,
``warmup``, ``sync``): it adds its parser, parses the flags into the library's configuration
objects (checked once, here) and calls the library, whose errors name parameters, never flags.
They are registered through ``_SUBCOMMANDS``: ``(module, function)`` pairs whose function takes
the argparse sub-parsers object and adds its parser with ``set_defaults(func=...)``. The packages beside the runtime (``d2r_lab``: evaluation and
research tools; ``d2r_convert``: model converters; ``d2r_server``: the edge server) add their
commands through the ``d2r.commands`` entry-point group of their distribution, so this package
never names them. A command whose module cannot be imported (an extra not installed) is left
out of ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from .._version import __version__
from ..errors import D2RError

# The runtime's own commands: (module, registration function).
_SUBCOMMANDS: list[tuple[str, str]] = [
    ("d2r.cli.codebook", "register"),
    ("d2r.cli.build", "register"),
    ("d2r.cli.add", "register"),
    ("d2r.cli.query", "register"),
    ("d2r.cli.warmup", "register"),
    ("d2r.cli.sync", "register_cli"),
]
# Commands of other packages: entry points ``NAME = module:function`` in this group.
ENTRY_POINT_GROUP = "d2r.commands"


def _registrations():
    for module_name, func_name in _SUBCOMMANDS:
        yield module_name, func_name
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        module_name, _, func_name = ep.value.partition(":")
        yield module_name.strip(), func_name.strip() or "register_cli"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2r",
        description="Detect-to-Retrieve visual search SDK: build, query and sync R-ASMK* indexes.",
    )
    parser.add_argument("--version", action="version", version=f"d2r {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for module_name, func_name in _registrations():
        if (module_name, func_name) in seen:
            continue
        seen.add((module_name, func_name))
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

