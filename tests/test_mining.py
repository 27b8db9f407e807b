"""Landmark box mining (d2r_lab.mining, d2r detector mine-boxes) on real photos.

A real landmark photo crop is pasted, with a small affine warp, into real backgrounds (UKBench
object photos of different objects): the box mined for each must cover the pasted object, and
photos that share nothing with the others must get no box. Real XFeat features, real codebook,
index and RANSAC; small images so the file stays quick.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from d2r import cli
from d2r.errors import InputError
from d2r_lab import mining

from shared_data import landmark_photo, ukbench_dir, ukbench_groups

pytestmark = pytest.mark.slow  # builds indexes from photos

BG_SIZE = (320, 240)  # (w, h) of each background


def iou(a, b) -> float:
    y0, x0, y1, x1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, y1 - y0) * max(0.0, x1 - x0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def warped(obj: Image.Image, angle_deg: float, scale: float):
    """The object rotated and scaled (PIL affine), with the mask of its pixels."""
    w, h = obj.size
    a = math.radians(angle_deg)
    ca, sa = math.cos(a) * scale, math.sin(a) * scale
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    fwd = np.array([[ca, -sa], [sa, ca]])
    moved = corners @ fwd.T
    off = moved.min(axis=0)
    size = np.ceil(moved.max(axis=0) - off).astype(int)
    inv = np.linalg.inv(fwd)
    # PIL maps output (x, y) to input: inv @ ([x, y] + off).
    coeffs = (inv[0, 0], inv[0, 1], inv[0] @ off, inv[1, 0], inv[1, 1], inv[1] @ off)
    img = obj.transform(tuple(size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    mask = Image.new("L", obj.size, 255).transform(tuple(size), Image.AFFINE, coeffs, resample=Image.NEAREST)
    return img, mask


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """4 photos with the pasted landmark (true boxes known) and 2 photos with nothing shared."""
    root = tmp_path_factory.mktemp("photos")
    src = Image.open(landmark_photo("all_souls_000000.jpg")).convert("RGB")
    w, h = src.size
    obj = src.crop((int(w * 0.15), int(h * 0.2), int(w * 0.85), int(h * 0.6))).resize((150, 110), Image.BILINEAR)
    groups = ukbench_groups()["groups"]
    images = ukbench_dir() / "images"
    truths = {}
    warps = [(4.0, 1.0, (30, 40)), (-5.0, 0.9, (150, 100)), (2.0, 1.1, (100, 20)), (-2.0, 1.0, (10, 110))]
    for k, (angle, scale, (x, y)) in enumerate(warps):
        bg = Image.open(images / groups[k][0]).convert("RGB").resize(BG_SIZE, Image.BILINEAR)
        img, mask = warped(obj, angle, scale)
        x = min(x, BG_SIZE[0] - img.width)
        y = min(y, BG_SIZE[1] - img.height)
        bg.paste(img, (x, y), mask)
        name = f"pasted_{k}.jpg"
        bg.save(root / name, quality=92)
        truths[name] = [y / BG_SIZE[1], x / BG_SIZE[0], (y + img.height) / BG_SIZE[1], (x + img.width) / BG_SIZE[0]]
    for k in (4, 5):
        Image.open(images / groups[k][1]).convert("RGB").resize(BG_SIZE, Image.BILINEAR).save(root / f"plain_{k}.jpg", quality=92)
    return root, truths


MINE = dict(codebook_size=32, top_k=5, min_inliers=25, progress=False)


def test_pasted_landmark_is_boxed_and_unrelated_photos_are_not(collection, tmp_path):
    root, truths = collection
    paths, _ = mining.list_images(root)
    doc = mining.mine_boxes(paths, root=root, cache_dir=tmp_path / "cache", **MINE)
    by_name = {e["path"]: e for e in doc["images"]}
    assert set(by_name) == set(truths) | {"plain_4.jpg", "plain_5.jpg"}
    for name, truth in truths.items():
        e = by_name[name]
        assert e["box"] is not None, name
        assert iou(e["box"], truth) >= 0.5, (name, e["box"], truth)
        # Its support is the other pasted photos, never a plain one.
        assert e["support"] >= 2 and all(n["path"].startswith("pasted_") for n in e["neighbours"]), e
        assert e["inliers"] >= e["support"] * MINE["min_inliers"]
    for name in ("plain_4.jpg", "plain_5.jpg"):
        assert by_name[name]["box"] is None and by_name[name]["support"] == 0, by_name[name]


def test_a_photo_without_local_features_gets_no_box(collection, tmp_path):
    """A blank photo has no feature to sample for the codebook (an empty index array once broke
    the sampling) and nothing to verify: it is mined, without a box."""
    root, _ = collection
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", BG_SIZE, (128, 128, 128)).save(blank)
    paths, _ = mining.list_images(root)
    doc = mining.mine_boxes([*paths, blank], cache_dir=tmp_path / "cache", **MINE)
    entry = next(e for e in doc["images"] if e["path"].endswith("blank.jpg"))
    assert entry["box"] is None and entry["support"] == 0, entry


def test_query_outside_the_collection_is_boxed_against_it(collection, tmp_path):
    root, truths = collection
    paths = sorted(p for p in root.glob("*.jpg") if p.name != "pasted_3.jpg")
    doc = mining.mine_boxes(paths, [root / "pasted_3.jpg"], root=root, cache_dir=tmp_path / "cache", **MINE)
    (q,) = doc["queries"]
    assert q["box"] is not None and iou(q["box"], truths["pasted_3.jpg"]) >= 0.5, q
    assert all(e["path"] != "pasted_3.jpg" for e in doc["images"])


def test_box_from_evidence_votes_out_a_lone_whole_frame_neighbour():
    # Three neighbours agree on the centre; one near-duplicate has inliers all over the frame.
    rng = np.random.default_rng(0)
    centre = [mining.Support(j, 1.0, 40, (rng.uniform(100, 200, (40, 2))).astype(np.float32)) for j in range(3)]
    whole = mining.Support(9, 1.0, 300, rng.uniform(0, 300, (300, 2)).astype(np.float32))
    ev = mining.Evidence(shape=(300, 300), supports=[whole] + centre)
    box = mining.box_from_evidence(ev, mining.BoxParams(min_inliers=15, margin=0.0, percentile=0.0))["box"]
    assert iou(box, [1 / 3, 1 / 3, 2 / 3, 2 / 3]) > 0.8, box
    # Disjoint extents and a high vote fraction: the most-voted area, not a crash.
    apart = mining.Evidence(shape=(300, 300), supports=[
        mining.Support(1, 1.0, 40, rng.uniform(0, 90, (40, 2)).astype(np.float32)),
        mining.Support(2, 1.0, 40, rng.uniform(200, 290, (40, 2)).astype(np.float32))])
    box = mining.box_from_evidence(apart, mining.BoxParams(min_inliers=15, vote_fraction=0.9, margin=0.0))["box"]
    assert box is not None and iou(box, [0, 0, 1, 1]) > 0.7, box
    # A neighbour below min_inliers does not count; none left -> no box.
    weak = mining.Evidence(shape=(300, 300), supports=[mining.Support(1, 1.0, 10, rng.uniform(0, 300, (10, 2)).astype(np.float32))])
    assert mining.box_from_evidence(weak, mining.BoxParams(min_inliers=15)) == {"box": None, "support": 0, "inliers": 0, "used": []}


def test_bad_inputs_fail_clearly(collection, tmp_path):
    root, _ = collection
    with pytest.raises(InputError, match="at least 2 images"):
        mining.mine_boxes([root / "pasted_0.jpg"], progress=False)
    with pytest.raises(InputError, match="no such image file"):
        mining.mine_boxes([root / "pasted_0.jpg", root / "missing.jpg"], progress=False)
    with pytest.raises(InputError, match="listed twice"):
        mining.mine_boxes([root / "pasted_0.jpg", root / "pasted_1.jpg", root / "." / "pasted_0.jpg"], progress=False)
    with pytest.raises(InputError, match="also in the collection"):
        mining.mine_boxes([root / "pasted_0.jpg", root / "pasted_1.jpg"], [root / "pasted_1.jpg"], progress=False)
    with pytest.raises(InputError, match="list of image paths"):
        mining.mine_boxes(str(root), progress=False)
    with pytest.raises(InputError, match="min_inliers"):
        mining.mine_boxes([root / "pasted_0.jpg", root / "pasted_1.jpg"], min_inliers=3, progress=False)
    with pytest.raises(InputError, match="top_k"):
        mining.mine_boxes([root / "pasted_0.jpg", root / "pasted_1.jpg"], top_k=0, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        mining.list_images(empty)
    listing = tmp_path / "list.txt"
    listing.write_text("pasted_0.jpg\n")
    with pytest.raises(InputError, match="line 1: no such image file"):
        mining.list_images(listing)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a d2r-boxes file"):
        mining.load_boxes(bad)
    bad.write_text(json.dumps({"format": "d2r-boxes", "version": 1, "images": [{"path": "a.jpg", "box": [0.5, 0.1, 0.2, 0.9]}]}))
    with pytest.raises(InputError, match="a.jpg"):
        mining.load_boxes(bad)


def test_cli_writes_a_valid_boxes_file(collection, tmp_path, capsys):
    root, truths = collection
    listing = tmp_path / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(root.glob("*.jpg"))))
    out = tmp_path / "boxes.json"
    rc = cli.main(["detector", "mine-boxes", str(root), "-o", str(out), "-k", "5", "--codebook-size", "32",
                   "--cache", str(tmp_path / "cache"), "--threads", "1", "--quiet"])
    assert rc == 0
    doc = mining.load_boxes(out)
    assert doc["format"] == "d2r-boxes" and doc["version"] == 1 and doc["settings"]["top_k"] == 5
    assert {e["path"] for e in doc["images"]} == set(truths) | {"plain_4.jpg", "plain_5.jpg"}
    for e in doc["images"]:
        assert set(e) == {"path", "width", "height", "box", "support", "inliers", "neighbours"}
        assert (e["width"], e["height"]) == BG_SIZE
        assert (e["box"] is not None) == e["path"].startswith("pasted_")
    assert "boxes for 4 of 6 images" in capsys.readouterr().out
    # A list file gives the same images, with paths relative to the list's folder.
    rc = cli.main(["detector", "mine-boxes", str(listing), "-o", str(out), "-k", "5", "--codebook-size", "32",
                   "--cache", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0 and len(mining.load_boxes(out)["images"]) == 6
    # Bad input: a clear error and exit status 1, no traceback.
    assert cli.main(["detector", "mine-boxes", str(tmp_path / "nowhere"), "-o", str(out)]) == 1
    assert "no such folder or list file" in capsys.readouterr().err


def test_finetune_without_the_converters_says_what_to_install(monkeypatch, capsys):
    from d2r_lab.cli import detector as landmarks

    monkeypatch.setattr(landmarks, "_finetune_module", lambda: (None, "No module named 'd2r_convert'"))
    rc = cli.main(["detector", "finetune", "--images", "photos", "--boxes", "boxes.json", "-o", "out"])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install -e '.[convert]'" in err and "d2r_convert" in err, err
