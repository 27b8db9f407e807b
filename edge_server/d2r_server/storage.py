"""Embedded storage: a folder of immutable content-addressed files plus one SQLite database.

    DATA/blobs/ab/abcdef...     bundle and delta archives, named by their sha256, never modified
    DATA/unpacked/<sha256>/     the bundle folder of an archive (derived: deltas are made from it)
    DATA/tmp/                   uploads in progress (removed at start)
    DATA/d2r.sqlite3            collections, versions, deltas, devices, scopes, sync log

A file enters ``blobs`` by one rename once verified, and a version becomes visible by one
committed SQLite transaction after that: a reader never sees a half-published version.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    collection TEXT NOT NULL REFERENCES collections(name),
    version INTEGER NOT NULL,
    archive_sha256 TEXT NOT NULL,
    archive_size INTEGER NOT NULL,
    bundle_checksum TEXT NOT NULL,
    signature TEXT NOT NULL,
    n_images INTEGER,
    created TEXT NOT NULL,
    PRIMARY KEY (collection, version)
);
CREATE TABLE IF NOT EXISTS deltas (
    collection TEXT NOT NULL,
    from_version INTEGER NOT NULL,
    to_version INTEGER NOT NULL,
    sha256 TEXT,              -- NULL: no delta reproduces the new version, download it whole
    size INTEGER,
    n_added INTEGER,
    n_removed INTEGER,
    created TEXT NOT NULL,
    PRIMARY KEY (collection, from_version, to_version)
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    revoked TEXT,
    last_seen TEXT,
    last_sync TEXT,
    last_collection TEXT,
    last_version INTEGER,
    last_method TEXT
);
CREATE TABLE IF NOT EXISTS device_collections (
    device_id TEXT NOT NULL REFERENCES devices(id),
    collection TEXT NOT NULL,
    PRIMARY KEY (device_id, collection)
);
CREATE TABLE IF NOT EXISTS sync_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    device_id TEXT,
    collection TEXT,
    event TEXT NOT NULL,
    version INTEGER,
    detail TEXT
);
"""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Storage:
    """The server's data folder. Thread-safe: one SQLite connection per call (WAL mode)."""

    def __init__(self, root):
        self.root = Path(root).resolve()
        self.blobs = self.root / "blobs"
        self.unpacked = self.root / "unpacked"
        self.tmp = self.root / "tmp"
        self.db_path = self.root / "d2r.sqlite3"
        for p in (self.blobs, self.unpacked, self.tmp):
            p.mkdir(parents=True, exist_ok=True)
        for p in self.tmp.iterdir():  # uploads interrupted by a restart
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        with self.db() as con:
            con.executescript(SCHEMA)
        self.publish_lock = threading.Lock()
        self._delta_locks: dict = {}
        self._delta_locks_guard = threading.Lock()

    @contextmanager
    def db(self):
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self):
        with self.db() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- files -------------------------------------------------------------------------------------
    def temp_path(self, prefix: str) -> Path:
        return self.tmp / f"{prefix}-{uuid.uuid4().hex}"

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def add_blob(self, src: Path, sha256: str) -> Path:
        """Move ``src`` into the store under its sha256 (kept as is if already there)."""
        dst = self.blob_path(sha256)
        dst.parent.mkdir(exist_ok=True)
        if dst.exists():
            src.unlink()
        else:
            os.replace(src, dst)
        return dst

    def add_unpacked(self, src: Path, sha256: str) -> Path:
        dst = self.unpacked / sha256
        if dst.exists():
            shutil.rmtree(src, ignore_errors=True)
        else:
            os.replace(src, dst)
        return dst

    def delta_lock(self, key) -> threading.Lock:
        with self._delta_locks_guard:
            return self._delta_locks.setdefault(key, threading.Lock())

    # -- queries -----------------------------------------------------------------------------------
    def collections(self) -> list:
        with self.db() as con:
            return [dict(r) for r in con.execute(
                "SELECT c.name, c.created, COUNT(v.version) AS n_versions, MAX(v.version) AS latest "
                "FROM collections c LEFT JOIN versions v ON v.collection = c.name GROUP BY c.name ORDER BY c.name")]

    def versions(self, collection: str) -> list:
        with self.db() as con:
            return [dict(r) for r in con.execute(
                "SELECT * FROM versions WHERE collection = ? ORDER BY version DESC", (collection,))]

    def version(self, collection: str, version: int | None = None) -> dict | None:
        with self.db() as con:
            if version is None:
                row = con.execute("SELECT * FROM versions WHERE collection = ? ORDER BY version DESC LIMIT 1",
                                  (collection,)).fetchone()
            else:
                row = con.execute("SELECT * FROM versions WHERE collection = ? AND version = ?",
                                  (collection, int(version))).fetchone()
        return dict(row) if row else None

    def collection_exists(self, name: str) -> bool:
        with self.db() as con:
            return con.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone() is not None

    def log(self, event: str, device_id=None, collection=None, version=None, detail=None) -> None:
        with self.db() as con:
            con.execute("INSERT INTO sync_log (at, device_id, collection, event, version, detail) VALUES (?, ?, ?, ?, ?, ?)",
                        (now(), device_id, collection, event, version, detail))

    def devices(self) -> list:
        with self.db() as con:
            rows = [dict(r) for r in con.execute("SELECT * FROM devices ORDER BY created, id")]
            scopes = {}
            for r in con.execute("SELECT device_id, collection FROM device_collections ORDER BY collection"):
                scopes.setdefault(r["device_id"], []).append(r["collection"])
        for r in rows:
            r.pop("token_sha256", None)
            r["collections"] = scopes.get(r["id"], [])
        return rows
