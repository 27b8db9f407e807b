"""The device's destination folder: bundle versions side by side, one of them active.

    DEST/current -> versions/7      symlink, replaced atomically: the active bundle
    DEST/previous -> versions/6     the bundle before it (rollback)
    DEST/versions/N/                complete, verified bundle folders
    DEST/staging/                   partial downloads (*.part, resumed) and unfinished folders
    DEST/tuf/                       trusted TUF metadata (root.json pinned, rotated by TUF's rules)
    DEST/tuf-state.json             when the metadata was last verified fresh (:func:`freshness`)
    DEST/.lock                      held by the one sync running on the folder

A version folder appears only by one rename once it is complete and verified, and ``current``
changes only by one rename of a symlink; a crash (kill -9 included) at any point leaves the
previous bundle active, and the next run removes the leftovers and resumes the download.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from .._files import fsync_dir as _fsync_dir
from ..bundle.folder import read_strict_info
from ..errors import SyncError


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
        self.tuf = self.root / "tuf"

    def has_trusted_root(self) -> bool:
        """Whether the folder holds the collection's TUF root already (DEST/tuf/root.json, kept
        and rotated by TUF after the first sync)."""
        return (self.tuf / "root.json").is_file()

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
        return read_strict_info(cur) if cur is not None else None

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


# -- DEST/tuf-state.json -------------------------------------------------------------------------------
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


def record_verified(root, expires) -> str:
    """Write DEST/tuf-state.json: the TUF metadata was verified fresh now, valid until
    ``expires`` (a datetime, or None). Returns the ISO time recorded."""
    root = Path(root)
    verified_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    state = {"verified_at": verified_at, "expires": expires.isoformat() if expires else None}
    tmp = root / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, root / STATE_FILE)
    return verified_at
