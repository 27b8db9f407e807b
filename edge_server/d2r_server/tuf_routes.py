"""/tuf/<collection>/metadata/<file> and /tuf/<collection>/targets/<dir>/<sha256>.<name>: the
collection's TUF repository as static files (what devices read, and what a mirror copies), for
admin and device tokens. timestamp.json is re-signed here when half of its lifetime is gone."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, send_file

from d2r.bundle.tuf import COLLECTION_NAME

from .auth import require_admin, require_reader

bp = Blueprint("tuf", __name__)

METADATA_FILE = re.compile(r"\A(?:[1-9][0-9]{0,18}\.(?:root|targets|snapshot|deltas)|timestamp)\.json\Z")
TARGET_FILE = re.compile(r"\A(?:bundles|deltas)/[0-9a-f]{64}\.[1-9][0-9]{0,18}(?:-[1-9][0-9]{0,18})?\.tar\Z")


def _not_found(what):
    resp = jsonify(error=f"{what}: not found")
    resp.status_code = 404
    return resp


@bp.get("/<name>/metadata/<file>")
@require_reader
def metadata(name, file):
    if not METADATA_FILE.match(file) or not COLLECTION_NAME.fullmatch(name):
        return _not_found(file[:80])
    repo = current_app.extensions["d2r_repos"](name)
    if file == "timestamp.json" and repo.exists() and repo.needs_refresh():
        storage = current_app.extensions["d2r_storage"]
        with storage.publish_lock:  # (checked again under the lock: another request may have done it)
            repo.refresh_if_needed()
    path = repo.metadata / file
    if not path.is_file():
        return _not_found(file)
    resp = send_file(path, mimetype="application/json", conditional=False, etag=False, max_age=0)
    resp.headers["Cache-Control"] = "no-cache" if file == "timestamp.json" else "private, max-age=31536000, immutable"
    return resp


@bp.route("/<name>/targets/<path:file>", methods=["GET", "HEAD"])
@require_reader
def target(name, file):
    """A target file (Range, ETag = its sha256): bundles and deltas."""
    if not TARGET_FILE.match(file) or not COLLECTION_NAME.fullmatch(name):
        return _not_found(file[:80])
    repo = current_app.extensions["d2r_repos"](name)
    path = repo.targets_dir / file
    if not path.is_file():
        return _not_found(file)
    sha = file.split("/")[1].split(".", 1)[0]
    resp = send_file(path, mimetype="application/x-tar", conditional=True, etag=sha, max_age=31536000, last_modified=None)
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    return resp


online_bp = Blueprint("tuf_keys", __name__)


@online_bp.get("/online-key")
@require_admin
def online_key():
    """The server's online public key (TUF key dict), for the snapshot, timestamp and deltas roles
    of a collection's root (d2r collection create puts it there)."""
    key = current_app.extensions["d2r_online_signer"].public_key
    return jsonify(keyid=key.keyid, key=key.to_dict())
