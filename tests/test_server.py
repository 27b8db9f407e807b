"""The edge server over real HTTP (waitress on loopback): publish, history, download with
Range/ETag, validation (traversal, size limits, signatures), tokens, health, metrics, the
status page in headless Chromium, and the exact commands (`d2r serve` in a subprocess)."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("waitress")
pytest.importorskip("cryptography")
pytest.importorskip("tuf")

from d2r.sync import Destination, SyncError, generate_keypair, pack_bundle, verify_bundle_folder  # noqa: E402
from d2r_server.client import AdminClient  # noqa: E402
from d2r_server.testing import ADMIN_TOKEN, Collection, ServerThread, create_collection, free_port, tuf_keys  # noqa: E402

pytestmark = pytest.mark.slow  # real servers and bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    c = Collection()
    c.add([f"img{i:03d}" for i in range(100)])
    v1 = c.save(root / "v1.d2r")
    c.add(["extra"])
    v2 = c.save(root / "v2.d2r")
    keys = tuf_keys(root / "keys")
    other, _ = generate_keypair(root / "other.key")
    archive = root / "v1.tar"
    info = pack_bundle(v1, archive)
    return {"v1": v1, "v2": v2, "keys": keys, "key": keys["targets"], "other": other, "archive": archive, "info": info}


@pytest.fixture()
def server(tmp_path, bundles):
    with ServerThread(tmp_path / "data", MAX_BUNDLE_BYTES=1_000_000) as srv:
        srv.admin = AdminClient(srv.url, ADMIN_TOKEN)
        srv.root = create_collection(srv.admin, "museum", bundles["keys"], tmp_path / "museum.root.json")
        yield srv


def request(server, method, path, body=None, headers=None, token=ADMIN_TOKEN):
    """(status, headers, body bytes) of one raw HTTP request (the path is sent as given)."""
    con = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    try:
        con.request(method, path, body=body, headers=h)
        resp = con.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        con.close()


def _signed_targets(admin, bundles, collection="museum", key="key", data=None, info=None) -> str:
    """X-D2R-Targets for publishing ``data`` (default: the v1 archive): the collection's next
    targets metadata listing it, signed with ``key``."""
    from tuf.api.metadata import TargetFile

    data = bundles["archive"].read_bytes() if data is None else data
    info = info or bundles["info"]
    t = TargetFile.from_data(f"bundles/{info['version']}.tar", data, ["sha256"])
    t.unrecognized_fields["custom"] = {"d2r": {"version": info["version"], "bundle_checksum": info["checksum"],
                                               "n_images": info.get("n_images")}}
    return admin._next_targets(collection, bundles[key], lambda ts: ts.__setitem__(t.path, t), None, 86400)


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_publish_latest_history_and_download_with_range_and_etag(server, bundles):
    rec = server.admin.publish(bundles["v1"], "museum", bundles["key"])
    data = bundles["archive"].read_bytes()
    assert rec["version"] == 1 and rec["archive_sha256"] == hashlib.sha256(data).hexdigest()
    assert rec["archive_size"] == len(data) and rec["n_images"] == 100
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    st, _, body = request(server, "GET", "/api/v1/collections/museum/latest")
    assert st == 200 and json.loads(body)["version"] == 2
    st, _, body = request(server, "GET", "/api/v1/collections/museum/versions")
    assert [v["version"] for v in json.loads(body)["versions"]] == [2, 1]

    url = rec["download"]
    st, h, body = request(server, "GET", url)
    assert st == 200 and body == data and h["ETag"] == f'"{rec["archive_sha256"]}"'
    assert h["Accept-Ranges"] == "bytes" and h["Content-Type"] == "application/x-tar"
    st, h, body = request(server, "GET", url, headers={"Range": "bytes=1000-1999"})
    assert st == 206 and body == data[1000:2000] and h["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    st, h, body = request(server, "GET", url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert st == 206 and body == data[-10:]
    st, _, body = request(server, "GET", url, headers={"If-None-Match": h["ETag"]})
    assert st == 304 and body == b""
    # If-Range with a stale ETag: the whole (current) file, not a mismatched piece.
    st, _, body = request(server, "GET", url, headers={"Range": "bytes=10-", "If-Range": '"stale"'})
    assert st == 200 and body == data
    st, _, _ = request(server, "GET", url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert st == 416
    st, _, _ = request(server, "GET", "/api/v1/collections/museum/versions/9/bundle")
    assert st == 404


def test_publish_is_verified_before_it_becomes_visible(server, bundles):
    path = "/api/v1/collections/museum/versions"
    data = bundles["archive"].read_bytes()
    sig = {"X-D2R-Targets": _signed_targets(server.admin, bundles)}
    # Unsigned.
    assert request(server, "POST", path, data)[0] == 400
    # Not a tar.
    st, _, body = request(server, "POST", path, b"hello" * 1000, sig)
    assert st == 400 and b"not a valid" in body
    # Path traversal inside the archive.
    bj = (bundles["v1"] / "bundle.json").read_bytes()
    for name in ("../evil", "/etc/passwd", "models/../../evil"):
        st, _, body = request(server, "POST", path, _tar([("bundle.json", bj), (name, b"x")]), sig)
        assert st == 400 and b"unsafe path" in body, name
    # A file altered after bundle.json was written.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    altered = [(n, c[:-1] + bytes([c[-1] ^ 1]) if n == "index.d2ri" else c) for n, c in members]
    st, _, body = request(server, "POST", path, _tar(altered), sig)
    assert st == 400 and b"sha256" in body
    # A file missing.
    st, _, body = request(server, "POST", path, _tar([m for m in members if m[0] != "codebook.d2rcb"]), sig)
    assert st == 400 and b"missing" in body
    # Nothing of the above became visible or stayed on disk.
    assert request(server, "GET", "/api/v1/collections/museum/latest")[0] == 404
    storage = server.app.extensions["d2r_storage"]
    assert not list(storage.blobs.rglob("*.*")) and not any(storage.tmp.iterdir())
    # The same version twice: 409.
    assert request(server, "POST", path, data, sig)[0] == 201
    assert request(server, "POST", path, data, sig)[0] == 409
    # Bad collection names.
    for bad in ("..", ".hidden", "a" * 65, "x%2F..%2Fy"):
        st, _, _ = request(server, "POST", f"/api/v1/collections/{bad}/versions", data, sig)
        assert st in (400, 404), bad


def test_oversized_uploads_are_refused_with_413(server, bundles):
    path = "/api/v1/collections/big/versions"
    sig = {"X-D2R-Targets": "e30=", "Content-Type": "application/x-tar"}
    big = b"\0" * 1_200_000  # limit is 1 000 000 bytes
    st, _, body = request(server, "POST", path, big, sig)
    assert st == 413
    # Chunked (no Content-Length): refused while streaming.
    con = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    con.putrequest("POST", path)
    for k, v in dict(sig, Authorization=f"Bearer {ADMIN_TOKEN}", **{"Transfer-Encoding": "chunked"}).items():
        con.putheader(k, v)
    con.endheaders()
    for _ in range(12):
        chunk = b"\0" * 100_000
        con.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    con.send(b"0\r\n\r\n")
    assert con.getresponse().status == 413
    con.close()
    # Announced far above waitress's own limit: refused before the body is read.
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
              f"Content-Length: {10**10}\r\n\r\n".encode())
    assert b" 413 " in s.recv(4096).split(b"\r\n")[0]
    s.close()
    assert not any(server.app.extensions["d2r_storage"].tmp.iterdir())


def test_url_path_traversal_is_not_served(server, bundles):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    for path in ("/api/v1/collections/../../d2r.sqlite3", "/api/v1/collections/museum/versions/1/../../../../d2r.sqlite3",
                 "/api/v1/collections/..%2f..%2fd2r.sqlite3/latest", "/api/v1/collections/museum/versions/..%2f1/bundle",
                 "/blobs/", "/d2r.sqlite3"):
        st, _, body = request(server, "GET", path)
        assert st in (400, 404), (path, st)
        assert b"SQLite format" not in body


def test_tokens_are_hashed_scoped_and_revocable(server, bundles):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    dev = server.admin.add_device(["museum"], "kiosk")
    token = dev["token"]
    latest = "/api/v1/collections/museum/latest"
    assert request(server, "GET", latest, token=token)[0] == 200
    assert request(server, "GET", latest, token=None)[0] == 401
    assert request(server, "GET", latest, token=token + "x")[0] == 401
    assert request(server, "GET", latest, token="d2rdev_" + dev["id"] + "_guess")[0] == 401
    assert request(server, "GET", latest, token="not-the-admin-token-000000")[0] == 401
    # Device tokens cannot do admin work.
    assert request(server, "GET", "/api/v1/devices", token=token)[0] == 401
    assert request(server, "POST", "/api/v1/collections/museum/versions", b"x", token=token)[0] == 401
    assert request(server, "GET", "/status", token=token)[0] == 401
    # Scope.
    other = server.admin.add_device(["elsewhere"], "other")
    assert request(server, "GET", latest, token=other["token"])[0] == 403
    assert request(server, "GET", "/api/v1/collections/museum/versions/1/bundle", token=other["token"])[0] == 403
    # Only hashes are stored.
    storage = server.app.extensions["d2r_storage"]
    raw = storage.db_path.read_bytes() + b"".join(p.read_bytes() for p in storage.root.glob("d2r.sqlite3-*"))
    assert token.encode() not in raw and token.rsplit("_", 1)[1].encode() not in raw
    assert ADMIN_TOKEN.encode() not in raw
    # Revocation.
    server.admin.revoke_device(dev["id"])
    assert request(server, "GET", latest, token=token)[0] == 401
    listed = {d["id"]: d for d in server.admin.devices()}
    assert listed[dev["id"]]["revoked"] and "token_sha256" not in listed[dev["id"]]
    with pytest.raises(SyncError, match="404"):
        server.admin.revoke_device(dev["id"])


def test_publish_is_verified_against_the_collections_targets_key(server, bundles):
    with pytest.raises(SyncError, match="400.*not signed by the threshold of targets keys"):
        server.admin.publish(bundles["v1"], "museum", bundles["other"])
    with pytest.raises(SyncError, match="409.*create it first"):  # no TUF root, no publish
        server.admin._call("POST", "/api/v1/collections/elsewhere/versions", bundles["archive"].read_bytes(),
                           {"X-D2R-Targets": _signed_targets(server.admin, bundles)})
    assert server.admin.publish(bundles["v1"], "museum", bundles["key"])["version"] == 1


def test_healthz_and_metrics(server, bundles):
    st, _, body = request(server, "GET", "/healthz", token=None)
    assert st == 200 and json.loads(body)["status"] == "ok"
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    server.admin.add_device(["museum"], "a")
    request(server, "GET", "/api/v1/collections/museum/latest", token="bad-token")
    st, h, body = request(server, "GET", "/metrics", token=None)
    assert st == 200 and h["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? -?[0-9.]+(e[+-]?[0-9]+)?$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'd2r_collection_latest_version{collection="museum"} 1' in text
    assert 'd2r_publish_total{result="ok"} 1' in text
    assert 'd2r_devices{state="active"} 1' in text
    assert 'd2r_auth_failures_total{kind="device"} 1' in text


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_status_page_lists_what_the_api_says(server, bundles, tmp_path):
    from d2r.sync import SyncClient

    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    dev = server.admin.add_device(["museum"], "guide-tablet-7")
    SyncClient(server.url, "museum", dev["token"], tmp_path / "dev", server.root).sync()
    gone = server.admin.add_device(["museum"], "lost-kiosk")
    server.admin.revoke_device(gone["id"])
    st, h, _ = request(server, "GET", "/status", token=None)
    assert st == 401 and h["WWW-Authenticate"].startswith("Basic")
    st, _, html = request(server, "GET", "/status")
    assert st == 200
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium test: Debian's chromium package is not installed (apt-get install -y chromium)")
    url = f"http://admin:{urllib.parse.quote(ADMIN_TOKEN)}@127.0.0.1:{server.port}/status"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "<h1>d2r edge server</h1>" in dom, proc.stderr[-2000:]
    # What the API says, the rendered page shows.
    colls = json.loads(request(server, "GET", "/api/v1/collections")[2])["collections"]
    for c in colls:
        assert f'data-name="{c["name"]}" data-latest="{c["latest"]}"' in dom
    for d in server.admin.devices():
        assert f'data-id="{d["id"]}"' in dom and d["name"] in dom
    assert re.search(r'class="device" data-id="%s" data-version="2"' % dev["id"], dom)
    assert re.search(r'class="device revoked" data-id="%s"' % gone["id"], dom)
    for v in json.loads(request(server, "GET", "/api/v1/collections/museum/versions")[2])["versions"]:
        assert f'data-version="{v["version"]}"' in dom
    shot = tmp_path / "status.png"
    subprocess.run(cmd[:-2] + [f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 5000


def test_exact_commands_serve_keygen_collection_publish_device_sync(tmp_path, bundles):
    d2r_cmd = [sys.executable, "-m", "d2r.cli"]
    token_file = tmp_path / "admin.token"
    token_file.write_text("cli-admin-token-abcdefghijklmnop\n")
    token_file.chmod(0o600)

    def run(*args):
        proc = subprocess.run(d2r_cmd + list(args), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    for role in ("root", "targets"):
        run("keygen", "-o", str(tmp_path / f"{role}.key"))
    key = tmp_path / "targets.key"
    assert key.is_file() and Path(str(key) + ".pub").is_file() and (key.stat().st_mode & 0o777) == 0o600
    port = free_port()
    server = subprocess.Popen(d2r_cmd + ["serve", "--data", str(tmp_path / "data"), "--host", "127.0.0.1", "--port", str(port),
                                         "--admin-token-file", str(token_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert server.poll() is None, server.communicate()[1].decode()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        st_con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        st_con.request("GET", "/healthz")
        resp = st_con.getresponse()
        assert resp.status == 200 and resp.getheader("Server") == "d2r"  # waitress, not the Flask dev server
        st_con.close()

        admin = ["--token-file", str(token_file)]
        root = tmp_path / "museum.root.json"
        out = run("collection", "create", "museum", "--server", url, *admin, "--root-key", str(tmp_path / "root.key"),
                  "--targets-key", str(key), "--out", str(root))
        assert "provision devices with" in out and json.loads(root.read_text())["signed"]["_type"] == "root"
        out = run("publish", str(bundles["v1"]), "--server", url, "--collection", "museum", *admin, "--signing-key", str(key))
        assert "version 1 published" in out
        device_token = run("device", "add", "--server", url, "--collection", "museum", *admin).strip()
        assert device_token.startswith("d2rdev_")
        (tmp_path / "device.token").write_text(device_token + "\n")
        (tmp_path / "device.token").chmod(0o600)
        device = ["--token-file", str(tmp_path / "device.token")]
        out = run("sync", "--server", url, "--collection", "museum", *device, "--dest", str(tmp_path / "dev"), "--root", str(root))
        assert "version 1 active" in out
        verify_bundle_folder(Destination(tmp_path / "dev").current)
        run("publish", str(bundles["v2"]), "--server", url, "--collection", "museum", *admin, "--signing-key", str(key))
        out = run("sync", "--server", url, "--collection", "museum", *device, "--dest", str(tmp_path / "dev"))
        assert "version 2 active (delta" in out
        assert "version 2 is current" in run("sync", "--server", url, "--collection", "museum", *device,
                                             "--dest", str(tmp_path / "dev"))
        assert "museum" in run("device", "list", "--server", url, *admin)
        bad = subprocess.run(d2r_cmd + ["sync", "--server", url, "--collection", "museum", "--token", "wrong", "--dest",
                                        str(tmp_path / "dev2"), "--root", str(root)], capture_output=True, text=True)
        assert bad.returncode == 1 and "401" in bad.stderr, bad.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_chunked_publish_and_state_survives_a_restart(tmp_path, bundles):
    data = bundles["archive"].read_bytes()
    with ServerThread(tmp_path / "data") as srv:
        admin = AdminClient(srv.url, ADMIN_TOKEN)
        create_collection(admin, "museum", bundles["keys"], tmp_path / "museum.root.json")
        con = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        con.putrequest("POST", "/api/v1/collections/museum/versions")
        con.putheader("Authorization", f"Bearer {ADMIN_TOKEN}")
        con.putheader("X-D2R-Targets", _signed_targets(admin, bundles))
        con.putheader("Transfer-Encoding", "chunked")
        con.endheaders()
        for i in range(0, len(data), 50_000):  # streamed without a Content-Length
            piece = data[i : i + 50_000]
            con.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        con.send(b"0\r\n\r\n")
        resp = con.getresponse()
        assert resp.status == 201 and json.loads(resp.read())["archive_size"] == len(data)
        con.close()
        dev = AdminClient(srv.url, ADMIN_TOKEN).add_device(["museum"], "kiosk")
    (tmp_path / "data" / "tmp" / "upload-left-by-a-crash").write_bytes(b"x")
    with ServerThread(tmp_path / "data") as srv:  # same data folder, new process state
        st, _, body = request(srv, "GET", "/api/v1/collections/museum/latest", token=dev["token"])
        assert st == 200 and json.loads(body)["version"] == 1
        assert not any((tmp_path / "data" / "tmp").iterdir())
        # The online key survived the restart: what it signs still verifies on a device.
        from d2r.sync import SyncClient

        r = SyncClient(srv.url, "museum", dev["token"], tmp_path / "dev", tmp_path / "museum.root.json").sync()
        assert r.version == 1 and oct((tmp_path / "data" / "keys" / "online.key").stat().st_mode & 0o777) == "0o600"
