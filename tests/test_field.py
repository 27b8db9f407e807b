"""Field conditions (issue "Field-ready"): bad photos in a batch, mismatched metadata, blank and
huge photos, a missing accelerator, option errors before any work."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import d2r
from d2r.engine import Engine
from d2r.image import DRAFT_PIXELS, load_image

from shared_data import ukbench_images

pytestmark = pytest.mark.slow  # builds bundles and runs the CLI

CLI = [sys.executable, "-m", "d2r.cli"]
FAST = ["--features", "xfeat", "--detector", "none", "--codebook-size", "32", "--verification-features", "0"]


def d2r_cli(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight good photos and one corrupt JPEG (a truncated download), in one folder."""
    folder = tmp_path_factory.mktemp("field") / "photos"
    folder.mkdir()
    for p in ukbench_images()[:8]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(ukbench_images()[9].read_bytes()[:300])
    return folder


@pytest.fixture(scope="module")
def bundle(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("field-bundle") / "b.d2r"
    meta = photos.parent / "meta.csv"
    names = sorted(p.name for p in photos.glob("ukbench*.jpg"))
    meta.write_text("image_id,title\n" + "".join(f"{n},Object {n}\n" for n in names[1:]) + "ghost.jpg,Nowhere\n")
    run = d2r_cli("build", photos, "-o", out, *FAST, "--metadata", meta)
    return out, run, names


def test_build_skips_an_unreadable_photo_lists_it_and_records_it(bundle):
    out, run, names = bundle
    assert run.returncode == 0, run.stderr
    assert "broken.jpg" in run.stderr and "skipped 1 photo" in run.stderr
    info = json.loads((out / "bundle.json").read_text())
    assert info["n_images"] == 8 and list(info["skipped"]) == ["broken.jpg"]
    assert "truncated" in info["skipped"]["broken.jpg"] or "corrupt" in info["skipped"]["broken.jpg"]
    with Engine.open(out) as engine:
        assert sorted(engine.index.image_ids()) == names


def test_build_warns_about_metadata_that_matches_no_photo(bundle):
    _, run, names = bundle
    warnings = [line for line in run.stderr.splitlines() if "warning" in line]
    assert any("1 metadata rows that match no photo: ghost.jpg" in w for w in warnings), run.stderr
    # names[0] has no row; the broken photo has none either
    assert any("photos without a metadata row" in w and names[0] in w and "broken.jpg" in w for w in warnings), run.stderr


def test_strict_build_stops_at_the_bad_photo_on_a_line_of_its_own(photos, tmp_path):
    out = tmp_path / "strict.d2r"
    run = d2r_cli("build", photos, "-o", out, *FAST, "--strict")
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    # the progress counter ("features: 3/9") is ended before the error is printed
    assert errors and errors[0].startswith("d2r build: error: ") and "broken.jpg" in errors[0], run.stderr
    assert not out.exists()


def test_query_answers_every_good_photo_and_exits_non_zero_for_a_bad_one(bundle, photos, tmp_path):
    out, _, names = bundle
    good = photos / names[2]
    run = d2r_cli("query", out, good, photos / "broken.jpg", photos / "missing.jpg", "--top-k", "2", "--json")
    assert run.returncode == 1
    res = json.loads(run.stdout)
    assert res[str(good)]["hits"][0]["image_id"] == names[2]
    assert "error" in res[str(photos / "broken.jpg")] and "no such file" in res[str(photos / "missing.jpg")]["error"]
    assert "2 of 3 photo(s) failed" in run.stderr


def test_top_k_zero_is_refused_before_any_work(bundle):
    out, _, _ = bundle
    run = d2r_cli("query", out, "nothing.jpg", "--top-k", "0")
    assert run.returncode == 2 and "--top-k" in run.stderr and "expected a whole number >= 1" in run.stderr
    with Engine.open(out) as engine:
        with pytest.raises(d2r.InputError, match="top_k"):
            engine.query("not even read.jpg", top_k=0)


def test_library_batch_skips_or_raises(photos):
    paths = sorted(photos.glob("*.jpg"))
    with Engine.create(features="xfeat", detector=None, kind="asmk_star") as engine:
        engine.train_codebook(paths, size=32, progress=False)
        assert list(engine.skipped) == ["broken.jpg"]
        added = engine.add_images(paths, progress=False)
        assert "broken.jpg" not in added and len(added) == 8 and len(engine.index) == 8
        with pytest.raises(d2r.ImageError, match="broken.jpg"):
            engine.add_images([photos / "broken.jpg"], ids=["again"], progress=False, on_error="raise")
        with pytest.raises(d2r.InputError, match="on_error"):
            engine.add_images(paths, progress=False, on_error="ignore")


@pytest.mark.parametrize("shape", [(480, 640), (1, 1), (10, 10000), (10000, 10)])
def test_a_photo_without_features_returns_no_hits(bundle, shape):
    out, _, _ = bundle
    with Engine.open(out) as engine:
        blank = np.full((*shape, 3), 128, np.uint8)
        res = engine.query(blank, top_k=5)
        assert res.hits == [] and res.n_features == 0


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (40, 90, 160)).save(buf, "JPEG", quality=30)
    return buf.getvalue()


@pytest.mark.parametrize("w,h", [(12000, 9000), (16320, 12240)])  # 108 and 200 megapixels
def test_phone_photos_of_100_and_200_megapixels_decode_reduced(w, h):
    rgb = load_image(_jpeg(w, h))
    assert rgb.shape[0] * rgb.shape[1] <= DRAFT_PIXELS
    assert rgb.shape[1] / rgb.shape[0] == pytest.approx(w / h, rel=0.01)
    assert abs(int(rgb[10, 10, 2]) - 160) < 8


def test_decompression_bombs_stay_refused(tmp_path):
    # a PNG cannot be decoded reduced: above the limit it is refused before decoding
    png = io.BytesIO()
    Image.new("1", (9000, 8000)).save(png, "PNG")
    with pytest.raises(d2r.ImageError, match="pixels"):
        load_image(png.getvalue())
    # a JPEG that would still be too large at 1/8 is refused from its header alone
    data = bytearray(_jpeg(64, 48))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (50000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    with pytest.raises(d2r.ImageError, match="decompression bomb"):
        load_image(bytes(data))


def test_a_missing_accelerator_warns_once_per_model_without_tracebacks(tmp_path):
    script = (
        "import d2r, numpy as np\n"
        "e = d2r.Engine.create(features='xfeat', detector='ssd', accelerator='gpu')\n"
        "e.extract(np.zeros((64, 64, 3), np.uint8))\n"
        "print(e.extractor.model.accelerator, e.detector.model.accelerator)\n"
        "del e\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["cpu", "cpu"]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("d2r: ") and "running on the CPU" in line for line in lines), run.stderr
    assert "Traceback" not in run.stderr and "XNNPACK delegate for CPU" not in run.stderr
