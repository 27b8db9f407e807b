"""Operator endpoints: /healthz, /metrics (Prometheus text), /status (HTML page)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, render_template

from .auth import require_admin

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    storage = current_app.extensions["d2r_storage"]
    try:
        with storage.db() as con:
            con.execute("SELECT 1").fetchone()
    except Exception as exc:  # the database is the one thing that can break
        return jsonify(status="error", error=str(exc)), 503
    return jsonify(status="ok")


@bp.get("/metrics")
def metrics():
    storage = current_app.extensions["d2r_storage"]
    latest = [({"collection": c["name"]}, c["latest"] or 0) for c in storage.collections()]
    devices = storage.devices()
    live = sum(1 for d in devices if not d["revoked"])
    gauges = [
        ("d2r_collection_latest_version", "Latest published version per collection", latest),
        ("d2r_devices", "Registered devices by state", [({"state": "active"}, live), ({"state": "revoked"}, len(devices) - live)]),
    ]
    text = current_app.extensions["d2r_metrics"].render(gauges)
    return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")


def _tuf_state(repo) -> dict | None:
    """Versions and expiry of a collection's TUF metadata, for the status page."""
    if not repo.exists():
        return None
    try:
        out = {}
        for role in ("root", "targets", "snapshot"):
            md = repo.load(role).signed
            out[role] = {"version": md.version, "expires": md.expires.isoformat()}
        ts = repo.md.Metadata.from_file(str(repo.metadata / "timestamp.json")).signed
        out["timestamp"] = {"version": ts.version, "expires": ts.expires.isoformat()}
        return out
    except Exception as exc:  # noqa: BLE001 - shown on the page, never a 500 for a status page
        return {"error": str(exc)[:200]}


@bp.get("/status")
@require_admin(basic=True)
def status():
    """Collections, their versions, devices and their last sync. Admin token as Bearer or as
    the password of HTTP Basic auth (what a browser asks for)."""
    storage = current_app.extensions["d2r_storage"]
    collections = storage.collections()
    repos = current_app.extensions["d2r_repos"]
    for c in collections:
        c["versions"] = storage.versions(c["name"])
        c["tuf"] = _tuf_state(repos(c["name"]))
    with storage.db() as con:
        log = [dict(r) for r in con.execute("SELECT * FROM sync_log ORDER BY id DESC LIMIT 20")]
    return render_template("status.html", collections=collections, devices=storage.devices(), log=log)
