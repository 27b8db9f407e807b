"""Device sync: fetch the latest bundle of a collection, verified with The Update Framework
(TUF, ``tuf.ngclient``) against the collection's provisioned root, and swap it in atomically.

    client = d2r.sync.SyncClient("https://10.0.0.2:8443", "museum", token, "/var/lib/d2r", "museum.root.json")
    result = client.sync()                  # SyncResult(version=7, previous=6, method="delta", ...)
    live = d2r.sync.LiveBundle("/var/lib/d2r")   # opens DEST/current with d2r.Engine.open
    live.query(photo)                       # reopens the bundle between queries after a swap
    live.freshness                          # {verified_at, expires, stale_seconds, expired}

Layout of the destination folder (``docs/sync-protocol.md``)::

    DEST/current -> versions/7      symlink, replaced atomically: the active bundle
    DEST/previous -> versions/6     the bundle before it (rollback)
    DEST/versions/N/                complete, verified bundle folders
    DEST/staging/                   partial downloads (*.part, resumed) and unfinished folders
    DEST/tuf/                       trusted TUF metadata (root.json pinned, rotated by TUF's rules)
    DEST/tuf-state.json             when the metadata was last verified fresh

A version folder appears only by one rename once it is complete and verified, and ``current``
changes only by one rename of a symlink; a crash (kill -9 included) at any point leaves the
previous bundle active, and the next run removes the leftovers and resumes the download.

Device side: the standard library (urllib) plus ``tuf`` (and ``cryptography`` through it) for
the metadata: imported on use, with a clear error when missing.

The transport forms of a bundle (an uncompressed tar of the bundle folder) and of a delta are
defined here, on both sides: :func:`pack_bundle`, :func:`unpack_bundle`, :func:`apply_delta`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import IO, Any

from ._files import fsync_dir as _fsync_dir
from ._files import sha256_file as _sha256_file
from .errors import D2RError, InputError

ARCHIVE_MEDIA_TYPE = "application/x-tar"
DELTA_FORMAT = "d2r-delta"
DELTA_VERSION = 1
# bundle.json and delta.json are small; refuse a giant one before parsing it.
MAX_JSON_BYTES = 64 * 1024 * 1024
# \A...\Z, not ^...$: "$" also matches before a final newline ("museum\n" is not a name).
COLLECTION_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# Versions are SQLite INTEGERs (signed 64-bit): 1 .. 2**63 - 1.
MAX_VERSION = 2**63 - 1
_SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
_CHUNK = 1 << 20
DEFAULT_MAX_BUNDLE_BYTES = 8 * 1024**3
# Room a download must leave free on the destination's file system (bytes).
DISK_RESERVE = 64 * 1024**2


def plain_http_warning(url: str) -> str | None:
    """A warning for a server URL that is not https:// (tokens and bundles travel in clear)."""
    if urllib.parse.urlsplit(url).scheme.lower() == "https":
        return None
    return (f"warning: {url} is plain HTTP: the device token travels in clear and anyone on the network can read it "
            "(use https://, see docs/sync-protocol.md 'Running behind TLS')")


def _check_room(folder: Path, need: int, what: str) -> None:
    """Refuse to start a download of ``need`` bytes that the file system of ``folder`` cannot take."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need + DISK_RESERVE > free:
        raise SyncError(f"{what}: needs {need} bytes but {folder} has {free} bytes free "
                        f"(keeping {DISK_RESERVE} in reserve); nothing downloaded")


class SyncError(D2RError, RuntimeError):
    """A sync could not complete (server unreachable, refused, corrupt or unverifiable data).
    The active bundle is unchanged when this is raised."""


class SignatureError(SyncError):
    """TUF refused the repository's metadata: not signed by the keys of the pinned root, a
    rollback to older metadata, or a target that does not match its signed length and hashes."""


class StaleMetadataError(SyncError):
    """The repository's TUF metadata has expired (a freeze: the server or a mirror keeps serving
    old metadata, or stopped re-signing). The active bundle is kept; ``version`` is it and
    ``stale_seconds`` how long ago the device last verified fresh metadata (None: never)."""

    def __init__(self, message: str, version: int | None, stale_seconds: float | None):
        super().__init__(message)
        self.version = version
        self.stale_seconds = stale_seconds


class ArchiveError(D2RError, ValueError):
    """A bundle or delta archive is malformed, unsafe (paths outside the bundle) or does not
    match its bundle.json."""


# -- keys (Ed25519 PEM files; TUF signs and verifies with them, see d2r._tuf) ---------------------------
def _ed25519():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - depends on the installation
        raise SyncError("keys and TUF signatures need the 'cryptography' package: pip install cryptography") from None
    return ed25519, serialization, InvalidSignature


def generate_keypair(path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600) and its public key to
    ``path.pub`` (PEM). Refuses to overwrite an existing key."""
    ed25519, serialization, _ = _ed25519()
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise InputError(f"{p}: exists already; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    pub.write_bytes(public_pem)
    return path, pub


def load_private_key(path):
    ed25519, serialization, _ = _ed25519()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 private key (made by `d2r keygen`)")
    return key


def load_public_key(path):
    ed25519, serialization, _ = _ed25519()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(f"{path}: not an Ed25519 public key (KEYFILE.pub made by `d2r keygen`)")
    return key


# -- transport form of a bundle: an uncompressed tar ------------------------------------------------
def is_version(value) -> bool:
    """True for a bundle version number: an int (not a bool) in 1 .. 2**63 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VERSION


def check_bundle_json(body, where: str) -> None:
    """Strict types and ranges of the bundle.json fields sync relies on (a bundle from the
    network is hostile until proven otherwise). Raises :class:`ArchiveError` naming the field."""
    if not isinstance(body, dict):
        raise ArchiveError(f"{where}: bundle.json is not a JSON object")
    if not is_version(body.get("version")):
        raise ArchiveError(f"{where}: bundle.json 'version' must be an integer from 1 to {MAX_VERSION}, "
                           f"got {body.get('version')!r:.40}")
    files = body.get("files")
    if not isinstance(files, dict) or not files:
        raise ArchiveError(f"{where}: bundle.json 'files' must be an object {{path: {{sha256, size}}}}")
    for rel, meta in files.items():
        if not isinstance(rel, str) or not rel or len(rel) > 1024:
            raise ArchiveError(f"{where}: bundle.json 'files' has a bad path {rel!r:.60}")
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not _SHA256_HEX.match(meta["sha256"])
                or not isinstance(meta.get("size"), int) or isinstance(meta.get("size"), bool) or not 0 <= meta["size"] <= MAX_VERSION):
            raise ArchiveError(f"{where}: bundle.json 'files' entry {rel!r:.60} must be {{sha256: 64 hex digits, size: integer >= 0}}")
    n = body.get("n_images")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_VERSION):
        raise ArchiveError(f"{where}: bundle.json 'n_images' must be an integer >= 0")
    if not isinstance(body.get("checksum"), str) or not _SHA256_HEX.match(body["checksum"]):
        raise ArchiveError(f"{where}: bundle.json 'checksum' must be 64 hex digits")


def _bundle_info(folder):
    from .engine import read_bundle_info

    folder = Path(folder)
    try:
        raw = (folder / "bundle.json").read_bytes() if (folder / "bundle.json").stat().st_size <= MAX_JSON_BYTES else None
        body = json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        body = False  # read_bundle_info names the problem
    if body is None:
        raise ArchiveError(f"{folder}: bundle.json is over {MAX_JSON_BYTES} bytes")
    if body is not False:
        check_bundle_json(body, str(folder))
    return read_bundle_info(folder)


def verify_bundle_folder(folder) -> dict:
    """bundle.json of ``folder`` after checking every listed file's size and sha256."""
    from .engine import BundleError

    folder = Path(folder)
    info = _bundle_info(folder)
    for rel, meta in info["files"].items():
        f = folder / rel
        if not f.is_file() or f.is_symlink():
            raise BundleError(f"{folder}: file {rel} listed in bundle.json is missing")
        if f.stat().st_size != meta["size"] or _sha256_file(f) != meta["sha256"]:
            raise BundleError(f"{folder}: file {rel} does not match bundle.json (size or sha256)")
    return info


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def pack_bundle(folder, out) -> dict:
    """Write the transport form of bundle ``folder`` to ``out`` (a path or binary file): an
    uncompressed POSIX (pax) tar holding ``bundle.json`` first, then every file it lists in
    sorted order, regular files only, mtime 0, so equal bundles give equal bytes.
    Verifies the folder first; returns its bundle.json."""
    folder = Path(folder)
    info = verify_bundle_folder(folder)
    own = not hasattr(out, "write")
    fh = open(out, "wb") if own else out
    try:
        with tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel in ["bundle.json"] + sorted(info["files"]):
                f = folder / rel
                with open(f, "rb") as src:
                    tar.addfile(_tarinfo(rel, os.fstat(src.fileno()).st_size), src)
    finally:
        if own:
            fh.close()
    return info


def _safe_member(member: tarfile.TarInfo, where: str) -> str:
    name = member.name
    if not member.isreg():
        raise ArchiveError(f"{where}: member {name!r} is not a regular file (links and folders are refused)")
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts)
            or len(name) > 1024):
        raise ArchiveError(f"{where}: member {name!r} has an unsafe path (absolute, '..' or empty parts)")
    return name


def _open_member(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> IO[bytes]:
    src = tar.extractfile(member)
    if src is None:  # _safe_member lets only regular files through, and those always open
        raise ArchiveError(f"{where}: member {member.name!r} is not a regular file")
    return src


def _write_member(tar: tarfile.TarFile, member, target: Path, expect_sha: str | None = None, where: str = "") -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    src = _open_member(tar, member, where)
    h = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as dst:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            h.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    digest = h.hexdigest()
    if expect_sha is not None and digest != expect_sha:
        raise ArchiveError(f"{where}: {member.name} does not match its sha256 in bundle.json")
    return digest


def unpack_bundle(archive, dest) -> dict:
    """Extract the tar ``archive`` (path) made by :func:`pack_bundle` into the new folder
    ``dest`` and verify it: bundle.json first and self-consistent, then exactly the files it
    lists with their sizes and sha256, nothing else. Returns bundle.json.
    Raises :class:`ArchiveError` (or ``BundleError`` for a bad bundle.json)."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=False, exist_ok=False)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            first = tar.next()
            if first is None or _safe_member(first, str(archive)) != "bundle.json":
                raise ArchiveError(f"{archive}: the first member must be bundle.json")
            if first.size > MAX_JSON_BYTES:
                raise ArchiveError(f"{archive}: bundle.json is {first.size} bytes, over the limit")
            _write_member(tar, first, dest / "bundle.json")
            info = _bundle_info(dest)
            expected = dict(info["files"])
            while (member := tar.next()) is not None:
                rel = _safe_member(member, str(archive))
                meta = expected.pop(rel, None)
                if meta is None:
                    raise ArchiveError(f"{archive}: member {rel!r} is not listed in bundle.json (or appears twice)")
                if member.size != meta["size"]:
                    raise ArchiveError(f"{archive}: {rel} has {member.size} bytes, bundle.json says {meta['size']}")
                _write_member(tar, member, dest / rel, meta["sha256"], str(archive))
            if expected:
                raise ArchiveError(f"{archive}: files listed in bundle.json are missing: {', '.join(sorted(expected)[:5])}")
    except tarfile.TarError as exc:
        raise ArchiveError(f"{archive}: not a valid uncompressed tar ({exc})") from exc
    return info


# -- deltas -------------------------------------------------------------------------------------------
def replay_index(old_index, remove, add, compact: bool, out) -> None:
    """The delta's index recipe: open ``old_index``, tombstone the ids ``remove``, add the images
    ``add`` (id, metadata, list of Aggregation), save to ``out`` (compacted if ``compact``).
    The server keeps a delta only if this reproduces the new index byte for byte."""
    from .index import Index

    idx = Index.open(old_index, mmap=True, verify=False)
    try:
        for image_id in remove:
            idx.remove(image_id)
        for image_id, metadata, aggs in add:
            idx.add_regions(image_id, aggs, metadata=metadata)
        idx.save(out, compact=compact)
    finally:
        idx.close()


def _delta_images(d: dict, words_blob: bytes, payload_blob: bytes, kind: str, dim: int):
    """Yield (id, metadata, [Aggregation]) of the images a delta adds."""
    import numpy as np

    from .aggregate import BINARY_KINDS, Aggregation

    binary = kind in BINARY_KINDS
    payload = (dim + 7) // 8 if binary else 4 * dim
    words = np.frombuffer(words_blob, dtype="<u4")
    codes = np.frombuffer(payload_blob, dtype=np.uint8)
    if codes.shape[0] != words.shape[0] * payload:
        raise ArchiveError(f"delta: payload.bin has {codes.shape[0]} bytes for {words.shape[0]} words of {payload} bytes")
    codes = codes.reshape(words.shape[0], payload)
    pos = 0
    for image in d["add"]:
        aggs = []
        for n in image["items"]:
            n = int(n)
            if n < 0 or pos + n > words.shape[0]:
                raise ArchiveError("delta: item sizes run past words.bin")
            w, c = words[pos : pos + n], codes[pos : pos + n]
            pos += n
            if binary:
                aggs.append(Aggregation(kind, dim, w, codes=c))
            else:
                aggs.append(Aggregation(kind, dim, w, vectors=c.view("<f4").reshape(n, dim)))
        yield image["id"], image.get("metadata"), aggs
    if pos != words.shape[0]:
        raise ArchiveError("delta: words.bin holds more words than the images use")


def apply_delta(old_dir, delta, new_dir) -> dict:
    """Build the new bundle folder ``new_dir`` from the verified bundle ``old_dir`` and the
    delta archive ``delta`` (path), then verify every file against the new bundle.json (which
    the caller checks against its signature). Returns the new bundle.json.

    Delta archive (uncompressed tar, see docs/sync-protocol.md): ``delta.json`` (recipe),
    ``bundle.json`` (of the new version), ``words.bin`` (uint32 LE visual words of the added
    items), ``payload.bin`` (their codes, item after item), ``files/REL`` (changed files other
    than the index). Unchanged files are hard-linked (or copied) from ``old_dir``.
    """
    from .index import Index

    old_dir, delta, new_dir = Path(old_dir), Path(delta), Path(new_dir)
    old = _bundle_info(old_dir)
    new_dir.mkdir(parents=False, exist_ok=False)
    try:
        with tarfile.open(delta, mode="r:") as tar:
            members = {}
            for m in tar.getmembers():
                name = _safe_member(m, str(delta))
                if name in members:
                    raise ArchiveError(f"{delta}: member {name!r} appears twice")
                members[name] = m
            for need in ("delta.json", "bundle.json", "words.bin", "payload.bin"):
                if need not in members:
                    raise ArchiveError(f"{delta}: not a d2r delta (no {need})")
            if members["delta.json"].size > MAX_JSON_BYTES or members["bundle.json"].size > MAX_JSON_BYTES:
                raise ArchiveError(f"{delta}: delta.json or bundle.json is over the size limit")
            try:
                d = json.loads(_open_member(tar, members["delta.json"], str(delta)).read())
            except ValueError as exc:
                raise ArchiveError(f"{delta}: delta.json is not JSON ({exc})") from None
            if not isinstance(d, dict) or d.get("format") != DELTA_FORMAT or d.get("format_version") != DELTA_VERSION:
                raise ArchiveError(f"{delta}: unknown delta format {d.get('format') if isinstance(d, dict) else None!r}")
            if d["from"]["checksum"] != old["checksum"]:
                raise ArchiveError(f"{delta}: made for bundle {d['from']['checksum'][:12]}..., not the active {old['checksum'][:12]}...")
            _write_member(tar, members["bundle.json"], new_dir / "bundle.json")
            new = _bundle_info(new_dir)
            if d["to"]["checksum"] != new["checksum"]:
                raise ArchiveError(f"{delta}: delta.json and bundle.json disagree on the target bundle")
            index_rel = d["index"]["file"]
            if index_rel not in new["files"] or index_rel not in old["files"]:
                raise ArchiveError(f"{delta}: index file {index_rel!r} is not in both bundles")
            for rel, meta in new["files"].items():
                if rel == index_rel:
                    continue
                target = new_dir / rel
                if "files/" + rel in members:
                    _write_member(tar, members["files/" + rel], target, meta["sha256"], str(delta))
                elif old["files"].get(rel, {}).get("sha256") == meta["sha256"]:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(old_dir / rel, target)  # bundle files are never modified in place
                    except OSError:
                        shutil.copyfile(old_dir / rel, target)
                else:
                    raise ArchiveError(f"{delta}: {rel} changed but the delta does not carry it")
            words_blob = _open_member(tar, members["words.bin"], str(delta)).read()
            payload_blob = _open_member(tar, members["payload.bin"], str(delta)).read()
        head = Index.open(old_dir / index_rel, mmap=True, verify=False)
        kind, dim = head.kind, head.dim
        head.close()
        adds = list(_delta_images(d["index"], words_blob, payload_blob, kind, dim))
        replay_index(old_dir / index_rel, d["index"]["remove"], adds, bool(d["index"]["compact"]), new_dir / index_rel)
    except tarfile.TarError as exc:
        raise ArchiveError(f"{delta}: not a valid uncompressed tar ({exc})") from exc
    except (KeyError, TypeError) as exc:
        raise ArchiveError(f"{delta}: delta.json lacks or mistypes {exc}") from None
    except D2RError as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"{delta}: cannot be applied to {old_dir} ({exc})") from exc
    return verify_bundle_folder(new_dir)


# -- the device's destination folder ------------------------------------------------------------------
def _crash_point(stage: str) -> None:
    """Test hook: ``D2R_SYNC_CRASH_AT=<stage>`` kills this process with SIGKILL at that stage
    (the crash-safety tests use it to stop a sync at every step of the swap)."""
    if os.environ.get("D2R_SYNC_CRASH_AT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_dir():
            _fsync_dir(p)
    _fsync_dir(path)


class Destination:
    """The device's folder of bundle versions, with an atomically switched ``current``."""

    def __init__(self, root):
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.staging = self.root / "staging"

    @contextmanager
    def lock(self):
        """Exclusive lock of the folder for one sync (a second concurrent sync is refused)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = open(self.root / ".lock", "a+b")
        try:
            try:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # pragma: no cover - not POSIX: no lock
                pass
            except OSError:
                raise SyncError(f"{self.root}: another sync is running on this folder") from None
            yield
        finally:
            fh.close()

    def prepare(self) -> None:
        """Create the folders and remove what an interrupted run left (but keep partial
        downloads, ``*.part``, to resume them)."""
        self.versions.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        for p in self.staging.iterdir():
            if not p.name.endswith(".part"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        for p in self.versions.glob(".*"):
            shutil.rmtree(p, ignore_errors=True)

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        try:
            target = os.readlink(link)
        except OSError:
            return None
        path = (self.root / target)
        return path if path.is_dir() else None

    @property
    def current(self) -> Path | None:
        """The active version folder (resolved), or None before the first sync."""
        return self._link("current")

    @property
    def previous(self) -> Path | None:
        return self._link("previous")

    def current_info(self) -> dict | None:
        cur = self.current
        return _bundle_info(cur) if cur is not None else None

    def _point(self, name: str, version_dir: Path) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(version_dir, self.root), tmp)
        _crash_point(f"{name}-link-created")
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def install(self, staged: Path, version: int) -> Path:
        """Move the verified folder ``staged`` to versions/N and make it current (previous =
        the old current). Each step is one rename; the old bundle stays active until the last."""
        final = self.versions / str(int(version))
        old = self.current
        if old is not None and old.resolve() == final.resolve():
            raise SyncError(f"{self.root}: version {version} is already active")
        _fsync_tree(staged)
        if final.exists():  # left by a crash after the rename: replace it by the fresh copy
            trash = self.versions / f".trash-{version}-{time.monotonic_ns()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staged, final)
        _fsync_dir(self.versions)
        _crash_point("installed")
        if old is not None:
            self._point("previous", old)
        self._point("current", final)
        _crash_point("swapped")
        return final

    def rollback(self) -> Path:
        """Make the previous version current again (and the current one previous)."""
        cur, prev = self.current, self.previous
        if prev is None:
            raise SyncError(f"{self.root}: no previous version to roll back to")
        self._point("current", prev)
        if cur is not None:
            self._point("previous", cur)
        return prev

    def prune(self) -> None:
        """Delete version folders other than current and previous."""
        keep = {p.resolve() for p in (self.current, self.previous) if p is not None}
        for p in self.versions.iterdir():
            if p.resolve() not in keep and not p.name.startswith("."):
                trash = self.versions / f".trash-{p.name}-{time.monotonic_ns()}"
                os.replace(p, trash)
                shutil.rmtree(trash, ignore_errors=True)


# -- the client ----------------------------------------------------------------------------------------
@dataclass
class SyncResult:
    """What one :meth:`SyncClient.sync` did: ``method`` is "none" (already current), "delta"
    or "full"; ``downloaded`` counts the bytes received in this run; ``verified_at`` is when
    the TUF metadata was last verified fresh (now, after a successful sync)."""

    version: int
    previous: int | None
    method: str
    downloaded: int = 0
    path: Path | None = None
    verified_at: str | None = None
    metadata_bytes: int = 0  # TUF metadata received in this run (not in ``downloaded``)


class _HTTPStatus(SyncError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


STATE_FILE = "tuf-state.json"  # DEST/tuf-state.json: when the metadata was last verified fresh


def _read_state(root: Path) -> dict:
    try:
        state = json.loads((root / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def freshness(dest) -> dict:
    """How fresh the device's trust in its active bundle is: ``verified_at`` (ISO time of the
    last sync that verified fresh TUF metadata, or None), ``expires`` (the earliest expiry of the
    metadata verified then), ``stale_seconds`` (seconds since ``verified_at``) and ``expired``
    (the metadata has expired since: the repository could not be refreshed, or was frozen)."""
    import datetime as dt

    state = _read_state(Path(dest))
    now = dt.datetime.now(dt.timezone.utc)
    out = {"verified_at": state.get("verified_at"), "expires": state.get("expires"), "stale_seconds": None, "expired": None}
    try:
        if out["verified_at"]:
            out["stale_seconds"] = max(0.0, (now - dt.datetime.fromisoformat(out["verified_at"])).total_seconds())
        if out["expires"]:
            out["expired"] = now >= dt.datetime.fromisoformat(out["expires"])
    except (TypeError, ValueError):
        pass
    return out


def _fetcher_class():
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    class _Fetcher(FetcherInterface):
        """tuf.ngclient's network access through urllib, with the device token on requests to the
        edge server only (never to a mirror)."""

        def __init__(self, token: str | None, token_prefix: str | None, timeout: float):
            self.token, self.prefix, self.timeout = token, token_prefix, timeout
            self.received = 0

        def _fetch(self, url: str):
            headers = {"User-Agent": "d2r-sync"}
            if self.token and self.prefix and url.startswith(self.prefix):
                headers["Authorization"] = f"Bearer {self.token}"
            try:
                resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                raise DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from None
            return self._chunks(resp)

        def _chunks(self, resp):
            with resp:
                for chunk in iter(lambda: resp.read(65536), b""):
                    self.received += len(chunk)
                    yield chunk

    return _Fetcher


class SyncClient:
    """Syncs one collection into a destination folder, trusting only the collection's TUF root.

    Args:
        server: edge server URL (``https://host:port``), or None with ``mirror``. Reports go here.
        collection: collection name. token: the device token (``d2r device add``).
        dest: destination folder. root: the collection's TUF root metadata provisioned on the
            device (path or bytes; ``d2r collection create`` writes it). Used on the first sync;
            after that the device's own copy (DEST/tuf/root.json, updated by key rotations).
        mirror: URL of a static copy of the collection's repository (``metadata/``, ``targets/``);
            default ``SERVER/tuf/COLLECTION``. The device token is not sent to a mirror.
        timeout: seconds per network operation. retries: attempts per download (each resumes
            with HTTP Range where the last stopped). prefer_delta: try a delta first.
        max_bundle_bytes: refuse a bundle whose signed length is larger (default 8 GiB). Every
            download is bounded by the length signed in TUF metadata, and a delta by the size of
            the full bundle too; neither starts unless the destination's file system has room.
    """

    def __init__(self, server: str | None, collection: str, token: str | None, dest, root=None, timeout: float = 30.0,
                 retries: int = 4, prefer_delta: bool = True, log=None, max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
                 mirror: str | None = None):
        if not isinstance(collection, str) or not COLLECTION_NAME.fullmatch(collection):
            raise InputError(f"collection: expected letters, digits, '.', '_' or '-' (at most 64), got {collection!r}")
        if not server and not mirror:
            raise InputError("a server URL or a mirror URL is required")
        self.server = server.rstrip("/") if server else None
        self.collection = collection
        self.token = token
        self.dest = Destination(dest)
        self.repo_url = (mirror.rstrip("/") if mirror else
                         f"{self.server}/tuf/{urllib.parse.quote(collection, safe='')}")
        self.root_bytes: bytes | None
        if isinstance(root, (bytes, bytearray)):
            self.root_bytes = bytes(root)
        elif root is not None:
            try:
                self.root_bytes = Path(root).read_bytes()
            except OSError as exc:
                raise InputError(f"{root}: cannot read the collection's TUF root ({exc.strerror or exc})") from None
        else:
            self.root_bytes = None
        self.timeout = timeout
        self.retries = max(int(retries), 1)
        self.prefer_delta = prefer_delta
        self.max_bundle_bytes = int(max_bundle_bytes)
        self.log = log or (lambda msg: None)
        self._updater: Any = None  # a tuf.ngclient.Updater once metadata is refreshed (tuf is imported on first use)
        for url in dict.fromkeys(u for u in (self.server, mirror) if u):
            warning = plain_http_warning(url)
            if warning and url == self.server:
                self.log(warning)

    # -- HTTP ---------------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"{self.server}/api/v1/collections/{urllib.parse.quote(self.collection, safe='')}{path}"

    def _request(self, url: str, headers=None, data=None, method=None):
        h = {"User-Agent": "d2r-sync"}
        if self.token and self.server and url.startswith(self.server + "/"):
            h["Authorization"] = f"Bearer {self.token}"
        h.update(headers or {})
        req = urllib.request.Request(url, data=data, headers=h, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read() or b"{}").get("error", "")
            except (ValueError, AttributeError):
                body = ""
            exc.close()
            what = {401: "the token is wrong or revoked", 403: "the token may not read this collection",
                    404: "not found"}.get(exc.code, body or exc.reason)
            raise _HTTPStatus(exc.code, f"{url}: HTTP {exc.code}: {what}" + (f" ({body})" if body and body != what else "")) from None
        except (urllib.error.URLError, OSError, HTTPException) as exc:
            raise SyncError(f"{url}: server unreachable ({getattr(exc, 'reason', exc)})") from None

    # -- TUF ------------------------------------------------------------------------------------------
    def _new_updater(self):
        try:
            from tuf.ngclient import Updater, UpdaterConfig
        except ImportError:  # pragma: no cover - depends on the installation
            raise SyncError("d2r sync needs The Update Framework's client: pip install tuf") from None
        meta = self.dest.root / "tuf"
        meta.mkdir(parents=True, exist_ok=True)
        bootstrap = None
        if not (meta / "root.json").is_file():
            if self.root_bytes is None:
                raise InputError(f"{self.dest.root}: no trusted TUF root yet: provision the collection's root "
                                 "(--root COLLECTION.root.json, written by d2r collection create)")
            bootstrap = self.root_bytes
        fetcher = _fetcher_class()(self.token, (self.server + "/") if self.server else None, self.timeout)
        self._fetcher = fetcher
        config = UpdaterConfig(app_user_agent="d2r-sync", targets_max_length=4_000_000)
        try:
            return Updater(str(meta), self.repo_url + "/metadata/", None, self.repo_url + "/targets/", fetcher, config,
                           bootstrap=bootstrap)
        except Exception as exc:  # noqa: BLE001 - a bad provisioned root
            raise InputError(f"the provisioned TUF root is not valid root metadata ({type(exc).__name__}: {exc})") from None

    def _tuf_error(self, exc, cur_version):
        from tuf.api import exceptions as tx

        if isinstance(exc, tx.DownloadHTTPError):
            what = {401: "the token is wrong or revoked", 403: "the token may not read this collection"}.get(exc.status_code, "")
            return _HTTPStatus(exc.status_code, f"{self.repo_url}: HTTP {exc.status_code}{': ' + what if what else ''} ({exc})")
        if isinstance(exc, tx.ExpiredMetadataError):
            fr = freshness(self.dest.root)
            stale = fr["stale_seconds"]
            ago = f"{stale:.0f} s ago" if stale is not None else "never"
            return StaleMetadataError(
                f"{self.repo_url}: the repository's TUF metadata has expired ({exc}); a freeze or a server that stopped "
                f"re-signing. Keeping the active version {cur_version if cur_version is not None else '(none)'}; "
                f"last verified fresh {ago}", cur_version, stale)
        if isinstance(exc, tx.BadVersionNumberError):
            return SignatureError(f"{self.repo_url}: rollback refused: the repository offers older TUF metadata than this "
                                  f"device has already seen ({exc}); active bundle kept")
        if isinstance(exc, tx.RepositoryError):
            return SignatureError(f"{self.repo_url}: TUF metadata refused ({type(exc).__name__}: {exc}); active bundle kept")
        if isinstance(exc, tx.DownloadError):
            cause = exc.__cause__ or exc
            return SyncError(f"{self.repo_url}: repository unreachable ({type(cause).__name__}: {cause})")
        return None

    def _refresh(self, cur_version):
        from tuf.api.metadata import Metadata

        self._updater = self._new_updater()
        try:
            self._updater.refresh()
        except Exception as exc:  # noqa: BLE001 - mapped to d2r errors below
            mapped = self._tuf_error(exc, cur_version)
            if mapped is None:
                raise
            raise mapped from None
        # The targets metadata verified by refresh(), as ngclient keeps it.
        trusted = Metadata.from_file(str(self.dest.root / "tuf" / "targets.json"))
        expires = []
        for role in ("timestamp", "snapshot", "targets", "root"):
            try:
                expires.append(Metadata.from_file(str(self.dest.root / "tuf" / f"{role}.json")).signed.expires)
            except (OSError, ValueError):
                pass
        return trusted, min(expires) if expires else None

    def latest(self, cur_version=None) -> dict:
        """The newest bundle the collection's verified TUF targets offer: {version, target,
        archive_sha256, archive_size, bundle_checksum, n_images}. Refreshes the metadata."""
        import datetime as dt

        from ._tuf import bundle_info_of

        trusted, expires = self._refresh(cur_version)
        best = None
        for t in trusted.signed.targets.values():
            try:
                info = bundle_info_of(t)
            except InputError as exc:
                raise SignatureError(f"{self.repo_url}: signed targets hold a malformed bundle target ({exc})") from None
            if best is None or info["version"] > best["version"]:
                best = dict(info, target=t)
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        state = {"verified_at": now.isoformat(), "expires": expires.isoformat() if expires else None}
        tmp = self.dest.root / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state) + "\n")
        os.replace(tmp, self.dest.root / STATE_FILE)
        self._verified_at = state["verified_at"]
        if best is None:
            raise SyncError(f"collection {self.collection!r} has no published version")
        return {"version": best["version"], "target": best["target"], "archive_sha256": best["sha256"],
                "archive_size": best["length"], "bundle_checksum": best["bundle_checksum"], "n_images": best["n_images"]}

    def _download(self, url: str, part: Path, expect_sha: str | None, max_size: int | None = None) -> tuple[Path, int, str]:
        """Download ``url`` to ``part``, resuming with Range after a dropped connection (within
        this call and across runs), then check the sha256. Stops a response that grows past
        ``max_size`` bytes (the length signed in TUF metadata). Returns (path, bytes received, sha)."""
        received = 0
        last_error = None
        for attempt in range(self.retries):
            have = part.stat().st_size if part.exists() else 0
            if max_size is not None and have > max_size:
                part.unlink()
                have = 0
            headers = {}
            if have:
                headers["Range"] = f"bytes={have}-"
                if expect_sha:
                    headers["If-Range"] = f'"{expect_sha}"'
            try:
                resp = self._request(url, headers)
            except _HTTPStatus as exc:
                if exc.status == 416 and have:  # nothing left to send: the file may be complete
                    break
                raise
            except SyncError as exc:
                last_error = exc
                time.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            try:
                with resp:
                    mode = "ab" if resp.status == 206 else "wb"
                    with open(part, mode) as fh:
                        for chunk in iter(functools.partial(resp.read, _CHUNK), b""):
                            fh.write(chunk)
                            received += len(chunk)
                            _crash_point("download-chunk")
                            if max_size is not None and fh.tell() > max_size:
                                fh.close()
                                part.unlink(missing_ok=True)
                                raise SyncError(f"{url}: the server sends more than the signed {max_size} bytes; discarded")
                        fh.flush()
                        os.fsync(fh.fileno())
                    length = resp.headers.get("Content-Length")
                    if length is not None and resp.status in (200, 206):
                        expected_end = int(length) + (have if resp.status == 206 else 0)
                        if part.stat().st_size < expected_end:
                            raise HTTPException(f"connection closed after {part.stat().st_size} of {expected_end} bytes")
                last_error = None
                break
            except (OSError, HTTPException, ValueError) as exc:
                last_error = SyncError(f"{url}: download interrupted ({exc}); resuming")
                self.log(str(last_error))
                time.sleep(min(0.2 * 2**attempt, 5.0))
        if last_error is not None:
            raise SyncError(f"{url}: download failed after {self.retries} attempts ({last_error})")
        sha = _sha256_file(part)
        if expect_sha and sha != expect_sha:
            part.unlink(missing_ok=True)  # start over next time: resuming a corrupt file cannot help
            raise SyncError(f"{url}: downloaded data is corrupt (sha256 {sha[:12]}... instead of the signed "
                            f"{expect_sha[:12]}...); discarded")
        return part, received, sha

    def _target_url(self, path: str, sha: str) -> str:
        from ._tuf import target_url

        return target_url(self.repo_url + "/targets", path, sha)

    # -- one sync -------------------------------------------------------------------------------------
    def sync(self) -> SyncResult:
        """Bring ``dest`` to the latest version (delta if possible, else full). Raises
        :class:`SyncError` (the active bundle unchanged) on any failure;
        :class:`StaleMetadataError` when the repository's metadata has expired."""
        with self.dest.lock():
            try:
                return self._sync()
            except StaleMetadataError as exc:
                if exc.version is not None:
                    self._report(exc.version, "stale", 0, int(exc.stale_seconds) if exc.stale_seconds is not None else None)
                raise

    def _sync(self) -> SyncResult:
        dest = self.dest
        dest.prepare()
        cur_dir = dest.current
        cur = _bundle_info(cur_dir) if cur_dir is not None else None
        self._verified_at = None
        latest = self.latest(int(cur["version"]) if cur else None)
        version = int(latest["version"])
        if cur is not None:
            if cur["checksum"] == latest["bundle_checksum"]:
                return SyncResult(int(cur["version"]), None, "none", 0, cur_dir, self._verified_at, self._fetcher.received)
            if version <= int(cur["version"]):
                raise SyncError(f"the repository offers version {version}, not newer than the active {cur['version']}: "
                                "refused (use Destination.rollback() to go back on purpose)")
        size = int(latest["archive_size"])
        if size > self.max_bundle_bytes:
            raise SyncError(f"version {version}: the signed bundle has {size} bytes, over this device's limit of "
                            f"{self.max_bundle_bytes} (max_bundle_bytes); nothing downloaded")
        downloaded = 0
        staged = None
        method = "full"
        if cur is not None and cur_dir is not None and self.prefer_delta:
            try:
                staged, n = self._fetch_delta(cur_dir, int(cur["version"]), version, size)
                if staged is not None:
                    downloaded += n
                    method = "delta"
            except _HTTPStatus as exc:
                if exc.status in (401, 403):
                    raise
                self.log(f"no delta ({exc}); downloading the full bundle")
            except (SyncError, ArchiveError, D2RError) as exc:
                self.log(f"delta rejected ({exc}); downloading the full bundle")
                downloaded += getattr(exc, "downloaded", 0)
        if staged is None:
            part = dest.staging / f"bundle-{latest['archive_sha256']}.part"
            _check_room(dest.staging, size - (part.stat().st_size if part.exists() else 0), f"version {version}")
            part, n, _ = self._download(self._target_url(latest["target"].path, latest["archive_sha256"]), part,
                                        latest["archive_sha256"], size)
            downloaded += n
            _crash_point("downloaded")
            staged = dest.staging / f"unpack-{version}"
            try:
                unpack_bundle(part, staged)
            except D2RError as exc:
                part.unlink(missing_ok=True)
                raise SyncError(f"version {version}: the bundle archive is unusable ({exc}); active bundle kept") from exc
            part.unlink(missing_ok=True)
        info = _bundle_info(staged)
        if info["checksum"] != latest["bundle_checksum"] or int(info["version"]) != version:
            raise SignatureError(f"version {version}: the bundle built does not match the signed bundle_checksum; "
                                 "active bundle kept")
        _crash_point("verified")
        final = dest.install(staged, version)
        dest.prune()
        for p in dest.staging.glob("*.part"):  # partial downloads of versions no longer wanted
            p.unlink(missing_ok=True)
        self._report(version, method, downloaded)
        return SyncResult(version, int(cur["version"]) if cur else None, method, downloaded, final, self._verified_at,
                          self._fetcher.received)

    def _fetch_delta(self, cur_dir: Path, from_version: int, to_version: int, max_size: int):
        """Download and apply the delta if the signed metadata lists one (role "deltas"); None
        otherwise. Bounded by its signed length and by the size of the full bundle."""
        from ._tuf import delta_target

        path = delta_target(from_version, to_version)
        try:
            target = self._updater.get_targetinfo(path)
        except Exception as exc:  # noqa: BLE001 - TUF errors of the delegated role
            mapped = self._tuf_error(exc, from_version)
            raise (mapped or SyncError(f"{path}: {exc}")) from None
        if target is None:
            self.log(f"no delta from version {from_version} to {to_version}; downloading the full bundle")
            return None, 0
        sha = target.hashes.get("sha256", "")
        if not _SHA256_HEX.match(sha):
            raise SyncError(f"{path}: no sha256 in its signed metadata")
        if target.length > max_size:
            raise SyncError(f"{path}: a delta of {target.length} bytes is not smaller than the full bundle ({max_size} bytes)")
        part = self.dest.staging / f"delta-{from_version}-{to_version}-{sha}.part"
        _check_room(self.dest.staging, target.length, path)
        part, n, _ = self._download(self._target_url(path, sha), part, sha, target.length)
        staged = self.dest.staging / f"delta-unpack-{to_version}"
        try:
            apply_delta(cur_dir, part, staged)
        except D2RError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            part.unlink(missing_ok=True)
            exc.downloaded = n  # type: ignore[attr-defined]  # read back with getattr by _sync
            raise
        part.unlink(missing_ok=True)
        return staged, n

    def _report(self, version: int, method: str, downloaded: int, stale_seconds: int | None = None) -> None:
        if not self.server:
            return
        body = {"version": version, "method": method, "bytes": downloaded}
        if stale_seconds is not None:
            body["stale_seconds"] = stale_seconds
        try:
            self._request(self._url("/sync-report"), {"Content-Type": "application/json"}, data=json.dumps(body).encode(),
                          method="POST").close()
        except SyncError as exc:  # the swap is done; a lost report only delays the status page
            self.log(f"sync report not delivered ({exc})")


# -- a running engine that follows DEST/current ---------------------------------------------------------
class LiveBundle:
    """The object opened from ``DEST/current`` (a :class:`d2r.Engine` by default), reopened
    between calls when a sync has swapped the active version. Old versions stay on disk until
    the next-but-one sync, so a query running during a swap finishes on the bundle it started.

        live = LiveBundle("/var/lib/d2r")
        live.query(photo)          # d2r.Engine.query on the active bundle
    """

    def __init__(self, dest, opener=None, close=True):
        self.dest = Destination(dest)
        if opener is None:
            from .engine import Engine

            opener = Engine.open
        self._opener = opener
        self._close = close
        self._target = None
        self._obj = None

    def get(self):
        """The opened active bundle (reopened if ``current`` changed since the last call)."""
        target = self.dest.current
        if target is None:
            raise SyncError(f"{self.dest.root}: no active bundle yet (run d2r sync)")
        target = target.resolve()
        if target != self._target:
            new = self._opener(target)
            old, self._obj, self._target = self._obj, new, target
            if old is not None and self._close and hasattr(old, "close"):
                old.close()
        return self._obj

    @property
    def version_path(self) -> Path | None:
        return self._target

    @property
    def freshness(self) -> dict:
        """:func:`freshness` of the destination: when the device last verified fresh TUF
        metadata (``verified_at``), ``stale_seconds`` since, and whether that metadata has
        ``expired`` since (the bundle keeps serving; the update channel is stale or frozen)."""
        return freshness(self.dest.root)

    @property
    def stale_seconds(self) -> float | None:
        """Seconds since the device last verified fresh TUF metadata (None: never)."""
        return self.freshness["stale_seconds"]

    def query(self, *args, **kwargs):
        return self.get().query(*args, **kwargs)

    def close(self) -> None:
        if self._obj is not None and self._close and hasattr(self._obj, "close"):
            self._obj.close()
        self._obj = self._target = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- command line ---------------------------------------------------------------------------------------
def parse_interval(text: str) -> float:
    """'90', '90s', '15m', '2h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not m:
        raise InputError(f"--every: expected a duration like 30s, 15m or 2h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def read_secret_file(path, what: str, warn=None) -> str:
    """The secret in file ``path`` (stripped). Warns through ``warn`` (default: stderr) when the
    file is readable or writable by its group or by others (chmod 600 it)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if os.name == "posix" and mode & 0o077:
        message = (f"warning: {path} holds the {what} but is accessible to its group or to others "
                   f"(mode {mode & 0o777:o}); run: chmod 600 {path}")
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
    return text


def resolve_token(token: str | None, token_file, env_var: str, what: str) -> str | None:
    """A token from --token-file, else the environment variable ``env_var``, else --token
    (which other local users can see in the process list: warned)."""
    if token_file:
        return read_secret_file(token_file, what)
    if os.environ.get(env_var):
        return os.environ[env_var].strip()
    if token:
        print(f"warning: --token puts the {what} in the process list (visible to other users); prefer "
              f"--token-file FILE (mode 600) or the {env_var} environment variable", file=sys.stderr, flush=True)
    return token


def backoff_delays(interval: float, first: float = 1.0):
    """Delays after consecutive failures: first, 2*first, 4*first, ... capped at ``interval``
    (and at one hour)."""
    delay = max(float(first), 0.01)
    while True:
        yield min(delay, max(interval, 0.01), 3600.0)
        delay *= 2


def _cli_sync(args) -> int:
    interval = parse_interval(args.every) if args.every else None
    token = resolve_token(args.token, args.token_file, "D2R_DEVICE_TOKEN", "device token")
    if not token and not args.mirror:
        raise InputError("a device token is required: --token-file FILE, the D2R_DEVICE_TOKEN environment variable, or --token T")
    if not args.server and not args.mirror:
        raise InputError("--server URL or --mirror URL is required")

    def log(msg):
        print(f"d2r sync: {msg}", file=sys.stderr, flush=True)

    if args.mirror and urllib.parse.urlsplit(args.mirror).scheme.lower() != "https":
        log(f"note: mirror {args.mirror} is plain HTTP; TUF still verifies everything it serves")
    client = SyncClient(args.server, args.collection, token, args.dest, args.root, timeout=args.timeout,
                        prefer_delta=not args.no_delta, log=log, mirror=args.mirror)
    delays = None
    while True:
        try:
            r = client.sync()
            if r.method == "none":
                print(f"{args.collection}: version {r.version} is current (metadata verified {r.verified_at})", flush=True)
            else:
                print(f"{args.collection}: version {r.version} active ({r.method}, {r.downloaded} bytes"
                      f"{', previous ' + str(r.previous) if r.previous else ''})", flush=True)
            delays = None
            wait = interval if interval is not None else 0.0  # without an interval the loop ends below
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - with --every, no error ends the loop (disk full, network, ...)
            if isinstance(exc, StaleMetadataError):
                stale = "never verified" if exc.stale_seconds is None else f"{exc.stale_seconds:.0f} s stale"
                print(f"{args.collection}: STALE: version {exc.version} kept, update metadata expired ({stale})", flush=True)
            else:  # e.g. the server is unreachable: say so if the metadata verified last has expired since
                fr = freshness(args.dest)
                cur = Destination(args.dest).current
                if fr["expired"] and cur is not None:
                    print(f"{args.collection}: STALE: version {cur.name} kept, update metadata expired "
                          f"({fr['stale_seconds']:.0f} s since last verified)", flush=True)
            if interval is None:
                if isinstance(exc, D2RError):
                    raise
                raise SyncError(f"sync failed: {type(exc).__name__}: {exc}") from exc
            delays = delays or backoff_delays(interval, args.retry_first)
            wait = next(delays)
            log(f"error: {type(exc).__name__}: {exc}; the active bundle is unchanged; retrying in {wait:g} s")
        if interval is None:
            return 0
        time.sleep(wait)


def register_cli(sub) -> None:
    p = sub.add_parser("sync", help="fetch the latest bundle of a collection (verified with TUF) and swap it in atomically")
    p.add_argument("--server", default=None, help="edge server URL, e.g. https://edge.local:8443 (sync reports go there)")
    p.add_argument("--mirror", default=None, help="URL of a static copy of the collection's TUF repository (its metadata/ "
                   "and targets/ folders) to download from instead of SERVER/tuf/COLLECTION; the token is not sent to it")
    p.add_argument("--collection", required=True)
    p.add_argument("--token-file", default=None, help="file holding the device token (mode 600; keeps it out of `ps`)")
    p.add_argument("--token", default=None, help="device token from `d2r device add` (visible in `ps`: prefer --token-file "
                   "or the D2R_DEVICE_TOKEN environment variable)")
    p.add_argument("--dest", required=True, help="destination folder (DEST/current is the active bundle)")
    p.add_argument("--root", default=None, help="the collection's TUF root metadata (COLLECTION.root.json from d2r collection "
                   "create), provisioned on the device: needed on the first sync, then kept (and rotated) in DEST/tuf")
    p.add_argument("--every", default=None, help="keep running, syncing at this interval (e.g. 15m); after an error "
                   "(network, disk full, ...) it retries with exponential backoff up to the interval and never exits")
    p.add_argument("--retry-first", type=float, default=5.0, help="with --every: first retry delay in seconds after an error (default 5)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation (default 30)")
    p.add_argument("--no-delta", action="store_true", help="always download the full bundle")
    p.set_defaults(func=_cli_sync)
