"""/api/v1/devices: register devices (one token each, scoped to collections), list, revoke."""

from __future__ import annotations

import secrets

from flask import Blueprint, current_app, jsonify, request

from d2r.sync import COLLECTION_NAME

from .auth import new_device_token, require_admin, token_hash
from .storage import now

bp = Blueprint("devices", __name__)


def _error(status, message):
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


@bp.post("")
@require_admin
def add_device():
    """JSON {name, collections: [...]} -> {id, name, collections, token}; the token is shown once."""
    body = request.get_json(silent=True) or {}
    name = str(body.get("name") or "device")[:128]
    collections = body.get("collections")
    if not isinstance(collections, list) or not collections or not all(isinstance(c, str) and COLLECTION_NAME.match(c) for c in collections):
        return _error(400, "collections: expected a non-empty list of collection names")
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
    storage = current_app.extensions["d2r_storage"]
    with storage.db() as con:
        n = con.execute("UPDATE devices SET revoked = ? WHERE id = ? AND revoked IS NULL", (now(), device_id)).rowcount
    if not n:
        return _error(404, f"no active device {device_id!r}")
    storage.log("device-revoked", device_id)
    return jsonify(id=device_id, revoked=True)
