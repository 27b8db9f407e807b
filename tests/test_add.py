"""``d2r add BUNDLE PHOTOS`` on one machine (issue 18): photos added to a bundle with its own
codebook and configuration give the bundle a build of all the photos with that codebook writes;
ids already in the bundle are refused before any work and the bundle is left untouched; bad
photos are skipped and listed; a failed add, or a bundle saved by someone else meanwhile, never
leaves a half-written or overwritten bundle. The same on a Ray cluster: tests/test_ray_build.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from d2r.cli import main
from d2r.errors import BundleError

from shared_data import ukbench_images

pytestmark = pytest.mark.slow  # builds bundles

# XFeat and the landmark detector (regions re-extracted on each crop), a small codebook.
FAST = ["--features", "xfeat", "--detector", "landmark@0.1", "--verification-features", "100"]
BUNDLE_FILES = ("index.d2ri", "codebook.d2rcb", "features.d2rv", "features.ids.json")


def same_files(a: Path, b: Path) -> dict:
    return {name: (a / name).read_bytes() == (b / name).read_bytes() for name in BUNDLE_FILES}


def snapshot(folder: Path) -> dict:
    """Every file of a folder: relative path -> (bytes, mtime): what 'left untouched' means."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """all/: six photos and a corrupt JPEG; first/: the first three; more/: the other three and
    the corrupt one; titles.csv: metadata for the photos of more/."""
    root = tmp_path_factory.mktemp("add")
    photos = ukbench_images()[:6]
    for name, part in (("all", photos), ("first", photos[:3]), ("more", photos[3:])):
        (root / name).mkdir()
        for p in part:
            shutil.copy(p, root / name / p.name)
    broken = ukbench_images()[12].read_bytes()[:300]  # a truncated download
    (root / "all" / "broken.jpg").write_bytes(broken)
    (root / "more" / "broken.jpg").write_bytes(broken)
    (root / "titles.csv").write_text("image_id,title\n" + "".join(f"{p.name},Object {p.stem}\n" for p in photos[3:]))
    return root


@pytest.fixture(scope="module")
def bundles(folders, tmp_path_factory):
    """whole.d2r: a build of all/ (codebook trained on it); base.d2r: a build of first/ with that codebook."""
    from d2r.cli import main

    out = tmp_path_factory.mktemp("add-bundles")
    assert main(["build", str(folders / "all"), "-o", str(out / "whole.d2r"), *FAST, "--codebook-size", "16",
                 "--metadata", str(folders / "titles.csv")]) == 0
    assert main(["build", str(folders / "first"), "-o", str(out / "base.d2r"), *FAST, "--codebook", str(out / "whole.d2r" / "codebook.d2rcb")]) == 0
    return out / "whole.d2r", out / "base.d2r"


def test_adding_photos_writes_the_bundle_of_a_build_of_all_the_photos_with_that_codebook(folders, bundles, tmp_path, capsys):
    from d2r.engine import Engine

    whole, base = bundles
    bundle = tmp_path / "museum.d2r"
    shutil.copytree(base, bundle)
    rc, out, err = cli(capsys, "add", bundle, folders / "more", "--metadata", folders / "titles.csv")
    assert rc == 0, err
    # the index (ids, metadata, posting lists), codebook and verification features: byte for byte
    assert same_files(whole, bundle) == dict.fromkeys(BUNDLE_FILES, True)
    info, ref = (json.loads((p / "bundle.json").read_text()) for p in (bundle, whole))
    assert info["version"] == 2 and info["n_images"] == ref["n_images"] == 6 and info["config"] == ref["config"]
    # the corrupt photo: skipped, listed, recorded (its reason names the folder it was given in)
    assert list(info["skipped"]) == list(ref["skipped"]) == ["broken.jpg"]
    assert info["skipped"]["broken.jpg"] == str(folders / "more" / "broken.jpg") + ref["skipped"]["broken.jpg"].split("broken.jpg", 1)[1]
    assert f"wrote {bundle} version 2: 6 images (3 added)" in out
    assert "skipped 1 photo(s) that could not be read" in err and "  broken.jpg: " in err
    assert "index: 4/4 photos" in err  # the progress counter (photos/s and time left once a second has passed)
    with Engine.open(bundle) as engine:
        photo = folders / "more" / sorted(p.name for p in (folders / "more").glob("ukbench*"))[0]
        assert engine.query(photo, top_k=1).hits[0].image_id == photo.name
        assert engine.index.get_metadata(photo.name) == {"title": f"Object {photo.stem}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["museum.d2r"]  # no temporary left beside it


def test_photos_already_in_the_bundle_are_refused_by_name_and_the_bundle_is_left_untouched(folders, bundles, tmp_path, capsys):
    _, base = bundles
    bundle = tmp_path / "museum.d2r"
    shutil.copytree(base, bundle)
    again = tmp_path / "again"
    again.mkdir()
    first = sorted((folders / "first").iterdir())
    shutil.copy(first[0], again)  # in the bundle already
    shutil.copy(ukbench_images()[7], again)  # new
    before = snapshot(bundle)
    rc, out, err = cli(capsys, "add", bundle, again)
    assert rc == 1
    assert f"d2r add: error: 1 photo(s) of {again} are already in {bundle}: {first[0].name}; nothing was changed" in err, err
    assert "--skip-existing" in err and "index:" not in err  # refused before any photo was read
    assert snapshot(bundle) == before
    # --skip-existing: the others are added
    rc, out, err = cli(capsys, "add", bundle, again, "--skip-existing")
    assert rc == 0, err
    assert "left out 1 photo(s) already in the bundle" in out and "version 2: 4 images (1 added)" in out
    # nothing new at all: no new version
    before = snapshot(bundle)
    rc, out, err = cli(capsys, "add", bundle, again, "--skip-existing")
    assert rc == 0 and "left as it was (version 2, 4 images): no photo added" in out
    assert snapshot(bundle) == before


def test_a_strict_add_that_stops_at_a_bad_photo_leaves_the_bundle_as_it_was(bundles, tmp_path, capsys):
    _, base = bundles
    bundle = tmp_path / "museum.d2r"
    shutil.copytree(base, bundle)
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(ukbench_images()[8], more)
    (more / "zz-broken.jpg").write_bytes(ukbench_images()[9].read_bytes()[:300])  # after a good photo
    before = snapshot(bundle)
    rc, _, err = cli(capsys, "add", bundle, more, "--strict")
    assert rc == 1 and "d2r add: error: " in err and "zz-broken.jpg" in err
    assert snapshot(bundle) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more", "museum.d2r"]


def test_a_bundle_saved_by_another_writer_meanwhile_is_not_overwritten(bundles, tmp_path):
    from d2r.adding import add_to_bundle
    from d2r.engine import Engine

    _, base = bundles
    bundle = tmp_path / "museum.d2r"
    shutil.copytree(base, bundle)
    photo = ukbench_images()[10]

    def other_writer(stage, done, total):
        if done == 1:  # while this add runs, another process saves the bundle as version 2
            with Engine.open(bundle) as other:
                other.save(bundle)

    with pytest.raises(BundleError, match="saved by another writer"):
        add_to_bundle(bundle, [photo], progress=other_writer)
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["version"] == 2 and info["n_images"] == 3  # the other writer's bundle, whole


def test_add_refuses_what_is_not_a_bundle_and_the_ray_flags_without_ray(folders, tmp_path, capsys, monkeypatch):
    photos = folders / "first"
    rc, _, err = cli(capsys, "add", tmp_path / "missing.d2r", photos)
    assert rc == 1 and f"d2r add: error: {tmp_path / 'missing.d2r'}: no such bundle folder" in err, err
    rc, _, err = cli(capsys, "add", folders / "more", photos)  # a folder of photos, not a bundle
    assert rc == 1 and "d2r add: error: " in err and str(folders / "more") in err, err
    assert len(list((folders / "more").iterdir())) == 4
    for flags in (["--resume"], ["--shards", str(tmp_path / "s")], ["--ray-workers", "2"]):
        rc, _, err = cli(capsys, "add", tmp_path / "any.d2r", photos, *flags)
        assert rc == 1 and f"{flags[0]}: only with --ray" in err, err
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    rc, _, err = cli(capsys, "add", tmp_path / "any.d2r", photos, "--ray", "auto")
    assert rc == 1 and "--ray: adding on a cluster needs the 'ray' extra: pip install 'd2r[ray]'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
