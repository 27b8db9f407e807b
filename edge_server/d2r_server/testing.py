"""Helpers for tests and benchmarks: synthetic bundles (no models needed), a real waitress
server on loopback in a thread, and a TCP proxy that drops or corrupts responses.

The one server module that uses the device runtime beyond :mod:`d2r.bundle`: it builds real
bundles with ``d2r.Codebook``, ``d2r.Index`` and ``d2r.aggregate``, as a publisher would
(tests/test_server_imports.py lets it; the server itself never imports this module)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np

import d2r
from d2r.bundle.folder import write_bundle_json
from d2r.config import EngineConfig

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


def synthetic_codebook(k: int = 64, dim: int = 32, seed: int = 0) -> d2r.Codebook:
    return d2r.Codebook(np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32))


def synthetic_aggregations(codebook, image_id: str, n_features: int = 60, regions: int = 2, kind: str = "rasmk_star"):
    """Deterministic R-ASMK* aggregation of random descriptors, seeded by the image id."""
    seed = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_features * regions, codebook.dim)).astype(np.float32)
    return d2r.aggregate(x, codebook, kind=kind, region_sizes=[n_features] * regions)


def write_bundle(path, index: d2r.Index, codebook: d2r.Codebook, version: int, extra_files: dict | None = None) -> Path:
    """A bundle folder as :meth:`d2r.Engine.save` writes it (same bundle.json), without models:
    index.d2ri, codebook.d2rcb, models/manifest.json (empty) and ``extra_files`` {rel: bytes}."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index.save(tmp / "index.d2ri")
    codebook.save(tmp / "codebook.d2rcb")
    (tmp / "models").mkdir()
    (tmp / "models" / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": []}) + "\n")
    for rel, data in (extra_files or {}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    write_bundle_json(tmp, {
        "version": int(version),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "d2r_version": d2r.__version__,
        "config": asdict(EngineConfig(detector=None)),
        "models": {"features": None, "detector": None},
        "codebook_sha256": codebook.checksum,
        "n_images": len(index),
    })
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


class Collection:
    """A synthetic collection evolving like a publisher's: open, add/remove images, save."""

    def __init__(self, k: int = 64, dim: int = 32, n_features: int = 60, regions: int = 2):
        self.codebook = synthetic_codebook(k, dim)
        self.index = d2r.Index(self.codebook, kind="rasmk_star")
        self.n_features, self.regions = n_features, regions
        self.version = 0

    def add(self, ids):
        for i in ids:
            self.index.add(i, synthetic_aggregations(self.codebook, i, self.n_features, self.regions), metadata={"title": i})

    def remove(self, ids):
        for i in ids:
            self.index.remove(i)

    def save(self, path, extra_files=None) -> Path:
        self.version += 1
        return write_bundle(path, self.index, self.codebook, self.version, extra_files)


def tuf_keys(folder) -> dict:
    """A collection's key files in ``folder`` (made once): {"root": ..., "targets": ...}."""
    from d2r.bundle.keys import generate_keypair

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = {}
    for role in ("root", "targets"):
        path = folder / f"{role}.key"
        if not path.exists():
            generate_keypair(path)
        keys[role] = path
    return keys


def create_collection(admin, name: str, keys: dict, out) -> Path:
    """Create collection ``name`` on the server of ``admin`` with ``keys`` (tuf_keys); returns
    the root metadata file devices are provisioned with."""
    admin.create_collection(name, [keys["root"]], keys["targets"], out=out)
    return Path(out)


class ServerThread:
    """The real app under waitress on 127.0.0.1 (random port), in a background thread."""

    def __init__(self, data_dir, admin_token: str = ADMIN_TOKEN, threads: int = 16, idle_timeout: float = 20, **config):
        import waitress

        from .app import create_app
        from .serving import waitress_options

        cfg = {"DATA_DIR": str(data_dir), "ADMIN_TOKEN": admin_token}
        cfg.update(config)
        self.app = create_app(cfg)
        limit = int(self.app.config["MAX_BUNDLE_BYTES"])
        # The same waitress settings as `d2r serve`.
        self.server = waitress.create_server(self.app, host="127.0.0.1", port=0,
                                             **waitress_options(limit, threads=threads, idle_timeout=idle_timeout))
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from waitress import wasyncore

        # waitress's own run() cannot be stopped from another thread cleanly: poll, then close here.
        while not self._stop.is_set():
            wasyncore.loop(timeout=0.05, map=self.server._map, count=1, use_poll=True)
        self.server.close()
        self.server.task_dispatcher.shutdown(timeout=5)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._stop.set()
        self.thread.join(timeout=10)


class FlakyProxy:
    """TCP proxy on 127.0.0.1 in front of ``upstream_port``. For the first ``faults``
    connections whose request line matches ``match``, it cuts the response after ``cut_after``
    bytes (mode "drop") or flips one byte at offset ``cut_after`` (mode "corrupt")."""

    def __init__(self, upstream_port: int, match: bytes = b"/bundle", mode: str = "drop", cut_after: int = 20000, faults: int = 1):
        self.upstream = upstream_port
        self.match, self.mode, self.cut_after, self.faults = match, mode, cut_after, faults
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client):
        up = socket.create_connection(("127.0.0.1", self.upstream))
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                break
            head += data
        with self._lock:
            self.requests.append(head.split(b"\r\n\r\n")[0])
            faulty = self.match in head.split(b"\r\n")[0] and head.startswith(b"GET") and self.faults > 0
            if faulty:
                self.faults -= 1
        up.sendall(head)

        def upstream_to_client():
            sent = 0
            try:
                while True:
                    data = up.recv(65536)
                    if not data:
                        break
                    if faulty and self.mode == "drop" and sent + len(data) > self.cut_after:
                        client.sendall(data[: self.cut_after - sent])
                        break
                    if faulty and self.mode == "corrupt" and sent <= self.cut_after < sent + len(data):
                        i = self.cut_after - sent
                        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                    client.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            finally:
                for s in (client, up):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()

        def client_to_upstream():
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    up.sendall(data)
            except OSError:
                pass

        threading.Thread(target=client_to_upstream, daemon=True).start()
        upstream_to_client()

    def close(self):
        self._stop = True
        self.sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers started in subprocesses)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def mirror_repository(repo_dir, mirror_dir) -> Path:
    """Copy a collection's TUF repository (DATA/repo/<collection>) to ``mirror_dir`` the way a
    mirror must: targets first, then versioned metadata, timestamp.json last (the switch), so
    that a device reading the mirror meanwhile always sees a consistent state."""
    src, dst = Path(repo_dir), Path(mirror_dir)
    for sub in ("targets", "metadata"):
        for f in sorted((src / sub).rglob("*")):
            if f.is_file() and f.name != "timestamp.json" and not f.name.startswith("."):
                out = dst / f.relative_to(src)
                if not out.exists():
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, out)
    (dst / "metadata").mkdir(parents=True, exist_ok=True)
    tmp = dst / "metadata" / ".timestamp.json.tmp"
    shutil.copyfile(src / "metadata" / "timestamp.json", tmp)
    os.replace(tmp, dst / "metadata" / "timestamp.json")
    return dst


class StaticMirror:
    """A plain HTTP server (http.server, no d2r code) on 127.0.0.1 serving ``folder``: a mirror
    or CDN of a TUF repository. ``headers`` and ``paths`` record the requests it saw."""

    def __init__(self, folder):
        import functools
        import http.server

        self.headers: list = []
        self.paths: list = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.headers.append(dict(self.headers.items()))
                outer.paths.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
