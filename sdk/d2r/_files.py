"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

Temporaries are named after their target and their writer, so that they are recognisably
ours and the next save or open of the same target can remove the ones left by a writer that
died (kill -9, power loss)::

    .{name}.d2r-tmp-{host}-{pid}-{random}     a file or folder being written for {name}
    .{name}.d2r-old-{host}-{pid}-{random}     the previous bundle folder during a swap

``host`` is a short hash of the machine's name: a temporary is removed only if it was made on
this machine by a process that no longer exists (a folder shared over the network may hold a
live writer's temporaries from another machine). See :func:`clean_stale`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("d2r")

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_OURS = re.compile(r"\.d2r-(tmp|old)-([0-9a-f]{8})-(\d+)-[0-9a-f]+")
# Names written by d2r before these rules (no host tag): removed only when their writer is dead
# here and they have not changed for LEGACY_MIN_AGE_S.
_LEGACY = re.compile(r"\.(tmp|old)-(\d+)-(\d+)")
LEGACY_MIN_AGE_S = 600.0


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path, what: str = "tmp") -> Path:
    """A fresh temporary name beside ``path`` that :func:`clean_stale` recognises."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    return folder / f".{path.name}.d2r-{what}-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a zombie counts as dead). Where this
    cannot be told (Windows), True: nothing is then removed."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def stale_temporaries(path) -> list[tuple[Path, str]]:
    """(temporary, "tmp" or "old") left beside ``path`` by dead writers of ``path``."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    prefix = f".{path.name}"
    out: list[tuple[Path, str]] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return out
    now = time.time()
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        m = _OURS.fullmatch(rest)
        if m is not None:
            if m.group(2) == _HOST and not pid_alive(int(m.group(3))):
                out.append((folder / name, m.group(1)))
            continue
        m = _LEGACY.fullmatch(rest)
        if m is not None and not pid_alive(int(m.group(2))):
            try:
                age = now - os.lstat(folder / name).st_mtime
            except OSError:
                continue
            if age >= LEGACY_MIN_AGE_S:
                out.append((folder / name, m.group(1)))
    return out


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def clean_stale(path) -> list[Path]:
    """Remove the temporaries that dead writers left beside ``path`` (see the module's
    docstring). If ``path`` itself is missing because a writer died between the two renames
    of a swap, the previous version (``-old-``) is renamed back to ``path`` instead of being
    removed. Best effort: a folder we cannot write to is left as it is. Returns what was
    removed or restored."""
    path = Path(path)
    done = []
    stale = stale_temporaries(path)
    olds = sorted((p for p, what in stale if what == "old"), key=lambda p: _mtime(p), reverse=True)
    if olds and not os.path.lexists(path):
        try:
            os.replace(olds[0], path)
            log.warning("d2r: %s was missing after an interrupted save; restored the previous version", path)
            done.append(olds[0])
        except OSError:
            pass
    for p, _ in stale:
        if p in done:
            continue
        try:
            _remove(p)
            done.append(p)
            log.info("d2r: removed %s, left by an interrupted save", p)
        except OSError:
            pass
    return done


def _mtime(p: Path) -> float:
    try:
        return os.lstat(p).st_mtime
    except OSError:
        return 0.0


@contextmanager
def atomic_file(path):
    """A binary file handle whose content replaces ``path`` atomically on success.

    Temporary file in the same folder (named by :func:`temp_path`), fsync, rename over the
    target, fsync of the folder; the temporary file is removed if anything fails, and the ones
    of dead writers of the same target are removed first (:func:`clean_stale`).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    clean_stale(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "x+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(folder)


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(data)


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
