"""The transport form of a bundle: an uncompressed POSIX (pax) tar of its folder.

``bundle.json`` comes first, then every file it lists in sorted order, regular files only,
mtime 0, so equal bundles give equal bytes (:func:`pack_bundle`). The reader
(:func:`unpack_bundle`, used by the server on publish and by the device on sync) refuses any
member that is not a regular file with a safe relative path, any file not listed, and any file
whose size or sha256 differs from bundle.json.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import IO

from ..errors import ArchiveError
from .folder import BUNDLE_JSON, MAX_JSON_BYTES, read_strict_info, verify_bundle_folder

ARCHIVE_MEDIA_TYPE = "application/x-tar"
_CHUNK = 1 << 20


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """The header of a member of a bundle or delta archive: a regular file, mode 644, mtime 0,
    no owner (equal contents give equal bytes)."""
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
            for rel in [BUNDLE_JSON] + sorted(info["files"]):
                f = folder / rel
                with open(f, "rb") as src:
                    tar.addfile(tarinfo(rel, os.fstat(src.fileno()).st_size), src)
    finally:
        if own:
            fh.close()
    return info


def safe_member(member: tarfile.TarInfo, where: str) -> str:
    """The name of ``member`` if it is a regular file with a safe relative path; else
    :class:`ArchiveError` (links, folders, absolute paths, '..' and empty parts are refused)."""
    name = member.name
    if not member.isreg():
        raise ArchiveError(f"{where}: member {name!r} is not a regular file (links and folders are refused)")
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts)
            or len(name) > 1024):
        raise ArchiveError(f"{where}: member {name!r} has an unsafe path (absolute, '..' or empty parts)")
    return name


def open_member(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> IO[bytes]:
    src = tar.extractfile(member)
    if src is None:  # safe_member lets only regular files through, and those always open
        raise ArchiveError(f"{where}: member {member.name!r} is not a regular file")
    return src


def write_member(tar: tarfile.TarFile, member, target: Path, expect_sha: str | None = None, where: str = "") -> str:
    """Extract ``member`` to the new file ``target`` (flushed to disk); its sha256 must be
    ``expect_sha`` when given (:class:`ArchiveError`). Returns the sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    src = open_member(tar, member, where)
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
            if first is None or safe_member(first, str(archive)) != BUNDLE_JSON:
                raise ArchiveError(f"{archive}: the first member must be bundle.json")
            if first.size > MAX_JSON_BYTES:
                raise ArchiveError(f"{archive}: bundle.json is {first.size} bytes, over the limit")
            write_member(tar, first, dest / BUNDLE_JSON)
            info = read_strict_info(dest)
            expected = dict(info["files"])
            while (member := tar.next()) is not None:
                rel = safe_member(member, str(archive))
                meta = expected.pop(rel, None)
                if meta is None:
                    raise ArchiveError(f"{archive}: member {rel!r} is not listed in bundle.json (or appears twice)")
                if member.size != meta["size"]:
                    raise ArchiveError(f"{archive}: {rel} has {member.size} bytes, bundle.json says {meta['size']}")
                write_member(tar, member, dest / rel, meta["sha256"], str(archive))
            if expected:
                raise ArchiveError(f"{archive}: files listed in bundle.json are missing: {', '.join(sorted(expected)[:5])}")
    except tarfile.TarError as exc:
        raise ArchiveError(f"{archive}: not a valid uncompressed tar ({exc})") from exc
    return info
