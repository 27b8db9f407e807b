"""The README is the front door: its model zoo table must list exactly the shipped files, with
their sizes, and its commands must exist."""

import re
from pathlib import Path

from d2r.cli import build_parser
from d2r.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_model_zoo_table_matches_the_manifest():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| `([\w.]+\.(?:tflite|onnx))` \| ([\d.]+) MB \|", readme)}
    manifest = load_manifest()
    assert set(rows) == {Path(e.file).name for e in manifest.models}
    for e in manifest.models:
        assert abs(rows[Path(e.file).name] - e.path.stat().st_size / 1e6) < 0.01, e.file


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))
    commands = set(re.findall(r"^d2r ([a-z]+)", code, flags=re.M))
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    assert commands and commands <= known, commands - known
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
