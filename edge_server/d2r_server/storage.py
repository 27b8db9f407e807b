"""Embedded storage: a folder of immutable content-addressed files plus one SQLite database.

    DATA/blobs/ab/abcdef...     bundle and delta archives, named by their sha256, never modified
    DATA/tmp/                   uploads in progress and delta builds (removed at start)
    DATA/d2r.sqlite3            collections, versions, deltas, devices, scopes, sync log

A file enters ``blobs`` by one rename once verified, and a version becomes visible by one
committed SQLite transaction after that: a reader never sees a half-published version.
Each version is stored once, as its archive; a delta build unpacks the two archives it needs
into ``tmp`` and removes them after. A deleted (or garbage-collected) version disappears from
the database first, then its blobs and the deltas that need it.
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
    last_method TEXT,
    stale_seconds INTEGER,    -- set while the device reports expired TUF metadata
    stale_reported TEXT
);
CREATE TABLE IF NOT EXISTS device_collections (
    device_id TEXT NOT NULL REFERENCES devices(id),
    collection TEXT NOT NULL,
    PRIMARY KEY (device_id, collection)
);
CREATE TABLE IF NOT EXISTS deleted_versions (
    collection TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted TEXT NOT NULL,
    reason TEXT,
    PRIMARY KEY (collection, version)
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
        self.tmp = self.root / "tmp"
        self.db_path = self.root / "d2r.sqlite3"
        for p in (self.blobs, self.tmp):
            p.mkdir(parents=True, exist_ok=True)
        # Data folders of an earlier server kept a second, unpacked copy of every version here
        # (derived from the archives, made by this server): removed, each version is stored once.
        shutil.rmtree(self.root / "unpacked", ignore_errors=True)
        for p in self.tmp.iterdir():  # uploads interrupted by a restart
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        with self.db() as con:
            con.executescript(SCHEMA)
            have = {r[1] for r in con.execute("PRAGMA table_info(devices)")}
            for column, kind in (("stale_seconds", "INTEGER"), ("stale_reported", "TEXT")):
                if column not in have:  # data folders of an earlier server
                    con.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")
        self.publish_lock = threading.Lock()
        self.blob_lock = threading.RLock()  # adding a blob + its row, versus garbage collection

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

    def delete_version(self, collection: str, version: int, reason: str) -> dict | None:
        """Remove a version (its row, the deltas from or to it, then the blobs nobody needs any
        more); its number is remembered and never accepted again. Returns the removed row."""
        with self.transaction() as con:
            row = con.execute("SELECT * FROM versions WHERE collection = ? AND version = ?", (collection, version)).fetchone()
            if row is None:
                return None
            con.execute("DELETE FROM versions WHERE collection = ? AND version = ?", (collection, version))
            con.execute("DELETE FROM deltas WHERE collection = ? AND (from_version = ? OR to_version = ?)",
                        (collection, version, version))
            con.execute("INSERT OR REPLACE INTO deleted_versions VALUES (?, ?, ?, ?)", (collection, version, now(), reason))
        self.collect_garbage()
        return dict(row)

    def collect_garbage(self) -> int:
        """Delete blobs that no version and no delta refers to; returns how many."""
        n = 0
        with self.blob_lock:
            with self.db() as con:
                live = {r[0] for r in con.execute("SELECT archive_sha256 FROM versions")}
                live |= {r[0] for r in con.execute("SELECT sha256 FROM deltas WHERE sha256 IS NOT NULL")}
            for d in self.blobs.iterdir():
                for f in d.iterdir() if d.is_dir() else ():
                    if f.name not in live:
                        f.unlink(missing_ok=True)
                        n += 1
        return n

    def deleted_versions(self, collection: str) -> set:
        with self.db() as con:
            return {r[0] for r in con.execute("SELECT version FROM deleted_versions WHERE collection = ?", (collection,))}

    def is_deleted(self, collection: str, version: int) -> bool:
        with self.db() as con:
            return con.execute("SELECT 1 FROM deleted_versions WHERE collection = ? AND version = ?",
                               (collection, version)).fetchone() is not None

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
