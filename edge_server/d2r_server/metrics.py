"""Counters for ``/metrics`` in the Prometheus text exposition format (no client library)."""

from __future__ import annotations

import threading

HELP = {
    "d2r_http_requests_total": ("counter", "HTTP requests by endpoint, method and status"),
    "d2r_http_request_seconds": ("summary", "HTTP request handling time (until the response starts)"),
    "d2r_http_response_bytes_total": ("counter", "Bytes announced in Content-Length of responses, by endpoint"),
    "d2r_publish_total": ("counter", "Publish attempts by result"),
    "d2r_delta_builds_total": ("counter", "Deltas computed by result"),
    "d2r_auth_failures_total": ("counter", "Requests refused for a missing, wrong or revoked token"),
    "d2r_sync_reports_total": ("counter", "Syncs reported applied by devices, by method"),
    "d2r_versions_deleted_total": ("counter", "Versions deleted by the admin"),
}


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    parts = []
    for k, v in sorted(labels.items()):
        v = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{v}"')
    return "{" + ",".join(parts) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict = {}

    def inc(self, name: str, labels: dict | None = None, value: float = 1.0) -> None:
        key = (name, _labels(labels or {}))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def observe(self, name: str, labels: dict, seconds: float) -> None:
        self.inc(name + "_sum", labels, seconds)
        self.inc(name + "_count", labels, 1)

    def render(self, gauges: list) -> str:
        """Text format; ``gauges`` adds (name, help, [(labels, value)]) computed at scrape time."""
        with self._lock:
            values = dict(self._values)
        lines = []
        by_family: dict = {}
        for (name, labels), v in values.items():
            family = name[:-4] if name.endswith("_sum") else name[:-6] if name.endswith("_count") else name
            by_family.setdefault(family, []).append((name, labels, v))
        for family in sorted(set(by_family) | set(HELP)):
            kind, text = HELP.get(family, ("untyped", family))
            lines.append(f"# HELP {family} {text}")
            lines.append(f"# TYPE {family} {kind}")
            for name, labels, v in sorted(by_family.get(family, [])):
                lines.append(f"{name}{labels} {v:g}")
        for name, text, samples in gauges:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} gauge")
            for labels, v in samples:
                lines.append(f"{name}{_labels(labels)} {v:g}")
        return "\n".join(lines) + "\n"
