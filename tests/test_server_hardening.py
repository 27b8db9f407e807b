"""Issue 16's attack findings, each reproduced against a real server on loopback (waitress in a
thread, or `d2r serve` in a subprocess), and the operations it asked for: many idle half-open
connections, version poisoning and deleting a version, unbounded downloads from a hostile
server, HTTP 500s for out-of-range numbers and mistyped fields, `\\Z` anchors, length limits,
`d2r sync --every` surviving an OSError, admin tokens from a file or the environment, plain
http:// warnings, `--keep` garbage collection and one stored copy per version.

Each test here fails on the server and client of before issue 16 (commit 6cb612e): the first
version of this file (commit ba928e0) failed there, each for the reason
each test names; since TUF, tests that need a collection error there already in their fixture."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("waitress")
pytest.importorskip("cryptography")

from d2r.bundle.folder import canonical as _canonical  # noqa: E402
from d2r.sync import Destination, SyncClient, SyncError, generate_keypair  # noqa: E402
from d2r_server.client import AdminClient  # noqa: E402
from d2r_server.testing import ADMIN_TOKEN, Collection, ServerThread, free_port, tuf_keys  # noqa: E402

pytestmark = pytest.mark.slow  # real servers

D2R = [sys.executable, "-m", "d2r.cli"]
BIG = 2**63  # one past SQLite's INTEGER range


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    c = Collection()
    c.add([f"img{i:03d}" for i in range(60)])
    v1 = c.save(root / "v1.d2r")
    c.add(["extra-1"])
    v2 = c.save(root / "v2.d2r")
    c.add(["extra-2"])
    v3 = c.save(root / "v3.d2r")
    keys = tuf_keys(root)
    keys["other"], _ = generate_keypair(root / "other.key")
    return {"v1": v1, "v2": v2, "v3": v3, "key": keys["targets"], "keys": keys, "root": root}


@pytest.fixture()
def server(tmp_path, bundles):
    with ServerThread(tmp_path / "data") as srv:
        srv.admin = AdminClient(srv.url, ADMIN_TOKEN)
        srv.root = tmp_path / "museum.root.json"
        srv.admin.create_collection("museum", [bundles["keys"]["root"]], bundles["key"], out=srv.root)
        yield srv


def signed_targets(server, bundles, data: bytes, checksum: str, version=1, key="targets", collection="museum") -> str:
    """X-D2R-Targets listing ``data`` as bundles/<version>.tar, signed with ``key``."""
    from tuf.api.metadata import TargetFile

    t = TargetFile.from_data(f"bundles/{version}.tar", data, ["sha256"])
    t.unrecognized_fields["custom"] = {"d2r": {"version": version, "bundle_checksum": checksum, "n_images": 1}}
    return server.admin._next_targets(collection, bundles["keys"][key], lambda ts: ts.__setitem__(t.path, t), None, 86400)


def request(port, method, path, body=None, headers=None, token=ADMIN_TOKEN, timeout=30):
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)) or body is None and method == "POST" and "json" in h.get("Content-Type", ""):
        body = json.dumps(body).encode()
    try:
        con.request(method, path, body=body, headers=h)
        resp = con.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        con.close()


def forged_archive(bundle: Path, **changes) -> tuple[bytes, str]:
    """The archive of ``bundle`` with bundle.json fields replaced (checksum recomputed, so it is
    self-consistent), and that checksum."""
    body = json.loads((bundle / "bundle.json").read_text())
    body.pop("checksum")
    body.update(changes)
    body["checksum"] = hashlib.sha256(_canonical(body)).hexdigest()
    members = [("bundle.json", json.dumps(body).encode())]
    files = json.loads((bundle / "bundle.json").read_text())["files"]
    members += [(rel, (bundle / rel).read_bytes()) for rel in sorted(files)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), body["checksum"]


def start_serve(tmp_path, *extra, token_mode=0o600):
    """`d2r serve` in a subprocess; returns (process, port, token file)."""
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(token_mode)
    port = free_port()
    cmd = D2R + ["serve", "--data", str(tmp_path / "data"), "--port", str(port), "--admin-token-file", str(token_file)]
    proc = subprocess.Popen(cmd + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc, port, token_file
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port, token_file
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("d2r serve did not start within 60 s")


def stop(proc) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


# -- finding 1: denial of service with idle half-open connections -------------------------------------
def test_300_half_open_connections_do_not_block_healthz(tmp_path, bundles):
    proc, port, _ = start_serve(tmp_path)
    socks = []
    try:
        assert proc.poll() is None, stop(proc)
        deadline = time.monotonic() + 30  # bounded in count (300) and time (30 s)
        for _ in range(300):
            if time.monotonic() > deadline:
                break
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: attacker\r\n")  # no final CRLF: the request never ends
            socks.append(s)
        assert len(socks) == 300
        time.sleep(0.5)  # let the server accept them all
        try:
            st, _, body = request(port, "GET", "/healthz", token=None, timeout=5)
        except OSError as exc:  # waitress's old connection_limit=100: nothing is accepted any more
            pytest.fail(f"/healthz did not answer with 300 idle connections open ({exc!r})")
        assert st == 200 and json.loads(body)["status"] == "ok"
        # And the API too, not only /healthz.
        st, _, _ = request(port, "GET", "/api/v1/collections", timeout=5)
        assert st == 200
    finally:
        for s in socks:
            s.close()
        stop(proc)


def test_idle_connections_are_closed_after_the_idle_timeout(tmp_path, bundles):
    proc, port, _ = start_serve(tmp_path, "--idle-timeout", "2")
    try:
        assert proc.poll() is None, stop(proc)
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            data = s.recv(100)  # blocks until the server closes it; the socket's 15 s timeout bounds the wait
        except socket.timeout:
            data = None
        s.close()
        assert data == b"", data
    finally:
        stop(proc)


# -- finding 2: version poisoning ---------------------------------------------------------------------
def test_a_server_started_without_keys_accepts_no_publish(tmp_path, bundles):
    """Started as the README showed (no key), the old server accepted any signature string. Now
    there is no such mode: a publish needs the collection's TUF root, and targets metadata
    signed by the targets key that root names."""
    data, checksum = forged_archive(bundles["v1"])
    with ServerThread(tmp_path / "data") as srv:
        srv.admin = AdminClient(srv.url, ADMIN_TOKEN)
        path = "/api/v1/collections/museum/versions"
        for headers in ({"X-D2R-Signature": "AAAA"}, {"X-D2R-Targets": "AAAA"}, {}):
            st, _, body = request(srv.port, "POST", path, data, headers)
            assert st in (400, 409), (headers, st, body)
        srv.admin.create_collection("museum", [bundles["keys"]["root"]], bundles["key"], out=tmp_path / "r.json")
        st, _, body = request(srv.port, "POST", path, data,
                              {"X-D2R-Targets": signed_targets(srv, bundles, data, checksum, key="other")})
        assert st == 400 and b"not signed by the threshold of targets keys" in body, body
        assert request(srv.port, "GET", "/api/v1/collections/museum/latest")[0] == 404
    (tmp_path / "cli").mkdir()
    proc, _, _ = start_serve(tmp_path / "cli", "--public-key", str(bundles["key"]) + ".pub")
    err = stop(proc)
    assert proc.returncode == 1 and "each collection's TUF root" in err, err


@pytest.mark.parametrize("version", ["99", True, 0, -1, BIG, 2.5, None])
def test_a_mistyped_or_out_of_range_version_is_refused(server, bundles, version):
    data, checksum = forged_archive(bundles["v1"], version=version)
    header = signed_targets(server, bundles, data, checksum)  # even with the right key
    st, _, body = request(server.port, "POST", "/api/v1/collections/museum/versions", data, {"X-D2R-Targets": header})
    assert st == 400 and b"version" in body, (st, body)
    assert request(server.port, "GET", "/api/v1/collections/museum/latest")[0] == 404


def test_any_signature_string_is_refused(server, bundles):
    data, checksum = forged_archive(bundles["v1"])
    for header in ("AAAA", "x" * 50000, "not base64 !", "e30="):
        st, _, body = request(server.port, "POST", "/api/v1/collections/museum/versions", data, {"X-D2R-Targets": header})
        assert st == 400 and b"Targets" in body or b"targets" in body, (header[:10], st, body)
    assert request(server.port, "GET", "/api/v1/collections/museum/latest")[0] == 404


def test_delete_a_version_api_and_cli(server, bundles, tmp_path):
    for v in ("v1", "v2"):
        server.admin.publish(bundles[v], "museum", bundles["key"])
    dev = server.admin.add_device(["museum"], "kiosk")
    path = "/api/v1/collections/museum/versions/2"
    assert request(server.port, "DELETE", path, token=dev["token"])[0] == 401  # admin only
    assert request(server.port, "DELETE", path, token=None)[0] == 401
    st, _, body = request(server.port, "DELETE", path)  # ... and the targets key
    assert st == 400 and b"X-D2R-Targets" in body
    rec = server.admin.delete_version("museum", 2, bundles["key"])
    assert rec == {"collection": "museum", "deleted": 2, "latest": 1}
    assert request(server.port, "DELETE", path)[0] == 404
    st, _, body = request(server.port, "GET", "/api/v1/collections/museum/latest", token=dev["token"])
    assert json.loads(body)["version"] == 1
    assert request(server.port, "GET", path + "/bundle")[0] == 404
    # Its archive and the delta 1 -> 2 are gone; its number is not reused.
    storage = server.app.extensions["d2r_storage"]
    assert len([f for d in storage.blobs.iterdir() for f in d.iterdir()]) == 1
    with pytest.raises(SyncError, match="409.*deleted"):
        server.admin.publish(bundles["v2"], "museum", bundles["key"])
    assert server.admin.publish(bundles["v3"], "museum", bundles["key"])["version"] == 3
    r = SyncClient(server.url, "museum", dev["token"], tmp_path / "dev", server.root).sync()
    assert r.version == 3
    # The CLI, with the admin token from the environment.
    env = dict(os.environ, D2R_ADMIN_TOKEN=ADMIN_TOKEN)
    out = subprocess.run(D2R + ["version", "delete", "--server", server.url, "--collection", "museum", "--version", "3",
                                "--signing-key", str(bundles["key"])], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "version 3 deleted; latest is now 1" in out.stdout, out.stderr
    out = subprocess.run(D2R + ["version", "list", "--server", server.url, "--collection", "museum"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[0] == "1" and len(out.stdout.splitlines()) == 1, out
    # A device on the deleted version 3 is not moved back to 1 silently.
    with pytest.raises(SyncError, match="not newer"):
        SyncClient(server.url, "museum", dev["token"], tmp_path / "dev", server.root).sync()


# -- finding 4: unbounded downloads from a hostile server -----------------------------------------------
class HostileProxy:
    """Plain HTTP server on loopback that forwards to the real server, except that a delta is an
    endless stream of zeros (up to ``flood`` bytes), or ``latest`` announces a giant bundle."""

    def __init__(self, upstream: str, flood: int = 64 * 1024**2, giant_latest: bool = False):
        self.sent = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                req = urllib.request.Request(upstream + self.path, data=data, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    resp = urllib.request.urlopen(req, timeout=30)
                except urllib.error.HTTPError as exc:
                    resp = exc
                body = resp.read()
                if giant_latest and self.path.endswith("/latest"):
                    rec = json.loads(body)
                    rec["archive_size"] = 2**62
                    body = json.dumps(rec).encode()
                self.send_response(resp.status if hasattr(resp, "status") else resp.code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _flood(self):
                self.send_response(200)
                self.send_header("ETag", '"%s"' % ("ab" * 32))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                chunk = b"\0" * (1 << 20)
                try:
                    while outer.sent < flood:
                        self.wfile.write(chunk)
                        outer.sent += len(chunk)
                except OSError:
                    pass
                self.close_connection = True

            def do_GET(self):
                self._flood() if "/targets/deltas/" in self.path else self._forward()

            do_HEAD = do_GET

            def do_POST(self):
                self._forward()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_endless_delta_is_cut_at_its_signed_length(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = server.admin.add_device(["museum"], "kiosk")["token"]
    SyncClient(server.url, "museum", token, tmp_path / "dev", server.root).sync()
    rec = server.admin.publish(bundles["v2"], "museum", bundles["key"])
    hostile = HostileProxy(server.url)
    try:
        logs = []
        r = SyncClient(hostile.url, "museum", token, tmp_path / "dev", server.root, log=logs.append).sync()
    finally:
        hostile.close()
    assert (r.version, r.method) == (2, "full")  # the delta was dropped, the signed full bundle installed
    # The device stopped reading at the delta's signed length (plus what sat in socket buffers).
    assert hostile.sent < rec["archive_size"] + 8 * 1024**2, hostile.sent
    assert any("more than the signed" in line for line in logs), logs
    assert not list((tmp_path / "dev" / "staging").glob("*.part"))


def test_a_bundle_over_the_device_limit_is_not_downloaded(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = server.admin.add_device(["museum"], "kiosk")["token"]
    with pytest.raises(SyncError, match="nothing downloaded"):
        SyncClient(server.url, "museum", token, tmp_path / "dev", server.root, max_bundle_bytes=1000).sync()
    assert Destination(tmp_path / "dev").current is None
    assert not list((tmp_path / "dev" / "staging").glob("*.part"))


# -- finding 5: HTTP 500s, anchors, lengths --------------------------------------------------------------
def test_out_of_range_numbers_and_mistyped_fields_are_4xx_never_500(server, bundles):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    dev = server.admin.add_device(["museum"], "kiosk")
    p = server.port
    for path in (f"/api/v1/collections/museum/versions/{BIG}", f"/api/v1/collections/museum/versions/{BIG}/bundle",
                 f"/api/v1/collections/museum/delta/1/{BIG}", f"/api/v1/collections/museum/delta/{BIG}/{BIG + 1}",
                 f"/api/v1/collections/museum/versions/{10**40}", "/api/v1/collections/museum/versions/0",
                 "/api/v1/collections/museum/versions/-1"):
        st, _, _ = request(p, "GET", path)
        assert st in (404, 405), (path, st)  # no route for it; never a 500
    report = "/api/v1/collections/museum/sync-report"
    for body in ({"version": BIG}, {"version": "1"}, {"version": [1]}, {"version": True}, {"version": 1, "bytes": "x"},
                 {"version": 1, "bytes": BIG}, {"version": 1, "method": ["full"]}, {"version": 1, "method": "x" * 100},
                 [1, 2], "text", None, 5):
        st, _, _ = request(p, "POST", report, json.dumps(body).encode(), {"Content-Type": "application/json"}, token=dev["token"])
        assert st == 400, (body, st)
    for raw in (b"[" * 100_000, b'{"version":' * 50_000, bytes([0xFF, 0xFE]), b"{" + b" " * 1000):
        st, _, _ = request(p, "POST", report, raw, {"Content-Type": "application/json"}, token=dev["token"])
        assert st == 400, (raw[:12], st)
        st, _, _ = request(p, "POST", "/api/v1/devices", raw, {"Content-Type": "application/json"})
        assert st == 400, (raw[:12], st)
    # bundle.json with mistyped files, signed by the real key: 400, not 500.
    for changes in ({"files": [1, 2]}, {"files": {"index.d2ri": [1]}}, {"files": {"a": {"sha256": 5, "size": 1}}},
                    {"files": {"a": {"sha256": "0" * 64, "size": BIG}}}, {"files": "x"}, {"n_images": "many"}):
        data, checksum = forged_archive(bundles["v2"], **changes)
        st, _, body = request(p, "POST", "/api/v1/collections/museum/versions", data,
                              {"X-D2R-Targets": signed_targets(server, bundles, data, checksum, version=2)})
        assert st == 400, (changes, st, body)


def test_names_with_a_trailing_newline_and_oversized_names_are_refused(server, bundles):
    data, checksum = forged_archive(bundles["v1"])
    header = signed_targets(server, bundles, data, checksum)
    for name in ("museum%0A", "museum%0D%0A", "museum%00"):
        st, _, _ = request(server.port, "POST", f"/api/v1/collections/{name}/versions", data, {"X-D2R-Targets": header})
        assert st == 400, name
        st, _, _ = request(server.port, "PUT", f"/api/v1/collections/{name}", b"{}", {"Content-Type": "application/json"})
        assert st == 400, name
    assert [c["name"] for c in server.app.extensions["d2r_storage"].collections()] == ["museum"]
    devices = "/api/v1/devices"
    hdr = {"Content-Type": "application/json"}
    for body in ({"name": "x" * 100_000, "collections": ["museum"]}, {"name": 12, "collections": ["museum"]},
                 {"name": "kiosk\x00", "collections": ["museum"]}, {"name": "kiosk", "collections": ["museum\n"]},
                 {"name": "kiosk", "collections": [1, 2]}, {"name": "kiosk", "collections": ["m"] * 1000},
                 {"name": "kiosk", "collections": "museum"}, [1], None):
        st, _, _ = request(server.port, "POST", devices, json.dumps(body).encode(), hdr)
        assert st == 400, (str(body)[:60], st)
    assert server.admin.devices() == []
    assert request(server.port, "DELETE", "/api/v1/devices/" + "a" * 100_000)[0] in (404, 414, 431)
    for path in ("/tuf/museum%0A/metadata/timestamp.json", "/tuf/a%20b/targets/bundles/" + "0" * 64 + ".1.tar",
                 "/tuf/museum/metadata/..%2Fkeys%2Fonline.key", "/tuf/museum/targets/..%2F..%2Fkeys%2Fonline.key",
                 f"/tuf/museum/metadata/{BIG * 100}.root.json", "/api/v1/collections/museum%0A/tuf-targets"):
        st, _, body = request(server.port, "GET", path)
        assert st in (400, 404), (path, st)
        assert b"PRIVATE KEY" not in body


# -- finding 6: operations -------------------------------------------------------------------------------
def test_sync_every_keeps_retrying_after_an_oserror(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token_file = tmp_path / "device.token"
    token_file.write_text(server.admin.add_device(["museum"], "kiosk")["token"] + "\n")
    token_file.chmod(0o600)
    dest = tmp_path / "dev"
    dest.mkdir()
    (dest / "versions").write_text("a file where the versions folder should be")  # every sync: OSError
    cmd = D2R + ["sync", "--server", server.url, "--collection", "museum", "--token-file", str(token_file),
                 "--dest", str(dest), "--root", str(server.root), "--every", "1s", "--retry-first", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("retrying" in line for line in lines) and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, "".join(lines)[-3000:]  # still running after the error
        time.sleep(1.5)
        assert proc.poll() is None, "".join(lines)[-3000:]  # ... and after several
        (dest / "versions").unlink()  # the disk problem goes away
        while time.monotonic() < deadline and Destination(dest).current is None and proc.poll() is None:
            time.sleep(0.1)
        assert Destination(dest).current is not None and proc.poll() is None, "".join(lines)[-3000:]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    text = "".join(lines)
    assert "FileExistsError" in text or "NotADirectoryError" in text, text[-2000:]
    assert "plain HTTP" in text  # the device warns that http:// carries the token in clear


def test_admin_token_from_a_file_or_the_environment_with_a_permission_warning(tmp_path, bundles):
    proc, port, token_file = start_serve(tmp_path, token_mode=0o644)
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.poll() is None, stop(proc)
        run = lambda *a, **kw: subprocess.run(D2R + list(a), capture_output=True, text=True, timeout=120, **kw)  # noqa: E731
        out = run("device", "add", "--server", url, "--collection", "museum", "--token-file", str(token_file))
        assert out.returncode == 0 and out.stdout.startswith("d2rdev_"), out.stderr
        assert "chmod 600" in out.stderr  # the world-readable token file is not used silently
        token_file.chmod(0o600)
        out = run("device", "list", "--server", url, "--token-file", str(token_file))
        assert out.returncode == 0 and "museum" in out.stdout and "chmod" not in out.stderr, out.stderr
        out = run("device", "list", "--server", url, env=dict(os.environ, D2R_ADMIN_TOKEN=ADMIN_TOKEN))
        assert out.returncode == 0 and "museum" in out.stdout and "warning" not in out.stderr, out.stderr
        out = run("device", "list", "--server", url, env={k: v for k, v in os.environ.items() if k != "D2R_ADMIN_TOKEN"})
        assert out.returncode == 1 and "token" in out.stderr
    finally:
        err = stop(proc)
    assert "chmod 600" in err  # d2r serve warned about its own token file too


def test_keep_n_collects_old_versions_and_each_version_is_stored_once(tmp_path, bundles):
    with ServerThread(tmp_path / "data", KEEP_VERSIONS=2) as srv:
        admin = AdminClient(srv.url, ADMIN_TOKEN)
        admin.create_collection("museum", [bundles["keys"]["root"]], bundles["key"], out=tmp_path / "root.json")
        sizes = {}
        for v in ("v1", "v2"):
            sizes[v] = admin.publish(bundles[v], "museum", bundles["key"])["archive_size"]
        with pytest.raises(SyncError, match="400.*keeps 2"):  # signed targets listing 3 versions: refused
            admin.publish(bundles["v3"], "museum", bundles["key"])
        sizes["v3"] = admin.publish(bundles["v3"], "museum", bundles["key"], keep=2)["archive_size"]
        assert [v["version"] for v in admin.versions("museum")] == [3, 2]
        storage = srv.app.extensions["d2r_storage"]
        with storage.db() as con:
            deltas = con.execute("SELECT from_version, to_version, size FROM deltas").fetchall()
        assert [(a, b) for a, b, _ in deltas] == [(2, 3)]  # 1 -> 2 went with version 1
        # Every file once: blobs and the repository's targets are the same inodes.
        files = {}
        for f in (tmp_path / "data").rglob("*"):
            if f.is_file() and not f.name.endswith(".json") and "sqlite" not in f.name and f.parent.name != "keys":
                files[f.stat().st_ino] = f.stat().st_size
        assert sum(files.values()) == sizes["v2"] + sizes["v3"] + sum(d[2] for d in deltas), (files, sizes)
        assert not (tmp_path / "data" / "unpacked").exists() and not any(storage.tmp.iterdir())
        # What devices see agrees: version 1 is not offered any more.
        token = admin.add_device(["museum"], "kiosk")["token"]
        assert SyncClient(srv.url, "museum", token, tmp_path / "dev", tmp_path / "root.json").sync().version == 3


# -- HTTPS served by d2r serve itself ---------------------------------------------------------------------
def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d2r test edge")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "edge.crt", folder / "edge.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_serve_https_itself_publish_and_sync_over_tls(tmp_path, bundles, monkeypatch):
    import ssl

    cert, key = _self_signed(tmp_path)
    proc, port, token_file = start_serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--idle-timeout", "3")
    url = f"https://127.0.0.1:{port}"
    socks = []
    try:
        assert proc.poll() is None, stop(proc)
        ctx = ssl.create_default_context(cafile=str(cert))
        # 300 connections that never finish the TLS handshake do not block anyone.
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never completed
            socks.append(s)
        time.sleep(0.5)
        con = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
        con.request("GET", "/healthz")
        resp = con.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        con.close()
        # After the handshake, a request that never ends and an idle kept-alive connection are
        # both closed after the idle timeout (3 s here).
        for partial in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"):
            tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="127.0.0.1")
            tls.sendall(partial)  # the socket's 20 s timeout bounds the wait for the close
            got = b""
            try:
                while True:
                    data = tls.recv(65536)
                    if not data:
                        break
                    got += data
            except (socket.timeout, ssl.SSLError, OSError) as exc:
                pytest.fail(f"not closed: {exc!r}")
            tls.close()
            assert (b" 200 " in got) == partial.endswith(b"\r\n\r\n")
        # Plain HTTP on the TLS port gets nothing useful.
        with pytest.raises((http.client.HTTPException, OSError)):
            plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            plain.request("GET", "/healthz")
            plain.getresponse().read()
        # The whole flow over HTTPS, the private CA given as SSL_CERT_FILE (as on a device).
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        admin = AdminClient(url, ADMIN_TOKEN)
        admin.create_collection("museum", [bundles["keys"]["root"]], bundles["key"], out=tmp_path / "museum.root.json")
        rec = admin.publish(bundles["v1"], "museum", bundles["key"])
        assert rec["download"].startswith("/api/v1/") and rec["version"] == 1
        token_path = tmp_path / "device.token"
        token_path.write_text(admin.add_device(["museum"], "kiosk")["token"] + "\n")
        token_path.chmod(0o600)
        out = subprocess.run(D2R + ["sync", "--server", url, "--collection", "museum", "--token-file", str(token_path),
                                    "--dest", str(tmp_path / "dev"), "--root", str(tmp_path / "museum.root.json")],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ, SSL_CERT_FILE=str(cert)))
        assert out.returncode == 0 and "version 1 active (full" in out.stdout, out.stderr
        assert "plain HTTP" not in out.stderr
        # Without the CA the device refuses the server.
        out = subprocess.run(D2R + ["sync", "--server", url, "--collection", "museum", "--token-file", str(token_path),
                                    "--dest", str(tmp_path / "dev2"), "--root", str(tmp_path / "museum.root.json")],
                             capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"})
        assert out.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in out.stderr, out.stderr
    finally:
        for s in socks:
            s.close()
        stop(proc)
