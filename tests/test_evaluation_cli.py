"""``d2r eval`` on a small dataset folder made from the UKBench photos (real images, real models)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import d2r
from d2r_lab.evaluation import parse_regions, rmac_boxes, run

from shared_data import ukbench_retrieval_dataset

pytestmark = pytest.mark.slow  # runs d2r eval on photos


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """14 objects x 4 photos: the first photo of each object is a query, the other 3 the database."""
    return ukbench_retrieval_dataset(tmp_path_factory.mktemp("ukb-dataset"))


def test_rmac_boxes_and_region_parsing():
    boxes = rmac_boxes(480, 640, 3)
    assert len(boxes) >= 1 + 2 + 3
    for b in boxes:
        assert 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1
    assert parse_regions("none") == ("none", None)
    assert parse_regions("rmac:2") == ("rmac", 2)
    assert parse_regions("detector:ssd@0.3") == ("detector", ("ssd", 0.3))
    assert parse_regions("shuffled:landmark@0.1") == ("shuffled", ("landmark", 0.1))
    assert parse_regions("centred:landmark@0.2") == ("centred", ("landmark", 0.2))
    for bad in ("rmac:0", "rmac:x", "detector:ssd@high", "shuffled:ssd@x", "centred:ssd@x", "grid"):
        with pytest.raises(d2r.InputError, match="regions"):
            parse_regions(bad)


def test_eval_asmk_star_and_regions(dataset, tmp_path):
    cache = tmp_path / "cache"
    plain = run(dataset, features="xfeat", kind="asmk_star", codebook_size=128, cache_dir=cache, progress=False)
    assert plain["n_queries"] == 14 and plain["n_images"] == 42
    assert plain["map"]["medium"] > 60.0, plain["table"]
    assert set(plain["mp"]["medium"]) == {"1", "5", "10"}
    # A second run hits the feature cache and, with the same seed, gives the same numbers.
    cb_path = tmp_path / "cb.d2rcb"
    cached = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")}
    again = run(dataset, features="xfeat", kind="asmk_star", codebook_size=128, cache_dir=cache, progress=False)
    assert again["map"] == plain["map"]
    assert cached and {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")} == cached  # nothing computed again
    # The cache is keyed by the photos' bytes: a copy elsewhere (new paths, new mtimes) reuses it.
    moved = shutil.copytree(dataset, tmp_path / "moved", copy_function=shutil.copyfile)
    assert run(moved, features="xfeat", kind="asmk_star", codebook_size=128, cache_dir=cache, progress=False)["map"] == plain["map"]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")} == cached
    # The other kinds on one codebook trained once (k-means dominates these small runs).
    from d2r_lab.evaluate import load_dataset

    with d2r.Engine.create(features="xfeat", detector=None, kind="asmk_star") as engine:
        engine.train_codebook(load_dataset(dataset).image_paths, size=128, progress=False).save(cb_path)
    regional = run(dataset, features="xfeat", kind="rasmk_star", regions="rmac:2", codebook=cb_path, cache_dir=cache, progress=False)
    assert regional["regions_per_image"] > 1 and regional["map"]["medium"] > 50.0
    assert regional["options"]["codebook"] == str(cb_path)
    d2r_max = run(dataset, features="xfeat", kind="d2r_asmk_star", regions="rmac:1", codebook=cb_path, cache_dir=cache, progress=False)
    assert d2r_max["map"]["medium"] > 50.0
    vlad = run(dataset, features="xfeat", kind="vlad", codebook_size=16, cache_dir=cache, progress=False)
    assert vlad["map"]["medium"] > 20.0
    verified = run(dataset, features="xfeat", kind="asmk_star", codebook_size=128, cache_dir=cache, verify_top=2, limit=4, progress=False)
    assert verified["options"]["verify"] and verified["n_queries"] == 4
    assert "verify_ms_per_query" in verified["timings"]
    assert verified["options"]["verify_precision"] == "int8"
    with pytest.raises(d2r.InputError, match="verify_precision"):
        run(dataset, features="xfeat", kind="asmk_star", codebook=cb_path, cache_dir=cache, verify_top=2, verify_precision="fp16", progress=False)


def test_shuffled_boxes_control(dataset, tmp_path):
    from d2r_lab.evaluation import _derangement

    for n in (2, 3, 42):
        d = _derangement(n, seed=1)
        assert sorted(d.tolist()) == list(range(n)) and (d != np.arange(n)).all()
    cache = tmp_path / "cache"
    kw = dict(features="xfeat", kind="rasmk_star", codebook_size=64, cache_dir=cache, progress=False)
    det = run(dataset, regions="detector:landmark@0.1", **kw)
    ctl = run(dataset, regions="shuffled:landmark@0.1", **kw)
    # the same boxes, dealt to other images: the same number of regions over the database
    assert det["regions_per_image"] > 1.5
    assert ctl["regions_per_image"] == pytest.approx(det["regions_per_image"])
    assert ctl["options"]["regions"] == "shuffled:ssd_mobilenetv2_landmark@0.1"
    assert ctl["index_bytes"] != det["index_bytes"] or ctl["map"] != det["map"]
    # --max-regions keeps the best boxes (the cached detections serve every cap)
    one = run(dataset, regions="detector:landmark@0.1", max_regions=1, **kw)
    assert 1.0 < one["regions_per_image"] <= 2.0 < det["regions_per_image"]
    assert one["options"]["max_regions"] == 1 and det["options"]["max_regions"] == 8  # d2r build's default
    with pytest.raises(d2r.InputError, match="max_regions"):
        run(dataset, regions="detector:landmark@0.1", max_regions=26, **kw)


def test_centred_boxes():
    from d2r_lab.evaluation import centred_boxes

    boxes = np.array([[0.0, 0.0, 0.5, 0.25], [0.2, 0.6, 1.0, 1.0], [0.1, 0.1, 0.9, 0.9]], np.float32)
    c = centred_boxes(boxes)
    assert c.dtype == np.float32 and c.shape == (3, 4)
    np.testing.assert_allclose(c[:, 2] - c[:, 0], boxes[:, 2] - boxes[:, 0], atol=1e-6)  # same heights
    np.testing.assert_allclose(c[:, 3] - c[:, 1], boxes[:, 3] - boxes[:, 1], atol=1e-6)  # and widths
    np.testing.assert_allclose((c[:, 0] + c[:, 2]) / 2, 0.5, atol=1e-6)
    np.testing.assert_allclose((c[:, 1] + c[:, 3]) / 2, 0.5, atol=1e-6)
    np.testing.assert_allclose(c[0], [0.25, 0.375, 0.75, 0.625], atol=1e-6)
    assert centred_boxes(np.zeros((0, 4))).shape == (0, 4)


def test_centred_control_and_scoring_variants(dataset, tmp_path):
    from d2r.config import NORMALIZE, QUERY_EXPAND
    from d2r_lab.evaluation import Scoring

    cache = tmp_path / "cache"
    cb_path = tmp_path / "cb.d2rcb"
    kw = dict(features="xfeat", kind="rasmk_star", cache_dir=cache, progress=False)
    det = run(dataset, regions="detector:landmark@0.1", codebook_size=64, **kw)
    det["_codebook"].save(cb_path)
    vs = [Scoring(), Scoring(alpha=2.0), Scoring(tau=0.2), Scoring(normalize=not NORMALIZE), Scoring(expand=0)]
    ctl = run(dataset, regions="centred:landmark@0.1", codebook=cb_path, variants=vs, **kw)
    # the image's own boxes, moved to the centre: as many regions, not the same ones
    assert ctl["regions_per_image"] == pytest.approx(det["regions_per_image"])
    assert ctl["options"]["regions"] == "centred:ssd_mobilenetv2_landmark@0.1"
    assert ctl["index_bytes"] != det["index_bytes"] or ctl["map"] != det["map"]
    # Variants rank over one aggregation: the pipeline's own scoring (with Engine.query's query
    # expansion) is the run's result, and another alpha or tau is what a run configured with it
    # gives (aggregated again); expand=0 is what a run with expand=0 gives.
    got = {(v["alpha"], v["tau"], v["normalize"], v["expand"]): v for v in ctl["variants"]}
    assert len(got) == 5 and got[(3.0, 0.0, NORMALIZE, QUERY_EXPAND)]["map"] == ctl["map"]
    for alpha, tau in ((2.0, 0.0), (3.0, 0.2)):
        own = run(dataset, regions="centred:landmark@0.1", codebook=cb_path, alpha=alpha, tau=tau, **kw)
        assert got[(alpha, tau, NORMALIZE, QUERY_EXPAND)]["map"] == own["map"]
    plain = run(dataset, regions="centred:landmark@0.1", codebook=cb_path, expand=0, **kw)
    assert got[(3.0, 0.0, NORMALIZE, 0)]["map"] == plain["map"] and plain["options"]["expand"] == 0
    assert all(v["query_ms_median"] > 0 for v in ctl["variants"])
    with pytest.raises(d2r.InputError, match="variants"):
        run(dataset, regions="centred:landmark@0.1", codebook=cb_path, variants=[{"alpha": 2, "gamma": 1}], **kw)
    with pytest.raises(d2r.InputError, match="variants"):
        run(dataset, kind="vlad", codebook_size=16, features="xfeat", cache_dir=cache, progress=False, variants=vs)


def test_eval_cli_json(dataset, tmp_path):
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, "-m", "d2r.cli", "eval", "--dataset", str(dataset), "--features", "xfeat", "--codebook-size", "64", "--quiet",
         "--cache", str(tmp_path / "c"), "--limit", "5", "--json", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    for key in ("dataset", "options", "map", "mp", "n_queries", "n_images", "regions_per_image", "index_bytes", "timings"):
        assert key in res
    assert res["n_queries"] == 5 and set(res["map"]) == {"easy", "medium", "hard"}
    # The HTML report: one section per query, ten bordered thumbnails each, the summary table.
    report = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "d2r.cli", "eval", "--dataset", str(dataset), "--features", "xfeat", "--codebook-size", "64", "--quiet",
         "--cache", str(tmp_path / "c"), "--limit", "3", "--report", str(report)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    page = report.read_text()
    assert page.count("<section>") == 3 and page.count('class="query"') == 3
    assert page.count('<figure class="pos">') + page.count('<figure class="neg">') + page.count('<figure class="junk">') == 30
    assert page.count('<figure class="pos">') >= 6  # most of the 3 x 3 positives are in the top 10
    chromium = shutil.which("chromium")
    if chromium:  # it must also render in a browser (installed by .ci/run)
        shot = tmp_path / "report.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chr'}",
                        f"--screenshot={shot}", "--window-size=1200,900", report.as_uri()], capture_output=True, timeout=120)
        from PIL import Image

        img = Image.open(shot).convert("RGB")
        colours = set(img.resize((300, 225)).getdata())
        assert (34, 170, 34) in colours or any(g > 150 and r < 80 and b < 80 for r, g, b in colours)  # green borders drawn
    bad = subprocess.run([sys.executable, "-m", "d2r.cli", "eval", "--dataset", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 1 and "none" in bad.stderr


def test_eval_naive_rasmk_and_progress_callable(dataset, tmp_path):
    events = []
    res = run(dataset, features="xfeat", kind="naive_rasmk", regions="rmac:1", codebook_size=64, cache_dir=tmp_path / "c",
              progress=lambda what, done, total: events.append((what, done, total)))
    assert res["options"]["kind"] == "naive_rasmk" and res["regions_per_image"] > 1
    assert res["map"]["medium"] > 30.0, res["table"]
    assert ("index", 42, 42) in events and ("query features", 14, 14) in events
    with pytest.raises(d2r.errors.InputError, match="needs regions"):
        run(dataset, features="xfeat", kind="naive_rasmk", regions="none", cache_dir=tmp_path / "c")


def test_eval_packed_crops_are_the_region_stage_s(dataset, tmp_path, monkeypatch):
    """--regions pack: the eval packs the selected boxes of each photo through the region
    stage, as d2r build does, and caches them per box set."""
    from d2r.pipeline import RegionStage

    calls = []
    packed = RegionStage.packed
    monkeypatch.setattr(RegionStage, "packed", lambda self, rgb, boxes: calls.append(len(boxes)) or packed(self, rgb, boxes))
    kw = dict(features="xfeat", kind="rasmk_star", codebook_size=64, cache_dir=tmp_path / "cache", progress=False)
    crop = run(dataset, **kw)
    assert calls == []
    pack = run(dataset, regions="pack", **kw)
    n_images = pack["n_images"]
    assert len(calls) == n_images and sum(calls) == pytest.approx((pack["regions_per_image"] - 1) * n_images)
    again = run(dataset, regions="pack", **kw)
    assert len(calls) == n_images  # the second run read the cache
    assert pack["options"]["region_mode"] == "pack" and crop["options"]["region_mode"] == "crop"
    assert pack["regions_per_image"] == crop["regions_per_image"] > 1.5
    assert pack["map"] == again["map"] and pack["map"]["medium"] > 50.0
