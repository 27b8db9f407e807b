"""/api/v1/devices: register devices (one token each, scoped to collections), list, revoke."""

from __future__ import annotations

import re
import secrets

from flask import Blueprint, current_app, jsonify, request

from d2r.bundle.tuf import COLLECTION_NAME

from .auth import new_device_token, require_admin, token_hash
from .storage import now

bp = Blueprint("devices", __name__)

MAX_NAME = 128
MAX_SCOPES = 256
# Printable, no control characters (names appear on the status page and in logs), 1-128 of them.
DEVICE_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,%d}" % MAX_NAME)
DEVICE_ID = re.compile(r"[0-9a-f]{16}")


def _error(status, message):
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


@bp.post("")
@require_admin
def add_device():
    """JSON {name, collections: [...]} -> {id, name, collections, token}; the token is shown once."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return _error(400, "expected a JSON object {name, collections: [...]}")
    name = body.get("name", "device")
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        return _error(400, f"name: expected 1-{MAX_NAME} printable characters (no control characters)")
    collections = body.get("collections")
    if (not isinstance(collections, list) or not 1 <= len(collections) <= MAX_SCOPES
            or not all(isinstance(c, str) and COLLECTION_NAME.fullmatch(c) for c in collections)):
        return _error(400, f"collections: expected a list of 1-{MAX_SCOPES} collection names "
                           "(1-64 letters, digits, '.', '_' or '-', starting with a letter or digit)")
    device_id = secrets.token_hex(8)
    token = new_device_token(device_id)
    storage = current_app.extensions["d2r_storage"]
    with storage.transaction() as con:
        con.execute("INSERT INTO devices (id, name, token_sha256, created) VALUES (?, ?, ?, ?)",
                    (device_id, name, token_hash(token), now()))
        con.executemany("INSERT INTO device_collections (device_id, collection) VALUES (?, ?)",
                        [(device_id, c) for c in sorted(set(collections))])
    storage.log("device-added", device_id, None, None, name)
    resp = jsonify(id=device_id, name=name, collections=sorted(set(collections)), token=token)
    resp.status_code = 201
    return resp


@bp.get("")
@require_admin
def list_devices():
    return jsonify(devices=current_app.extensions["d2r_storage"].devices())


@bp.delete("/<device_id>")
@require_admin
def revoke_device(device_id):
    if not DEVICE_ID.fullmatch(device_id):
        return _error(404, f"no active device {device_id[:40]!r}")
    storage = current_app.extensions["d2r_storage"]
    with storage.db() as con:
        n = con.execute("UPDATE devices SET revoked = ? WHERE id = ? AND revoked IS NULL", (now(), device_id)).rowcount
    if not n:
        return _error(404, f"no active device {device_id!r}")
    storage.log("device-revoked", device_id)
    return jsonify(id=device_id, revoked=True)
