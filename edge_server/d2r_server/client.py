"""Operator side of the protocol (standard library + cryptography): publish a signed bundle,
register, list and revoke devices."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from d2r.sync import ARCHIVE_MEDIA_TYPE, COLLECTION_NAME, SyncError, load_private_key, pack_bundle, sign_bundle
from d2r.errors import InputError


class AdminClient:
    def __init__(self, server: str, token: str, timeout: float = 600.0):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body=None, headers=None, length=None) -> dict:
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
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                msg = exc.reason
            exc.close()
            raise SyncError(f"{method} {path}: HTTP {exc.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SyncError(f"{self.server}: server unreachable ({getattr(exc, 'reason', exc)})") from None

    def publish(self, bundle, collection: str, signing_key) -> dict:
        """Verify, sign, pack and upload bundle folder ``bundle``; returns the version record."""
        if not COLLECTION_NAME.fullmatch(collection or ""):
            raise InputError(f"collection: expected letters, digits, '.', '_' or '-', got {collection!r}")
        key = load_private_key(signing_key) if isinstance(signing_key, (str, os.PathLike)) else signing_key
        with tempfile.TemporaryFile() as fh:
            info = pack_bundle(bundle, fh)
            size = fh.tell()
            fh.seek(0)
            signature = sign_bundle(key, collection, info["checksum"])
            return self._call("POST", f"/api/v1/collections/{urllib.parse.quote(collection)}/versions", fh,
                              {"Content-Type": ARCHIVE_MEDIA_TYPE, "X-D2R-Signature": signature}, length=size)

    def add_device(self, collections, name: str = "device") -> dict:
        return self._call("POST", "/api/v1/devices", {"name": name, "collections": list(collections)})

    def devices(self) -> list:
        return self._call("GET", "/api/v1/devices")["devices"]

    def revoke_device(self, device_id: str) -> dict:
        return self._call("DELETE", f"/api/v1/devices/{urllib.parse.quote(device_id)}")

    def versions(self, collection: str) -> list:
        return self._call("GET", f"/api/v1/collections/{urllib.parse.quote(collection, safe='')}/versions")["versions"]

    def delete_version(self, collection: str, version: int) -> dict:
        """Yank ``version`` of ``collection`` (admin): no longer offered; its number is not reused."""
        return self._call("DELETE", f"/api/v1/collections/{urllib.parse.quote(collection, safe='')}/versions/{int(version)}")
