"""/api/v1/collections: create a collection (its TUF root), rotate its root, publish and delete
versions (with the publisher's signed TUF targets), latest, history, download (Range/ETag),
sync reports. The TUF repository itself (metadata and targets, what devices read) is served by
:mod:`d2r_server.tuf_routes` under /tuf/<collection>/."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import shutil

from flask import Blueprint, abort, current_app, g, jsonify, request, send_file, url_for

from d2r.bundle.archive import ARCHIVE_MEDIA_TYPE, unpack_bundle
from d2r.bundle.delta import make_delta
from d2r.bundle.folder import MAX_VERSION, is_version
from d2r.bundle.tuf import COLLECTION_NAME, DELTA_TARGET, delta_target
from d2r.errors import D2RError

from .auth import require_admin, require_reader
from .repository import RepositoryError
from .storage import now

bp = Blueprint("collections", __name__)

# Version numbers in URLs: 1 .. 2**63 - 1 (SQLite INTEGER); anything else is a 404 from routing.
V = f"int(min=1, max={MAX_VERSION})"
TARGETS_HEADER = "X-D2R-Targets"
MAX_TARGETS_HEADER = 48 * 1024  # base64 of the signed targets metadata, within waitress's 64 KiB of headers
SYNC_METHODS = ("full", "delta", "none", "stale")
DELTA_SOURCES = 3  # at publish, deltas are built from the 3 newest older versions to the new one


def _storage():
    return current_app.extensions["d2r_storage"]


def _metrics():
    return current_app.extensions["d2r_metrics"]


def _repo(name):
    return current_app.extensions["d2r_repos"](name)


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
        "n_images": row["n_images"],
        "created": row["created"],
        "download": url_for("collections.download", name=row["collection"], version=row["version"]),
        "target": f"bundles/{row['version']}.tar",
    }


def _error(status: int, message: str):
    resp = jsonify(error=message)
    resp.status_code = status
    return resp


def _targets_header() -> bytes | None:
    raw = request.headers.get(TARGETS_HEADER, "").strip()
    if not raw:
        return None
    if len(raw) > MAX_TARGETS_HEADER:
        raise RepositoryError(f"{TARGETS_HEADER}: over {MAX_TARGETS_HEADER} characters (keep fewer versions: --keep)")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise RepositoryError(f"{TARGETS_HEADER}: not base64") from None


def _json_body(*keys) -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not all(isinstance(body.get(k), dict) for k in keys):
        raise RepositoryError(f"expected a JSON object with {', '.join(keys)} (TUF metadata objects)")
    return body


@bp.errorhandler(RepositoryError)
def _repository_error(exc):
    _metrics().inc("d2r_publish_total", {"result": "refused"})
    return _error(exc.status, str(exc))


@bp.get("")
@require_admin
def list_collections():
    return jsonify(collections=_storage().collections())


@bp.put("/<name>")
@require_admin
def create_collection(name):
    """JSON {root, targets}: the collection's first TUF root (signed by its root keys, with this
    server's online key for snapshot and timestamp) and empty targets (signed by its targets key)."""
    _check_name(name)
    body = _json_body("root", "targets")
    storage = _storage()
    with storage.publish_lock:
        _repo(name).create(json.dumps(body["root"]).encode(), json.dumps(body["targets"]).encode())
        with storage.db() as con:
            con.execute("INSERT OR IGNORE INTO collections (name, created) VALUES (?, ?)", (name, now()))
    storage.log("collection-created", None, name, None, None)
    resp = jsonify(collection=name, root_version=1)
    resp.status_code = 201
    return resp


@bp.put("/<name>/root")
@require_admin
def rotate_root(name):
    """JSON {root[, targets]}: the next root version (signed by the old and the new root keys);
    with new targets keys, also the current targets re-signed with them."""
    _check_name(name)
    body = _json_body("root")
    targets = body.get("targets")
    if targets is not None and not isinstance(targets, dict):
        raise RepositoryError("targets: expected a TUF metadata object")
    with _storage().publish_lock:
        version = _repo(name).rotate_root(json.dumps(body["root"]).encode(),
                                          json.dumps(targets).encode() if targets is not None else None)
    _storage().log("root-rotated", None, name, version, None)
    return jsonify(collection=name, root_version=version)


@bp.get("/<name>/tuf-targets")
@require_admin
def current_targets(name):
    """The targets metadata in force (the publisher signs the next version from it)."""
    _check_name(name)
    repo = _repo(name)
    md = repo.targets_md()
    return current_app.response_class(md.to_bytes(), mimetype="application/json")


def _build_deltas(name, repo, infos: dict, new_version: int | None) -> dict:
    """Deltas of the new repository state: the existing ones whose versions are still listed,
    plus (on publish) one from each of the DELTA_SOURCES newest older versions."""
    storage, metrics = _storage(), _metrics()
    deltas = {}
    for path, t in repo.current_deltas().items():
        m = DELTA_TARGET.match(path)
        if m and int(m.group(1)) in infos and int(m.group(2)) in infos:
            deltas[path] = t
    if new_version is None:
        return deltas
    from tuf.api.metadata import TargetFile

    new = storage.version(name, new_version)
    for old_version in sorted((v for v in infos if v < new_version), reverse=True)[:DELTA_SOURCES]:
        old = storage.version(name, old_version)
        if old is None:
            continue
        work = storage.temp_path("delta-work")
        out = storage.temp_path("delta")
        try:
            work.mkdir()
            unpack_bundle(storage.blob_path(old["archive_sha256"]), work / "old")
            unpack_bundle(storage.blob_path(new["archive_sha256"]), work / "new")
            stats = make_delta(work / "old", work / "new", out, work / "replay")
            metrics.inc("d2r_delta_builds_total", {"result": "ok" if stats else "none"})
            sha = size = None
            if stats is not None:
                h = hashlib.sha256()
                with open(out, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                sha, size = h.hexdigest(), out.stat().st_size
            with storage.blob_lock:  # blob, link and row together: garbage collection sees all or none
                if stats is not None:
                    blob = storage.add_blob(out, sha)
                    path = delta_target(old_version, new_version)
                    repo.link_target(path, sha, blob)
                    deltas[path] = TargetFile(size, {"sha256": sha}, path)
                with storage.db() as con:
                    con.execute("INSERT OR REPLACE INTO deltas VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (name, old_version, new_version, sha, size, (stats or {}).get("n_added"),
                                 (stats or {}).get("n_removed"), now()))
        except (D2RError, OSError) as exc:  # a delta is an optimisation: log, devices take the full bundle
            storage.log("delta-failed", None, name, new_version, f"from {old_version}: {exc}"[:500])
        finally:
            out.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
    return deltas


def _apply_removals(name, repo, removed: list, reason: str) -> None:
    storage = _storage()
    for v in removed:
        storage.delete_version(name, v, reason)
        storage.log("deleted", None, name, v, reason)
    live = set()
    with storage.db() as con:
        live |= {r[0] for r in con.execute("SELECT archive_sha256 FROM versions WHERE collection = ?", (name,))}
        live |= {r[0] for r in con.execute("SELECT sha256 FROM deltas WHERE collection = ? AND sha256 IS NOT NULL", (name,))}
    repo.unlink_targets(live)


@bp.post("/<name>/versions")
@require_admin
def publish(name):
    """Body: the bundle archive (application/x-tar), streamed to disk with a size limit.
    Header X-D2R-Targets: base64 of the collection's next TUF targets metadata, signed by its
    targets key, listing this archive as bundles/N.tar (d2r publish makes it)."""
    _check_name(name)
    storage, metrics = _storage(), _metrics()
    limit = int(current_app.config["MAX_BUNDLE_BYTES"])
    targets_raw = _targets_header()
    if targets_raw is None:
        metrics.inc("d2r_publish_total", {"result": "unsigned"})
        return _error(400, f"{TARGETS_HEADER} header required: the collection's signed TUF targets metadata (d2r publish "
                           "--signing-key TARGETS.key makes it)")
    repo = _repo(name)  # a collection without a TUF root: 409 from check_targets, after the size checks
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
            return _error(400, f"not a valid bundle archive: {exc}".replace(str(upload), "upload").replace(str(unpacked), "bundle"))
        shutil.rmtree(unpacked, ignore_errors=True)
        version = info["version"]
        if not is_version(version):  # checked by unpack_bundle already; never trust one layer
            return _error(400, f"bundle.json 'version' must be an integer from 1 to {MAX_VERSION}")
        keep = current_app.config.get("KEEP_VERSIONS")
        with storage.publish_lock:
            deleted = storage.deleted_versions(name)
            md, infos, new_version, removed = repo.check_targets(
                targets_raw, {"sha256": sha, "length": size, "version": version, "checksum": info["checksum"]}, keep, deleted)
            latest = storage.version(name)
            if latest is not None and version <= latest["version"]:
                metrics.inc("d2r_publish_total", {"result": "conflict"})
                return _error(409, f"version {version} is not newer than the latest version {latest['version']} of {name!r}")
            with storage.blob_lock:
                blob = storage.add_blob(upload, sha)
                repo.link_target(f"bundles/{version}.tar", sha, blob)
                with storage.transaction() as con:
                    con.execute("INSERT OR IGNORE INTO collections (name, created) VALUES (?, ?)", (name, now()))
                    con.execute(
                        "INSERT INTO versions (collection, version, archive_sha256, archive_size, bundle_checksum, signature, "
                        "n_images, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, version, sha, size, info["checksum"], f"tuf targets v{md.signed.version}", info.get("n_images"),
                         now()))
            storage.log("publish", None, name, version, json.dumps({"sha256": sha, "size": size}))
            repo.install_targets(targets_raw, md)
            deltas = _build_deltas(name, repo, infos, new_version)
            repo.write_online(deltas)
            _apply_removals(name, repo, removed, "removed from the signed targets")
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
    """Yank a version. Header X-D2R-Targets: the next targets metadata without it, signed by the
    collection's targets key (d2r version delete makes it). It is no longer offered (latest falls
    back to the one before), its archive and deltas are deleted, its number is never reused."""
    _check_name(name)
    storage = _storage()
    if storage.version(name, version) is None:
        return _error(404, f"collection {name!r} has no version {version}")
    targets_raw = _targets_header()
    if targets_raw is None:
        return _error(400, f"{TARGETS_HEADER} header required: the collection's next TUF targets metadata without version "
                           f"{version}, signed by its targets key (d2r version delete --signing-key makes it)")
    repo = _repo(name)
    with storage.publish_lock:
        md, infos, _, removed = repo.check_targets(targets_raw, None, None, set())
        if version not in removed:
            return _error(400, f"{TARGETS_HEADER}: the signed targets still list version {version}")
        repo.install_targets(targets_raw, md)
        repo.write_online(_build_deltas(name, repo, infos, None))
        _apply_removals(name, repo, removed, "deleted by the admin")
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


@bp.post("/<name>/sync-report")
@require_reader
def sync_report(name):
    """A device reports the version it has active: after a swap, or ("stale") when its TUF
    metadata has expired and it keeps serving that version, with how stale it is."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not is_version(body.get("version")):
        return _error(400, f"expected JSON {{version: integer 1..{MAX_VERSION}, method: {'|'.join(SYNC_METHODS)}, "
                           "bytes: integer >= 0, stale_seconds: integer >= 0 (method stale)}}")
    version = body["version"]
    method = body.get("method", "full")
    n_bytes = body.get("bytes", 0)
    stale = body.get("stale_seconds")
    if method not in SYNC_METHODS:
        return _error(400, f"method: expected one of {', '.join(SYNC_METHODS)}")
    for field, value in (("bytes", n_bytes), ("stale_seconds", stale if stale is not None else 0)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VERSION:
            return _error(400, f"{field}: expected an integer from 0 to {MAX_VERSION}")
    device_id = g.device["id"] if g.device else None
    storage = _storage()
    if device_id:
        with storage.db() as con:
            if method == "stale":
                con.execute("UPDATE devices SET last_collection = ?, last_version = ?, stale_seconds = ?, stale_reported = ? "
                            "WHERE id = ?", (name, version, stale, now(), device_id))
            else:
                con.execute("UPDATE devices SET last_sync = ?, last_collection = ?, last_version = ?, last_method = ?, "
                            "stale_seconds = NULL, stale_reported = NULL WHERE id = ?", (now(), name, version, method, device_id))
    detail = {"method": method, "bytes": n_bytes}
    if method == "stale":
        detail["stale_seconds"] = stale
    storage.log("stale" if method == "stale" else "applied", device_id, name, version, json.dumps(detail))
    _metrics().inc("d2r_sync_reports_total", {"method": method})
    return jsonify(ok=True)
