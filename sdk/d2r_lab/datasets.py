"""``d2r datasets``: fetch the Revisited Oxford and Paris benchmarks, and cut the 640 px subset.

A lab tool: nothing the runtime imports on a query imports this module.

``download`` fetches the files the revisitop project's own ``download.py`` fetches (the Oxford
Buildings / Paris images tarballs of the VGG site and ``gnd_<dataset>.pkl`` of the CMP revisitop
site), resumes a broken transfer with an HTTP Range request on ``<name>.part``, checks every
file's sha256 and only then converts to the folder layout ``d2r eval --dataset`` reads
(:func:`d2r_lab.evaluate.load_dataset`)::

    DEST/gnd.json      imlist, qimlist, gnd[i] = {bbx, easy, hard, junk}, query_source
    DEST/db/           the database images, the archive's JPEG bytes unchanged
    DEST/full/         each query's whole image, unchanged
    DEST/queries/      each query cropped to its bbx (the benchmark protocol)
    DEST/downloads/    the downloaded files (``--delete-archives`` removes them once converted)
    DEST/SHA256SUMS    the sha256 of every downloaded file

No sha256 of the official files is published, and we could not find one pinned by another
project, so :data:`PINNED_SHA256` is empty: the first download records each file's sha256 in
``DEST/SHA256SUMS`` (trust on first use, said on stderr) and every later run, resume and
conversion checks against it. ``checksums=`` (``--checksums FILE``) gives the expected values
up front instead. The ground-truth pickle is read by a restricted unpickler that builds only
plain containers, numbers, strings and numpy arrays of numbers, never any other object.

``make_mini`` (``d2r datasets mini``) makes the subset layout we evaluate on, with images
scaled to a longest side of 640 px; :func:`select_subset` documents its rule.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import re
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from d2r.errors import ChecksumError, DownloadError, InputError

from .evaluate import DatasetError

__all__ = [
    "DATASETS",
    "MINI_QUERIES",
    "PINNED_SHA256",
    "ChecksumError",
    "DownloadError",
    "download",
    "load_ground_truth",
    "make_mini",
    "select_subset",
]

VGG = "https://www.robots.ox.ac.uk/~vgg/data/"
CMP = "https://cmp.felk.cvut.cz/revisitop/data/datasets/"


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in DEST/downloads and on a --mirror
    url: str  # official address


@dataclass(frozen=True)
class DatasetSource:
    name: str
    archives: tuple  # RemoteFile of the image tarballs
    gnd: RemoteFile  # the revisitop ground truth pickle

    @property
    def files(self) -> tuple:
        return (*self.archives, self.gnd)


# The addresses of revisitop's python/download.py (the gnd pickle over https rather than http:
# the same host and path).
DATASETS = {
    "roxford5k": DatasetSource(
        "roxford5k",
        (RemoteFile("oxbuild_images-v1.tgz", VGG + "oxbuildings/oxbuild_images-v1.tgz"),),
        RemoteFile("gnd_roxford5k.pkl", CMP + "roxford5k/gnd_roxford5k.pkl"),
    ),
    "rparis6k": DatasetSource(
        "rparis6k",
        (RemoteFile("paris_1-v1.tgz", VGG + "parisbuildings/paris_1-v1.tgz"),
         RemoteFile("paris_2-v1.tgz", VGG + "parisbuildings/paris_2-v1.tgz")),
        RemoteFile("gnd_rparis6k.pkl", CMP + "rparis6k/gnd_rparis6k.pkl"),
    ),
}

# Published sha256 of the official files: none is known to us (neither site publishes one and
# we found no project that pins them). Never fill this in from a guess; a value belongs here
# only once read from a real download that was checked some other way.
PINNED_SHA256: dict = {}

# The 21 queries of ../shared/data/roxford5k-mini (in the official qimlist order).
MINI_QUERIES = (
    "oxford_002985", "ashmolean_000305", "balliol_000187", "balliol_000167", "balliol_000194",
    "bodleian_000107", "bodleian_000108", "christ_church_000179", "oxford_002562",
    "cornmarket_000047", "cornmarket_000131", "hertford_000015", "magdalen_000078",
    "oxford_001115", "radcliffe_camera_000095", "all_souls_000021", "all_souls_000022",
    "ashmolean_000078", "ashmolean_000005", "hertford_000082", "radcliffe_camera_000290",
)

MARKER = ".d2r-dataset.json"  # in DEST: what this tool created there
STAGING = ".d2r-staging"  # in DEST: the conversion in progress
OUR_PATHS = ("downloads", "db", "full", "queries", "gnd.json", "SHA256SUMS", STAGING)
CHUNK = 1 << 16
JPEG_QUALITY = 95
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress:
    """A progress display on stderr: a bar redrawn in place on a terminal, otherwise a plain line
    every ``interval`` seconds (and one at the end), so logs stay readable."""

    def __init__(self, label: str, total: int | None, unit: str = "MB", stream=None, interval: float = 30.0):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else interval
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def _fmt(self, n: int) -> str:
        return f"{n / 1e6:.1f}" if self.unit == "MB" else str(n)

    def _line(self) -> str:
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        rate_s = f"{rate / 1e6:.1f} MB/s" if self.unit == "MB" else f"{rate:.0f}/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = ("#" * int(frac * 24)).ljust(24) if self.tty else ""
            bar = f"[{bar}] " if bar or self.tty else ""
            return f"{self.label} {bar}{frac:4.0%} {self._fmt(self.done)}/{self._fmt(self.total)} {self.unit}  {rate_s}"
        return f"{self.label} {self._fmt(self.done)} {self.unit}  {rate_s}"

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.stream.write(("\r" + self._line() + "\x1b[K") if self.tty else self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.stream.write(("\r" + self._line() + "\x1b[K\n") if self.tty else self._line() + "\n")
        self.stream.flush()


def _say(msg: str, stream=None) -> None:
    print(msg, file=stream if stream is not None else sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def read_sha256sums(path) -> dict:
    """``sha256sum``-format file (``HASH  NAME`` per line) -> {name: hash}."""
    path = Path(path)
    out = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the checksum list ({exc})") from exc
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not _SHA.match(parts[0].lower()):
            raise InputError(f"{path}: line {n}: expected 'SHA256  NAME' (64 hex digits), got {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def _write_sha256sums(path: Path, sums: dict) -> None:
    from d2r._files import atomic_write

    atomic_write(path, "".join(f"{h}  {n}\n" for n, h in sorted(sums.items())).encode())


def _sha256(path: Path) -> str:
    from d2r._files import sha256_file

    return sha256_file(path)


# --------------------------------------------------------------------------------------------
# Resumable HTTP download
# --------------------------------------------------------------------------------------------


def _content_range(value: str | None):
    """``bytes START-END/TOTAL`` -> (start, end, total or None)."""
    m = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


def fetch(url: str, part: Path, label: str, timeout: float = 60.0, retries: int = 5,
          backoff: float = 2.0, stream=None) -> None:
    """Download ``url`` into ``part``, resuming from its current size with a Range request.

    A dropped connection (an error or fewer bytes than announced) is retried from where it
    stopped, up to ``retries`` times in a row without progress, waiting ``backoff`` * 2^k s.
    A server that ignores the Range (answers 200) or whose file changed (``If-Range`` with the
    validator saved beside the part file) sends the whole file again, which replaces the part.
    Raises :class:`DownloadError` naming the URL; the part file stays for the next run.
    """
    meta_path = part.with_name(part.name + ".json")
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("url") != url:
            meta = {}
    except (OSError, ValueError):
        meta = {}
    progress = None
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have and not meta:
            # A part file we know nothing about (no record of its URL): start over.
            have = 0
        req = urllib.request.Request(url, headers={"User-Agent": "d2r-datasets", "Accept-Encoding": "identity"})
        if have:
            req.add_header("Range", f"bytes={have}-")
            if meta.get("validator"):
                req.add_header("If-Range", meta["validator"])
        got = 0
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status = resp.status
                validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
                length = resp.headers.get("Content-Length")
                length = int(length) if length and length.isdigit() else None
                if status == 206:
                    cr = _content_range(resp.headers.get("Content-Range"))
                    if cr is None or cr[0] != have:
                        raise DownloadError(f"{url}: the server answered the range {have}- with {resp.headers.get('Content-Range')!r}")
                    total = cr[2]
                    expect = cr[1] - cr[0] + 1
                    mode = "ab"
                elif status == 200:
                    if have:
                        _say(f"{label}: the server sent the whole file again (no range support, or the file changed); restarting", stream)
                    have, total, expect, mode = 0, length, length, "wb"
                else:  # pragma: no cover - urllib raises for other codes
                    raise DownloadError(f"{url}: unexpected HTTP status {status}")
                meta = {"url": url, "validator": validator, "total": total}
                meta_path.write_text(json.dumps(meta))
                if progress is None:
                    progress = Progress(label, total, stream=stream)
                    progress.done = have
                else:
                    progress.done = have
                    progress.total = total
                with open(part, mode) as fh:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
                        got += len(chunk)
                        progress.update(len(chunk))
                if expect is not None and got < expect:
                    raise ConnectionError(f"connection closed after {got} of {expect} bytes")
            size = part.stat().st_size
            if total is not None and size != total:
                raise DownloadError(f"{url}: received {size} bytes, the server announced {total}")
            progress.close()
            meta_path.unlink(missing_ok=True)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                cr = re.match(r"^\s*bytes\s+\*/(\d+)\s*$", exc.headers.get("Content-Range") or "")
                if cr and int(cr.group(1)) == have:  # complete already (stopped before the rename)
                    if progress is not None:
                        progress.close()
                    meta_path.unlink(missing_ok=True)
                    return
                # Our part file is longer than the server's file: start over.
                part.unlink(missing_ok=True)
                meta = {}
                continue
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
            if isinstance(exc, DownloadError):
                raise
            failures = 1 if got else failures + 1  # a drop after progress starts a new count
            if failures > retries:
                reason = getattr(exc, "reason", exc)
                raise DownloadError(f"{url}: download failed ({reason}); {part} keeps "
                                    f"{part.stat().st_size if part.exists() else 0} bytes: run the command again to resume") from exc
            wait = backoff * (2 ** max(failures - 1, 0))
            _say(f"{label}: connection lost ({getattr(exc, 'reason', exc)}); resuming in {wait:g} s", stream)
            time.sleep(wait)


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def _numpy_globals() -> dict:
    import numpy as np

    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    out = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for name, obj in allowed.items():
            out[(mod, name)] = obj
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    out[("_codecs", "encode")] = _latin1_bytes  # how protocol 2 writes bytes (an array's data)
    out[("__builtin__", "bytes")] = out[("builtins", "bytes")] = _empty_bytes  # ... and b""
    return out


def _empty_bytes(*args):
    if args:
        raise pickle.UnpicklingError("bytes(...) is accepted only without arguments")
    return b""


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is accepted only for latin1 text, got {encoding!r}")
    return text.encode("latin1")


class _GroundTruthUnpickler(pickle.Unpickler):
    """Builds plain containers and numpy arrays only: ``find_class`` answers nothing else, so a
    pickle that names any other callable (``os.system``, ``builtins.eval``...) is refused."""

    def __init__(self, fh, path):
        super().__init__(fh, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self._path = path
        self._globals = _numpy_globals()

    def find_class(self, module, name):
        obj = self._globals.get((module, name))
        if obj is None:
            raise DatasetError(f"{self._path}: the ground-truth pickle asks for {module}.{name}; "
                               "only plain lists, dicts, numbers, strings and numpy arrays are accepted")
        return obj


def _int_list(value, where: str, n: int) -> list:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu" and not (value.size == 0 and value.dtype.kind == "f"):
            raise DatasetError(f"{where}: expected integer indices, got a {value.dtype} array")
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)):
        raise DatasetError(f"{where}: expected a list of indices, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, np.integer):
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
            raise DatasetError(f"{where}: {v!r} is not an index into imlist [0, {n})")
        out.append(v)
    return [int(v) for v in out]


def _bbx(value, where: str) -> list:
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise DatasetError(f"{where}: expected 4 numbers, got a {value.dtype} array")
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise DatasetError(f"{where}: expected [x1, y1, x2, y2]")
    out = []
    for v in value:
        if isinstance(v, (np.integer, np.floating)):
            v = float(v)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
            raise DatasetError(f"{where}: expected 4 numbers, got {v!r}")
        out.append(float(v))
    if not (out[2] > out[0] and out[3] > out[1]):
        raise DatasetError(f"{where}: empty box {out}")
    return out


def _names(value, where: str) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise DatasetError(f"{where}: expected a non-empty list of image names")
    out = []
    for v in value:
        if isinstance(v, bytes):
            v = v.decode("latin1")
        if not isinstance(v, str) or not _NAME.match(v) or ".." in v:
            raise DatasetError(f"{where}: {v!r} is not a plain image name")
        out.append(v)
    if len(set(out)) != len(out):
        raise DatasetError(f"{where}: an image name appears twice")
    return out


def load_ground_truth(path) -> dict:
    """Read a revisitop ``gnd_<dataset>.pkl`` with the restricted unpickler and check it.

    Returns ``{"imlist": [str], "qimlist": [str], "gnd": [{"bbx": [4 floats], "easy", "hard",
    "junk": [int]}]}``. Raises :class:`DatasetError` naming the file and the problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = _GroundTruthUnpickler(fh, path).load()
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:  # a malformed pickle raises anything from EOFError to TypeError
        raise DatasetError(f"{path}: not a readable ground-truth pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a dict with imlist, qimlist and gnd, got {type(raw).__name__}")
    imlist = _names(raw.get("imlist"), f"{path}: imlist")
    qimlist = _names(raw.get("qimlist"), f"{path}: qimlist")
    entries = raw.get("gnd")
    if not isinstance(entries, (list, tuple)) or len(entries) != len(qimlist):
        raise DatasetError(f"{path}: gnd must have one entry per query ({len(qimlist)})")
    gnd = []
    for q, e in enumerate(entries):
        where = f"{path}: gnd[{q}]"
        if not isinstance(e, dict):
            raise DatasetError(f"{where}: expected a dict")
        item = {"bbx": _bbx(e.get("bbx"), f"{where}['bbx']")}
        for key in ("easy", "hard", "junk"):
            item[key] = _int_list(e.get(key, []), f"{where}['{key}']", len(imlist))
        gnd.append(item)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


# --------------------------------------------------------------------------------------------
# Destination folder bookkeeping: only what we created is ever replaced or removed
# --------------------------------------------------------------------------------------------


class _Dest:
    def __init__(self, root: Path, dataset: str):
        self.root = root
        self.marker_path = root / MARKER
        if root.exists() and not root.is_dir():
            raise InputError(f"dest {root}: exists and is not a folder")
        marker = None
        if self.marker_path.exists():
            try:
                marker = json.loads(self.marker_path.read_text())
                assert isinstance(marker, dict) and isinstance(marker.get("created"), list)
            except (OSError, ValueError, AssertionError) as exc:
                raise InputError(f"{self.marker_path}: unreadable ({exc}); it is not ours to fix: move it away") from exc
            if marker.get("dataset") != dataset:
                raise InputError(f"dest {root}: holds {marker.get('dataset')!r}, not {dataset!r}; choose another folder")
        self.marker = marker or {"tool": "d2r datasets download", "dataset": dataset, "created": [], "converted": False}
        for name in OUR_PATHS:
            p = root / name
            if (p.exists() or p.is_symlink()) and name not in self.marker["created"]:
                raise InputError(f"dest {root}: {p} exists and was not made by d2r datasets; "
                                 "it is left untouched: choose another folder or move it away")

    def save(self) -> None:
        from d2r._files import atomic_write

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.marker_path, json.dumps(self.marker, indent=1).encode())

    def claim(self, name: str) -> Path:
        """Record ``name`` as ours before creating it."""
        if name not in self.marker["created"]:
            self.marker["created"].append(name)
            self.save()
        return self.root / name


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _decode(data: bytes, where: str):
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as exc:
        raise DatasetError(f"{where}: cannot decode the image ({exc})") from exc
    return im


def _crop_query(im, bbx, where: str):
    w, h = im.size
    # The revisitop protocol crops the stored pixels (no EXIF rotation) at the rounded box;
    # a box that runs past the border is clamped rather than padded with black.
    box = [min(max(int(round(v)), 0), lim) for v, lim in zip(bbx, (w, h, w, h))]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DatasetError(f"{where}: bbx {bbx} lies outside the {w}x{h} image")
    return im.convert("RGB").crop(tuple(box))


def _convert(src: DatasetSource, downloads: Path, stage: Path, stream=None) -> None:
    """Write gnd.json, db/, full/, queries/ into ``stage`` from the verified downloads."""
    gt = load_ground_truth(downloads / src.gnd.name)
    imlist, qimlist = gt["imlist"], gt["qimlist"]
    want_db, want_q = set(imlist), set(qimlist)
    for sub in ("db", "full", "queries"):
        (stage / sub).mkdir()
    found_db, found_q = set(), {}
    progress = Progress(f"{src.name}: extracting", len(want_db | want_q), unit="images", stream=stream)
    for arc in src.archives:
        path = downloads / arc.name
        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    stem, dot, ext = base.rpartition(".")
                    if not dot or ext.lower() not in ("jpg", "jpeg") or stem in found_db or stem in found_q:
                        continue
                    if stem not in want_db and stem not in want_q:
                        continue
                    fh = tar.extractfile(member)
                    if fh is None:
                        continue
                    if stem in want_q:  # 70 queries: kept in memory for the crop
                        data = fh.read()
                        (stage / "full" / f"{stem}.jpg").write_bytes(data)
                        found_q[stem] = data
                        fh = io.BytesIO(data)
                    if stem in want_db:
                        with open(stage / "db" / f"{stem}.jpg", "wb") as copy:
                            shutil.copyfileobj(fh, copy)
                        found_db.add(stem)
                    progress.update(1)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise DatasetError(f"{path}: not a readable image archive ({exc})") from exc
    progress.close()
    missing = [n for n in imlist if n not in found_db] + [n for n in qimlist if n not in found_q]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(f"{src.name}: {len(missing)} image(s) of the ground truth are in none of "
                           f"{', '.join(a.name for a in src.archives)}: {shown}")
    for q, name in enumerate(qimlist):
        where = f"{src.name} query {name}"
        crop = _crop_query(_decode(found_q[name], where), gt["gnd"][q]["bbx"], where)
        crop.save(stage / "queries" / f"{name}.jpg", quality=JPEG_QUALITY)
    out = {
        "dataset": src.name,
        "imlist": imlist,
        "qimlist": qimlist,
        "gnd": gt["gnd"],
        "query_source": ["cropped_from_full"] * len(qimlist),
    }
    (stage / "gnd.json").write_text(json.dumps(out))


def download(dataset: str, dest, mirror: str | None = None, checksums: dict | None = None,
             delete_archives: bool = False, retries: int = 5, backoff: float = 2.0,
             timeout: float = 60.0, stream=None) -> Path:
    """Download ``dataset`` (``roxford5k`` or ``rparis6k``) into ``dest`` and convert it.

    Args:
        mirror: base URL that replaces the official addresses: every file is fetched as
            ``mirror/<file name>`` (``oxbuild_images-v1.tgz``, ``gnd_roxford5k.pkl``, ...).
        checksums: {file name: sha256} expected values; they take precedence over
            :data:`PINNED_SHA256` and ``dest/SHA256SUMS``.
        delete_archives: remove ``dest/downloads`` once the conversion is complete.

    Nothing in ``dest`` that this function did not create is replaced or removed; the converted
    folders appear only once every file passed its check and the conversion finished.
    Returns ``dest``.
    """
    if dataset not in DATASETS:
        raise InputError(f"dataset: expected one of {', '.join(DATASETS)}, got {dataset!r}")
    if mirror is not None and not re.match(r"^https?://", mirror):
        raise InputError(f"mirror: expected an http:// or https:// URL, got {mirror!r}")
    src = DATASETS[dataset]
    root = Path(dest)
    d = _Dest(root, dataset)
    d.save()
    sums_path = root / "SHA256SUMS"
    recorded = read_sha256sums(sums_path) if sums_path.exists() else {}
    if d.marker.get("converted") and (root / "gnd.json").exists():
        _say(f"{root}: {dataset} is already downloaded and converted", stream)
        return root
    downloads = d.claim("downloads")
    downloads.mkdir(exist_ok=True)
    for f in src.files:
        url = mirror.rstrip("/") + "/" + f.name if mirror else f.url
        target = downloads / f.name
        expected, origin = None, None
        for table, what in ((checksums or {}, "the given checksums"), (PINNED_SHA256, "d2r's pinned checksums"),
                            (recorded, str(sums_path))):
            if f.name in table:
                expected, origin = table[f.name].lower(), what
                break
        if not target.exists():
            part = target.with_name(target.name + ".part")
            fetch(url, part, f"{dataset}: {f.name}", timeout=timeout, retries=retries, backoff=backoff, stream=stream)
            got = _sha256(part)
            if expected is not None and got != expected:
                part.unlink()
                raise ChecksumError(f"{f.name} from {url}: sha256 {got} does not match {expected} ({origin}); "
                                    "the download was removed and nothing was converted")
            os.replace(part, target)
        else:
            got = _sha256(target)
            if expected is not None and got != expected:
                raise ChecksumError(f"{target}: sha256 {got} does not match {expected} ({origin}); "
                                    "nothing was converted: delete the file to download it again")
        if expected is None:
            _say(f"{dataset}: no published sha256 for {f.name}; recorded {got} in {sums_path} "
                 "(later runs check against it; compare it with another copy to be sure)", stream)
        if recorded.get(f.name) != got:
            recorded[f.name] = got
            d.claim("SHA256SUMS")
            _write_sha256sums(sums_path, recorded)

    stage = d.claim(STAGING)
    if stage.exists():
        shutil.rmtree(stage)  # an interrupted conversion of ours
    stage.mkdir()
    try:
        _convert(src, downloads, stage, stream=stream)
        # Everything is written: move it into place, gnd.json last (the loader needs it).
        for name in ("db", "full", "queries", "gnd.json"):
            d.claim(name)
            if (root / name).exists():  # ours, from an interrupted move
                if (root / name).is_dir():
                    shutil.rmtree(root / name)
                else:
                    (root / name).unlink()
            os.replace(stage / name, root / name)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    d.marker["converted"] = True
    d.save()
    if delete_archives:
        shutil.rmtree(downloads)
        d.marker["created"].remove("downloads")
        d.save()
    n = len(json.loads((root / "gnd.json").read_text())["imlist"])
    _say(f"{root}: {dataset} ready: {n} database images, d2r eval --dataset {root}", stream)
    return root


# --------------------------------------------------------------------------------------------
# The 640 px subset
# --------------------------------------------------------------------------------------------


def _landmark(name: str) -> str:
    """The landmark word of a file name: ``christ_church_000179`` -> ``christ_church``."""
    return re.sub(r"_?\d+$", "", name)


def select_subset(imlist, qimlist, gnd, queries, step: int = 5, negatives: int = 5) -> list:
    """The database images of the subset, as sorted indices into ``imlist``.

    The rule (deterministic, needs no features):

    1. every ``step``-th image of ``imlist`` in its order (indices 0, step, 2 * step, ...);
    2. every hard positive of each selected query (easy positives come only through 1.);
    3. per selected query, its ``negatives`` hard negatives: the first images in ``imlist``
       order that carry the query's landmark word (the file name without its number, e.g.
       ``christ_church``), are no easy, hard or junk image of that query, and are not
       selected yet.

    ``queries`` are indices into ``qimlist``.
    """
    chosen = set(range(0, len(imlist), step))
    for q in queries:
        chosen.update(gnd[q]["hard"])
    for q in queries:
        word = _landmark(qimlist[q])
        excluded = set(gnd[q]["easy"]) | set(gnd[q]["hard"]) | set(gnd[q]["junk"])
        added = 0
        for i, name in enumerate(imlist):
            if added >= negatives:
                break
            if i in chosen or i in excluded or _landmark(name) != word:
                continue
            chosen.add(i)
            added += 1
    return sorted(chosen)


def _scaled(im, size: int):
    """``im`` with its longest side at most ``size`` (never enlarged), and the scale per axis."""
    from PIL import Image

    w, h = im.size
    s = min(1.0, size / max(w, h))
    if s >= 1.0:
        return im, 1.0, 1.0
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    return im.resize((nw, nh), Image.Resampling.LANCZOS), nw / w, nh / h


def make_mini(src, dest, size: int = 640, step: int = 5, negatives: int = 5, queries="auto",
              stream=None) -> Path:
    """Make the subset layout we evaluate on from a full dataset folder ``src``.

    Database images: :func:`select_subset`, scaled to a longest side of ``size`` px (EXIF
    orientation applied, as ``d2r`` reads them). Queries: ``queries`` is ``"all"``,
    ``"roxford5k-mini"`` (:data:`MINI_QUERIES`), a list of names, or ``"auto"``
    (``roxford5k-mini`` when ``src`` has all of them, else all). Each query's full image is
    scaled like the database images, its bbx scaled with it (2 decimals), and the crop cut from
    the scaled image. ``easy``, ``hard`` and ``junk`` are remapped to the subset.

    ``dest`` must not exist or be empty; the subset is written beside it and renamed into place
    at the end, so a failure leaves nothing behind. Returns ``dest``.
    """
    from PIL import Image, ImageOps

    from .evaluate import load_dataset

    for value, name in ((size, "size"), (step, "step")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name}: expected a positive integer, got {value!r}")
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
        raise InputError(f"negatives: expected an integer >= 0, got {negatives!r}")
    src, dest = Path(src), Path(dest)
    ds = load_dataset(src)
    raw = json.loads((src / "gnd.json").read_text())
    gnd = [{k: [int(i) for i in e[k]] for k in ("easy", "hard", "junk")} for e in ds.gnd]
    if queries == "auto":
        queries = "roxford5k-mini" if set(MINI_QUERIES) <= set(ds.query_names) else "all"
    if queries == "all":
        qsel = list(range(ds.n_queries))
    else:
        names = list(MINI_QUERIES) if queries == "roxford5k-mini" else list(queries)
        where = {n: i for i, n in enumerate(ds.query_names)}
        unknown = [n for n in names if n not in where]
        if unknown:
            raise InputError(f"queries: {', '.join(unknown[:5])} not among the queries of {src / 'gnd.json'}")
        qsel = sorted(where[n] for n in dict.fromkeys(names))
        if not qsel:
            raise InputError("queries: no query selected")
    full_dir = src / "full"
    no_full = [ds.query_names[q] for q in qsel if not (full_dir / f"{ds.query_names[q]}.jpg").exists()]
    if no_full:
        raise DatasetError(f"{full_dir}: no full image of {len(no_full)} selected query(ies) ({', '.join(no_full[:5])}); "
                           "the subset scales each query like the database, which needs the whole image")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InputError(f"dest {dest}: exists and is not an empty folder; it is left untouched")
    sel = select_subset(ds.names, ds.query_names, gnd, qsel, step=step, negatives=negatives)
    remap = {old: new for new, old in enumerate(sel)}

    dest.parent.mkdir(parents=True, exist_ok=True)
    for old in dest.parent.glob(f".{dest.name}.d2r-mini-*"):  # ours, left by a killed run
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
    stage = dest.parent / f".{dest.name}.d2r-mini-{os.getpid()}"
    stage.mkdir()
    try:
        for sub in ("db", "full", "queries"):
            (stage / sub).mkdir()
        progress = Progress("mini: database", len(sel), unit="images", stream=stream)
        for i in sel:
            path = ds.image_paths[i]
            try:
                with Image.open(path) as im:
                    im = ImageOps.exif_transpose(im).convert("RGB")
            except Exception as exc:
                raise DatasetError(f"{path}: cannot decode ({exc})") from exc
            _scaled(im, size)[0].save(stage / "db" / f"{ds.names[i]}.jpg", quality=JPEG_QUALITY)
            progress.update(1)
        progress.close()
        out_gnd = []
        for q in qsel:
            name = ds.query_names[q]
            path = full_dir / f"{name}.jpg"
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")  # bbx is in stored pixels: no EXIF rotation
            except Exception as exc:
                raise DatasetError(f"{path}: cannot decode ({exc})") from exc
            small, sx, sy = _scaled(im, size)
            bbx = ds.gnd[q]["bbx"] or (0.0, 0.0, float(im.size[0]), float(im.size[1]))
            bbx = [round(bbx[0] * sx, 2), round(bbx[1] * sy, 2), round(bbx[2] * sx, 2), round(bbx[3] * sy, 2)]
            small.save(stage / "full" / f"{name}.jpg", quality=JPEG_QUALITY)
            _crop_query(small, bbx, f"{path}").save(stage / "queries" / f"{name}.jpg", quality=JPEG_QUALITY)
            entry = {"bbx": bbx}
            for key in ("easy", "hard", "junk"):
                entry[key] = [remap[i] for i in gnd[q][key] if i in remap]
            out_gnd.append(entry)
        source = raw.get("query_source")
        out = {
            "imlist": [ds.names[i] for i in sel],
            "qimlist": [ds.query_names[q] for q in qsel],
            "gnd": out_gnd,
            "query_source": ["cropped_from_full"] * len(qsel),
            "subset": {"source": raw.get("dataset", str(src)), "size": size, "step": step, "negatives": negatives,
                       "rule": "d2r_lab.datasets.select_subset", "source_query_source": [source[q] for q in qsel] if source else None},
        }
        (stage / "gnd.json").write_text(json.dumps(out))
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.replace(stage, dest)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    n_eval = sum(1 for e in out_gnd if e["easy"] or e["hard"])
    _say(f"{dest}: {len(sel)} database images, {len(qsel)} queries ({n_eval} with positives)", stream)
    return dest


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
