"""The pieces of tools/arm64-check.sh that run on the host (the emulated run itself is not in CI:
see benchmarks/RESULTS.md, "Raspberry Pi path"), and the demo's --objects option it uses."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENOSYS_EXEC = ROOT / "tools" / "enosys_exec.py"
CHECK = ROOT / "tools" / "arm64-check.sh"

x86_linux = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                               reason="tools/enosys_exec.py is for x86-64 Linux hosts")

# the raw system calls by number, so that no libc fallback hides the answer
PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(256)
out = []
for name, args in (("statx", (332, -100, b"/", 0, 0xFFF, buf)), ("faccessat2", (439, -100, b"/", 0, 0)),
                   ("newfstatat", (262, -100, b"/", buf, 0))):
    r = libc.syscall(*args)
    out.append(f"{name}={'ok' if r == 0 else os.strerror(ctypes.get_errno())}")
print(" ".join(out))
"""


@x86_linux
def test_enosys_exec_answers_only_the_named_calls_with_enosys():
    plain = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert plain.stdout.split() == ["statx=ok", "faccessat2=ok", "newfstatat=ok"]
    filtered = subprocess.run([sys.executable, str(ENOSYS_EXEC), "statx,faccessat2", "--", sys.executable, "-c", PROBE],
                              capture_output=True, text=True)
    assert filtered.returncode == 0, filtered.stderr
    nosys = "Function not implemented"
    assert filtered.stdout.split("\n")[0] == f"statx={nosys} faccessat2={nosys} newfstatat=ok"
    # children inherit the filter (proot's children are qemu and the guest)
    child = subprocess.run([sys.executable, str(ENOSYS_EXEC), "statx", "--", sys.executable, "-c",
                            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {PROBE!r}])"],
                           capture_output=True, text=True)
    assert child.stdout.startswith(f"statx={nosys} faccessat2=ok"), child.stdout + child.stderr


@x86_linux
def test_enosys_exec_rejects_bad_input_by_name():
    bad = subprocess.run([sys.executable, str(ENOSYS_EXEC), "statx,chmod", "--", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown system call(s) chmod" in bad.stderr
    missing = subprocess.run([sys.executable, str(ENOSYS_EXEC), "statx", "--", "/nonexistent/d2r-cmd"],
                             capture_output=True, text=True)
    assert missing.returncode == 127 and "/nonexistent/d2r-cmd" in missing.stderr
    usage = subprocess.run([sys.executable, str(ENOSYS_EXEC), "statx", "true"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_arm64_check_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(CHECK)]).returncode == 0
    helped = subprocess.run(["bash", str(CHECK), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--objects N" in helped.stdout and "--tests" in helped.stdout
    wrong = subprocess.run(["bash", str(CHECK), "--frobnicate"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown argument '--frobnicate'" in wrong.stderr
    for n in ("0", "9", "two"):
        count = subprocess.run(["bash", str(CHECK), "--objects", n], capture_output=True, text=True)
        assert count.returncode == 1 and f"--objects must be a whole number from 1 to 8, got '{n}'" in count.stderr


@pytest.mark.parametrize("n", ["0", "9", "-1"])
def test_demo_rejects_an_object_count_out_of_range_before_any_work(n, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(out), "--objects", n],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"--objects must be between 1 and 8, got {n}" in proc.stderr
    assert "building" not in proc.stdout and not out.exists()
