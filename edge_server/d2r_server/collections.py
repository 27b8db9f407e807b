"""/api/v1/collections: publish, latest, history, download (Range/ETag), delta, sync reports."""

from __future__ import annotations

import hashlib
import json
import shutil

from flask import Blueprint, abort, current_app, g, jsonify, request, send_file, url_for

from d2r.errors import D2RError
from d2r.sync import (
    ARCHIVE_MEDIA_TYPE, COLLECTION_NAME, MAX_VERSION, SignatureError, is_version, unpack_bundle, verify_signature,
)

from .auth import require_admin, require_reader
from .delta import make_delta
from .storage import now

bp = Blueprint("collections", __name__)

# Version numbers in URLs: 1 .. 2**63 - 1 (SQLite INTEGER); anything else is a 404 from routing.
V = f"int(min=1, max={MAX_VERSION})"
MAX_SIGNATURE_CHARS = 256
SYNC_METHODS = ("full", "delta", "none")


def _storage():
    return current_app.extensions["d2r_storage"]


def _metrics():
    return current_app.extensions["d2r_metrics"]


def _check_name(name: str) -> None:
    if not COLLECTION_NAME.fullmatch(name):
        abort(400, description="collection names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")


def _record(row: dict) -> dict:
    return {
        "collection": row["collection"],
        "version": row["version"],
        "archive_sha256": row["archive_sha256"],
        "archive_size": row["archive_size"],
        "bundle_checksum": row["bundle_checksum"],
        "signature": row["signature"],
        "n_images": row["n_images"],
        "created": row["created"],
        "download": url_for("collections.download", name=row["collection"], version=row["version"]),
    }


def _error(status: int, message: str):
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


@bp.get("")
@require_admin
def list_collections():
    return jsonify(collections=_storage().collections())


@bp.post("/<name>/versions")
@require_admin
def publish(name):
    """Body: the bundle archive (application/x-tar), streamed to disk with a size limit.
    Header X-D2R-Signature: base64 Ed25519 signature of the bundle (d2r.sync.signed_message)."""
    _check_name(name)
    storage, metrics = _storage(), _metrics()
    limit = int(current_app.config["MAX_BUNDLE_BYTES"])
    signature = request.headers.get("X-D2R-Signature", "").strip()
    if not signature:
        metrics.inc("d2r_publish_total", {"result": "unsigned"})
        return _error(400, "X-D2R-Signature header required: bundles are signed by the publisher (d2r publish --signing-key)")
    if len(signature) > MAX_SIGNATURE_CHARS:
        metrics.inc("d2r_publish_total", {"result": "bad_signature"})
        return _error(400, f"X-D2R-Signature: over {MAX_SIGNATURE_CHARS} characters (an Ed25519 signature is 88)")
    if request.content_length is not None and request.content_length > limit:
        metrics.inc("d2r_publish_total", {"result": "too_large"})
        return _error(413, f"bundle of {request.content_length} bytes exceeds the limit of {limit} bytes")
    upload = storage.temp_path("upload")
    unpacked = storage.temp_path("unpack")
    try:
        h = hashlib.sha256()
        size = 0
        chunk = int(current_app.config["UPLOAD_CHUNK"])
        with open(upload, "wb") as fh:
            while True:
                data = request.stream.read(chunk)
                if not data:
                    break
                size += len(data)
                if size > limit:
                    metrics.inc("d2r_publish_total", {"result": "too_large"})
                    return _error(413, f"bundle exceeds the limit of {limit} bytes")
                h.update(data)
                fh.write(data)
        if request.content_length is not None and size != request.content_length:
            return _error(400, f"upload ended after {size} of {request.content_length} bytes")
        sha = h.hexdigest()
        try:
            info = unpack_bundle(upload, unpacked)
        except (D2RError, OSError) as exc:
            metrics.inc("d2r_publish_total", {"result": "invalid"})
            return _error(400, f"not a valid bundle archive: {exc}".replace(str(upload), "upload"))
        # Always verified: the server does not start without publisher keys (app.create_app).
        for key in current_app.extensions["d2r_public_keys"]:
            try:
                verify_signature(key, name, info["checksum"], signature)
                break
            except SignatureError:
                continue
        else:
            metrics.inc("d2r_publish_total", {"result": "bad_signature"})
            return _error(400, "X-D2R-Signature: the signature does not verify with the server's publisher key(s)")
        version = info["version"]
        if not is_version(version):  # checked by unpack_bundle already; never trust one layer
            return _error(400, f"bundle.json 'version' must be an integer from 1 to {MAX_VERSION}")
        with storage.publish_lock:
            latest = storage.version(name)
            if latest is not None and version <= latest["version"]:
                metrics.inc("d2r_publish_total", {"result": "conflict"})
                return _error(409, f"version {version} is not newer than the latest version {latest['version']} of {name!r}")
            if storage.is_deleted(name, version):
                metrics.inc("d2r_publish_total", {"result": "conflict"})
                return _error(409, f"version {version} of {name!r} was deleted; publish it under a new version number")
            with storage.blob_lock:
                storage.add_blob(upload, sha)
                with storage.transaction() as con:
                    con.execute("INSERT OR IGNORE INTO collections (name, created) VALUES (?, ?)", (name, now()))
                    con.execute(
                        "INSERT INTO versions (collection, version, archive_sha256, archive_size, bundle_checksum, signature, "
                        "n_images, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, version, sha, size, info["checksum"], signature, info.get("n_images"), now()))
            storage.log("publish", None, name, version, json.dumps({"sha256": sha, "size": size}))
            keep = current_app.config.get("KEEP_VERSIONS")
            if keep:
                for old in storage.keep_latest(name, int(keep)):
                    storage.log("deleted", None, name, old, f"garbage-collected (keep {keep})")
        metrics.inc("d2r_publish_total", {"result": "ok"})
        resp = jsonify(_record(storage.version(name, version)))
        resp.status_code = 201
        return resp
    finally:
        upload.unlink(missing_ok=True)
        shutil.rmtree(unpacked, ignore_errors=True)


@bp.delete(f"/<name>/versions/<{V}:version>")
@require_admin
def delete_version(name, version):
    """Yank a version: it is no longer offered (latest falls back to the one before), its
    archive and deltas are deleted, and its number is never accepted again."""
    _check_name(name)
    storage = _storage()
    with storage.publish_lock:
        row = storage.delete_version(name, version, "deleted by the admin")
    if row is None:
        return _error(404, f"collection {name!r} has no version {version}")
    storage.log("deleted", None, name, version, "deleted by the admin")
    _metrics().inc("d2r_versions_deleted_total", {})
    latest = storage.version(name)
    return jsonify(collection=name, deleted=version, latest=latest["version"] if latest else None)


@bp.get("/<name>/latest")
@require_reader
def latest(name):
    row = _storage().version(name)
    if row is None:
        return _error(404, f"collection {name!r} has no published version")
    return jsonify(_record(row))


@bp.get("/<name>/versions")
@require_reader
def history(name):
    return jsonify(collection=name, versions=[_record(r) for r in _storage().versions(name)])


@bp.get(f"/<name>/versions/<{V}:version>")
@require_reader
def version_info(name, version):
    row = _storage().version(name, version)
    if row is None:
        return _error(404, f"collection {name!r} has no version {version}")
    return jsonify(_record(row))


def _send_blob(sha: str, size: int):
    resp = send_file(_storage().blob_path(sha), mimetype=ARCHIVE_MEDIA_TYPE, conditional=True, etag=sha,
                     max_age=31536000, last_modified=None)
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"  # content-addressed
    return resp


@bp.route(f"/<name>/versions/<{V}:version>/bundle", methods=["GET", "HEAD"])
@require_reader
def download(name, version):
    """The bundle archive; HTTP Range (resume), ETag = sha256 of the archive, If-None-Match."""
    row = _storage().version(name, version)
    if row is None:
        return _error(404, f"collection {name!r} has no version {version}")
    if request.method == "GET" and "Range" not in request.headers:
        _storage().log("download", g.device["id"] if g.device else None, name, version, "full")
    return _send_blob(row["archive_sha256"], row["archive_size"])


@bp.route(f"/<name>/delta/<{V}:from_version>/<{V}:to_version>", methods=["GET", "HEAD"])
@require_reader
def delta(name, from_version, to_version):
    """Delta archive from one version to a later one; 404 when none reproduces the new version
    (the device then downloads the full bundle)."""
    storage, metrics = _storage(), _metrics()
    if from_version >= to_version:
        return _error(400, "a delta goes from an older version to a newer one")
    old, new = storage.version(name, from_version), storage.version(name, to_version)
    if old is None or new is None:
        return _error(404, f"collection {name!r} lacks version {from_version if old is None else to_version}")
    key = (name, from_version, to_version)
    with storage.delta_lock(key):
        with storage.db() as con:
            row = con.execute("SELECT * FROM deltas WHERE collection = ? AND from_version = ? AND to_version = ?", key).fetchone()
        if row is None:
            out = storage.temp_path("delta")
            work = storage.temp_path("delta-work")
            try:
                # Each version is stored once (its archive): unpack the two this delta needs.
                work.mkdir()
                try:
                    unpack_bundle(storage.blob_path(old["archive_sha256"]), work / "old")
                    unpack_bundle(storage.blob_path(new["archive_sha256"]), work / "new")
                except (D2RError, OSError):  # deleted meanwhile, or the store is damaged
                    return _error(404, f"no delta from version {from_version} to {to_version}; download the full bundle")
                stats = make_delta(work / "old", work / "new", out, work / "replay")
                sha = size = None
                with storage.blob_lock:
                    if stats is not None:
                        h = hashlib.sha256()
                        with open(out, "rb") as fh:
                            for chunk in iter(lambda: fh.read(1 << 20), b""):
                                h.update(chunk)
                        sha, size = h.hexdigest(), out.stat().st_size
                        storage.add_blob(out, sha)
                    metrics.inc("d2r_delta_builds_total", {"result": "ok" if stats else "none"})
                    with storage.transaction() as con:
                        both = con.execute("SELECT COUNT(*) FROM versions WHERE collection = ? AND version IN (?, ?)",
                                           (name, from_version, to_version)).fetchone()[0]
                        if both != 2:  # one of them was deleted while the delta was built
                            return _error(404, f"collection {name!r} lacks version {from_version} or {to_version}")
                        con.execute("INSERT INTO deltas VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (*key, sha, size, (stats or {}).get("n_added"), (stats or {}).get("n_removed"), now()))
                        row = con.execute("SELECT * FROM deltas WHERE collection = ? AND from_version = ? AND to_version = ?",
                                          key).fetchone()
            finally:
                out.unlink(missing_ok=True)
                shutil.rmtree(work, ignore_errors=True)
    if row["sha256"] is None:
        return _error(404, f"no delta from version {from_version} to {to_version}; download the full bundle")
    if request.method == "GET" and "Range" not in request.headers:
        storage.log("download", g.device["id"] if g.device else None, name, to_version, f"delta from {from_version}")
    resp = _send_blob(row["sha256"], row["size"])
    resp.headers["X-D2R-Delta-Added"] = str(row["n_added"])
    resp.headers["X-D2R-Delta-Removed"] = str(row["n_removed"])
    return resp


@bp.post("/<name>/sync-report")
@require_reader
def sync_report(name):
    """A device reports the version it has just made active."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not is_version(body.get("version")):
        return _error(400, f"expected JSON {{version: integer 1..{MAX_VERSION}, method: {'|'.join(SYNC_METHODS)}, bytes: integer >= 0}}")
    version = body["version"]
    method = body.get("method", "full")
    n_bytes = body.get("bytes", 0)
    if method not in SYNC_METHODS:
        return _error(400, f"method: expected one of {', '.join(SYNC_METHODS)}")
    if not isinstance(n_bytes, int) or isinstance(n_bytes, bool) or not 0 <= n_bytes <= MAX_VERSION:
        return _error(400, f"bytes: expected an integer from 0 to {MAX_VERSION}")
    device_id = g.device["id"] if g.device else None
    storage = _storage()
    if device_id:
        with storage.db() as con:
            con.execute("UPDATE devices SET last_sync = ?, last_collection = ?, last_version = ?, last_method = ? WHERE id = ?",
                        (now(), name, version, method, device_id))
    storage.log("applied", device_id, name, version, json.dumps({"method": method, "bytes": n_bytes}))
    _metrics().inc("d2r_sync_reports_total", {"method": method})
    return jsonify(ok=True)
