"""The README's first command runs examples/demo.py: it must work and recognise the visitors."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_builds_queries_and_draws(tmp_path):
    proc = subprocess.run([sys.executable, str(DEMO), "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8/8 visitor photos recognised" in proc.stdout, proc.stdout
    assert (tmp_path / "sample.d2r" / "bundle.json").is_file()
    sheet = Image.open(tmp_path / "results.png")
    assert sheet.size[0] > 600 and sheet.size[1] > 8 * 120
