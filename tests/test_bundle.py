"""The bundle format on its own (d2r.bundle): bundle.json written and read back, the atomic
swap, the archive form, and errors of the library that name no command-line flag. Fast: plain
files, no models, no server."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict

import pytest

from d2r.bundle import folder as bundle_folder
from d2r.bundle import pack_bundle, read_bundle_info, unpack_bundle, verify_bundle_folder, write_bundle_json, writing
from d2r.config import EngineConfig
from d2r.errors import ArchiveError, BundleError, InputError


def _body(version=1):
    return {"version": version, "config": asdict(EngineConfig(detector=None)), "codebook_sha256": "ab" * 32, "n_images": 0}


def _make(path, version=1, files=None):
    with writing(path) as tmp:
        for rel, data in (files or {"index.d2ri": b"index", "models/manifest.json": b"{}"}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        write_bundle_json(tmp, _body(version))
    return path


def test_bundle_json_lists_every_file_and_checks_itself(tmp_path):
    b = _make(tmp_path / "b.d2r")
    info = read_bundle_info(b)
    assert info["format"] == "d2r-bundle" and info["format_version"] == 1 and info["version"] == 1
    assert sorted(info["files"]) == ["index.d2ri", "models/manifest.json"]
    assert info["files"]["index.d2ri"]["size"] == 5
    assert verify_bundle_folder(b)["checksum"] == info["checksum"]
    raw = json.loads((b / "bundle.json").read_text())
    raw["n_images"] = 7  # an edit without a new checksum
    (b / "bundle.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="checksum mismatch"):
        read_bundle_info(b)


def test_an_altered_file_is_named(tmp_path):
    b = _make(tmp_path / "b.d2r")
    (b / "index.d2ri").write_bytes(b"INDEX")  # same size, other bytes
    info = read_bundle_info(b)
    bundle_folder.check_files(b, info, hashes=False)  # sizes only: not seen
    with pytest.raises(BundleError, match="index.d2ri was altered"):
        bundle_folder.check_files(b, info)


def test_a_failed_write_leaves_the_old_bundle_and_no_temporary(tmp_path):
    b = _make(tmp_path / "b.d2r", version=1)
    with pytest.raises(RuntimeError, match="boom"):
        with writing(b) as tmp:
            (tmp / "index.d2ri").write_bytes(b"half")
            raise RuntimeError("boom")
    assert read_bundle_info(b)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.d2r"]
    with pytest.raises(BundleError, match="no bundle.json was written"):
        with writing(b) as tmp:
            (tmp / "index.d2ri").write_bytes(b"no bundle.json")
    assert read_bundle_info(b)["version"] == 1
    _make(b, version=2)
    assert read_bundle_info(b)["version"] == 2


def test_a_folder_of_the_user_is_refused_before_anything_is_written(tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_bytes(b"mine")
    with pytest.raises(BundleError, match="not a d2r bundle"):
        with writing(user):
            raise AssertionError("not reached: refused before the folder is made")
    assert [p.name for p in user.iterdir()] == ["a.jpg"]


def test_the_archive_is_deterministic_and_unpacks_to_the_same_bundle(tmp_path):
    b = _make(tmp_path / "b.d2r")
    one, two = io.BytesIO(), io.BytesIO()
    pack_bundle(b, one)
    pack_bundle(b, two)
    assert one.getvalue() == two.getvalue()
    names = tarfile.open(fileobj=io.BytesIO(one.getvalue())).getnames()
    assert names == ["bundle.json", "index.d2ri", "models/manifest.json"]
    (tmp_path / "b.tar").write_bytes(one.getvalue())
    info = unpack_bundle(tmp_path / "b.tar", tmp_path / "out")
    assert info["checksum"] == read_bundle_info(b)["checksum"]
    assert (tmp_path / "out" / "index.d2ri").read_bytes() == b"index"


def test_an_unlisted_member_is_refused(tmp_path):
    b = _make(tmp_path / "b.d2r")
    pack_bundle(b, tmp_path / "b.tar")
    with tarfile.open(tmp_path / "b.tar", mode="a") as tar:
        ti = tarfile.TarInfo("extra.bin")
        ti.size = 5
        tar.addfile(ti, io.BytesIO(b"extra"))
    with pytest.raises(ArchiveError, match="'extra.bin' is not listed"):
        unpack_bundle(tmp_path / "b.tar", tmp_path / "out")


def test_the_sync_library_names_no_flag_and_the_command_does(tmp_path, capsys):
    pytest.importorskip("tuf")
    from d2r.cli import main
    from d2r.sync import SyncClient

    # No provisioned root: refused before any network access (port 9 is never contacted).
    client = SyncClient("http://127.0.0.1:9", "museum", "t", tmp_path / "dev")
    with pytest.raises(InputError) as err:
        client.sync()
    assert "no trusted TUF root" in str(err.value) and "--" not in str(err.value)
    assert main(["sync", "--server", "http://127.0.0.1:9", "--collection", "museum", "--token", "t",
                 "--dest", str(tmp_path / "dev")]) == 1
    assert "--root COLLECTION.root.json" in capsys.readouterr().err


def test_durations_name_the_option_that_gave_them():
    from d2r.cli.common import parse_interval

    assert parse_interval("15m", "--every") == 900
    with pytest.raises(InputError, match="^--timestamp-expiry: expected a duration"):
        parse_interval("soon", "--timestamp-expiry")


def test_old_import_paths_still_work():
    import d2r.engine
    import d2r.sync

    assert d2r.sync.SyncError is d2r.errors.SyncError and d2r.sync.ArchiveError is ArchiveError
    assert d2r.sync.pack_bundle is pack_bundle and d2r.engine.read_bundle_info is read_bundle_info
    assert d2r.sync.parse_interval("2h") == 7200
    assert issubclass(d2r.errors.StaleMetadataError, d2r.errors.SyncError)
