"""DELF: official-name checkpoint and PCA importers round-tripped from random weights, small export."""

from __future__ import annotations

import numpy as np
import pytest

from d2r.errors import ModelError
from d2r_convert import datum_io, delf, pipeline

from shared_data import photo_sets

pytestmark = pytest.mark.slow  # converts models (TensorFlow)

SIZE = (96, 128)


def test_official_variable_names_and_counts():
    names = delf.official_variables()
    # conv1 + 13 units x 3 convs + 3 projection shortcuts + attention conv1 and conv2
    assert sum(n.endswith("/weights") for n in names) == 1 + 13 * 3 + 3 + 2
    assert names["resnet_v1_50/conv1/weights"] == (7, 7, 3, 64)
    assert names["resnet_v1_50/block3/unit_6/bottleneck_v1/conv3/weights"] == (1, 1, 256, 1024)
    assert names["resnet_v1_50/block2/unit_1/bottleneck_v1/shortcut/weights"] == (1, 1, 256, 512)
    assert "resnet_v1_50/block2/unit_4/bottleneck_v1/shortcut/weights" not in names  # identity (subsampling) shortcut
    assert names["attention_block/attention/compute/conv1/weights"] == (1, 1, 1024, 512)
    assert names["attention_block/attention/compute/conv2/biases"] == (1,)


def test_checkpoint_round_trip(tmp_path):
    variables = delf.random_variables(seed=3)
    extra = {"global_step": np.zeros((), np.float32), "attention_block/logits/weights": np.ones((1, 1, 1024, 5), np.float32)}
    delf.write_checkpoint(tmp_path / "model.ckpt", {**variables, **extra})
    back = delf.read_checkpoint(tmp_path / "model.ckpt")
    assert set(back) == set(variables)
    for k, v in variables.items():
        np.testing.assert_array_equal(back[k], v)
    model = delf.build(*SIZE, pca_dim=None)
    delf.load_checkpoint(model, back)
    # every Keras weight now holds the checkpoint value of its official name
    w = model.get_layer("resnet_v1_50__block3__unit_6__bottleneck_v1__conv2").get_weights()[0]
    np.testing.assert_array_equal(w, variables["resnet_v1_50/block3/unit_6/bottleneck_v1/conv2/weights"])
    bn = model.get_layer("attention_block__attention__compute__conv1__BatchNorm").get_weights()
    np.testing.assert_array_equal(bn[3], variables["attention_block/attention/compute/conv1/BatchNorm/moving_variance"])


def test_checkpoint_without_delf_variables_is_refused(tmp_path):
    delf.write_checkpoint(tmp_path / "other.ckpt", {"some/other/weights": np.zeros((3, 3), np.float32)})
    with pytest.raises(ModelError, match="DELF variables missing"):
        delf.read_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(ModelError, match="not a readable"):
        delf.read_checkpoint(tmp_path / "nothing_here")


def test_datum_round_trip_and_unpacked_encoding(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    datum_io.write_datum(tmp_path / "a.datum", a)
    np.testing.assert_array_equal(datum_io.read_datum(tmp_path / "a.datum"), a)
    # proto2 parsers also accept unpacked repeated fields: shape dims as varints, floats as fixed32
    shape = b"\x08\x02\x08\x01"  # dim: 2, dim: 1
    floats = b"\x0d" + np.float32(1.5).tobytes() + b"\x0d" + np.float32(-2).tobytes()
    msg = b"\x0a" + bytes([len(shape)]) + shape + b"\x12" + bytes([len(floats)]) + floats
    np.testing.assert_array_equal(datum_io.decode_datum(msg), [[1.5], [-2.0]])
    with pytest.raises(ValueError):
        datum_io.decode_datum(msg[:-3])


def test_keras_rebuild_matches_independent_reference():
    variables, pca = delf.random_variables(seed=1), delf.random_pca(seed=1)
    model = delf.build(*SIZE)
    delf.load_checkpoint(model, variables, pca)
    x = np.random.default_rng(0).uniform(0, 255, (1, *SIZE, 3)).astype(np.float32)
    ref = delf.reference_forward(variables, x, pca)
    out = model(x)
    assert out["descriptors"].shape == (1, 3, 4, 128) and out["attention"].shape == (1, 3, 4, 1)
    for name in ("attention", "descriptors"):
        r, o = ref[name], np.asarray(out[name])
        assert np.abs(o - r).max() <= 1e-4 * max(np.abs(r).max(), 1e-6), name
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["descriptors"]), axis=-1), 1.0, rtol=1e-5)


def test_small_export_with_random_official_checkpoint(tmp_path):
    cal, ev = photo_sets(n_calibration=4, n_evaluation=2)
    job = delf.make_job(*SIZE, calibration=cal, evaluation=ev, random_weights=True)
    assert job.stem.startswith("delf_random_")  # never mistaken for a usable model
    report = pipeline.run(job, tmp_path, threads=(1,), timing_runs=1, log=lambda s: None)
    rows = {(r["format"], r["precision"]): r for r in report["files"]}
    assert set(rows) == {("tflite", "fp32"), ("tflite", "int8"), ("onnx", "fp32"), ("onnx", "int8")}
    for fmt in ("tflite", "onnx"):
        worst = max(v["max_abs_rel"] for v in rows[(fmt, "fp32")]["vs_source"].values())
        assert worst <= 1e-3, (fmt, worst)
        assert rows[(fmt, "int8")]["size_bytes"] < 0.35 * rows[(fmt, "fp32")]["size_bytes"]
        assert np.isfinite(rows[(fmt, "int8")]["vs_fp32"]["descriptors"]["max_abs"])
    assert rows[("tflite", "fp32")]["gpu_delegate_unsupported_ops"] == []
    assert "RANDOM" in job.entry["source"]["weights"]


def test_large_attention_scores_stay_finite_in_tflite(tmp_path):
    # DELF keeps locations with attention >= 100: softplus must not overflow in the exported graph.
    from d2r_convert import export, runtimes

    variables = delf.random_variables(seed=2)
    variables["attention_block/attention/compute/conv2/biases"] = np.array([150.0], np.float32)
    model = delf.build(64, 64, pca_dim=None)
    delf.load_checkpoint(model, variables)
    path = tmp_path / "delf.tflite"
    path.write_bytes(export.to_tflite(model, (1, 64, 64, 3), "fp32"))
    x = np.random.default_rng(1).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    got = runtimes.TFLiteModel(path)(x)["attention"]
    ref = delf.reference_forward(variables, x)["attention"]
    assert np.isfinite(got).all() and got.min() > 100
    np.testing.assert_allclose(got, ref, rtol=1e-4)
