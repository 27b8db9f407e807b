"""The TUF repository of each collection, kept by the edge server as static files:

    DATA/repo/<collection>/metadata/N.root.json       offline root key(s): signed by the operator
    DATA/repo/<collection>/metadata/N.targets.json    the publisher's targets key: bundles/N.tar
    DATA/repo/<collection>/metadata/N.deltas.json     online key: deltas/A-B.tar (delegated by targets)
    DATA/repo/<collection>/metadata/N.snapshot.json   online key
    DATA/repo/<collection>/metadata/timestamp.json    online key, short-lived, re-signed on demand
    DATA/repo/<collection>/targets/bundles/<sha256>.N.tar, targets/deltas/<sha256>.A-B.tar
                                                      hard links to DATA/blobs (stored once)

Consistent snapshots: every file but timestamp.json is named by version or hash and never
changes, so a mirror that copies the folder (timestamp.json last) is always consistent, and so
is a device reading while the server writes. The server holds only the online key
(DATA/keys/online.key); it can re-sign snapshot, timestamp and deltas, never targets or root, so
whoever takes the server can at worst replay what the publisher signed (until it expires) or
offer deltas that fail to reproduce the signed bundle.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

from d2r.bundle.tuf import BUNDLE_TARGET, DELTAS_EXPIRY, DELTAS_ROLE, SNAPSHOT_EXPIRY, TIMESTAMP_EXPIRY, bundle_info_of, expiry, tuf_modules, utcnow
from d2r.errors import InputError

MAX_METADATA_BYTES = 1 << 20
KEEP_OLD_METADATA = 4  # older N.snapshot.json etc. kept for devices and mirrors mid-update


class RepositoryError(InputError):
    """A root or targets metadata upload that the repository refuses (HTTP 400/409)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_online_signer(keys_dir: Path):
    """The server's online Ed25519 key (made on first start, mode 0600): signs snapshot,
    timestamp and deltas of every collection."""
    from d2r.bundle.keys import generate_keypair
    from d2r.bundle.tuf import private_signer

    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = keys_dir / "online.key"
    if not path.exists():
        generate_keypair(path)
    return private_signer(path)


class CollectionRepository:
    """One collection's TUF repository (call under the storage's publish lock when writing)."""

    def __init__(self, root: Path, online_signer, timestamp_expiry: float = TIMESTAMP_EXPIRY,
                 snapshot_expiry: float = SNAPSHOT_EXPIRY, deltas_expiry: float = DELTAS_EXPIRY):
        self.root = Path(root)
        self.metadata = self.root / "metadata"
        self.targets_dir = self.root / "targets"
        self.online = online_signer
        self.timestamp_expiry = timestamp_expiry
        self.snapshot_expiry = snapshot_expiry
        self.deltas_expiry = deltas_expiry
        self.md, _ = tuf_modules()

    # -- reading ---------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.metadata / "timestamp.json").is_file()

    def _latest_version(self, role: str) -> int:
        best = 0
        for p in self.metadata.glob(f"*.{role}.json") if self.metadata.is_dir() else ():
            head = p.name.split(".", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
        return best

    def load(self, role: str):
        v = self._latest_version(role)
        if not v:
            raise RepositoryError(f"collection has no {role} metadata (create it first: d2r collection create)", 409)
        return self.md.Metadata.from_file(str(self.metadata / f"{v}.{role}.json"))

    def root_md(self):
        return self.load("root")

    def targets_md(self):
        return self.load("targets")

    def bundles(self) -> dict:
        """{version: bundle info} of the targets currently signed."""
        return {info["version"]: info for info in (bundle_info_of(t) for t in self.targets_md().signed.targets.values())}

    def _parse(self, raw: bytes, kind):
        if len(raw) > MAX_METADATA_BYTES:
            raise RepositoryError(f"{kind.type} metadata over {MAX_METADATA_BYTES} bytes")
        try:
            md = self.md.Metadata.from_bytes(raw)
        except Exception as exc:  # noqa: BLE001 - any parse error of untrusted input is a 400
            raise RepositoryError(f"not valid TUF {kind.type} metadata ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(md.signed, kind):
            raise RepositoryError(f"expected {kind.type} metadata, got {md.signed.type}")
        if md.signed.is_expired():
            raise RepositoryError(f"{kind.type} metadata version {md.signed.version} has already expired ({md.signed.expires})")
        return md

    def _verify(self, delegator, role: str, md) -> None:
        from tuf.api.exceptions import UnsignedMetadataError

        try:
            delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as exc:
            raise RepositoryError(f"{role} metadata is not signed by the threshold of {role} keys of this collection's root "
                                  f"({exc})") from None

    def _check_online_roles(self, root) -> None:
        keyid = self.online.public_key.keyid
        for role in ("snapshot", "timestamp"):
            r = root.roles[role]
            if r.keyids != [keyid] or r.threshold != 1:
                raise RepositoryError(f"root: role {role} must be held by this server's online key {keyid[:16]}... "
                                      "(GET /api/v1/tuf/online-key), threshold 1")

    def _check_deltas_delegation(self, targets) -> None:
        d = targets.delegations
        role = d.roles.get(DELTAS_ROLE) if d is not None and d.roles else None
        keyid = self.online.public_key.keyid
        if d is not None and (set(d.roles or {}) - {DELTAS_ROLE}):
            raise RepositoryError(f"targets: the only delegation allowed is {DELTAS_ROLE!r}")
        if role is not None and (role.keyids != [keyid] or role.threshold != 1 or role.paths != ["deltas/*"] or not role.terminating):
            raise RepositoryError(f"targets: delegation {DELTAS_ROLE!r} must give paths ['deltas/*'] to this server's "
                                  "online key, threshold 1, terminating")

    # -- writing ---------------------------------------------------------------------------------------
    def create(self, root_raw: bytes, targets_raw: bytes) -> None:
        """A new collection from its first root (self-signed by its root keys) and targets
        (empty, signed by its targets keys)."""
        if self.exists():
            raise RepositoryError("the collection exists already (rotate its root with d2r collection rotate)", 409)
        root = self._parse(root_raw, self.md.Root)
        if root.signed.version != 1:
            raise RepositoryError("a new collection starts with root version 1")
        self._verify(root.signed, "root", root)
        if not root.signed.consistent_snapshot:
            raise RepositoryError("root: consistent_snapshot must be true (mirrors copy the folder while it changes)")
        self._check_online_roles(root.signed)
        targets = self._parse(targets_raw, self.md.Targets)
        self._verify(root.signed, "targets", targets)
        if targets.signed.targets:
            raise RepositoryError("the first targets metadata of a collection lists no bundles (publish them)")
        self._check_deltas_delegation(targets.signed)
        self.metadata.mkdir(parents=True, exist_ok=True)
        (self.targets_dir / "bundles").mkdir(parents=True, exist_ok=True)
        (self.targets_dir / "deltas").mkdir(parents=True, exist_ok=True)
        _write_atomic(self.metadata / "1.root.json", root_raw)
        _write_atomic(self.metadata / f"{targets.signed.version}.targets.json", targets_raw)
        self.write_online({})

    def rotate_root(self, root_raw: bytes, targets_raw: bytes | None = None) -> int:
        """Root version N+1, signed by the threshold of root keys of both N and N+1. If it
        changes the targets keys, ``targets_raw`` (the current targets re-signed with the new
        key, version + 1) must come with it, or devices could not verify the targets in force."""
        old = self.root_md()
        new = self._parse(root_raw, self.md.Root)
        if new.signed.version != old.signed.version + 1:
            raise RepositoryError(f"root version must be {old.signed.version + 1}, got {new.signed.version}", 409)
        self._verify(old.signed, "root", new)
        self._verify(new.signed, "root", new)
        if not new.signed.consistent_snapshot:
            raise RepositoryError("root: consistent_snapshot must stay true")
        self._check_online_roles(new.signed)
        cur = self.targets_md()
        targets = None
        if targets_raw is not None:
            targets = self._parse(targets_raw, self.md.Targets)
            self._verify(new.signed, "targets", targets)
            if targets.signed.version != cur.signed.version + 1 or targets.signed.targets != cur.signed.targets:
                raise RepositoryError(f"targets: with a root rotation, send the current targets re-signed as version "
                                      f"{cur.signed.version + 1}, same bundles", 409)
            self._check_deltas_delegation(targets.signed)
        else:
            try:
                new.signed.verify_delegate("targets", cur.signed_bytes, cur.signatures)
            except Exception:  # noqa: BLE001 - UnsignedMetadataError
                raise RepositoryError("the new root changes the targets keys: send the current targets re-signed with the "
                                      "new targets key (d2r collection rotate --targets-key NEW.key)") from None
        _write_atomic(self.metadata / f"{new.signed.version}.root.json", root_raw)
        if targets is not None:
            self.install_targets(targets_raw, targets)
            self.write_online(None)
        return new.signed.version

    def check_targets(self, raw: bytes, upload: dict | None, keep: int | None, deleted: set) -> tuple:
        """Verify a targets metadata upload; returns (metadata, {version: info}, new version or
        None, removed versions). ``upload`` is {sha256, length, version, checksum} of the bundle
        sent with it (publish) or None (deleting versions)."""
        root = self.root_md().signed
        cur = self.targets_md()
        md = self._parse(raw, self.md.Targets)
        self._verify(root, "targets", md)
        if md.signed.version != cur.signed.version + 1:
            raise RepositoryError(f"targets version must be {cur.signed.version + 1} (the current is {cur.signed.version}), "
                                  f"got {md.signed.version}", 409)
        self._check_deltas_delegation(md.signed)
        old = {t.path: t for t in cur.signed.targets.values()}
        infos = {}
        added = []
        for path, t in md.signed.targets.items():
            if not BUNDLE_TARGET.match(path):
                raise RepositoryError(f"targets: {path!r} is not a bundle target (bundles/N.tar)")
            info = bundle_info_of(t)
            infos[info["version"]] = info
            if path in old:
                if old[path] != t:
                    raise RepositoryError(f"targets: {path} differs from the version already published", 409)
            else:
                added.append(info)
        if upload is None and added:
            raise RepositoryError("targets: lists a bundle that was not uploaded")
        new_version = None
        if upload is not None:
            if len(added) != 1:
                raise RepositoryError("targets: must add exactly the bundle uploaded with it")
            info = added[0]
            if (info["sha256"], info["length"]) != (upload["sha256"], upload["length"]):
                raise RepositoryError(f"targets: {info['version']} has another sha256 or length than the upload")
            if (info["version"], info["bundle_checksum"]) != (upload["version"], upload["checksum"]):
                raise RepositoryError("targets: custom.d2r version or bundle_checksum differ from the bundle's bundle.json")
            older = [v for v in infos if v != info["version"]] + [int(p.split("/")[1][:-4]) for p in old]
            if older and info["version"] <= max(older):
                raise RepositoryError(f"version {info['version']} is not newer than the latest version {max(older)}", 409)
            if info["version"] in deleted:
                raise RepositoryError(f"version {info['version']} was deleted; publish it under a new version number", 409)
            new_version = info["version"]
        if keep and len(infos) > keep:
            raise RepositoryError(f"targets: lists {len(infos)} bundles but this server keeps {keep} per collection "
                                  f"(d2r publish --keep {keep} drops the oldest)")
        removed = sorted(int(p.split("/")[1][:-4]) for p in old if p not in md.signed.targets)
        if upload is None and not removed:
            raise RepositoryError("targets: removes no version")
        return md, infos, new_version, removed

    def install_targets(self, raw: bytes, md) -> None:
        _write_atomic(self.metadata / f"{md.signed.version}.targets.json", raw)

    def link_target(self, path: str, sha256: str, blob: Path) -> None:
        folder, _, name = path.rpartition("/")
        dst = self.targets_dir / folder / f"{sha256}.{name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            return
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(blob, tmp)  # the same file as the blob: stored once
        except OSError:
            import shutil

            shutil.copyfile(blob, tmp)
        os.replace(tmp, dst)

    def unlink_targets(self, keep_sha256: set) -> None:
        for p in self.targets_dir.rglob("*.tar") if self.targets_dir.is_dir() else ():
            if p.name.split(".", 1)[0] not in keep_sha256:
                p.unlink(missing_ok=True)

    def write_online(self, deltas: dict | None) -> None:
        """Sign new deltas (if ``deltas`` is given: {path: TargetFile}), snapshot and timestamp
        metadata with the online key. timestamp.json is written last: the switch."""
        md = self.md
        targets_v = self._latest_version("targets")
        deltas_v = self._latest_version(DELTAS_ROLE)
        if deltas is not None:
            deltas_v += 1
            d = md.Metadata(md.Targets(version=deltas_v, expires=expiry(self.deltas_expiry), targets=dict(deltas)))
            d.sign(self.online)
            _write_atomic(self.metadata / f"{deltas_v}.{DELTAS_ROLE}.json", d.to_bytes())
        snap_v = self._latest_version("snapshot") + 1
        meta = {"targets.json": md.MetaFile(version=targets_v)}
        if deltas_v:
            meta[f"{DELTAS_ROLE}.json"] = md.MetaFile(version=deltas_v)
        s = md.Metadata(md.Snapshot(version=snap_v, expires=expiry(self.snapshot_expiry), meta=meta))
        s.sign(self.online)
        _write_atomic(self.metadata / f"{snap_v}.snapshot.json", s.to_bytes())
        self._write_timestamp(snap_v)
        self._prune_metadata()

    def _write_timestamp(self, snapshot_version: int) -> None:
        md = self.md
        ts_path = self.metadata / "timestamp.json"
        version = 1
        if ts_path.is_file():
            version = md.Metadata.from_file(str(ts_path)).signed.version + 1
        t = md.Metadata(md.Timestamp(version=version, expires=expiry(self.timestamp_expiry),
                                     snapshot_meta=md.MetaFile(version=snapshot_version)))
        t.sign(self.online)
        _write_atomic(ts_path, t.to_bytes())

    def needs_refresh(self, now: dt.datetime | None = None) -> bool:
        """Whether :meth:`refresh_if_needed` would write (read without the lock: files are
        replaced atomically)."""
        now = now or utcnow()
        try:
            ts = self.md.Metadata.from_file(str(self.metadata / "timestamp.json")).signed
            snap = self.load("snapshot").signed
        except (OSError, ValueError, RepositoryError):
            return True
        return (snap.expires - now < dt.timedelta(seconds=self.snapshot_expiry / 2)
                or ts.expires - now < dt.timedelta(seconds=self.timestamp_expiry / 2))

    def refresh_if_needed(self, now: dt.datetime | None = None) -> bool:
        """Re-sign timestamp (and snapshot, deltas) when less than half of its lifetime is
        left: devices see fresh metadata as long as the server runs. Returns True if written."""
        if not self.exists():
            return False
        now = now or utcnow()
        md = self.md
        ts = md.Metadata.from_file(str(self.metadata / "timestamp.json")).signed
        snap = self.load("snapshot").signed
        if snap.expires - now < dt.timedelta(seconds=self.snapshot_expiry / 2):
            deltas = None
            if self._latest_version(DELTAS_ROLE):
                dl = self.load(DELTAS_ROLE).signed
                if dl.expires - now < dt.timedelta(seconds=self.deltas_expiry / 2):
                    deltas = dl.targets
            self.write_online(deltas)
            return True
        if ts.expires - now < dt.timedelta(seconds=self.timestamp_expiry / 2):
            self._write_timestamp(snap.version)
            return True
        return False

    def current_deltas(self) -> dict:
        if not self._latest_version(DELTAS_ROLE):
            return {}
        return dict(self.load(DELTAS_ROLE).signed.targets)

    def _prune_metadata(self) -> None:
        for role in ("snapshot", "targets", DELTAS_ROLE):
            latest = self._latest_version(role)
            for p in self.metadata.glob(f"*.{role}.json"):
                head = p.name.split(".", 1)[0]
                if head.isdigit() and int(head) <= latest - KEEP_OLD_METADATA:
                    p.unlink(missing_ok=True)
