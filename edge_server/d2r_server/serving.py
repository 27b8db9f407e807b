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


class TLSFront:
    """HTTPS for ``d2r serve --tls-cert/--tls-key``: an asyncio TLS listener on ``host:port``
    that forwards each connection's bytes to waitress on 127.0.0.1:``upstream_port`` (waitress
    speaks no TLS). It keeps its own limits: at most ``connection_limit`` connections, the TLS
    handshake within ``handshake_timeout`` seconds, and a connection idle for ``idle_timeout``
    seconds after a response (or before its first request) is closed; one idle in the middle of
    a request is left to waitress's own timeout, which knows whether a request is being handled."""

    def __init__(self, host: str, port: int, cert, key, upstream_port: int, connection_limit: int = DEFAULT_CONNECTION_LIMIT,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, handshake_timeout: float = 10.0):
        import ssl

        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self.context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            from d2r.errors import InputError

            raise InputError(f"{cert} / {key}: cannot load the TLS certificate chain and its private key ({exc})") from None
        self.host, self.port, self.upstream_port = host, int(port), int(upstream_port)
        self.limit, self.idle, self.handshake = int(connection_limit), float(idle_timeout), float(handshake_timeout)
        self.active = 0

    async def _pipe(self, reader, writer, state, direction):
        import time

        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                state["t"] = time.monotonic()
                state["last"] = direction
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass

    async def _handle(self, reader, writer):
        import asyncio
        import time

        if self.active >= self.limit:
            writer.close()
            return
        self.active += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                writer.close()
                return
            state = {"t": time.monotonic(), "last": "down"}
            tasks = [asyncio.ensure_future(self._pipe(reader, up_writer, state, "up")),
                     asyncio.ensure_future(self._pipe(up_reader, writer, state, "down"))]
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=1.0, return_when=asyncio.ALL_COMPLETED)
                # Idle after a response (or before any request): closed here. Idle after the
                # client sent bytes: waitress is reading or handling a request (a publish that
                # builds deltas can take minutes) and closes an unfinished request itself.
                if state["last"] == "down" and time.monotonic() - state["t"] > self.idle:
                    for w in (writer, up_writer):
                        w.close()
                    for t in tasks:
                        t.cancel()
                    break
        finally:
            self.active -= 1

    def serve_forever_in_thread(self):
        """Start listening (raises if the port is taken) and serve in a daemon thread."""
        import asyncio
        import threading

        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(
            self._handle, self.host, self.port, ssl=self.context, ssl_handshake_timeout=self.handshake, backlog=1024))
        self.server, self.loop = server, loop
        threading.Thread(target=loop.run_forever, name="d2r-tls", daemon=True).start()
        return self
