"""The shipped models: manifest contract, sha256, size budget, and a real run in LiteRT and ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2r.errors import ModelError
from d2r.manifest import SCHEMA_VERSION, load_manifest, resolve_model_path

from shared_data import landmark_photo

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(MODELS / "manifest.json")


def _photo(shape):
    from PIL import Image

    path = landmark_photo("all_souls_000000.jpg")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((shape[2], shape[1]), Image.BILINEAR), dtype=np.float32)[None]


def test_manifest_lists_the_default_models(manifest):
    have = {(m.name, m.format, m.precision) for m in manifest.models}
    for name in ("ssd_mobilenetv2_oidv4", "xfeat"):
        assert (name, "tflite", "int8") in have
        assert (name, "tflite", "fp32") in have or (name, "tflite", "fp16") in have
        assert (name, "onnx", "fp32") in have and (name, "onnx", "int8") in have
    listed = {m.file for m in manifest.models}
    on_disk = {p.name for p in MODELS.iterdir() if p.suffix in (".tflite", ".onnx")}
    assert listed == on_disk


def test_files_match_manifest_sha256_and_fit_the_budget(manifest):
    for m in manifest.models:
        m.verify()
        assert m.path.stat().st_size == m.size_bytes
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    # 60 MB before ALIKED (n16 + t16: TFLite fp16 + ONNX fp32 + head: 5.7 MB); LightGlue for
    # ALIKED-n16, TFLite fp16 only (its fp32 and ONNX files are measured, not shipped): 24 MB
    assert total < 91e6, total


def test_entries_carry_the_runtime_contract(manifest):
    for m in manifest.models:
        if m.task == "matcher":  # LightGlue's pieces: keypoint tensors, not images (tests/test_lightglue.py runs them)
            assert m.input.layout == "NC" and m.input.shape[0] == 1 and m.format == "tflite" and m.precision == "fp16"
            assert m.licence and m.source.get("version") and m.sha256
            continue
        assert m.input.layout == "NHWC" and m.input.range == (0.0, 255.0) and m.input.shape[0] == 1
        assert m.licence and m.source.get("version") and m.sha256
        assert m.defaults.get("score_threshold") is not None
        if m.task == "detector":
            assert m.anchors["num_anchors"] == m.output("box_encodings").shape[1]
            assert len(m.labels) == m.output("class_logits").shape[2]
            assert m.decoding["box_scale"] == [10.0, 10.0, 5.0, 5.0] == m.anchors["box_scale"]
            assert [m.decoding["scales"][k] for k in "yxhw"] == m.decoding["box_scale"]
        elif m.geometry.get("decoding") == "aliked":
            # dense maps in the file, keypoints and descriptor head on the host (d2r.features.aliked)
            assert m.output("score_map").shape[1:3] == m.input.shape[1:3]
            assert m.head.get("file") and m.head.get("sha256") and m.defaults["max_features"] > 0
        else:
            assert m.geometry["stride"] == 8 and m.output("descriptors").shape[-1] == 64
            assert m.defaults["max_features"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_shipped_models_run_with_manifest_shapes(manifest, fmt):
    for m in (e for e in manifest.models if e.format == fmt and e.task != "matcher"):  # matchers: tests/test_lightglue.py
        x = _photo(m.input.shape)
        if fmt == "tflite":
            from ai_edge_litert.interpreter import Interpreter

            it = Interpreter(model_path=str(m.path), num_threads=2)
            runner = it.get_signature_runner()
            out = runner(image=x)
            # the manifest lists outputs in the order a plain interpreter returns them
            by_index = {d["index"]: k for k, d in runner.get_output_details().items()}
            plain = Interpreter(model_path=str(m.path))
            assert [by_index[d["index"]] for d in plain.get_output_details()] == [o.name for o in m.outputs]
            assert [d["name"] for d in plain.get_output_details()] == [o.tensor for o in m.outputs]
        else:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
            assert [o.name for o in sess.get_outputs()] == [o.name for o in m.outputs]
            assert sess.get_inputs()[0].name == m.input.name
            out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {m.input.name: x})))
        for spec in m.outputs:
            assert tuple(out[spec.name].shape) == spec.shape, (m.file, spec.name)
            assert np.isfinite(out[spec.name]).all()
        if m.name == "xfeat":
            norms = np.linalg.norm(out["descriptors"][0], axis=-1)
            assert np.abs(norms - 1).max() < 0.05, m.file  # L2-normalised map, also in int8


def test_int8_agrees_with_float_on_a_photo(manifest):
    from ai_edge_litert.interpreter import Interpreter

    def run(entry):
        it = Interpreter(model_path=str(entry.path))
        return it.get_signature_runner()(image=_photo(entry.input.shape))

    for name in ("ssd_mobilenetv2_oidv4", "xfeat"):
        q = manifest.find(name, format="tflite", precision="int8")
        f = next(m for m in manifest.models if m.name == name and m.format == "tflite" and m.precision != "int8")
        a, b = run(q), run(f)
        if name == "xfeat":
            cos = np.sum(a["descriptors"] * b["descriptors"], axis=-1)
            assert cos.mean() > 0.95
        else:
            sa, sb = 1 / (1 + np.exp(-a["class_logits"])), 1 / (1 + np.exp(-b["class_logits"]))
            assert np.abs(sa - sb).max() < 0.25
            assert np.corrcoef(a["box_encodings"].ravel(), b["box_encodings"].ravel())[0, 1] > 0.95


def test_resolve_by_name_prefers_int8(manifest):
    assert resolve_model_path("xfeat", "tflite", manifest).name.endswith("_int8.tflite")
    assert resolve_model_path("ssd_mobilenetv2_oidv4", "onnx", manifest).name.endswith("_int8.onnx")
    with pytest.raises(ModelError, match="no tflite model named"):
        resolve_model_path("superpoint", "tflite", manifest)


def test_manifest_errors_name_the_problem(tmp_path, manifest):
    with pytest.raises(ModelError, match="cannot read"):
        load_manifest(tmp_path / "missing.json")
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "models": []}))
    with pytest.raises(ModelError, match="schema_version"):
        load_manifest(bad)
    raw = json.loads((MODELS / "manifest.json").read_text())
    del raw["models"][0]["sha256"]
    bad.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="models\\[0\\]: missing field 'sha256'"):
        load_manifest(bad)
    with pytest.raises(ModelError, match="no model"):
        manifest.find("xfeat", format="tflite", precision="int4")
    entry = manifest.find("xfeat", format="onnx", precision="int8")
    fake = tmp_path / entry.file
    fake.write_bytes(b"not the model")
    with pytest.raises(ModelError, match="sha256"):
        type(entry)(**{**entry.__dict__, "path": fake}).verify()
