"""Saving and opening in the field (issue 15): a save never destroys what is not ours, an
interrupted save leaves nothing behind once the target is saved or opened again, a malformed
bundle.json gives BundleError naming the field, and no corruption of an index file gives a
silently wrong ranking."""

import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r import _files
from d2r.cli import main as cli_main
from d2r.engine import BundleError, Engine, check_bundle_target
from d2r.index import format as index_mod

from test_index import make_codebook, random_agg
from test_index_format import small_index

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_WAIT_POLICY="PASSIVE")


def snapshot(folder: Path) -> dict:
    """Everything under ``folder``: files with their bytes, folders, links with their targets."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(folder: Path, name: str) -> list:
    """Hidden entries beside ``name`` made for it: temporaries of any d2r version."""
    return sorted(n for n in os.listdir(folder) if n.startswith(f".{name}."))


@pytest.fixture(scope="module")
def engine():
    """A small engine: XFeat without detector, 16 words, 5 synthetic images (no photo decoded)."""
    rng = np.random.default_rng(0)
    cb = d2r.Codebook.train(rng.standard_normal((400, 64)).astype(np.float32), size=16, iterations=3, seed=0)
    e = Engine.create(features="xfeat", detector=None, codebook=cb, kind="asmk_star", threads=1)
    for i in range(5):
        e.index.add(f"im{i}.jpg", random_agg(rng, 16, 64, 6), metadata={"title": f"photo {i}"})
    yield e
    e.close()


def tiny_index():
    idx = d2r.Index(make_codebook(8, 16), kind="asmk_star")
    idx.add("a", random_agg(np.random.default_rng(0), 8, 16, 3))
    return idx


# -- 1. never delete what is not ours ------------------------------------------------------------------
@pytest.mark.parametrize("what", ["file", "folder", "symlink", "short file"])
def test_index_save_refuses_a_target_that_is_not_an_index(tmp_path, what):
    idx = tiny_index()
    target = tmp_path / "out.d2ri"
    if what == "file":
        target.write_text("my notes, not an index\n" * 10)
    elif what == "short file":
        target.write_bytes(b"D2R")
    elif what == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        idx.save(tmp_path / "real.d2ri")
        target.symlink_to(tmp_path / "real.d2ri")
    before = snapshot(tmp_path)
    with pytest.raises(d2r.IndexFormatError, match=re.escape(str(target))):
        idx.save(target)
    assert snapshot(tmp_path) == before


def test_index_save_replaces_an_index_or_an_empty_file(tmp_path):
    idx = tiny_index()
    (tmp_path / "empty.d2ri").write_bytes(b"")
    idx.save(tmp_path / "empty.d2ri")
    idx.save(tmp_path / "x.d2ri")
    idx.add("b", random_agg(np.random.default_rng(1), 8, 16, 2))
    idx.save(tmp_path / "x.d2ri")  # over an index: allowed
    assert len(d2r.Index.open(tmp_path / "x.d2ri")) == 2 and len(d2r.Index.open(tmp_path / "empty.d2ri")) == 1
    assert sorted(os.listdir(tmp_path)) == ["empty.d2ri", "x.d2ri"]


@pytest.mark.parametrize("case", ["user folder", "file", "symlink", "bundle holding a user file", "source folder",
                                  "empty source folder", "folder holding the source"])
@pytest.mark.slow
def test_bundle_save_refuses_what_is_not_ours(engine, tmp_path, case):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"\xff\xd8\xff a photo")
    target = tmp_path / "out.d2r"
    if case == "user folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif case == "file":
        target.write_text("mine")
    elif case == "symlink":
        target.symlink_to(photos)
    elif case == "bundle holding a user file":
        engine.save(target)
        (target / "models" / "notes.txt").write_text("mine")
    elif case == "source folder":
        target = photos
    elif case == "empty source folder":
        (photos / "a.jpg").unlink()
        target = photos
    else:
        target = tmp_path
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match=re.escape(str(target))):
        engine.save(target, protect=[photos])
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_bundle_save_over_a_new_path_an_empty_folder_or_a_bundle(engine, tmp_path):
    (tmp_path / "empty.d2r").mkdir()
    for name in ("new.d2r", "empty.d2r"):
        engine.save(tmp_path / name, version=3)
        with Engine.open(tmp_path / name) as e:
            assert len(e.index) == 5 and e.bundle_version == 3
    (tmp_path / "new.d2r" / ".DS_Store").write_bytes(b"Finder's")  # a file browser's cache does not count
    engine.save(tmp_path / "new.d2r", version=4)  # over our own bundle: allowed, swapped in
    with Engine.open(tmp_path / "new.d2r") as e:
        assert e.bundle_version == 4
    assert sorted(os.listdir(tmp_path)) == ["empty.d2r", "new.d2r"]
    check_bundle_target(tmp_path / "new.d2r", protect=[tmp_path / "elsewhere"])


def write_photos(folder: Path, n=3):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(n):
        noise = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((320, 240), Image.BILINEAR).save(folder / f"p{i}.png")


@pytest.mark.parametrize("case", ["userdir", "photos", "afile", "parent of photos"])
def test_cli_build_never_replaces_a_folder_or_file_of_the_user(tmp_path, case, capsys, monkeypatch):
    """The issue's cases: `d2r build photos -o userdir` deleted userdir/notes.txt, `-o photos`
    deleted the photos, `-o afile` replaced a file. Refused before any work now."""
    root = tmp_path / "work"
    root.mkdir()
    photos = root / "photos"
    write_photos(photos)
    target = {"userdir": root / "userdir", "photos": photos, "afile": root / "afile", "parent of photos": root}[case]
    if case == "userdir":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif case == "afile":
        target.write_text("mine")
    before = snapshot(root)
    started = []

    def create(*args, **kwargs):  # the build's first step: it must not be reached
        started.append(kwargs)
        raise AssertionError("the build started before its target was checked")

    monkeypatch.setattr(Engine, "create", create)
    rc = cli_main(["build", str(photos), "-o", str(target), "--features", "xfeat", "--detector", "none",
                   "--codebook-size", "16", "--verification-features", "0", "--threads", "1"])
    assert rc != 0 and not started  # refused up front, not after the build
    assert str(target) in capsys.readouterr().err
    assert snapshot(root) == before


# -- 2. interrupted saves -----------------------------------------------------------------------------
INDEX_WRITER = """
import sys
import numpy as np
import d2r
from test_index import make_codebook, random_agg
rng = np.random.default_rng(0)
idx = d2r.Index(make_codebook(1024, 128), kind="asmk_star")
for i in range(1500):
    idx.add(f"im{i}", random_agg(rng, 1024, 128, 400))
idx.save(sys.argv[1])
print("ready", flush=True)
while True:
    idx.save(sys.argv[1])
"""

ENGINE_WRITER = """
import sys
import numpy as np
import d2r
from d2r.engine import Engine
from test_index import random_agg
rng = np.random.default_rng(0)
cb = d2r.Codebook.train(rng.standard_normal((400, 64)).astype(np.float32), size=64, iterations=2, seed=0)
e = Engine.create(features="xfeat", detector=None, codebook=cb, kind="asmk_star", threads=1)
for i in range(3000):
    e.index.add(f"im{i}", random_agg(rng, 64, 64, 40))
e.save(sys.argv[1])
print("ready", flush=True)
while True:
    e.save(sys.argv[1])
"""


def kill_mid_save(script: str, target: Path, attempts=4, timeout=90.0) -> list:
    """Run ``script`` (saving ``target`` again and again) in a child process and SIGKILL it while
    a temporary of ``target`` exists; returns the leftovers seen after the kill."""
    deadline = time.monotonic() + timeout
    for _ in range(attempts):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)], env=CHILD_ENV, cwd=Path(__file__).parent,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready", "the writer did not start"
            while time.monotonic() < deadline:
                if leftovers(target.parent, target.name):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.0005)
        finally:
            proc.kill()
            proc.wait()
        left = leftovers(target.parent, target.name)
        if left:
            return left
    pytest.fail(f"could not kill a save of {target} while its temporary existed")


@pytest.mark.slow
def test_killed_index_save_is_cleaned_up_by_the_next_open_and_save(tmp_path):
    target = tmp_path / "big.d2ri"
    left = kill_mid_save(INDEX_WRITER, target)
    size = max((tmp_path / n).stat().st_size for n in left)
    assert size > 1 << 20, left  # a full-size temporary was being written
    idx = d2r.Index.open(target)  # the last complete save, intact
    assert len(idx) == 1500
    assert leftovers(tmp_path, target.name) == []
    left = kill_mid_save(INDEX_WRITER, target)
    idx.save(target)
    assert leftovers(tmp_path, target.name) == [] and sorted(os.listdir(tmp_path)) == ["big.d2ri"]


@pytest.mark.slow
def test_killed_bundle_save_is_cleaned_up_by_the_next_open_and_save(engine, tmp_path):
    target = tmp_path / "museum.d2r"
    kill_mid_save(ENGINE_WRITER, target)
    with Engine.open(target) as e:
        assert len(e.index) == 3000
    assert leftovers(tmp_path, target.name) == []
    kill_mid_save(ENGINE_WRITER, target)
    with Engine.open(target, verify=False) as e:
        e.save(target)
    assert sorted(os.listdir(tmp_path)) == ["museum.d2r"]


def test_stale_temporaries_only_of_dead_writers_of_this_machine(tmp_path):
    target = tmp_path / "x.d2ri"
    tiny_index().save(target)
    dead = dead_pid()
    other_host = "0" * 8 if _files._HOST != "0" * 8 else "1" * 8
    keep = [f".x.d2ri.d2r-tmp-{_files._HOST}-{os.getpid()}-aa",  # a live writer (this process)
            f".x.d2ri.d2r-tmp-{other_host}-{dead}-bb",  # another machine's writer (shared folder)
            ".x.d2ri.notes", "x.d2ri.d2r-tmp-1-2",  # not ours
            f".y.d2ri.d2r-tmp-{_files._HOST}-{dead}-cc",  # another target's
            f".x.d2ri.tmp-{dead}-123"]  # an old-style name, too recent to be sure
    gone = [f".x.d2ri.d2r-tmp-{_files._HOST}-{dead}-dd", f".x.d2ri.d2r-tmp-{_files._HOST}-{dead}-ee"]
    for n in keep + gone:
        (tmp_path / n).write_bytes(b"x")
    old_style = tmp_path / f".x.d2ri.tmp-{dead}-456"  # an old-style name, old enough
    old_style.write_bytes(b"x")
    os.utime(old_style, (time.time() - 3600, time.time() - 3600))
    d2r.Index.open(target)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["x.d2ri"])


@pytest.mark.slow
def test_a_bundle_lost_between_the_renames_of_a_swap_is_restored(engine, tmp_path):
    target = tmp_path / "museum.d2r"
    engine.save(target, version=7)
    dead = dead_pid()
    os.replace(target, tmp_path / f".museum.d2r.d2r-old-{_files._HOST}-{dead}-aa")  # the first rename happened
    (tmp_path / f".museum.d2r.d2r-tmp-{_files._HOST}-{dead}-bb").mkdir()  # the new version, never swapped in
    with Engine.open(target) as e:
        assert e.bundle_version == 7 and len(e.index) == 5
    assert sorted(os.listdir(tmp_path)) == ["museum.d2r"]


# -- 3. a malformed bundle.json -----------------------------------------------------------------------
ODD_VALUES = [None, True, False, 0, -1, 7, 2.5, -1e300, float("nan"), float("inf"), "", "x", "../../etc/passwd", "0" * 64,
              [], [1, "a"], [None], {}, {"a": 1}, 2**70]


def json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, prefix + (i,))


def tweak(v, rng):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return [v + 1, v - 1, -v - 1, v * 1000 + 17, float(v)][rng.integers(5)]
    if isinstance(v, float):
        return [-v, v * 1e6, float("nan"), int(v) if math.isfinite(v) else 0][rng.integers(4)]
    if isinstance(v, str):
        return [v + "x", v[:-1], v.upper(), v + "/..", "/" + v][rng.integers(5)]
    if isinstance(v, list):
        return v + [v[0] if v else 1] if rng.random() < 0.5 else v[1:]
    if isinstance(v, dict):
        w = dict(v)
        w["zz_extra"] = 1
        return w
    return "x"


def mutate(info, rng):
    """One random mutation of a JSON document; returns (document, names of the fields touched)."""
    info = json.loads(json.dumps(info))
    paths = [p for p in json_paths(info) if p and p != ("checksum",)]
    path = paths[rng.integers(len(paths))]
    parent = info
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    names = [str(k) for k in path if isinstance(k, str)]
    op = rng.integers(4)
    if op == 0:
        del parent[key]
    elif op == 1:
        parent[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    elif op == 2:
        parent[key] = tweak(parent[key], rng)
    elif isinstance(parent, dict):
        parent[key + "_"] = parent.pop(key)
        names.append(key + "_")
    else:
        parent.insert(0, parent[key])
    return info, names


def resign_bundle(info) -> dict:
    """Recompute bundle.json's checksum: sha256 of the canonical JSON of every other field."""
    body = {k: v for k, v in info.items() if k != "checksum"}
    info["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return info


@pytest.mark.slow
def test_fuzzed_bundle_json_gives_bundle_error_naming_the_field(engine, tmp_path):
    target = tmp_path / "b.d2r"
    engine.save(target)
    good = json.loads((target / "bundle.json").read_text())
    good["config"]["scales"] = [1.0]  # so that nested lists get mutated too
    rng = np.random.default_rng(15)
    outcomes = {"opened": 0, "refused": 0}
    t0 = time.monotonic()
    for trial in range(400):
        if time.monotonic() - t0 > 20:
            break
        info, names = mutate(good, rng)
        if rng.random() > 0.05:
            info = resign_bundle(info)
        else:  # left as it was: the checksum no longer matches
            names.append("checksum")
        (target / "bundle.json").write_text(json.dumps(info, indent=1))
        try:
            Engine.open(target, threads=1).close()
            outcomes["opened"] += 1
        except BundleError as exc:
            msg = str(exc)
            assert str(target) in msg, msg
            assert any(n in msg for n in names) or (not names and "bundle.json" in msg), (trial, names, msg)
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"trial {trial}: mutating {names} raised {type(exc).__name__}: {exc}")
    print(f"fuzzed bundle.json: {outcomes} in {time.monotonic() - t0:.1f} s")
    assert outcomes["refused"] >= 100 and outcomes["opened"] >= 10, outcomes
    # A few the fuzzing may miss, with the field the message must name.
    cases = [(("config", "max_regions"), "8"), (("config", "alpha"), None), (("config", "kind"), ["rasmk_star"]),
             (("files", "index.d2ri", "size"), -1), (("files", "index.d2ri"), "abc"), (("version",), "2"),
             (("config", "unknown_option"), 1), (("config", "kind"), "rasmk_star"), (("n_images",), 99),
             (("config", "verification_features"), 100), (("config", "features"), "aliked_t16"), (("models",), []),
             (("config", "scales"), [0.0]), (("config", "max_features"), 0)]
    for path, value in cases:
        info = json.loads(json.dumps(good))
        parent = info
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = value
        (target / "bundle.json").write_text(json.dumps(resign_bundle(info)))
        with pytest.raises(BundleError) as e:
            Engine.open(target, threads=1)
        assert path[-1] in str(e.value), (path, str(e.value))


# -- 4. a corrupt index never gives a silently wrong ranking ------------------------------------------------
def layout(data: bytes) -> dict:
    """name -> (offset, length) of every section of an index file, plus header, padding, trailer."""
    fields = index_mod._HEADER.unpack_from(data)
    header_size, n_sections = fields[2], fields[-1]
    names = index_mod._SECTIONS[:n_sections]
    out = {"header": [(0, header_size)], "trailer": [(len(data) - 32, 32)], "padding": []}
    pos = header_size
    for i, name in enumerate(names):
        off, length, _ = index_mod._SECTION.unpack_from(data, index_mod._HEADER.size + i * index_mod._SECTION.size)
        out["padding"].append((pos, off - pos))
        out[name] = [(off, length)]
        pos = off + length
    out["padding"].append((pos, len(data) - 32 - pos))
    return out


def results(idx, queries):
    return [[(h.image_id, h.score, h.metadata) for h in idx.search(q, top_k=1000, pooling=p)]
            for q in queries for p in ("max", "avg")]


@pytest.mark.parametrize("kind", ["rasmk_star", "asmk"])
@pytest.mark.parametrize("where", list(index_mod._SECTIONS) + ["header", "padding", "trailer"])
def test_a_flipped_bit_raises_or_changes_nothing(tmp_path, monkeypatch, kind, where):
    """Any single flipped bit, in any part of a file opened with the default check of a large
    file (lazy: per-word crc32 when a search first reads a word): the search raises
    IndexFormatError naming the file or ranks exactly as with the intact file."""
    monkeypatch.setattr(index_mod, "VERIFY_AUTO_MAX_BYTES", 0)  # every file is "large" here
    k, dim = 48, 16
    rng = np.random.default_rng(1)
    idx = d2r.Index(make_codebook(k, dim), kind=kind)
    for i in range(60):
        idx.add_regions(f"im{i}", [random_agg(rng, k, dim, int(rng.integers(1, 14)), kind) for _ in range(int(rng.integers(1, 3)))],
                        metadata={"i": i})
    idx.remove("im7")
    good_path = tmp_path / "good.d2ri"
    idx.save(good_path)
    data = good_path.read_bytes()
    queries = [random_agg(rng, k, dim, n, kind) for n in (k, 5, 9)]  # the first one reads every word
    expected = results(d2r.Index.open(good_path, verify=True), queries)
    spans = [(a, n) for a, n in layout(data)[where] if n > 0]
    if not spans:
        pytest.skip(f"no {where} bytes in this file")
    total = sum(n for _, n in spans)
    path = tmp_path / "bad.d2ri"
    raised = 0
    trials = 24
    for _ in range(trials):
        j = int(rng.integers(total * 8))
        for a, n in spans:  # noqa: B007 (a is the span where the loop stops)
            if j < 8 * n:
                break
            j -= 8 * n
        blob = bytearray(data)
        blob[a + j // 8] ^= 1 << (j % 8)
        path.write_bytes(bytes(blob))
        try:
            got = results(d2r.Index.open(path), queries)
        except d2r.IndexFormatError as exc:
            assert str(path) in str(exc)
            raised += 1
            continue
        assert got == expected, f"{where}: bit {j} of byte {a + j // 8} gave another ranking"
    assert raised == trials  # here every bit is covered by a check that search reaches


def test_lazy_check_of_a_large_file_at_save_and_from_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "VERIFY_AUTO_MAX_BYTES", 0)
    _, idx, _, rng = small_index(seed=3, n=40)
    good = tmp_path / "good.d2ri"
    idx.save(good)
    queries = [random_agg(rng, 32, 16, n) for n in (32, 4, 10)]
    expected = results(d2r.Index.open(good, verify=True), queries)
    opened = d2r.Index.open(good)
    assert opened._store.word_check is not None and not opened._store.word_check.ok.any()  # nothing checked at open
    out, errors = [], []

    def work():
        try:
            for _ in range(5):
                out.append(results(opened, queries))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and len(out) == 20 and all(r == expected for r in out)
    assert opened._store.word_check.ok.all()
    # A flipped code: a save of the opened file refuses to copy it into a new file.
    data = bytearray(good.read_bytes())
    off, length = layout(bytes(data))["ivf_codes"][0]
    data[off + length // 2] ^= 0x04
    bad = tmp_path / "bad.d2ri"
    bad.write_bytes(bytes(data))
    with pytest.raises(d2r.IndexFormatError, match="visual word"):
        d2r.Index.open(bad).save(tmp_path / "copy.d2ri")
    assert not (tmp_path / "copy.d2ri").exists() and leftovers(tmp_path, "copy.d2ri") == []
    with pytest.raises(d2r.IndexFormatError, match="ivf_codes"):
        d2r.Index.open(bad, verify=True)


def test_version_1_files_are_read_and_fully_checked(tmp_path, monkeypatch):
    """tests/data/index-format-v1.d2ri was written by d2r before format version 2 from
    small_index(seed=7, n=20) with im5 removed."""
    _, idx, _, rng = small_index(seed=7, n=20)
    idx.remove("im5")
    v1 = d2r.Index.open(DATA / "index-format-v1.d2ri")
    assert v1.image_ids() == idx.image_ids() and v1.get_metadata("im9") == idx.get_metadata("im9")
    queries = [random_agg(rng, 32, 16, n) for n in (32, 6)]
    assert results(v1, queries) == results(idx, queries)
    v1.save(tmp_path / "now.d2ri")  # written in the current version
    assert (tmp_path / "now.d2ri").read_bytes()[8:12] == index_mod.VERSION.to_bytes(4, "little")
    # No per-word crc32 in version 1: a "large" v1 file gets the full check at open.
    monkeypatch.setattr(index_mod, "VERIFY_AUTO_MAX_BYTES", 0)
    data = bytearray((DATA / "index-format-v1.d2ri").read_bytes())
    off, length = layout(bytes(data))["ivf_codes"][0]
    data[off + 1] ^= 0x80
    (tmp_path / "v1.d2ri").write_bytes(bytes(data))
    with pytest.raises(d2r.IndexFormatError, match="ivf_codes"):
        d2r.Index.open(tmp_path / "v1.d2ri")


def test_mobile_reference_reader_reads_both_versions(tmp_path):
    spec = importlib.util.spec_from_file_location("mobile_reader", ROOT / "examples" / "mobile" / "reader.py")
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    _, idx, _, rng = small_index(seed=7, n=20)
    idx.remove("im5")
    idx.save(tmp_path / "v2.d2ri")
    q = random_agg(rng, 32, 16, 8)
    want = [(h.image_id, h.score) for h in idx.search(q, top_k=5)]
    for path in (DATA / "index-format-v1.d2ri", tmp_path / "v2.d2ri"):
        r = reader.IndexReader(path)
        assert [(i, s) for i, s, _ in r.search(q.words, q.codes, top_k=5)] == want
