"""The Flask application factory: configuration in, app out, one blueprint per resource."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from flask import Flask, g, jsonify, request

from .metrics import Metrics
from .storage import Storage

DEFAULTS = {
    "DATA_DIR": None,  # required: the storage folder
    "ADMIN_TOKEN": None,  # the admin token (or ADMIN_TOKEN_SHA256, its sha256 hex)
    "ADMIN_TOKEN_SHA256": None,
    "MAX_BUNDLE_BYTES": 2 * 1024**3,  # publish size limit
    "PUBLISHER_PUBLIC_KEY": None,  # required: PEM path (or list of paths); every publish is verified
    "KEEP_VERSIONS": None,  # keep the newest N versions of each collection, delete older ones
    "UPLOAD_CHUNK": 1 << 20,
}


def create_app(config: dict | None = None) -> Flask:
    """The edge server app. ``config`` keys: DATA_DIR (folder, created), ADMIN_TOKEN or
    ADMIN_TOKEN_SHA256, MAX_BUNDLE_BYTES, PUBLISHER_PUBLIC_KEY (optional PEM path)."""
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    if not app.config["DATA_DIR"]:
        raise ValueError("DATA_DIR: the server needs a data folder")
    if not app.config["ADMIN_TOKEN_SHA256"]:
        token = app.config["ADMIN_TOKEN"]
        if not token or len(token) < 16:
            raise ValueError("ADMIN_TOKEN: expected a secret of at least 16 characters")
        app.config["ADMIN_TOKEN_SHA256"] = hashlib.sha256(token.encode("utf-8")).hexdigest()
    app.config["ADMIN_TOKEN"] = None  # keep only the hash in memory
    app.config["MAX_CONTENT_LENGTH"] = None  # publish enforces its own limit while streaming
    app.extensions["d2r_storage"] = Storage(Path(app.config["DATA_DIR"]))
    app.extensions["d2r_metrics"] = Metrics()
    keys = app.config["PUBLISHER_PUBLIC_KEY"]
    if isinstance(keys, (str, Path)):
        keys = [keys]
    if not keys:
        # Without a key any signature string would be accepted: refuse to run at all.
        raise ValueError("PUBLISHER_PUBLIC_KEY: the server verifies every publish and needs the publisher's public "
                         "key (d2r serve --public-key KEYFILE.pub, from d2r keygen)")
    from d2r.sync import load_public_key

    app.extensions["d2r_public_keys"] = [load_public_key(k) for k in keys]
    keep = app.config["KEEP_VERSIONS"]
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"KEEP_VERSIONS: expected an integer >= 1 (versions kept per collection), got {keep!r}")

    from .collections import bp as collections_bp
    from .devices import bp as devices_bp
    from .ops import bp as ops_bp

    app.register_blueprint(collections_bp, url_prefix="/api/v1/collections")
    app.register_blueprint(devices_bp, url_prefix="/api/v1/devices")
    app.register_blueprint(ops_bp)

    @app.before_request
    def _start_timer():
        g.t0 = time.perf_counter()

    @app.after_request
    def _count(resp):
        m = app.extensions["d2r_metrics"]
        labels = {"endpoint": request.endpoint or "none", "method": request.method, "status": resp.status_code}
        m.inc("d2r_http_requests_total", labels)
        m.observe("d2r_http_request_seconds", {"endpoint": request.endpoint or "none"}, time.perf_counter() - g.get("t0", time.perf_counter()))
        if resp.content_length:
            m.inc("d2r_http_response_bytes_total", {"endpoint": request.endpoint or "none"}, resp.content_length)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        return resp

    for code, text in ((400, "bad request"), (404, "not found"), (405, "method not allowed"), (413, "too large")):
        app.register_error_handler(code, lambda exc, code=code, text=text: (jsonify(error=getattr(exc, "description", text)), code))
    return app
