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
    "KEEP_VERSIONS": None,  # at most N versions per collection in the signed targets (d2r publish --keep N)
    # Lifetimes (seconds) of the metadata the server signs with its online key.
    "TIMESTAMP_EXPIRY": 86400,
    "SNAPSHOT_EXPIRY": 7 * 86400,
    "DELTAS_EXPIRY": 7 * 86400,
    "UPLOAD_CHUNK": 1 << 20,
}


def create_app(config: dict | None = None) -> Flask:
    """The edge server app. ``config`` keys: DATA_DIR (folder, created), ADMIN_TOKEN or
    ADMIN_TOKEN_SHA256, MAX_BUNDLE_BYTES, KEEP_VERSIONS, TIMESTAMP_EXPIRY, SNAPSHOT_EXPIRY,
    DELTAS_EXPIRY (seconds). Publisher keys are per collection, in its TUF root."""
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
    if app.config.get("PUBLISHER_PUBLIC_KEY"):
        raise ValueError("PUBLISHER_PUBLIC_KEY: gone with issue 16; each collection's TUF root names its keys "
                         "(d2r collection create), and every publish is verified against them")
    from d2r.bundle.tuf import COLLECTION_NAME

    from .repository import CollectionRepository, load_online_signer

    storage = app.extensions["d2r_storage"]
    signer = load_online_signer(storage.root / "keys")
    app.extensions["d2r_online_signer"] = signer
    expiries = {k: float(app.config[k]) for k in ("TIMESTAMP_EXPIRY", "SNAPSHOT_EXPIRY", "DELTAS_EXPIRY")}
    if min(expiries.values()) <= 0:
        raise ValueError(f"metadata lifetimes must be positive seconds, got {expiries}")

    def repos(name: str) -> CollectionRepository:
        if not COLLECTION_NAME.fullmatch(name):
            raise ValueError(f"not a collection name: {name!r}")
        return CollectionRepository(storage.root / "repo" / name, signer, expiries["TIMESTAMP_EXPIRY"],
                                    expiries["SNAPSHOT_EXPIRY"], expiries["DELTAS_EXPIRY"])

    app.extensions["d2r_repos"] = repos
    keep = app.config["KEEP_VERSIONS"]
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"KEEP_VERSIONS: expected an integer >= 1 (versions kept per collection), got {keep!r}")

    from .collections import bp as collections_bp
    from .devices import bp as devices_bp
    from .ops import bp as ops_bp
    from .tuf_routes import bp as tuf_bp
    from .tuf_routes import online_bp

    app.register_blueprint(collections_bp, url_prefix="/api/v1/collections")
    app.register_blueprint(devices_bp, url_prefix="/api/v1/devices")
    app.register_blueprint(ops_bp)
    app.register_blueprint(tuf_bp, url_prefix="/tuf")
    app.register_blueprint(online_bp, url_prefix="/api/v1/tuf")

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

    # json.loads raises RecursionError (not ValueError) for deeply nested input: a 400, not a 500.
    app.register_error_handler(RecursionError, lambda exc: (jsonify(error="JSON nested too deeply"), 400))
    for code, text in ((400, "bad request"), (404, "not found"), (405, "method not allowed"), (413, "too large")):
        app.register_error_handler(code, lambda exc, code=code, text=text: (jsonify(error=getattr(exc, "description", text)), code))
    return app
