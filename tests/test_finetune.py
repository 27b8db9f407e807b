"""d2r detector finetune: real TensorFlow training of the SSD heads on a tiny real set, export, runtime."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest

from d2r.errors import InputError
from d2r_convert import finetune, ssd

from shared_data import landmark_photo, landmark_photos, landmarks_dir, ukbench_dir, ukbench_images

# TensorFlow is looked for, not imported here: collecting the fast tier (`make check`) stays quick.
pytestmark = [pytest.mark.slow,  # trains with TensorFlow
              pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow (the convert extra)")]


def _paste_set(folder, n=6):
    """Oxford photos with a UKBench object pasted at a known place: the box is known exactly."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    oxford = landmark_photos()[:n]
    objects = ukbench_images()[::9][:n]
    rng = np.random.default_rng(0)
    recs = []
    for i, (bg_path, fg_path) in enumerate(zip(oxford, objects)):
        bg = Image.open(bg_path).convert("RGB")
        W, H = bg.size
        w = int(W * rng.uniform(0.35, 0.55))
        h = min(int(w * 0.75), H - 2)
        x0, y0 = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
        bg.paste(Image.open(fg_path).convert("RGB").resize((w, h)), (x0, y0))
        bg.save(folder / f"p{i}.jpg", quality=92)
        recs.append({"path": f"p{i}.jpg", "width": W, "height": H, "box": [y0 / H, x0 / W, (y0 + h) / H, (x0 + w) / W],
                     "support": 3, "inliers": 40})
    doc = {"format": "d2r-boxes", "version": 1, "settings": {"test": "pasted objects"}, "images": recs}
    (folder / "boxes.json").write_text(json.dumps(doc))
    return folder, doc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _paste_set(tmp_path_factory.mktemp("paste") / "images")


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    folder, _ = tiny
    out = tmp_path_factory.mktemp("out")
    parser = argparse.ArgumentParser()
    finetune.add_finetune_arguments(parser)
    args = parser.parse_args(["--images", str(folder), "--boxes", str(folder / "boxes.json"), "-o", str(out),
                              "--epochs", "6", "--batch-size", "4", "--views", "2", "--val-fraction", "0.34",
                              "--lr", "3e-3", "--cache", str(out / "cache"), "--keep", "tflite:int8", "--measure", "", "--timing-runs", "1",
                              "--calibration-count", "4", "--evaluation-count", "2",
                              "--calibration", str(ukbench_dir() / "images"), "--evaluation", str(landmarks_dir())])
    assert finetune.cmd_finetune(args) == 0
    return out


def test_training_lowers_the_loss(trained):
    rep = json.loads((trained / "reports" / "ssd_mobilenetv2_landmark_training.json").read_text())
    h = rep["history"]
    assert len(h) == 7 and rep["validation_images"] and len(rep["train_images"]) == 4
    first, last = h[1], h[-1]
    assert last["train_class"] + last["train_box"] < 0.8 * (first["train_class"] + first["train_box"])
    assert h[-1]["val_class"] + h[-1]["val_box"] < h[0]["val_class"] + h[0]["val_box"]
    assert rep["kept_epoch"] > 0


def test_export_loads_and_detects(trained, tiny):
    import d2r
    from d2r.detect import Detector

    manifest = json.loads((trained / "manifest.json").read_text())
    (entry,) = manifest["models"]
    assert entry["file"] == "ssd_mobilenetv2_landmark_int8.tflite" and entry["labels"] == ["background", "landmark"]
    assert entry["training"]["ground_truth_used"] is False
    assert not (trained / "ssd_mobilenetv2_landmark_fp32.tflite").exists()  # measured, not kept
    model = d2r.load_model(trained / entry["file"], threads=1)
    assert model.entry is not None and model.entry.output("class_logits").shape == (1, ssd.NUM_ANCHORS, 2)
    det = Detector(model, threshold=0.0, max_boxes=5).detect(tiny[0] / "p0.jpg")
    assert len(det) == 5 and set(det.labels) == {"landmark"}
    assert np.all((det.boxes >= 0) & (det.boxes <= 1)) and np.all(np.diff(det.scores) <= 0)


def test_matching_and_views():
    corners = finetune.anchor_corners()
    from d2r.detect import decode_boxes, ssd_anchors

    anchors = ssd_anchors(ssd.ANCHORS)
    box = [0.2, 0.1, 0.9, 0.6]
    labels, enc = finetune.match(box, corners, anchors)
    pos = np.flatnonzero(labels == 1)
    assert len(pos) >= 1 and set(np.unique(labels)) <= {-1, 0, 1}
    np.testing.assert_allclose(decode_boxes(enc[pos], anchors[pos]), np.tile(box, (len(pos), 1)), atol=1e-5)
    assert finetune.view_box(box, (0, 0, 1, 1), True) == pytest.approx([0.2, 0.4, 0.9, 0.9])
    assert finetune.view_box(box, (0.0, 0.7, 1.0, 1.0), False) is None  # the box is outside the crop
    v1 = finetune.make_views(["a.jpg", "b.jpg"], 4, seed=3)
    assert v1 == finetune.make_views(["a.jpg", "b.jpg"], 4, seed=3) != finetune.make_views(["a.jpg", "b.jpg"], 4, seed=4)


def test_average_precision():
    gt = [[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.5, 1.0, 1.0]]]
    hit = (np.array([[0.0, 0.0, 0.5, 0.5]], np.float32), np.array([0.9], np.float32))
    miss = (np.array([[0.0, 0.0, 0.2, 0.2]], np.float32), np.array([0.95], np.float32))
    assert finetune.average_precision([hit, (hit[0] + 0.5, hit[1])], gt) == pytest.approx(1.0)
    assert finetune.average_precision([miss, (hit[0] + 0.5, hit[1])], gt) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="something-else"), "expected a 'd2r-boxes' file"),
        (lambda d: d.update(version=7), "version 7"),
        (lambda d: d["images"][1].update(path="nope.jpg"), "nope.jpg.*not found"),
        (lambda d: d["images"][0].update(box=[0.1, 0.2, 1.3, 0.5]), "outside \\[0, 1\\]"),
        (lambda d: d["images"][0].update(box=[0.5, 0.2, 0.4, 0.5]), "empty"),
        (lambda d: d["images"][0].update(box=[0.1, 0.2]), "box must be"),
        (lambda d: d.update(images=[]), "non-empty list"),
    ],
)
def test_bad_boxes_files_fail_clearly(tiny, tmp_path, mutate, message):
    folder, doc = tiny
    bad = json.loads(json.dumps(doc))
    mutate(bad)
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=message):
        finetune.load_boxes(path, folder)


def test_boxes_file_not_json_or_missing(tiny, tmp_path):
    folder, _ = tiny
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        finetune.load_boxes(tmp_path / "b.json", folder)
    with pytest.raises(InputError, match="cannot read"):
        finetune.load_boxes(tmp_path / "missing.json", folder)
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="d2r-boxes"):
        finetune.load_boxes(tmp_path / "c.json", folder)


def test_shipped_landmark_detector_is_the_default():
    import d2r
    from d2r.detect import Detector
    from d2r.engine import EngineConfig
    from d2r.manifest import ALIASES, load_manifest, resolve_model_path

    assert ALIASES["landmark"] == "ssd_mobilenetv2_landmark" and ALIASES["ssd"] == "ssd_mobilenetv2_oidv4"
    assert EngineConfig().detector == "ssd_mobilenetv2_landmark"
    assert resolve_model_path("landmark").name == "ssd_mobilenetv2_landmark_int8.tflite"
    manifest = load_manifest()
    for fmt in ("tflite", "onnx"):
        entry = manifest.find("ssd_mobilenetv2_landmark", format=fmt, precision="int8")
        entry.verify()
        assert entry.labels == ("background", "landmark") and entry.training["ground_truth_used"] is False
        det = Detector(d2r.load_model(entry.path, threads=1), threshold=0.05).detect(landmark_photo("all_souls_000000.jpg"))
        assert len(det) >= 1 and set(det.labels) == {"landmark"}
