"""``d2r datasets``: download from a real loopback HTTP mirror (Range, dropped connections),
sha256 checks, the restricted unpickler, the converted layout and the 640 px subset."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2r.cli import main as cli_main
from d2r.errors import InputError
from d2r_lab import datasets
from d2r_lab.datasets import ChecksumError, DownloadError, download, load_ground_truth, make_mini, select_subset
from d2r_lab.evaluate import DatasetError, load_dataset

# --------------------------------------------------------------------------------------------
# A loopback mirror
# --------------------------------------------------------------------------------------------


class Mirror:
    """Files served on 127.0.0.1 with Range / If-Range support. ``drop[name] = n`` makes the next
    response for ``name`` stop after its n-th byte of the file and close the connection."""

    def __init__(self):
        self.files: dict = {}
        self.drop: dict = {}
        self.log: list = []  # (name, Range header, status, bytes sent)
        self.lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/moved/"):  # like www.robots.ox.ac.uk -> thor.robots.ox.ac.uk
                    self.send_response(301)
                    self.send_header("Location", mirror.url + self.path[len("/moved/"):])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    mirror.log.append(("moved", self.headers.get("Range"), 301, 0))
                    return
                name = self.path.lstrip("/")
                data = mirror.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    mirror.log.append((name, None, 404, 0))
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                start = 0
                if rng and (if_range is None or if_range == etag):
                    start = int(re.match(r"bytes=(\d+)-$", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        mirror.log.append((name, rng, 416, 0))
                        return
                body = data[start:]
                status = 206 if start else 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                with mirror.lock:
                    cut = mirror.drop.pop(name, None)
                if cut is not None:
                    body = body[: max(cut - start, 0)]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()
                mirror.log.append((name, rng, status, len(body)))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def requests(self, name):
        return [e for e in self.log if e[0] == name]

    def sent(self, name):
        return sum(e[3] for e in self.requests(name))


@pytest.fixture
def mirror():
    m = Mirror()
    m.thread.start()
    yield m
    m.server.shutdown()
    m.server.server_close()


# --------------------------------------------------------------------------------------------
# Tiny archives in the official layout
# --------------------------------------------------------------------------------------------


def _jpeg(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.kron(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _tgz(members: dict, extra_dirs=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in extra_dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


OX_DB = [f"all_souls_{i:06d}" for i in range(0, 14, 2)] + [f"balliol_{i:06d}" for i in range(5)] + ["oxford_000100", "oxford_000101"]
OX_Q = ["all_souls_000013", "oxford_002985"]
OX_GND = [
    {"bbx": [10.25, 20.5, 90.75, 100.0], "easy": [1, 3], "hard": [2, 5], "junk": [4]},
    {"bbx": [0.0, 0.0, 160.0, 120.0], "easy": [8], "hard": [9, 12], "junk": []},
]


def _gnd_pickle(imlist, qimlist, gnd, numpy_arrays=True, old_numpy_names=False) -> bytes:
    entries = []
    for e in gnd:
        item = {"bbx": np.asarray(e["bbx"], dtype=np.float64) if numpy_arrays else list(e["bbx"])}
        for k in ("easy", "hard", "junk"):
            item[k] = np.asarray(e[k], dtype=np.int64) if numpy_arrays else list(e[k])
        entries.append(item)
    data = pickle.dumps({"gnd": entries, "imlist": list(imlist), "qimlist": list(qimlist)}, protocol=2)
    if old_numpy_names:  # a pickle written by numpy 1.x names numpy.core
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in data
    return data


def _oxford_files():
    images = {n: _jpeg(i) for i, n in enumerate(OX_DB + OX_Q)}
    members = {f"{n}.jpg": images[n] for n in OX_DB + OX_Q}
    members["oxford_009999.jpg"] = _jpeg(99)  # an image no list names
    members["README.txt"] = b"not an image"
    files = {
        "oxbuild_images-v1.tgz": _tgz(members, extra_dirs=["sub"]),
        "gnd_roxford5k.pkl": _gnd_pickle(OX_DB, OX_Q, OX_GND, old_numpy_names=True),
    }
    return files, images


PA_DB = [f"paris_defense_{i:06d}" for i in range(6)] + [f"paris_louvre_{i:06d}" for i in range(6)]
PA_Q = ["paris_defense_000605", "paris_louvre_000135"]
PA_GND = [
    {"bbx": [5.0, 5.0, 60.0, 70.0], "easy": [0], "hard": [1, 2], "junk": [3]},
    {"bbx": [30.0, 10.0, 150.0, 110.0], "easy": [6, 7], "hard": [8], "junk": [9, 10]},
]


def _paris_files():
    images = {n: _jpeg(100 + i) for i, n in enumerate(PA_DB + PA_Q)}

    def path(n):
        return f"paris/{n.split('_')[1]}/{n}.jpg"

    half = {path(n): images[n] for n in PA_DB[:6] + PA_Q[:1]}
    rest = {path(n): images[n] for n in PA_DB[6:] + PA_Q[1:]}
    files = {
        "paris_1-v1.tgz": _tgz(half, extra_dirs=["paris", "paris/defense"]),
        "paris_2-v1.tgz": _tgz(rest, extra_dirs=["paris", "paris/louvre"]),
        "gnd_rparis6k.pkl": _gnd_pickle(PA_DB, PA_Q, PA_GND, numpy_arrays=False),
    }
    return files, images


def _sums(files) -> dict:
    return {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}


def _ours_absent(dest: Path):
    for name in ("db", "full", "queries", "gnd.json", datasets.STAGING):
        assert not (dest / name).exists(), name


# --------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------


def test_download_resumes_a_dropped_connection_and_converts(mirror, tmp_path):
    files, images = _oxford_files()
    mirror.files.update(files)
    arc = "oxbuild_images-v1.tgz"
    cut = len(files[arc]) // 2
    mirror.drop[arc] = cut
    dest = tmp_path / "rox"
    log = io.StringIO()
    download("roxford5k", dest, mirror=mirror.url, checksums=_sums(files), backoff=0, stream=log)

    # resumed with a Range request where the connection broke; every byte sent once
    reqs = mirror.requests(arc)
    assert [r[1] for r in reqs] == [None, f"bytes={cut}-"]
    assert [r[2] for r in reqs] == [200, 206]
    assert mirror.sent(arc) == len(files[arc])
    assert (dest / "downloads" / arc).read_bytes() == files[arc]
    assert not list((dest / "downloads").glob("*.part*"))

    ds = load_dataset(dest)
    assert ds.names == OX_DB and ds.query_names == OX_Q
    for q, e in enumerate(OX_GND):
        for k in ("easy", "hard", "junk"):
            assert ds.gnd[q][k].tolist() == e[k]
        assert list(ds.gnd[q]["bbx"]) == e["bbx"]
    for name, path in zip(ds.names, ds.image_paths):
        assert path.read_bytes() == images[name]  # the archive's bytes, unchanged
    for q, name in enumerate(OX_Q):
        assert (dest / "full" / f"{name}.jpg").read_bytes() == images[name]
        x1, y1, x2, y2 = OX_GND[q]["bbx"]
        with Image.open(ds.query_paths[q]) as im:
            assert im.size == (round(x2) - round(x1), round(y2) - round(y1))
    g = json.loads((dest / "gnd.json").read_text())
    assert g["query_source"] == ["cropped_from_full"] * 2
    assert not (dest / "db" / "oxford_009999.jpg").exists()
    assert datasets.read_sha256sums(dest / "SHA256SUMS") == _sums(files)
    assert "connection lost" in log.getvalue()

    # a second run finds the conversion done and fetches nothing
    n = len(mirror.log)
    download("roxford5k", dest, mirror=mirror.url, backoff=0, stream=io.StringIO())
    assert len(mirror.log) == n


def test_an_interrupted_run_resumes_and_does_not_fetch_completed_files_again(mirror, tmp_path):
    files, images = _paris_files()
    mirror.files.update(files)
    cut = len(files["paris_2-v1.tgz"]) // 3
    mirror.drop["paris_2-v1.tgz"] = cut
    dest = tmp_path / "rpa"
    with pytest.raises(DownloadError, match=r"paris_2-v1\.tgz.*run the command again to resume"):
        download("rparis6k", dest, mirror=mirror.url, checksums=_sums(files), retries=0, backoff=0, stream=io.StringIO())
    assert (dest / "downloads" / "paris_1-v1.tgz").read_bytes() == files["paris_1-v1.tgz"]
    assert (dest / "downloads" / "paris_2-v1.tgz.part").stat().st_size == cut
    assert mirror.requests("gnd_rparis6k.pkl") == []
    _ours_absent(dest)

    download("rparis6k", dest, mirror=mirror.url, checksums=_sums(files), retries=0, backoff=0, stream=io.StringIO())
    assert len(mirror.requests("paris_1-v1.tgz")) == 1  # completed before: not fetched again
    assert [r[1] for r in mirror.requests("paris_2-v1.tgz")] == [None, f"bytes={cut}-"]
    assert mirror.sent("paris_2-v1.tgz") == len(files["paris_2-v1.tgz"])
    ds = load_dataset(dest)
    assert ds.names == PA_DB and ds.query_names == PA_Q  # images from nested folders of two archives
    assert all(p.read_bytes() == images[n] for n, p in zip(ds.names, ds.image_paths))


def test_resume_follows_a_redirect(mirror, tmp_path):
    files, _ = _oxford_files()
    mirror.files.update(files)
    arc = "oxbuild_images-v1.tgz"
    mirror.drop[arc] = 3000
    dest = tmp_path / "rox"
    download("roxford5k", dest, mirror=mirror.url + "moved/", checksums=_sums(files), backoff=0, stream=io.StringIO())
    assert [r[1] for r in mirror.requests("moved")][:2] == [None, "bytes=3000-"]
    assert [r[1:3] for r in mirror.requests(arc)] == [(None, 200), ("bytes=3000-", 206)]
    assert load_dataset(dest).n_images == len(OX_DB)


def _interrupted_oxford_download(mirror, dest, cut: int):
    """The Oxford files on the mirror and a first download into ``dest`` whose archive
    connection drops after ``cut`` bytes (no retries): returns (files, archive name)."""
    files, _ = _oxford_files()
    mirror.files.update(files)
    arc = "oxbuild_images-v1.tgz"
    mirror.drop[arc] = cut
    with pytest.raises(DownloadError):
        download("roxford5k", dest, mirror=mirror.url, retries=0, backoff=0, stream=io.StringIO())
    return files, arc


def test_a_file_that_changed_on_the_server_is_fetched_again_whole(mirror, tmp_path):
    dest = tmp_path / "rox"
    _, arc = _interrupted_oxford_download(mirror, dest, 1000)
    new_files, _ = _oxford_files()
    new_files[arc] = new_files[arc] + b"\0" * 10  # another file under the same name: new ETag
    mirror.files.update(new_files)
    download("roxford5k", dest, mirror=mirror.url, checksums=_sums(new_files), retries=0, backoff=0, stream=io.StringIO())
    last = mirror.requests(arc)[-1]
    assert last[1] == "bytes=1000-" and last[2] == 200  # If-Range failed: the whole file
    assert (dest / "downloads" / arc).read_bytes() == new_files[arc]


def test_a_complete_part_file_is_not_fetched_again(mirror, tmp_path):
    dest = tmp_path / "rox"
    files, arc = _interrupted_oxford_download(mirror, dest, 500)
    part = dest / "downloads" / f"{arc}.part"
    with open(part, "ab") as fh:  # as if the run had stopped after the last byte, before the rename
        fh.write(files[arc][500:])
    download("roxford5k", dest, mirror=mirror.url, checksums=_sums(files), retries=0, backoff=0, stream=io.StringIO())
    assert [r[2] for r in mirror.requests(arc)] == [200, 416]
    assert mirror.sent(arc) == 500
    assert load_dataset(dest).n_images == len(OX_DB)


def test_a_wrong_sha256_is_refused_and_nothing_is_converted(mirror, tmp_path):
    files, _ = _oxford_files()
    mirror.files.update(files)
    sums = _sums(files)
    sums["gnd_roxford5k.pkl"] = "0" * 64
    dest = tmp_path / "rox"
    with pytest.raises(ChecksumError, match=r"gnd_roxford5k\.pkl.*does not match 0{64}"):
        download("roxford5k", dest, mirror=mirror.url, checksums=sums, stream=io.StringIO())
    _ours_absent(dest)
    assert not (dest / "downloads" / "gnd_roxford5k.pkl").exists()
    assert not (dest / "downloads" / "gnd_roxford5k.pkl.part").exists()

    # the same through the command line: exit 1, the message names the file
    sums_file = tmp_path / "sums.txt"
    sums_file.write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    assert cli_main(["datasets", "download", "roxford5k", "--dest", str(dest), "--mirror", mirror.url,
                     "--checksums", str(sums_file)]) == 1
    _ours_absent(dest)


def test_first_download_records_sha256_and_later_runs_check_it(mirror, tmp_path):
    files, _ = _oxford_files()
    # an archive that lacks an image of the ground truth: the conversion fails after the download
    broken = dict(files)
    members = {f"{n}.jpg": _jpeg(i) for i, n in enumerate(OX_DB[:-1] + OX_Q)}
    broken["oxbuild_images-v1.tgz"] = _tgz(members)
    mirror.files.update(broken)
    dest = tmp_path / "rox"
    log = io.StringIO()
    with pytest.raises(DatasetError, match=r"1 image\(s\).*oxford_000101"):
        download("roxford5k", dest, mirror=mirror.url, stream=log)
    assert "no published sha256 for oxbuild_images-v1.tgz" in log.getvalue()
    assert datasets.read_sha256sums(dest / "SHA256SUMS") == _sums(broken)
    _ours_absent(dest)

    # the downloaded file is damaged on disk: the next run compares it with SHA256SUMS
    arc = dest / "downloads" / "oxbuild_images-v1.tgz"
    data = bytearray(arc.read_bytes())
    data[100] ^= 1
    arc.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"oxbuild_images-v1\.tgz: sha256 .* \(.*SHA256SUMS\)"):
        download("roxford5k", dest, mirror=mirror.url, stream=io.StringIO())
    _ours_absent(dest)


def test_dest_content_we_did_not_make_is_never_touched(mirror, tmp_path):
    files, _ = _oxford_files()
    mirror.files.update(files)
    dest = tmp_path / "mine"
    (dest / "db").mkdir(parents=True)
    (dest / "db" / "photo.jpg").write_bytes(b"precious")
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"db exists and was not made by d2r datasets"):
        download("roxford5k", dest, mirror=mirror.url, stream=io.StringIO())
    assert (dest / "db" / "photo.jpg").read_bytes() == b"precious"
    assert mirror.log == []

    (dest / "db" / "photo.jpg").unlink()
    (dest / "db").rmdir()
    download("roxford5k", dest, mirror=mirror.url, checksums=_sums(files), stream=io.StringIO())
    assert (dest / "notes.txt").read_text() == "keep me"
    assert load_dataset(dest).n_images == len(OX_DB)
    # another dataset into the same folder is refused
    with pytest.raises(InputError, match="holds 'roxford5k'"):
        download("rparis6k", dest, mirror=mirror.url, stream=io.StringIO())
    # a regular file as --dest
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        download("roxford5k", tmp_path / "afile", mirror=mirror.url, stream=io.StringIO())
    assert (tmp_path / "afile").read_text() == "x"


def test_a_pickle_that_asks_for_code_is_refused(mirror, tmp_path):
    files, _ = _oxford_files()
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {flag}",))

    files["gnd_roxford5k.pkl"] = pickle.dumps({"imlist": OX_DB, "qimlist": OX_Q, "gnd": [Evil()]}, protocol=2)
    mirror.files.update(files)
    dest = tmp_path / "rox"
    with pytest.raises(DatasetError, match=r"gnd_roxford5k\.pkl: the ground-truth pickle asks for (posix|os)\.system"):
        download("roxford5k", dest, mirror=mirror.url, checksums=_sums(files), stream=io.StringIO())
    assert not flag.exists()
    _ours_absent(dest)


@pytest.mark.parametrize("numpy_arrays,old_names", [(True, False), (True, True), (False, False)])
def test_load_ground_truth_reads_the_official_structure(tmp_path, numpy_arrays, old_names):
    p = tmp_path / "gnd.pkl"
    p.write_bytes(_gnd_pickle(OX_DB, OX_Q, OX_GND, numpy_arrays=numpy_arrays, old_numpy_names=old_names))
    gt = load_ground_truth(p)
    assert gt["imlist"] == OX_DB and gt["qimlist"] == OX_Q
    assert gt["gnd"] == [{"bbx": e["bbx"], "easy": e["easy"], "hard": e["hard"], "junk": e["junk"]} for e in OX_GND]


@pytest.mark.parametrize("payload,msg", [
    ([1, 2], "expected a dict"),
    ({"imlist": OX_DB, "qimlist": OX_Q, "gnd": OX_GND[:1]}, "one entry per query"),
    ({"imlist": OX_DB, "qimlist": OX_Q, "gnd": [OX_GND[0], {**OX_GND[1], "hard": [99]}]}, r"gnd\[1\]\['hard'\]: 99 is not an index"),
    ({"imlist": ["../etc/passwd"], "qimlist": OX_Q, "gnd": OX_GND}, "not a plain image name"),
    ({"imlist": OX_DB, "qimlist": OX_Q, "gnd": [OX_GND[0], {**OX_GND[1], "bbx": [5, 5, 1, 1]}]}, "empty box"),
    ({"imlist": OX_DB, "qimlist": OX_Q, "gnd": [OX_GND[0], {**OX_GND[1], "easy": np.array(["a"])}]}, "integer indices"),
])
def test_load_ground_truth_names_the_problem(tmp_path, payload, msg):
    p = tmp_path / "gnd.pkl"
    p.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DatasetError, match=msg):
        load_ground_truth(p)
    p.write_bytes(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(DatasetError, match="not a readable ground-truth pickle"):
        load_ground_truth(p)


def test_progress_is_a_plain_line_when_not_on_a_terminal(mirror, tmp_path):
    files, _ = _oxford_files()
    mirror.files.update(files)
    log = io.StringIO()
    download("roxford5k", tmp_path / "rox", mirror=mirror.url, checksums=_sums(files), stream=log)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert re.search(r"roxford5k: oxbuild_images-v1\.tgz +100% [\d.]+/[\d.]+ MB", text)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = datasets.Progress("x", 10, unit="images", stream=tty, interval=0)
    bar.update(5)
    bar.close()
    assert tty.getvalue().startswith("\rx [############            ]  50% 5/10 images")


# --------------------------------------------------------------------------------------------
# the subset
# --------------------------------------------------------------------------------------------


def test_select_subset_rule():
    imlist = [f"a_{i:06d}" for i in range(10)] + [f"b_{i:06d}" for i in range(10)]
    qimlist = ["b_000100", "a_000200"]
    gnd = [{"easy": [11], "hard": [13, 17], "junk": [12]}, {"easy": [], "hard": [3], "junk": [1]}]
    # every 5th: 0 5 10 15; hard: 13 17 3; negatives of q0 (word b): 11 easy, 12 junk, 13 hard -> 14 16
    assert select_subset(imlist, qimlist, gnd, [0], step=5, negatives=2) == [0, 5, 10, 13, 14, 15, 16, 17]
    # q1 (word a): 1 junk, 2 is the first free a_ image
    assert select_subset(imlist, qimlist, gnd, [0, 1], step=5, negatives=1) == [0, 2, 3, 5, 10, 13, 14, 15, 17]
    assert select_subset(imlist, qimlist, gnd, [], step=1, negatives=3) == list(range(20))


def test_mini_scales_selects_and_remaps(mirror, tmp_path):
    files, _ = _oxford_files()
    mirror.files.update(files)
    full = download("roxford5k", tmp_path / "rox", mirror=mirror.url, checksums=_sums(files), stream=io.StringIO())
    src = load_dataset(full)
    dest = tmp_path / "mini"
    make_mini(full, dest, size=64, step=4, negatives=1, stream=io.StringIO())
    ds = load_dataset(dest)
    gnd = [{k: src.gnd[q][k].tolist() for k in ("easy", "hard", "junk")} for q in range(2)]
    sel = select_subset(src.names, src.query_names, gnd, [0, 1], step=4, negatives=1)
    assert ds.names == [src.names[i] for i in sel]
    assert ds.query_names == OX_Q  # not the 21 of roxford5k-mini: auto takes all
    for q in range(2):
        for k in ("easy", "hard", "junk"):  # same images, by name
            assert [ds.names[i] for i in ds.gnd[q][k]] == [src.names[i] for i in src.gnd[q][k] if i in sel]
        assert set(src.gnd[q]["hard"].tolist()) <= set(sel)
    for p in ds.image_paths:
        with Image.open(p) as im:
            assert im.size == (64, 48)
    # query 0: bbx scaled by 64/160, the crop cut at the rounded scaled box
    assert ds.gnd[0]["bbx"] == (4.1, 8.2, 36.3, 40.0)
    with Image.open(ds.query_paths[0]) as im:
        assert im.size == (36 - 4, 40 - 8)
    g = json.loads((dest / "gnd.json").read_text())
    assert g["subset"]["step"] == 4 and g["query_source"] == ["cropped_from_full"] * 2

    # never over an existing folder; a failure leaves nothing behind
    with pytest.raises(InputError, match="not an empty folder"):
        make_mini(full, dest, size=64)
    (full / "full" / "oxford_002985.jpg").unlink()
    with pytest.raises(DatasetError, match="no full image of 1 selected query"):
        make_mini(full, tmp_path / "mini2", size=64)
    assert not (tmp_path / "mini2").exists()
    assert [p.name for p in tmp_path.iterdir() if "d2r-mini" in p.name] == []
    with pytest.raises(InputError, match="not among the queries"):
        make_mini(full, tmp_path / "mini3", queries="roxford5k-mini")


def test_mini_never_enlarges_and_the_cli_runs_both_steps(mirror, tmp_path):
    files, _ = _paris_files()
    mirror.files.update(files)
    sums = tmp_path / "SUMS"
    sums.write_text("".join(f"{h}  {n}\n" for n, h in _sums(files).items()))
    full, mini = tmp_path / "rpa", tmp_path / "rpa-mini"
    assert cli_main(["datasets", "download", "rparis6k", "--dest", str(full), "--mirror", mirror.url, "--checksums", str(sums)]) == 0
    assert cli_main(["datasets", "mini", str(full), "--dest", str(mini), "--queries", "paris_louvre_000135"]) == 0
    ds = load_dataset(mini)
    assert ds.query_names == ["paris_louvre_000135"]
    with Image.open(ds.image_paths[0]) as im:
        assert im.size == (160, 120)  # smaller than 640: kept
    assert ds.gnd[0]["bbx"] == (30.0, 10.0, 150.0, 110.0)


@pytest.mark.slow
def test_mini_takes_the_21_queries_of_roxford5k_mini_by_default(tmp_path):
    # a full-size folder in the converted layout, made by hand: 21 + 1 queries, 12 database images
    src = tmp_path / "src"
    for sub in ("db", "full", "queries"):
        (src / sub).mkdir(parents=True)
    db = [f"x_{i:06d}" for i in range(12)]
    queries = list(datasets.MINI_QUERIES) + ["zz_000001"]
    for i, n in enumerate(db):
        (src / "db" / f"{n}.jpg").write_bytes(_jpeg(i, size=(1024, 768)))
    for i, n in enumerate(queries):
        (src / "full" / f"{n}.jpg").write_bytes(_jpeg(50 + i, size=(768, 1024)))
        (src / "queries" / f"{n}.jpg").write_bytes(_jpeg(50 + i, size=(64, 64)))
    gnd = [{"bbx": [100.0, 200.0, 600.0, 1000.0], "easy": [i % 12], "hard": [(i + 1) % 12], "junk": []} for i in range(len(queries))]
    (src / "gnd.json").write_text(json.dumps({"imlist": db, "qimlist": queries, "gnd": gnd}))
    (tmp_path / ".mini.d2r-mini-1").mkdir()  # left by a killed run
    make_mini(src, tmp_path / "mini", stream=io.StringIO())
    assert not (tmp_path / ".mini.d2r-mini-1").exists()
    ds = load_dataset(tmp_path / "mini")
    assert ds.query_names == list(datasets.MINI_QUERIES)
    with Image.open(ds.image_paths[0]) as im:
        assert im.size == (640, 480)
    with Image.open(tmp_path / "mini" / "full" / f"{queries[0]}.jpg") as im:
        assert im.size == (480, 640)
    assert ds.gnd[0]["bbx"] == (62.5, 125.0, 375.0, 625.0)  # x 640/1024 = 0.625
    with Image.open(ds.query_paths[0]) as im:
        assert im.size == (313, 500)  # round(375) - round(62.5) = 375 - 62 (round half to even), 625 - 125
