"""Operator side of the protocol (standard library + tuf): create a collection (its TUF root),
rotate its keys, publish a bundle with the next signed targets metadata, delete a version,
register, list and revoke devices."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from d2r.bundle.archive import ARCHIVE_MEDIA_TYPE, pack_bundle
from d2r.bundle.tuf import (
    COLLECTION_NAME,
    DELTAS_ROLE,
    ROOT_EXPIRY,
    TARGETS_EXPIRY,
    bundle_info_of,
    bundle_target,
    expiry,
    private_signer,
    public_key,
    tuf_modules,
)
from d2r.errors import InputError, SyncError

TARGETS_HEADER = "X-D2R-Targets"


def _keys(paths) -> list:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return list(paths or [])


class AdminClient:
    def __init__(self, server: str, token: str, timeout: float = 600.0):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body=None, headers=None, length=None, raw: bool = False):
        h = {"Authorization": f"Bearer {self.token}", "User-Agent": "d2r-admin"}
        h.update(headers or {})
        data = body
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        if length is not None:
            h["Content-Length"] = str(length)
        req = urllib.request.Request(self.server + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                content = resp.read()
                return content if raw else json.loads(content or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                msg = exc.reason
            exc.close()
            raise SyncError(f"{method} {path}: HTTP {exc.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SyncError(f"{self.server}: server unreachable ({getattr(exc, 'reason', exc)})") from None

    @staticmethod
    def _check(collection: str) -> str:
        if not isinstance(collection, str) or not COLLECTION_NAME.fullmatch(collection):
            raise InputError(f"collection: expected letters, digits, '.', '_' or '-', got {collection!r}")
        return urllib.parse.quote(collection, safe="")

    # -- TUF: collections, keys ------------------------------------------------------------------------
    def online_key(self):
        md, signer = tuf_modules()
        rec = self._call("GET", "/api/v1/tuf/online-key")
        return signer.SSlibKey.from_dict(rec["keyid"], dict(rec["key"]))

    def create_collection(self, collection: str, root_keys, targets_key, root_threshold: int = 1,
                          root_expiry: float = ROOT_EXPIRY, targets_expiry: float = TARGETS_EXPIRY, out=None) -> bytes:
        """Make the collection's TUF root (version 1: ``root_keys`` private key files, any
        ``root_threshold`` of them; the targets key's public half; the server's online key for
        snapshot and timestamp), sign it, sign empty targets with ``targets_key`` (a private key
        file) delegating deltas/* to the online key, and upload both. Returns the root JSON, to
        provision devices with (also written to ``out`` if given)."""
        name = self._check(collection)
        md, _ = tuf_modules()
        root_paths = _keys(root_keys)
        if not root_paths or not 1 <= int(root_threshold) <= len(root_paths):
            raise InputError(f"root keys: need at least {root_threshold} (the threshold), got {len(root_paths)}")
        online = self.online_key()
        root = md.Root(expires=expiry(root_expiry), consistent_snapshot=True)
        for p in root_paths:
            root.add_key(public_key(p), "root")
        root.roles["root"].threshold = int(root_threshold)
        root.add_key(public_key(targets_key), "targets")
        root.add_key(online, "snapshot")
        root.add_key(online, "timestamp")
        root_md = md.Metadata(root)
        for p in root_paths:
            root_md.sign(private_signer(p), append=True)
        targets = md.Targets(expires=expiry(targets_expiry))
        targets.delegations = md.Delegations(keys={online.keyid: online},
                                             roles={DELTAS_ROLE: md.DelegatedRole(DELTAS_ROLE, [online.keyid], 1, True, ["deltas/*"])})
        targets_md = md.Metadata(targets)
        targets_md.sign(private_signer(targets_key))
        raw = root_md.to_bytes()
        self._call("PUT", f"/api/v1/collections/{name}", {"root": json.loads(raw), "targets": json.loads(targets_md.to_bytes())})
        if out is not None:
            Path(out).write_bytes(raw)
        return raw

    def rotate_root(self, collection: str, old_root_keys, new_root_keys=None, root_threshold: int | None = None,
                    new_targets_key=None, root_expiry: float = ROOT_EXPIRY, out=None) -> bytes:
        """The next root version: root keys replaced by ``new_root_keys`` (if given) and the
        targets key by ``new_targets_key`` (a private key file; the current targets are re-signed
        with it). Signed by the old and the new root keys. Returns the new root JSON."""
        name = self._check(collection)
        md, _ = tuf_modules()
        cur = md.Metadata.from_bytes(self._call("GET", f"/tuf/{name}/metadata/1.root.json", raw=True))
        # Walk to the latest root (N.root.json until 404).
        while True:
            try:
                nxt = self._call("GET", f"/tuf/{name}/metadata/{cur.signed.version + 1}.root.json", raw=True)
            except SyncError as exc:
                if "404" in str(exc):
                    break
                raise
            cur = md.Metadata.from_bytes(nxt)
        root = cur.signed
        root.version += 1
        root.expires = expiry(root_expiry)
        old_paths, new_paths = _keys(old_root_keys), _keys(new_root_keys)
        if new_paths:
            for keyid in list(root.roles["root"].keyids):
                root.revoke_key(keyid, "root")
            for p in new_paths:
                root.add_key(public_key(p), "root")
        if root_threshold is not None:
            root.roles["root"].threshold = int(root_threshold)
        body = {}
        if new_targets_key is not None:
            for keyid in list(root.roles["targets"].keyids):
                root.revoke_key(keyid, "targets")
            root.add_key(public_key(new_targets_key), "targets")
            targets = md.Metadata.from_bytes(self._call("GET", f"/api/v1/collections/{name}/tuf-targets", raw=True))
            targets.signed.version += 1
            targets.signatures.clear()
            targets.sign(private_signer(new_targets_key))
            body["targets"] = json.loads(targets.to_bytes())
        new_md = md.Metadata(root)
        for p in dict.fromkeys(old_paths + new_paths):
            new_md.sign(private_signer(p), append=True)
        raw = new_md.to_bytes()
        body["root"] = json.loads(raw)
        self._call("PUT", f"/api/v1/collections/{name}/root", body)
        if out is not None:
            Path(out).write_bytes(raw)
        return raw

    def _next_targets(self, name: str, signing_key, change, keep: int | None, targets_expiry: float) -> str:
        md, _ = tuf_modules()
        targets = md.Metadata.from_bytes(self._call("GET", f"/api/v1/collections/{name}/tuf-targets", raw=True))
        t = targets.signed
        change(t.targets)
        if keep:
            versions = sorted((bundle_info_of(x)["version"] for x in t.targets.values()), reverse=True)
            for v in versions[int(keep):]:
                t.targets.pop(bundle_target(v), None)
        t.version += 1
        t.expires = expiry(targets_expiry)
        targets.signatures.clear()
        targets.sign(private_signer(signing_key) if isinstance(signing_key, (str, os.PathLike)) else signing_key)
        return base64.b64encode(targets.to_bytes()).decode("ascii")

    def publish(self, bundle, collection: str, signing_key, keep: int | None = None,
                targets_expiry: float = TARGETS_EXPIRY) -> dict:
        """Verify and pack bundle folder ``bundle``, list it in the collection's next targets
        metadata (dropping all but the newest ``keep`` versions), sign that with the targets key
        ``signing_key`` and upload both; returns the version record."""
        name = self._check(collection)
        md, _ = tuf_modules()
        with tempfile.TemporaryFile() as fh:
            info = pack_bundle(bundle, fh)
            size = fh.tell()
            fh.seek(0)
            target = md.TargetFile.from_data(bundle_target(info["version"]), fh, ["sha256"])
            target.unrecognized_fields["custom"] = {"d2r": {"version": int(info["version"]), "bundle_checksum": info["checksum"],
                                                            "n_images": info.get("n_images")}}
            fh.seek(0)
            header = self._next_targets(name, signing_key, lambda ts: ts.__setitem__(target.path, target), keep, targets_expiry)
            return self._call("POST", f"/api/v1/collections/{name}/versions", fh,
                              {"Content-Type": ARCHIVE_MEDIA_TYPE, TARGETS_HEADER: header}, length=size)

    def delete_version(self, collection: str, version: int, signing_key, targets_expiry: float = TARGETS_EXPIRY) -> dict:
        """Yank ``version`` (admin + the targets key): no longer offered; its number is not reused."""
        name = self._check(collection)

        def drop(ts):
            if ts.pop(bundle_target(version), None) is None:
                raise InputError(f"collection {collection!r}: version {version} is not in its signed targets")

        header = self._next_targets(name, signing_key, drop, None, targets_expiry)
        return self._call("DELETE", f"/api/v1/collections/{name}/versions/{int(version)}", headers={TARGETS_HEADER: header})

    # -- versions and devices --------------------------------------------------------------------------
    def versions(self, collection: str) -> list:
        return self._call("GET", f"/api/v1/collections/{self._check(collection)}/versions")["versions"]

    def add_device(self, collections, name: str = "device") -> dict:
        return self._call("POST", "/api/v1/devices", {"name": name, "collections": list(collections)})

    def devices(self) -> list:
        return self._call("GET", "/api/v1/devices")["devices"]

    def revoke_device(self, device_id: str) -> dict:
        return self._call("DELETE", f"/api/v1/devices/{urllib.parse.quote(device_id)}")
