"""The README is the front door and docs/ the reference: the model zoo table must list exactly the
shipped files, with their sizes; every documented `d2r` command must parse; every relative link
must lead to a file (and to a heading, when it names one)."""

import re
import shlex
from pathlib import Path

import pytest

from d2r.cli import build_parser
from d2r.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
# The pages whose commands and links are checked: the README, docs/ and the benchmark pages.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
         ROOT / "benchmarks" / "RESULTS.md", ROOT / "benchmarks" / "DECISIONS.md"]


def _rel(page):
    return str(page.relative_to(ROOT))


def _commands(text):
    """Each `d2r ...` command of the page's bash blocks, continuation lines joined, comments cut,
    `a && b` split. Lines with placeholders (`...`) or a list of alternatives (`a | b`) are left out."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = re.sub(r"\s#.*$", "", part).strip()
                if part.startswith("d2r ") and "..." not in part and " | " not in part:
                    out.append(part)
    return out


def test_model_zoo_table_matches_the_manifest():
    page = (ROOT / "docs" / "models.md").read_text()
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| `([\w.]+\.(?:tflite|onnx))` \| ([\d.]+) MB \|", page)}
    manifest = load_manifest()
    assert set(rows) == {Path(e.file).name for e in manifest.models}
    for e in manifest.models:
        assert abs(rows[Path(e.file).name] - e.path.stat().st_size / 1e6) < 0.01, e.file


def test_readme_has_the_two_commands_and_the_check():
    readme = (ROOT / "README.md").read_text()
    for line in ("make demo ", "make test ", "make check"):
        assert line in readme, line
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile and "\ncheck:" in makefile
    # the front door stays a front door: the reference lives in docs/
    assert len(readme.encode()) <= 10_500, len(readme.encode())


def test_documented_commands_parse():
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    checked = 0
    for page in PAGES:
        for command in _commands(page.read_text()):
            args = shlex.split(command)[1:]
            if args[0].startswith("-"):  # d2r --version, d2r --help: they exit on purpose
                continue
            assert args[0] in known, f"{_rel(page)}: unknown command: {command}"
            try:
                parser.parse_args(args)
            except SystemExit as e:  # argparse's way of saying no
                pytest.fail(f"{_rel(page)}: does not parse (exit {e.code}): {command}")
            checked += 1
    assert checked >= 30, checked  # the README, usage, deployment and evaluation pages have commands


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_lead_somewhere():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{_rel(page)}: link to a missing file: {target}"
            if anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, f"{_rel(page)}: no heading for {target}"
