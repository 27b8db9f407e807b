"""waitress settings shared by ``d2r serve`` and the test server: limits and timeouts that keep
the server answering when strangers on the network open many idle or half-open connections.

waitress's defaults (100 connections, 120 s before an idle one is closed) let 101 half-open
connections (a request line without its final CRLF) block every other client for two minutes.
Here: up to ``connection_limit`` (default 1000, lowered to fit the open-file limit) connections,
each closed after ``idle_timeout`` seconds (default 20) without a byte in either direction,
checked every ``cleanup_interval`` seconds; ``poll()`` instead of ``select()`` (which cannot
watch file descriptors above 1023); request headers limited to 64 KiB. A waiting connection
costs a socket and a few KiB, not a worker thread: waitress hands a request to a thread only
once it has been read whole. More than that (per-address limits, rate limiting) is the job of a
reverse proxy or firewall in front (docs/sync-protocol.md).
"""

from __future__ import annotations

import sys

DEFAULT_CONNECTION_LIMIT = 1000
DEFAULT_IDLE_TIMEOUT = 20
MAX_HEADER_BYTES = 64 * 1024


def _open_file_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (up to the hard limit); return it."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def waitress_options(max_body_bytes: int, threads: int = 16, connection_limit: int = DEFAULT_CONNECTION_LIMIT,
                     idle_timeout: float = DEFAULT_IDLE_TIMEOUT, warn=None) -> dict:
    """Keyword arguments for ``waitress.serve`` / ``waitress.create_server``."""
    if connection_limit < 1 or idle_timeout <= 0 or threads < 1:
        raise ValueError("connection_limit, idle_timeout and threads must be positive")
    # Each connection needs one descriptor; keep 64 for the database, blobs and listeners.
    files = _open_file_limit(connection_limit + 64)
    limit = max(1, min(connection_limit, files - 64))
    if limit < connection_limit:
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"d2r serve: warning: open-file limit {files}: at most {limit} connections (ulimit -n)")
    return {
        "threads": int(threads),
        "ident": "d2r",
        "connection_limit": int(limit),
        "channel_timeout": int(max(1, round(idle_timeout))),
        "cleanup_interval": int(max(1, min(10, round(idle_timeout / 2)))),
        "asyncore_use_poll": True,
        "backlog": 1024,
        "max_request_header_size": MAX_HEADER_BYTES,
        # waitress refuses bodies over this itself (413) before the app sees them.
        "max_request_body_size": int(max_body_bytes) + (1 << 20),
    }
