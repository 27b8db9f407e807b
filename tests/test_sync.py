"""Device sync against a real edge server (waitress on loopback): full and delta syncs,
resume, corruption, signatures, crash safety (kill -9 at every step), concurrent devices."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("waitress")
pytest.importorskip("cryptography")
pytest.importorskip("tuf")

import d2r  # noqa: E402
from d2r.sync import Destination, LiveBundle, SignatureError, SyncClient, SyncError, verify_bundle_folder  # noqa: E402
from d2r_server.client import AdminClient  # noqa: E402
from d2r_server.testing import ADMIN_TOKEN, Collection, FlakyProxy, ServerThread, create_collection, tuf_keys  # noqa: E402

pytestmark = pytest.mark.slow  # real servers and bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """v1: 300 images; v2: 3 removed, 3 added (1%); v3: 2 more added; plus a second key pair."""
    root = tmp_path_factory.mktemp("bundles")
    c = Collection()
    c.add([f"img{i:04d}" for i in range(300)])
    v1 = c.save(root / "v1.d2r")
    c.remove(["img0003", "img0100", "img0200"])
    c.add(["new-a", "new-b", "new-c"])
    v2 = c.save(root / "v2.d2r")
    c.add(["new-d", "new-e"])
    v3 = c.save(root / "v3.d2r")
    keys = tuf_keys(root / "keys")
    other = tuf_keys(root / "other-keys")
    return {"v1": v1, "v2": v2, "v3": v3, "keys": keys, "key": keys["targets"], "other_keys": other}


@pytest.fixture()
def server(tmp_path, bundles):
    with ServerThread(tmp_path / "data") as srv:
        srv.admin = AdminClient(srv.url, ADMIN_TOKEN)
        srv.root = create_collection(srv.admin, "museum", bundles["keys"], tmp_path / "museum.root.json")
        yield srv


def _device(server, name="tablet"):
    return server.admin.add_device(["museum"], name)["token"]


def _same_bundle(a: Path, b: Path) -> bool:
    return verify_bundle_folder(a)["checksum"] == verify_bundle_folder(b)["checksum"]


def test_full_then_delta_sync_reproduces_each_published_bundle(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    client = SyncClient(server.url, "museum", _device(server), tmp_path / "dev", server.root)
    r1 = client.sync()
    assert (r1.version, r1.method) == (1, "full")
    dest = Destination(tmp_path / "dev")
    assert _same_bundle(dest.current, bundles["v1"])
    assert client.sync().method == "none"

    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    r2 = client.sync()
    assert (r2.version, r2.previous, r2.method) == (2, 1, "delta")
    assert _same_bundle(dest.current, bundles["v2"])
    assert dest.previous.name == "1"
    assert r2.downloaded < r1.downloaded / 3  # 1% of the images changed
    idx = d2r.Index.open(dest.current / "index.d2ri")
    assert "new-a" in idx and "img0003" not in idx and len(idx) == 300
    idx.close()

    server.admin.publish(bundles["v3"], "museum", bundles["key"])
    assert client.sync().method == "delta"
    assert _same_bundle(dest.current, bundles["v3"])
    assert sorted(p.name for p in dest.versions.iterdir()) == ["2", "3"]  # current + previous kept

    dest.rollback()
    assert dest.current.name == "2" and dest.previous.name == "3"
    # A server offering an older version than the active one is refused (no silent downgrade).
    v1_record = dict(client.latest(), version=1)
    client.latest = lambda cur=None: v1_record
    with pytest.raises(SyncError, match="not newer"):
        client.sync()
    assert dest.current.name == "2"


def test_delta_skipping_versions_and_full_fallback(server, bundles, tmp_path):
    for v in ("v1", "v2", "v3"):
        server.admin.publish(bundles[v], "museum", bundles["key"])
    token = _device(server)
    # A device already on v1 jumps straight to v3 with one delta.
    dest = tmp_path / "dev"
    Destination(dest).prepare()
    staged = dest / "staging" / "seed"
    shutil.copytree(bundles["v1"], staged)
    Destination(dest).install(staged, 1)
    r = SyncClient(server.url, "museum", token, dest, server.root).sync()
    assert (r.version, r.method) == (3, "delta")
    assert _same_bundle(Destination(dest).current, bundles["v3"])
    # With deltas disabled the same jump is a full download.
    r = SyncClient(server.url, "museum", token, tmp_path / "dev2", server.root, prefer_delta=False).sync()
    assert (r.version, r.method) == (3, "full")


def test_resume_after_dropped_connection(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    proxy = FlakyProxy(server.port, match=b"/bundle", mode="drop", cut_after=30000, faults=2)
    try:
        r = SyncClient(proxy.url, "museum", _device(server), tmp_path / "dev", server.root).sync()
    finally:
        proxy.close()
    assert r.version == 1 and r.method == "full"
    ranged = [req for req in proxy.requests if b"/bundle" in req and b"range: bytes=" in req.lower()]
    assert len(ranged) >= 2, proxy.requests  # each retry resumed where the last one stopped
    assert _same_bundle(Destination(tmp_path / "dev").current, bundles["v1"])


def test_partial_download_is_resumed_by_the_next_run(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    proxy = FlakyProxy(server.port, match=b"/bundle", mode="drop", cut_after=25000, faults=1)
    try:
        with pytest.raises(SyncError):
            SyncClient(proxy.url, "museum", _device(server), tmp_path / "dev", server.root, retries=1).sync()
        size = server.app.extensions["d2r_storage"].version("museum", 1)["archive_size"]
        parts = list((tmp_path / "dev" / "staging").glob("*.part"))
        assert parts and 0 < parts[0].stat().st_size < size
        have = parts[0].stat().st_size
        r = SyncClient(proxy.url, "museum", _device(server), tmp_path / "dev", server.root).sync()
    finally:
        proxy.close()
    assert r.version == 1 and r.downloaded == size - have
    assert any(b"range: bytes=" in req.lower() for req in proxy.requests)


def test_corrupted_download_is_rejected_and_old_bundle_kept(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = _device(server)
    SyncClient(server.url, "museum", token, tmp_path / "dev", server.root).sync()
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    proxy = FlakyProxy(server.port, match=b"/", mode="corrupt", cut_after=5000, faults=10)
    try:
        with pytest.raises(SyncError, match="corrupt"):
            SyncClient(proxy.url, "museum", token, tmp_path / "dev", server.root).sync()
    finally:
        proxy.close()
    dest = Destination(tmp_path / "dev")
    assert dest.current.name == "1" and _same_bundle(dest.current, bundles["v1"])
    assert not list(dest.staging.glob("*.part"))  # a corrupt partial is not resumed
    assert SyncClient(server.url, "museum", token, tmp_path / "dev", server.root).sync().version == 2


def test_metadata_not_signed_by_the_pinned_roots_keys_is_rejected(server, bundles, tmp_path):
    from tuf.api.metadata import TargetFile

    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = _device(server)
    # A device provisioned with another collection's root (other root and targets keys).
    other_root = create_collection(server.admin, "other", bundles["other_keys"], tmp_path / "other.root.json")
    with pytest.raises(SignatureError, match="TUF metadata refused"):
        SyncClient(server.url, "museum", token, tmp_path / "dev", other_root).sync()
    assert Destination(tmp_path / "dev").current is None
    SyncClient(server.url, "museum", token, tmp_path / "dev2", server.root).sync()
    # A compromised server holds the online key, not the targets key: it signs targets listing
    # another bundle as version 2 with the key it has. Refused.
    repo = server.app.extensions["d2r_repos"]("museum")
    forged = repo.targets_md()
    evil = TargetFile.from_data("bundles/2.tar", (bundles["v2"] / "bundle.json").read_bytes(), ["sha256"])
    evil.unrecognized_fields["custom"] = {"d2r": {"version": 2, "bundle_checksum": "0" * 64, "n_images": 1}}
    forged.signed.targets[evil.path] = evil
    forged.signed.version += 1
    forged.signatures.clear()
    forged.sign(server.app.extensions["d2r_online_signer"])
    repo.install_targets(forged.to_bytes(), forged)
    repo.write_online(None)
    with pytest.raises(SignatureError, match="TUF metadata refused"):
        SyncClient(server.url, "museum", token, tmp_path / "dev2").sync()
    assert Destination(tmp_path / "dev2").current.name == "1"


def test_wrong_and_revoked_tokens(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    dev = server.admin.add_device(["museum"], "kiosk")
    with pytest.raises(SyncError, match="401"):
        SyncClient(server.url, "museum", dev["token"][:-2] + "xx", tmp_path / "a", server.root).sync()
    with pytest.raises(SyncError, match="401"):
        SyncClient(server.url, "museum", "d2rdev_nosuchdevice_secret", tmp_path / "a", server.root).sync()
    other = server.admin.add_device(["other-collection"], "elsewhere")
    with pytest.raises(SyncError, match="403"):
        SyncClient(server.url, "museum", other["token"], tmp_path / "a", server.root).sync()
    assert SyncClient(server.url, "museum", dev["token"], tmp_path / "a", server.root).sync().version == 1
    server.admin.revoke_device(dev["id"])
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    with pytest.raises(SyncError, match="401"):
        SyncClient(server.url, "museum", dev["token"], tmp_path / "a", server.root).sync()
    assert Destination(tmp_path / "a").current.name == "1"


def test_malicious_archive_with_path_traversal_is_refused_by_the_device(server, bundles, tmp_path):
    import io
    import tarfile

    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = _device(server)
    SyncClient(server.url, "museum", token, tmp_path / "dev", server.root).sync()
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    storage = server.app.extensions["d2r_storage"]
    row = storage.version("museum", 2)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        data = (bundles["v2"] / "bundle.json").read_bytes()
        ti = tarfile.TarInfo("bundle.json")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("../../escaped")
        ti.size = 3
        tar.addfile(ti, io.BytesIO(b"bad"))
    # The server's store is compromised: the target file is replaced (its signed sha256 is not).
    repo = server.app.extensions["d2r_repos"]("museum")
    target = repo.targets_dir / "bundles" / f"{row['archive_sha256']}.2.tar"
    target.unlink()
    target.write_bytes(evil.getvalue())
    with pytest.raises(SyncError, match="corrupt"):
        SyncClient(server.url, "museum", token, tmp_path / "dev", server.root, prefer_delta=False).sync()
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "dev" / "escaped").exists()
    assert Destination(tmp_path / "dev").current.name == "1"
    # Unpacking checks every member too (a hostile archive with a valid hash never gets this far).
    from d2r.sync import ArchiveError, unpack_bundle

    (tmp_path / "evil.tar").write_bytes(evil.getvalue())
    with pytest.raises(ArchiveError, match="unsafe path"):
        unpack_bundle(tmp_path / "evil.tar", tmp_path / "unpacked")
    assert not (tmp_path / "escaped").exists()


CRASH_STAGES = ["download-chunk", "downloaded", "verified", "installed", "previous-link-created", "current-link-created", "swapped"]


@pytest.mark.parametrize("method", ["full", "delta"])
def test_client_killed_at_every_step_keeps_a_complete_bundle_active(server, bundles, tmp_path, method):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = _device(server)
    dest = tmp_path / "dev"
    SyncClient(server.url, "museum", token, dest, server.root).sync()
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    cmd = [sys.executable, "-m", "d2r.cli", "sync", "--server", server.url, "--collection", "museum", "--token", token,
           "--dest", str(dest), "--root", str(server.root)]
    stages = CRASH_STAGES if method == "full" else ["verified", "installed", "current-link-created"]
    if method == "full":
        cmd.append("--no-delta")
    for stage in stages:
        env = dict(os.environ, D2R_SYNC_CRASH_AT=stage)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, (stage, proc.stdout, proc.stderr)
        d = Destination(dest)
        active = d.current
        assert active is not None and active.name in ("1", "2"), stage
        assert active.name == ("2" if stage == "swapped" else "1"), stage
        verify_bundle_folder(active)  # complete and intact, whatever the stage
        if active.name == "2":
            d.rollback()  # back to v1 for the next stage
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _same_bundle(Destination(dest).current, bundles["v2"])
    assert not [p for p in Destination(dest).staging.iterdir() if not p.name.endswith(".part")]


def test_twenty_devices_sync_while_a_new_version_is_published(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    tokens = [_device(server, f"tablet-{i}") for i in range(20)]
    results, errors = {}, []
    start = threading.Barrier(21)

    def device(i):
        start.wait()
        try:
            client = SyncClient(server.url, "museum", tokens[i], tmp_path / f"dev{i}", server.root)
            results[i] = [client.sync().version]
            results[i].append(client.sync().version)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((i, repr(exc)))

    threads = [threading.Thread(target=device, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    start.wait()
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i in range(20):
        d = Destination(tmp_path / f"dev{i}")
        info = verify_bundle_folder(d.current)  # one complete, verified version
        assert info["version"] in (1, 2) and results[i][-1] == info["version"]
        assert _same_bundle(d.current, bundles[f"v{info['version']}"])
    # One more round: everyone ends on the new version.
    for i in range(20):
        SyncClient(server.url, "museum", tokens[i], tmp_path / f"dev{i}", server.root).sync()
        assert _same_bundle(Destination(tmp_path / f"dev{i}").current, bundles["v2"])
    devices = {d["name"]: d for d in server.admin.devices()}
    assert all(devices[f"tablet-{i}"]["last_version"] == 2 for i in range(20))


def test_live_bundle_picks_up_a_new_version_between_queries(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = _device(server)
    client = SyncClient(server.url, "museum", token, tmp_path / "dev", server.root)
    client.sync()

    class IndexOnly:  # stands in for d2r.Engine (the default models are not needed here)
        def __init__(self, folder):
            self.index = d2r.Index.open(Path(folder) / "index.d2ri")

        def query(self, image_id):
            return image_id in self.index

        def close(self):
            self.index.close()

    with LiveBundle(tmp_path / "dev", opener=IndexOnly) as live:
        assert live.query("img0003") and not live.query("new-a")
        held = live.get()
        server.admin.publish(bundles["v2"], "museum", bundles["key"])
        client.sync()
        assert live.query("new-a") and not live.query("img0003")
        assert live.get() is not held and live.version_path.name == "2"


def test_index_get_returns_the_stored_items(tmp_path):
    """d2r.Index.get: the accessor deltas are made with (base and in-memory delta, regions, float kind)."""
    import numpy as np

    from d2r_server.testing import synthetic_codebook

    cb = synthetic_codebook(32, 16)
    rng = np.random.default_rng(1)
    for kind in ("rasmk_star", "asmk"):
        idx = d2r.Index(cb, kind=kind)
        stored = {}
        for i in range(20):
            aggs = [d2r.aggregate(rng.standard_normal((30, 16)).astype(np.float32), cb, kind=kind) for _ in range(1 + i % 3)]
            idx.add_regions(f"im{i}", aggs)
            stored[f"im{i}"] = aggs
        idx.remove("im4")
        with pytest.raises(d2r.InputError):
            idx.get("im4")
        idx.save(tmp_path / f"{kind}.d2ri")
        opened = d2r.Index.open(tmp_path / f"{kind}.d2ri")  # base segment (memory-mapped) + a new delta image
        opened.add_regions("late", stored["im7"])
        stored["late"] = stored["im7"]
        for image_id, where in (("im0", idx), ("im5", idx), ("im19", idx), ("im0", opened), ("im19", opened), ("late", opened)):
            got = where.get(image_id)
            assert len(got) == len(stored[image_id])
            for g, e in zip(got, stored[image_id]):
                assert g.kind == kind and np.array_equal(g.words, e.words)
                assert np.array_equal(g.codes, e.codes) if kind == "rasmk_star" else np.array_equal(g.vectors, e.vectors)
        opened.close()


def test_no_delta_when_the_codebook_changed_falls_back_to_full(server, bundles, tmp_path):
    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = _device(server)
    client = SyncClient(server.url, "museum", token, tmp_path / "dev", server.root)
    client.sync()
    rebuilt = Collection(k=48)  # a new codebook: every image's words change
    rebuilt.add(["only-one", "and-two"])
    rebuilt.version = 1
    v2 = rebuilt.save(tmp_path / "rebuilt.d2r")
    server.admin.publish(v2, "museum", bundles["key"])
    r = client.sync()
    assert (r.version, r.method) == (2, "full")
    assert _same_bundle(Destination(tmp_path / "dev").current, v2)


def test_every_interval_parsing():
    from d2r.sync import parse_interval

    assert parse_interval("15m") == 900 and parse_interval("30s") == 30 and parse_interval("2h") == 7200
    assert parse_interval("45") == 45
    with pytest.raises(d2r.InputError):
        parse_interval("soon")


def test_a_tampered_delta_cannot_install_and_the_full_bundle_is_used(server, bundles, tmp_path):
    import hashlib
    import io
    import json
    import tarfile

    server.admin.publish(bundles["v1"], "museum", bundles["key"])
    token = _device(server)
    client = SyncClient(server.url, "museum", token, tmp_path / "dev", server.root)
    client.sync()
    server.admin.publish(bundles["v2"], "museum", bundles["key"])
    storage = server.app.extensions["d2r_storage"]
    with storage.db() as con:
        sha = con.execute("SELECT sha256 FROM deltas").fetchone()[0]  # built at publish
    out = io.BytesIO()
    with tarfile.open(storage.blob_path(sha)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "delta.json":  # the attacker also deletes an image the publisher kept
                d = json.loads(data)
                d["index"]["remove"].append("img0001")
                data = json.dumps(d).encode()
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    evil = out.getvalue()
    evil_sha = hashlib.sha256(evil).hexdigest()
    storage.blob_path(evil_sha).parent.mkdir(exist_ok=True)
    storage.blob_path(evil_sha).write_bytes(evil)
    # The attacker holds the server's online key, so the deltas role signs the evil delta.
    from tuf.api.metadata import TargetFile

    repo = server.app.extensions["d2r_repos"]("museum")
    repo.link_target("deltas/1-2.tar", evil_sha, storage.blob_path(evil_sha))
    repo.write_online({"deltas/1-2.tar": TargetFile(len(evil), {"sha256": evil_sha}, "deltas/1-2.tar")})
    logs = []
    client.log = logs.append
    r = client.sync()
    assert (r.version, r.method) == (2, "full")
    assert any("delta rejected" in line for line in logs), logs
    assert _same_bundle(Destination(tmp_path / "dev").current, bundles["v2"])
