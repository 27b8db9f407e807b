"""Tokens: one admin token (from a file) and per-device tokens, stored as sha256 only.

A device token is ``d2rdev_<device id>_<secret>`` with a 256-bit random secret: the id finds
the row, the sha256 of the whole token is compared in constant time. A fast hash is enough
for a random 256-bit secret (nothing to brute-force); no secret is ever stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from functools import wraps

from flask import current_app, g, jsonify, request

from .storage import now

_DUMMY = hashlib.sha256(b"no such device").hexdigest()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_device_token(device_id: str) -> str:
    return f"d2rdev_{device_id}_{secrets.token_urlsafe(32)}"


def presented_token() -> str | None:
    """Bearer token of the request, or the password of HTTP Basic auth (for browsers)."""
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip() or None
    if auth.startswith("Basic "):
        try:
            return base64.b64decode(auth[6:]).decode("utf-8").partition(":")[2] or None
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def is_admin(token: str | None) -> bool:
    expected = current_app.config["ADMIN_TOKEN_SHA256"]
    return token is not None and hmac.compare_digest(token_hash(token), expected)


def device_for(token: str | None) -> dict | None:
    """The live (not revoked) device of a token with its collections, else None."""
    if not token or not token.startswith("d2rdev_"):
        return None
    device_id = token[len("d2rdev_"):].partition("_")[0]
    storage = current_app.extensions["d2r_storage"]
    with storage.db() as con:
        row = con.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        scopes = [r[0] for r in con.execute("SELECT collection FROM device_collections WHERE device_id = ?", (device_id,))]
    stored = row["token_sha256"] if row is not None else _DUMMY
    ok = hmac.compare_digest(token_hash(token), stored)
    if row is None or not ok or row["revoked"]:
        return None
    d = dict(row)
    d["collections"] = scopes
    return d


def _error(status: int, message: str, basic: bool = False):
    resp = jsonify(error=message)
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Basic realm="d2r"' if basic else 'Bearer realm="d2r"'
    return resp


def require_admin(view=None, *, basic: bool = False):
    def deco(fn):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            if not is_admin(presented_token()):
                current_app.extensions["d2r_metrics"].inc("d2r_auth_failures_total", {"kind": "admin"})
                return _error(401, "admin token required", basic)
            g.device = None
            return fn(*args, **kwargs)
        return wrapper
    return deco(view) if view is not None else deco


def require_reader(fn):
    """Admin, or a live device whose scope includes the ``name`` collection of the route."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        token = presented_token()
        if is_admin(token):
            g.device = None
            return fn(*args, **kwargs)
        device = device_for(token)
        if device is None:
            current_app.extensions["d2r_metrics"].inc("d2r_auth_failures_total", {"kind": "device"})
            return _error(401, "a valid device token is required (missing, wrong or revoked)")
        if kwargs.get("name") not in device["collections"]:
            return _error(403, "this device may not read this collection")
        g.device = device
        with current_app.extensions["d2r_storage"].db() as con:
            con.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now(), device["id"]))
        return fn(*args, **kwargs)
    return wrapper
