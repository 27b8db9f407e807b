"""The edge server uses the device package only through the bundle format: every module of
d2r_server imports from ``d2r`` nothing but ``d2r.bundle`` (and its submodules) and
``d2r.errors`` (issue 17: the server stops importing device internals).

Two documented exceptions: ``cli.py`` plugs the server's commands into the one command line
and shares its option helpers (``d2r.cli.common``: durations, tokens from files), and
``testing.py`` (fixtures for tests and benchmarks, never imported by the server) builds real
bundles with the runtime as a publisher would.

Reads the source with ``ast``: no import is executed, so this runs in milliseconds.
"""

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "edge_server" / "d2r_server"
ALLOWED = ("d2r.bundle", "d2r.errors")
EXCEPTIONS = {"cli.py": ("d2r.cli.common",), "testing.py": ("d2r",)}


def d2r_imports(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import from the ``d2r`` package in ``source``, at any depth
    (function bodies included); ``from d2r import x`` counts as ``d2r.x``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if node.module == "d2r" else node.module for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "d2r" or n.startswith("d2r.")]
    return found


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_checker_sees_every_form_of_import():
    src = ("import d2r\nimport d2r.sync as s\nfrom d2r import engine\nfrom d2r.index import Index\n"
           "def f():\n    from d2r.bundle.tuf import COLLECTION_NAME\nimport d2r_server\nfrom .app import x\n")
    assert [n for _, n in d2r_imports(src)] == ["d2r", "d2r.sync", "d2r.engine", "d2r.index", "d2r.bundle.tuf"]
    assert within("d2r.bundle.tuf", ALLOWED) and within("d2r.errors", ALLOWED)
    assert not within("d2r.bundles", ALLOWED) and not within("d2r.engine", ALLOWED)


@pytest.mark.parametrize("module", sorted(p.name for p in SERVER.glob("*.py")))
def test_the_server_imports_only_the_bundle_format_and_the_errors(module):
    allowed = ALLOWED + EXCEPTIONS.get(module, ())
    bad = [f"line {line}: {name}" for line, name in d2r_imports((SERVER / module).read_text())
           if not within(name, allowed)]
    assert not bad, f"d2r_server/{module} imports device internals: {', '.join(bad)} (use d2r.bundle or d2r.errors)"
