"""The Update Framework in d2r (issue 16): devices on tuf.ngclient pinned to a provisioned root,
a mirror on a second, plain HTTP server (no d2r code), freeze (expired timestamp) and rollback
(older metadata) refused by TUF while the device keeps serving its bundle and says how stale it
is (sync output, LiveBundle, status page), key rotation, root thresholds."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("flask")
pytest.importorskip("waitress")
pytest.importorskip("tuf")

from d2r.sync import Destination, LiveBundle, SignatureError, StaleMetadataError, SyncClient, SyncError, generate_keypair, verify_bundle_folder  # noqa: E402
from d2r_server.client import AdminClient  # noqa: E402
from d2r_server.testing import ADMIN_TOKEN, Collection, ServerThread, StaticMirror, mirror_repository  # noqa: E402

pytestmark = pytest.mark.slow  # real servers and bundles

D2R = [sys.executable, "-m", "d2r.cli"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    c = Collection()
    c.add([f"img{i:03d}" for i in range(200)])
    v1 = c.save(root / "v1.d2r")
    c.remove(["img005"])
    c.add(["new-a", "new-b"])
    v2 = c.save(root / "v2.d2r")
    c.add(["new-c"])
    v3 = c.save(root / "v3.d2r")
    keys = {}
    for role in ("root", "root2", "root3", "targets", "targets2"):
        keys[role], _ = generate_keypair(root / f"{role}.key")
    return {"v1": v1, "v2": v2, "v3": v3, "keys": keys}


def _same(a, b) -> bool:
    return verify_bundle_folder(a)["checksum"] == verify_bundle_folder(b)["checksum"]


def _setup(tmp_path, bundles, **config):
    srv = ServerThread(tmp_path / "data", **config)
    srv.__enter__()
    srv.admin = AdminClient(srv.url, ADMIN_TOKEN)
    srv.root = tmp_path / "museum.root.json"
    srv.admin.create_collection("museum", [bundles["keys"]["root"]], bundles["keys"]["targets"], out=srv.root)
    srv.repo_dir = tmp_path / "data" / "repo" / "museum"
    return srv


def test_sync_from_a_static_mirror_on_a_second_server(tmp_path, bundles):
    srv = _setup(tmp_path, bundles)
    try:
        srv.admin.publish(bundles["v1"], "museum", bundles["keys"]["targets"])
        token = srv.admin.add_device(["museum"], "kiosk")["token"]
        mirror_repository(srv.repo_dir, tmp_path / "mirror")
        with StaticMirror(tmp_path / "mirror") as mirror:
            # d2r sync --mirror: metadata and targets from the mirror, the report to the server.
            token_file = tmp_path / "device.token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            cmd = D2R + ["sync", "--server", srv.url, "--mirror", mirror.url, "--collection", "museum", "--token-file",
                         str(token_file), "--dest", str(tmp_path / "dev"), "--root", str(srv.root)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "version 1 active (full" in out.stdout, out.stderr
            assert _same(Destination(tmp_path / "dev").current, bundles["v1"])
            assert mirror.headers and not any("Authorization" in h for h in mirror.headers)  # no token to a mirror
            n_mirror = len(mirror.headers)
            # The publisher publishes v2 on the server; the mirror copies it; the device takes the delta.
            srv.admin.publish(bundles["v2"], "museum", bundles["keys"]["targets"])
            mirror_repository(srv.repo_dir, tmp_path / "mirror")
            r = SyncClient(None, "museum", None, tmp_path / "dev", mirror=mirror.url).sync()  # no server, no token
            assert (r.version, r.method) == (2, "delta")
            assert _same(Destination(tmp_path / "dev").current, bundles["v2"])
            assert any(p.startswith("/targets/deltas/") for p in mirror.paths[n_mirror:]), mirror.paths
            assert not any(p.startswith("/targets/bundles/") for p in mirror.paths[n_mirror:])
        assert {d["name"]: d for d in srv.admin.devices()}["kiosk"]["last_version"] == 1  # reported by the CLI run
    finally:
        srv.close()


def test_freeze_expired_metadata_keeps_the_bundle_and_reports_staleness(tmp_path, bundles):
    srv = _setup(tmp_path, bundles, TIMESTAMP_EXPIRY=3)
    try:
        srv.admin.publish(bundles["v1"], "museum", bundles["keys"]["targets"])
        dev = srv.admin.add_device(["museum"], "tablet")
        mirror_repository(srv.repo_dir, tmp_path / "mirror")
        with StaticMirror(tmp_path / "mirror") as mirror:
            client = SyncClient(srv.url, "museum", dev["token"], tmp_path / "dev", srv.root, mirror=mirror.url)
            assert client.sync().version == 1
            with LiveBundle(tmp_path / "dev", opener=lambda p: p) as live:
                fresh = live.freshness
                assert fresh["expired"] is False and fresh["stale_seconds"] < 3
                # The mirror is frozen (not updated any more; a man in the middle would do the same).
                srv.admin.publish(bundles["v2"], "museum", bundles["keys"]["targets"])
                time.sleep(4.5)  # the mirror's timestamp (3 s) has expired
                with pytest.raises(StaleMetadataError, match="expired") as info:
                    client.sync()
                assert info.value.version == 1 and info.value.stale_seconds >= 4
                assert live.get().name == "1"  # the device keeps serving its bundle
                assert live.freshness["expired"] is True and live.stale_seconds >= 4
            # The CLI says so, and the status page shows it.
            cmd = D2R + ["sync", "--server", srv.url, "--mirror", mirror.url, "--collection", "museum", "--dest",
                         str(tmp_path / "dev")]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                 env=dict(__import__("os").environ, D2R_DEVICE_TOKEN=dev["token"]))
            assert out.returncode == 1 and "STALE: version 1 kept" in out.stdout and "expired" in out.stderr, out
        # The mirror is gone altogether: the device still says it serves stale data.
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                             env=dict(__import__("os").environ, D2R_DEVICE_TOKEN=dev["token"]))
        assert out.returncode == 1 and "unreachable" in out.stderr and "STALE: version 1 kept" in out.stdout, out
        rec = {d["id"]: d for d in srv.admin.devices()}[dev["id"]]
        assert rec["stale_seconds"] >= 4 and rec["last_version"] == 1
        import http.client

        con = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        con.request("GET", "/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        html = con.getresponse().read().decode()
        con.close()
        assert f'class="device stale" data-id="{dev["id"]}"' in html and "EXPIRED: serving v1" in html
        assert "root v1 (" in html and "timestamp v" in html  # each collection's metadata versions and expiry
        # The server itself re-signs its timestamp: syncing from it brings the device up to date.
        r = SyncClient(srv.url, "museum", dev["token"], tmp_path / "dev").sync()
        assert r.version == 2 and LiveBundle(tmp_path / "dev").freshness["expired"] is False
        assert {d["id"]: d for d in srv.admin.devices()}[dev["id"]]["stale_seconds"] is None
    finally:
        srv.close()


def test_rollback_to_older_metadata_is_refused(tmp_path, bundles):
    srv = _setup(tmp_path, bundles)
    try:
        srv.admin.publish(bundles["v1"], "museum", bundles["keys"]["targets"])
        token = srv.admin.add_device(["museum"], "kiosk")["token"]
        old = mirror_repository(srv.repo_dir, tmp_path / "old-mirror")  # the repository at version 1
        srv.admin.publish(bundles["v2"], "museum", bundles["keys"]["targets"])
        assert SyncClient(srv.url, "museum", token, tmp_path / "dev", srv.root).sync().version == 2
        # A mirror or man in the middle replays the old, validly signed, unexpired metadata.
        with StaticMirror(old) as mirror:
            with pytest.raises(SignatureError, match="rollback refused"):
                SyncClient(None, "museum", None, tmp_path / "dev", mirror=mirror.url).sync()
            # A fresh device accepts the old state (it never saw newer): TUF protects what it has seen.
            assert SyncClient(None, "museum", None, tmp_path / "fresh", srv.root, mirror=mirror.url).sync().version == 1
        assert Destination(tmp_path / "dev").current.name == "2"
    finally:
        srv.close()


def test_key_rotation_root_and_targets(tmp_path, bundles):
    keys = bundles["keys"]
    srv = _setup(tmp_path, bundles)
    try:
        srv.admin.publish(bundles["v1"], "museum", keys["targets"])
        token = srv.admin.add_device(["museum"], "kiosk")["token"]
        assert SyncClient(srv.url, "museum", token, tmp_path / "dev", srv.root).sync().version == 1
        # A rotation signed only by a key the current root does not trust: refused.
        with pytest.raises(SyncError, match="400.*not signed by the threshold of root keys"):
            srv.admin.rotate_root("museum", [keys["root3"]], [keys["root2"]])
        # Root key and targets key replaced: root v2 signed by the old and the new root keys,
        # the targets in force re-signed with the new targets key.
        raw = srv.admin.rotate_root("museum", [keys["root"]], [keys["root2"]], new_targets_key=keys["targets2"],
                                    out=tmp_path / "museum.root.v2.json")
        assert json.loads(raw)["signed"]["version"] == 2
        with pytest.raises(SyncError, match="400.*not signed by the threshold of targets keys"):
            srv.admin.publish(bundles["v2"], "museum", keys["targets"])  # the old targets key is out
        srv.admin.publish(bundles["v2"], "museum", keys["targets2"])
        # The device pinned to root v1 follows the rotation by TUF's rules.
        r = SyncClient(srv.url, "museum", token, tmp_path / "dev").sync()
        assert (r.version, r.method) == (2, "delta")
        assert json.loads((tmp_path / "dev" / "tuf" / "root.json").read_text())["signed"]["version"] == 2
        # A new device provisioned with the old root walks the chain too.
        assert SyncClient(srv.url, "museum", token, tmp_path / "new", srv.root).sync().version == 2
        # The rotated-out root key alone can no longer rotate.
        with pytest.raises(SyncError, match="400"):
            srv.admin.rotate_root("museum", [keys["root"]], [keys["root3"]])
    finally:
        srv.close()


def test_root_threshold_two_of_three(tmp_path, bundles):
    keys = bundles["keys"]
    with ServerThread(tmp_path / "data") as srv:
        admin = AdminClient(srv.url, ADMIN_TOKEN)
        three = [keys["root"], keys["root2"], keys["root3"]]
        admin.create_collection("museum", three, keys["targets"], root_threshold=2, out=tmp_path / "root.json")
        with pytest.raises(SyncError, match="400.*threshold of root keys"):  # one signature of the old root is not enough
            admin.rotate_root("museum", [keys["root"]], None, root_expiry=86400 * 30)
        admin.rotate_root("museum", [keys["root"], keys["root3"]], None, root_expiry=86400 * 30)
        admin.publish(bundles["v1"], "museum", keys["targets"])
        token = admin.add_device(["museum"], "kiosk")["token"]
        assert SyncClient(srv.url, "museum", token, tmp_path / "dev", tmp_path / "root.json").sync().version == 1


def test_every_role_expires_and_the_timestamp_is_short_lived(tmp_path, bundles):
    from tuf.api.metadata import Metadata

    srv = _setup(tmp_path, bundles)
    try:
        srv.admin.publish(bundles["v1"], "museum", bundles["keys"]["targets"])
        srv.admin.publish(bundles["v2"], "museum", bundles["keys"]["targets"])
        meta = srv.repo_dir / "metadata"
        now = time.time()
        left = {}
        for role in ("root", "targets", "snapshot", "timestamp", "deltas"):
            files = sorted(meta.glob(f"*{role}.json"), key=lambda p: int(p.name.split(".")[0]) if p.name[0].isdigit() else 0)
            md = Metadata.from_file(str(files[-1]))
            left[role] = md.signed.expires.timestamp() - now
        assert 0 < left["timestamp"] <= 86400 < left["snapshot"] <= 7 * 86400 < left["targets"] < left["root"], left
        # Deltas are TUF targets (role "deltas", delegated by targets to the server's online key).
        deltas = Metadata.from_file(str(sorted(meta.glob("*.deltas.json"))[-1]))
        assert list(deltas.signed.targets) == ["deltas/1-2.tar"]
        t = deltas.signed.targets["deltas/1-2.tar"]
        assert (srv.repo_dir / "targets" / "deltas" / f"{t.hashes['sha256']}.1-2.tar").stat().st_size == t.length
    finally:
        srv.close()
