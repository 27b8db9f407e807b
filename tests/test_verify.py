"""Spatial verification: putative matches, affine RANSAC, re-ranking, packed features."""

from __future__ import annotations

import numpy as np
import pytest

import d2r
from d2r import verify, verify_kernels
from d2r.verify import LocalFeatures, match, ransac_affine, rerank

A_TRUE = np.array([[0.92, 0.15, 31.0], [-0.12, 1.07, -12.0]])
# Maps [0, 500]^2 into positive pixel coordinates (packable as uint16).
A_SCENE = np.array([[0.95, 0.1, 30.0], [-0.05, 1.05, 40.0]])


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def affine_scene(n_in=140, n_out=60, noise=0.5, seed=0, A=A_TRUE):
    """Query locations, candidate locations and the truth mask: inliers follow A (plus bounded
    noise), outliers are moved at least 40 px away from where A would put them."""
    rng = np.random.default_rng(seed)
    n = n_in + n_out
    src = rng.uniform(0, 600, size=(n, 2))
    dst = src @ A[:, :2].T + A[:, 2]
    dst[:n_in] += rng.uniform(-noise, noise, size=(n_in, 2))
    angle = rng.uniform(0, 2 * np.pi, size=n_out)
    radius = rng.uniform(40, 300, size=n_out)
    dst[n_in:] += np.stack([np.sin(angle), np.cos(angle)], 1) * radius[:, None]
    truth = np.zeros(n, dtype=bool)
    truth[:n_in] = True
    perm = rng.permutation(n)
    return src[perm].astype(np.float32), dst[perm].astype(np.float32), truth[perm]


def identity_matches(n):
    return np.stack([np.arange(n), np.arange(n)], 1)


# --------------------------------------------------------------------------------------------
# RANSAC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_ransac_recovers_known_inliers(seed):
    src, dst, truth = affine_scene(seed=seed)
    res = ransac_affine(src, dst, identity_matches(len(src)), seed=seed)
    assert res.inliers == truth.sum() == 140
    assert np.array_equal(res.inlier_mask, truth)
    np.testing.assert_allclose(res.affine, A_TRUE, atol=0.05 * np.abs(A_TRUE).max())


def test_ransac_refit_is_least_squares_on_inliers():
    src, dst, truth = affine_scene(noise=2.0, seed=11)
    res = ransac_affine(src, dst, identity_matches(len(src)), refit=True)
    assert res.inliers == 140 and np.array_equal(res.inlier_mask, truth)
    # the refit equals numpy's least squares on the true inliers
    X = np.hstack([src[truth].astype(np.float64), np.ones((truth.sum(), 1))])
    sol, *_ = np.linalg.lstsq(X, dst[truth].astype(np.float64), rcond=None)
    np.testing.assert_allclose(res.affine, sol.T, atol=1e-6)


def test_ransac_with_mostly_outliers():
    src, dst, truth = affine_scene(n_in=30, n_out=170, seed=5)
    res = ransac_affine(src, dst, identity_matches(len(src)), seed=3)
    assert res.inliers == 30
    assert np.array_equal(res.inlier_mask, truth)
    assert res.trials == 1000  # w = 0.15 needs more than the budget: no early stop


def test_ransac_stops_early_when_all_inliers():
    src, dst, truth = affine_scene(n_in=100, n_out=0, seed=2)
    res = ransac_affine(src, dst, identity_matches(100))
    assert res.inliers == 100 and res.trials == 1  # w = 1: one sample is enough
    full = ransac_affine(src, dst, identity_matches(100), confidence=1.0, max_trials=50)
    assert full.inliers == 100 and full.trials == 50


def test_ransac_is_deterministic_for_a_seed():
    src, dst, _ = affine_scene(n_in=40, n_out=160, noise=4.0, seed=9)
    m = identity_matches(len(src))
    a = ransac_affine(src, dst, m, seed=123)
    b = ransac_affine(src, dst, m, seed=123)
    assert a.inliers == b.inliers and a.trials == b.trials
    assert np.array_equal(a.inlier_mask, b.inlier_mask) and np.array_equal(a.affine, b.affine)


def test_ransac_threshold_is_in_pixels():
    # 10 points exactly on the model, 10 moved by 5 px in random directions
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, size=(20, 2))
    dst = src @ A_TRUE[:, :2].T + A_TRUE[:, 2]
    angle = rng.uniform(0, 2 * np.pi, size=10)
    dst[10:] += 5.0 * np.stack([np.sin(angle), np.cos(angle)], 1)
    m = identity_matches(20)
    assert ransac_affine(src, dst, m, threshold=10.0).inliers == 20
    for threshold in (10.0, 4.0):
        res = ransac_affine(src, dst, m, threshold=threshold, confidence=1.0)
        # the mask is exactly "Euclidean residual under the returned model < threshold"
        mapped = src @ res.affine[:, :2].T + res.affine[:, 2]
        residual = np.linalg.norm(mapped - dst, axis=1)
        assert np.array_equal(res.inlier_mask, residual < threshold)
    assert 10 <= res.inliers < 20


def test_ransac_uses_only_the_given_matches():
    src, dst, truth = affine_scene(seed=4)
    # candidate rows reversed: the matches must undo the permutation
    dst_rev = dst[::-1].copy()
    n = len(src)
    m = np.stack([np.arange(n), n - 1 - np.arange(n)], 1)
    res = ransac_affine(src, dst_rev, m)
    assert res.inliers == 140 and np.array_equal(res.inlier_mask, truth)
    assert res.matches.dtype == np.int32 and res.matches.shape == (n, 2)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_ransac_too_few_matches(n):
    src, dst, _ = affine_scene(n_in=10, n_out=0)
    res = ransac_affine(src, dst, identity_matches(n))
    assert res.inliers == 0 and res.affine is None and res.inlier_mask.shape == (n,)


def test_ransac_collinear_and_coincident_points_do_not_crash():
    t = np.linspace(0, 100, 20)
    src = np.stack([t, 2 * t + 1], 1)
    res = ransac_affine(src, src + 3, identity_matches(20))
    assert res.inliers == 0 and res.affine is None and res.trials == 1000
    # a plane mapped onto a line: every sample is singular on the candidate side
    rng = np.random.default_rng(0)
    plane = rng.uniform(0, 100, size=(20, 2))
    res = ransac_affine(plane, np.stack([plane[:, 0], plane[:, 0]], 1), identity_matches(20))
    assert res.inliers == 0 and res.affine is None
    same = np.full((10, 2), 7.0)
    res = ransac_affine(same, same, identity_matches(10), refit=True)
    assert res.inliers == 0 and res.affine is None


def test_many_to_one_matches_do_not_make_inliers():
    # 20 query features all matched to one candidate feature (repeated texture) plus 10
    # random matches: a sample with coincident candidate points would map the plane onto a
    # point or a line and "explain" the 20; such samples are rejected
    rng = np.random.default_rng(1)
    loc_a = rng.uniform(0, 500, size=(30, 2))
    loc_b = rng.uniform(0, 500, size=(11, 2))
    m = np.stack([np.arange(30), np.r_[np.zeros(20, int), np.arange(1, 11)]], 1)
    res = ransac_affine(loc_a, loc_b, m, confidence=1.0)
    assert res.inliers <= 4


def test_ransac_refit_survives_degenerate_inlier_set():
    # 3 general points + many points on a line: refit is still well defined or skipped cleanly
    t = np.linspace(0, 100, 30)
    src = np.concatenate([np.stack([t, t], 1), [[0, 80], [90, 5], [50, 300]]])
    dst = src @ A_TRUE[:, :2].T + A_TRUE[:, 2]
    res = ransac_affine(src, dst, identity_matches(len(src)), refit=True)
    assert res.inliers == 33


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(threshold=0), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(max_trials=0), "max_trials"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(confidence=0.0), "confidence"),
    ],
)
def test_ransac_rejects_bad_parameters(kwargs, msg):
    src, dst, _ = affine_scene(n_in=10, n_out=0)
    with pytest.raises(d2r.InputError, match=msg):
        ransac_affine(src, dst, identity_matches(10), **kwargs)


def test_ransac_rejects_bad_arrays():
    src, dst, _ = affine_scene(n_in=10, n_out=0)
    m = identity_matches(10)
    with pytest.raises(d2r.InputError, match="loc_a"):
        ransac_affine(src[:, :1], dst, m)
    bad = src.copy()
    bad[3, 1] = np.nan
    with pytest.raises(d2r.InputError, match="row 3"):
        ransac_affine(bad, dst, m)
    with pytest.raises(d2r.InputError, match="out of range"):
        ransac_affine(src, dst[:5], m)
    with pytest.raises(d2r.InputError, match="integer"):
        ransac_affine(src, dst, m.astype(np.float32))
    with pytest.raises(d2r.InputError, match=r"\[M, 2\]"):
        ransac_affine(src, dst, np.arange(10))


# --------------------------------------------------------------------------------------------
# Putative matches
# --------------------------------------------------------------------------------------------


def oracle_matches(d, max_distance, ratio=None, mutual=False):
    """Matches from a float64 distance matrix (inf = never compared): nearest neighbour below
    the threshold, ratio against the second nearest seen, mutual check; ties to the lowest index."""
    out = []
    for i in range(d.shape[0]):
        order = np.argsort(d[i], kind="stable")
        j = order[0]
        if not d[i, j] < max_distance:
            continue
        if ratio is not None and d.shape[1] > 1 and np.isfinite(d[i, order[1]]) and not d[i, j] < ratio * d[i, order[1]]:
            continue
        if mutual and np.argmin(d[:, j]) != i:
            continue
        out.append((i, j))
    return np.array(out, dtype=np.int32).reshape(-1, 2)


def distances(a, b):
    return np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))


def brute_force_match(a, b, max_distance, ratio=None, mutual=False):
    return oracle_matches(distances(a, b), max_distance, ratio, mutual)


def test_match_small_sizes_equal_brute_force():
    # row lengths around the kernel's 16-wide blocks, with ratio and mutual
    rng = np.random.default_rng(3)
    for nb in (1, 2, 15, 16, 17, 33):
        a = unit(rng.normal(size=(20, 8)))
        b = unit(np.concatenate([a[: nb // 2] + 0.3 * rng.normal(size=(nb // 2, 8)), rng.normal(size=(nb - nb // 2, 8))]))
        for ratio, mutual in [(None, False), (0.9, False), (None, True), (0.95, True)]:
            got = match(a, b, max_distance=1.2, ratio=ratio, mutual=mutual)
            assert np.array_equal(got, brute_force_match(a, b, 1.2, ratio, mutual)), (nb, ratio, mutual)


def test_match_recovers_a_permutation():
    rng = np.random.default_rng(0)
    a = unit(rng.normal(size=(300, 64)))
    perm = rng.permutation(300)
    b = unit(a[perm] + 0.02 * rng.normal(size=a.shape))
    m = match(a, b)
    assert m.dtype == np.int32 and m.shape == (300, 2)
    assert np.array_equal(m[:, 0], np.arange(300))
    assert np.array_equal(perm[m[:, 1]], np.arange(300))


@pytest.mark.parametrize("ratio, mutual", [(None, False), (0.8, False), (None, True), (0.9, True)])
def test_match_equals_brute_force(ratio, mutual):
    rng = np.random.default_rng(1)
    # half the rows have a close partner, the rest are random (distance about sqrt(2))
    a = unit(rng.normal(size=(120, 32)))
    b = unit(np.concatenate([a[:60] + 0.3 * rng.normal(size=(60, 32)), rng.normal(size=(90, 32))]))
    ref = brute_force_match(a, b, 0.9, ratio, mutual)
    got = match(a, b, max_distance=0.9, ratio=ratio, mutual=mutual)
    assert 0 < len(ref) < 120
    assert np.array_equal(got, ref)


def test_match_distance_threshold_is_strict_and_euclidean():
    a = unit([[1, 0, 0], [0, 1, 0]])
    # distance from a[0]: 0.5 exactly (chord of the unit circle), from a[1]: sqrt(2)
    c = np.cos(2 * np.arcsin(0.25))
    b = unit([[c, np.sqrt(1 - c * c), 0]])
    assert match(a, b, max_distance=0.6).tolist() == [[0, 0]]
    assert match(a, b, max_distance=0.45).shape == (0, 2)


def test_ratio_test_rejects_ambiguous_matches():
    a = unit([[1, 0, 0, 0]])
    b = unit([[1, 0.10, 0, 0], [1, 0, 0.11, 0], [0, 0, 0, 1]])
    assert match(a, b).tolist() == [[0, 0]]
    assert match(a, b, ratio=0.8).shape == (0, 2)
    # a single candidate has no second neighbour: the ratio test passes
    assert match(a, b[:1], ratio=0.8).tolist() == [[0, 0]]


def test_mutual_keeps_one_of_two_queries_on_the_same_feature():
    a = unit([[1, 0.05, 0], [1, 0.2, 0]])
    b = unit([[1, 0, 0], [0, 0, 1]])
    assert match(a, b).tolist() == [[0, 0], [1, 0]]
    assert match(a, b, mutual=True).tolist() == [[0, 0]]


def test_match_empty_and_bad_inputs():
    a = unit(np.eye(4, dtype=np.float32))
    assert match(a, np.zeros((0, 4), np.float32)).shape == (0, 2)
    with pytest.raises(d2r.InputError, match="dimension"):
        match(a, np.ones((3, 5), np.float32))
    with pytest.raises(d2r.InputError, match="ratio"):
        match(a, a, ratio=1.5)
    with pytest.raises(d2r.InputError, match="max_distance"):
        match(a, a, max_distance=0)
    with pytest.raises(d2r.InputError, match="mutual"):
        match(a, a, mutual="yes")
    with pytest.raises(d2r.InputError, match="floating"):
        match(a.astype(np.int32), a)


# --------------------------------------------------------------------------------------------
# Re-ranking
# --------------------------------------------------------------------------------------------


def scene_features(seed=0, n=200, n_shared=120, dim=32):
    """A query and a matching candidate (n_shared features related by A_TRUE), plus a
    candidate with unrelated features."""
    rng = np.random.default_rng(seed)
    q_loc = rng.uniform(0, 500, size=(n, 2)).astype(np.float32)
    q_desc = unit(rng.normal(size=(n, dim)))
    c_loc = rng.uniform(0, 500, size=(n, 2)).astype(np.float32)
    c_desc = unit(rng.normal(size=(n, dim)))
    c_loc[:n_shared] = (q_loc[:n_shared] @ A_SCENE[:, :2].T + A_SCENE[:, 2]).astype(np.float32)
    c_desc[:n_shared] = unit(q_desc[:n_shared] + 0.05 * rng.normal(size=(n_shared, dim)))
    other = LocalFeatures(rng.uniform(0, 500, size=(n, 2)), unit(rng.normal(size=(n, dim))))
    return LocalFeatures(q_loc, q_desc), LocalFeatures(c_loc, c_desc), other


def test_verify_pair_counts_shared_features():
    q, c, other = scene_features()
    assert verify.verify_pair(q, c).inliers == 120
    # unrelated features: a few chance matches at most, and 3 points always fit an affine
    assert verify.verify_pair(q, other).inliers <= 3
    # tuples work too
    assert verify.verify_pair((q.locations, q.descriptors), (c.locations, c.descriptors)).inliers == 120


@pytest.mark.parametrize("kwargs", [dict(seed=5), dict(seed=7, confidence=1.0, max_trials=300), dict(refit=True, threshold=4.0)])
def test_verify_pair_and_rerank_equal_match_then_ransac(kwargs):
    q, c, _ = scene_features(seed=2, n_shared=30)
    m = match(q.descriptors, c.descriptors)
    ref = ransac_affine(q.locations, c.locations, m, **kwargs)
    got = verify.verify_pair(q, c, **kwargs)
    assert (got.inliers, got.trials) == (ref.inliers, ref.trials)
    assert np.array_equal(got.matches, m) and np.array_equal(got.affine, ref.affine)
    assert rerank(q, [("c", 1.0, c)], **kwargs)[0].inliers == ref.inliers


def test_rerank_sorts_by_inliers_then_score():
    q, c, other = scene_features()
    cands = [("o1", 0.9, other), ("match", 0.5, c), ("o2", 0.7, other), ("tail", 0.2, None)]
    out = rerank(q, cands, top_r=3)
    assert [r.id for r in out] == ["match", "o1", "o2", "tail"]
    assert out[0].inliers == 120 and out[1].inliers == out[2].inliers <= 3 and out[3].inliers == -1
    assert [r.score for r in out] == [0.5, 0.9, 0.7, 0.2]


def test_rerank_ties_keep_initial_order():
    q, _, other = scene_features()
    out = rerank(q, [("a", 0.5, other), ("b", 0.5, other), ("c", 0.6, other)])
    assert [r.id for r in out] == ["c", "a", "b"]


def test_rerank_bad_candidates():
    q, c, _ = scene_features()
    with pytest.raises(d2r.InputError, match=r"candidates\[0\]"):
        rerank(q, [("a", 0.5)])
    with pytest.raises(d2r.InputError, match=r"candidates\[0\] features"):
        rerank(q, [("a", 0.5, None)])
    with pytest.raises(d2r.InputError, match="top_r"):
        rerank(q, [("a", 0.5, c)], top_r=0)
    with pytest.raises(d2r.InputError, match=r"candidates\[1\] features: descriptors of dimension D = 8"):
        rerank(q, [("a", 0.5, c), ("b", 0.4, (np.zeros((3, 2)), unit(np.ones((3, 8)))))])
    with pytest.raises(d2r.InputError, match="refit"):
        rerank(q, [("a", 0.5, c)], refit="no")


# --------------------------------------------------------------------------------------------
# Compact storage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_pack_round_trip(dtype):
    q, c, _ = scene_features(dim=128)
    blob = verify.pack_features(c, dtype)
    assert len(blob) == verify.feature_bytes(len(c), 128, dtype)
    back = verify.unpack_features(blob)
    assert np.abs(back.locations - c.locations).max() <= 0.5
    cos = np.einsum("ij,ij->i", back.descriptors, c.descriptors)
    assert cos.min() > 0.999
    # verification on packed features finds the same inliers
    assert verify.verify_pair(q, back).inliers == 120


def test_int8_packing_uses_the_whole_range_per_row():
    # RootSIFT-like rows: non-negative, largest component about 0.3; a fixed scale of 63
    # would leave about 25 levels, the per-row scale uses all 63 of the 7-bit stored codes
    rng = np.random.default_rng(4)
    d = unit(rng.gamma(0.5, size=(300, 128)))
    loc = rng.uniform(0, 100, size=(300, 2))
    back = verify.unpack_features(verify.pack_features((loc, d), "int8")).descriptors
    fixed = unit(np.rint(d * 63))
    err = np.linalg.norm(back - d, axis=1).max()
    assert err < 0.04 and err < 0.7 * np.linalg.norm(fixed - d, axis=1).max()
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), 1.0, rtol=1e-5)


def test_feature_bytes_documented_cost():
    assert verify.feature_bytes(1000, 128, "int8") == 10 + 1000 * 132
    assert verify.feature_bytes(1000, 128, "float16") == 10 + 1000 * 260


def test_pack_rejects_unpackable():
    with pytest.raises(d2r.InputError, match="65535"):
        verify.pack_features(([[-3.0, 1.0]], unit([[1, 0]])))
    with pytest.raises(d2r.InputError, match="descriptor_dtype"):
        verify.pack_features(([[3.0, 1.0]], unit([[1, 0]])), "int4")


def test_unpack_detects_bad_bytes():
    blob = verify.pack_features(([[3.0, 1.0]], unit([[1, 0]])))
    with pytest.raises(d2r.IndexFormatError, match="expected"):
        verify.unpack_features(blob[:-1])
    with pytest.raises(d2r.IndexFormatError, match="magic"):
        verify.unpack_features(b"XX" + blob[2:])
    with pytest.raises(d2r.IndexFormatError, match="truncated"):
        verify.unpack_features(blob[:4])


def test_side_file_round_trip_and_corruption(tmp_path):
    q, c, other = scene_features(dim=64)
    empty = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 64), np.float32))
    path = tmp_path / "verify.d2rv"
    size = verify.save_features(path, [c, other, empty])
    assert size == path.stat().st_size
    assert size == 28 + 12 * 3 + 2 * verify.feature_bytes(200, 64) + verify.feature_bytes(0, 64)
    loaded = verify.load_features(path)
    assert [len(f) for f in loaded] == [200, 200, 0]
    assert verify.verify_pair(q, loaded[0]).inliers == 120
    with verify.FeatureFile(path) as ff:
        assert len(ff) == 3
        np.testing.assert_array_equal(ff[-2].locations, loaded[1].locations)
        with pytest.raises(d2r.InputError, match="out of range"):
            ff[3]
    bad = tmp_path / "bad.d2rv"
    # a flipped bit in image 1: the table and image 0 still read, image 1 is reported
    data = bytearray(path.read_bytes())
    data[28 + 12 * 3 + verify.feature_bytes(200, 64) + 50] ^= 0x40
    bad.write_bytes(bytes(data))
    with verify.FeatureFile(bad) as ff:
        assert len(ff[0]) == 200
        with pytest.raises(d2r.IndexFormatError, match="image 1 fails its checksum"):
            ff[1]
    with pytest.raises(d2r.IndexFormatError, match="image 1"):
        verify.load_features(bad)
    # a flipped bit in the table
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(d2r.IndexFormatError, match="table checksum"):
        verify.FeatureFile(bad)
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(d2r.IndexFormatError, match="bad.d2rv.*truncated"):
        verify.load_features(bad)
    bad.write_bytes(path.read_bytes()[:30])
    with pytest.raises(d2r.IndexFormatError, match="truncated table"):
        verify.load_features(bad)
    bad.write_bytes(b"NOTVERIF" + path.read_bytes()[8:])
    with pytest.raises(d2r.IndexFormatError, match="magic"):
        verify.load_features(bad)
    with pytest.raises(d2r.IndexFormatError, match="cannot read"):
        verify.load_features(tmp_path / "missing.d2rv")


# --------------------------------------------------------------------------------------------
# A real image pair (optional: needs scikit-image and OpenCV, not project dependencies)
# --------------------------------------------------------------------------------------------


def test_real_stereo_pair_against_opencv():
    skdata = pytest.importorskip("skimage.data")
    cv2 = pytest.importorskip("cv2")
    left, right, _ = skdata.stereo_motorcycle()
    sift = cv2.SIFT_create(nfeatures=1000)
    feats = []
    for img in (left, right):
        kp, desc = sift.detectAndCompute(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), None)
        desc = np.sqrt(desc / np.maximum(desc.sum(1, keepdims=True), 1e-12))  # RootSIFT, unit L2
        loc = np.array([(k.pt[1], k.pt[0]) for k in kp], dtype=np.float32)
        feats.append(LocalFeatures(loc, desc.astype(np.float32)))
    m = match(feats[0].descriptors, feats[1].descriptors, ratio=0.8)
    res = ransac_affine(feats[0].locations, feats[1].locations, m, threshold=10.0)
    # a rectified stereo pair: a near-identity affine explains most ratio-test matches
    assert res.inliers > 0.5 * len(m) > 50
    assert abs(res.affine[0, 0] - 1) < 0.1 and abs(res.affine[1, 1] - 1) < 0.1
    src = feats[0].locations[m[:, 0]][:, ::-1]  # OpenCV wants (x, y)
    dst = feats[1].locations[m[:, 1]][:, ::-1]
    _, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=10.0, maxIters=1000)
    # same model family and threshold: the counts agree closely
    assert abs(res.inliers - int(mask.sum())) <= 0.1 * len(m)


# --------------------------------------------------------------------------------------------
# Matching within visual words
# --------------------------------------------------------------------------------------------


def brute_force_word_match(a, qw, b, cw, max_distance, ratio=None, mutual=False):
    """Oracle: exhaustive distances, pairs that share no word set to infinity."""
    shared = (qw[:, :, None] == cw[None, None, :]).any(axis=1)
    return oracle_matches(np.where(shared, distances(a, b), np.inf), max_distance, ratio, mutual)


@pytest.mark.parametrize("ratio, mutual", [(None, False), (0.8, False), (None, True), (0.9, True)])
def test_word_matching_kernel_equals_oracle(ratio, mutual):
    rng = np.random.default_rng(5)
    a = unit(rng.normal(size=(150, 32)))
    b = unit(np.concatenate([a[:80] + 0.3 * rng.normal(size=(80, 32)), rng.normal(size=(70, 32))]))
    qw = rng.integers(0, 12, size=(150, 3)).astype(np.int32)
    cw = rng.integers(0, 12, size=150).astype(np.int32)
    cw[:80] = qw[:80, rng.integers(0, 3)]  # most true partners share a word
    q = LocalFeatures(np.zeros((150, 2)), a, qw)
    c = LocalFeatures(np.zeros((150, 2)), b, cw)
    got = verify_kernels.word_matches(a, qw, b, cw, 0.81, ratio or 0.0, mutual)
    if ratio is None:
        assert np.array_equal(got, verify.matching._match_features(q, c, None, verify.matching._match_params(0.9, ratio, mutual), True))
    else:
        with pytest.raises(d2r.InputError, match="ratio"):
            verify.matching._match_features(q, c, None, verify.matching._match_params(0.9, ratio, mutual), True)
    ref = brute_force_word_match(a, qw, b, cw, 0.9, ratio, mutual)
    assert 0 < len(ref) and np.array_equal(got, ref)
    # no partner outside the shared words
    assert all(cw[j] in qw[i] for i, j in got)


def test_word_matching_with_one_word_equals_exhaustive():
    rng = np.random.default_rng(6)
    a = unit(rng.normal(size=(100, 16)))
    b = unit(np.concatenate([a[:50] + 0.3 * rng.normal(size=(50, 16)), rng.normal(size=(40, 16))]))
    q = LocalFeatures(np.zeros((100, 2)), a, np.zeros(100, np.int32))
    c = LocalFeatures(np.zeros((90, 2)), b, np.zeros(90, np.int32))
    for ratio, mutual in [(None, False), (0.8, True)]:
        words = verify_kernels.word_matches(q.descriptors, q.words, c.descriptors, c.words[:, 0].copy(), 0.81, ratio or 0.0, mutual)
        assert np.array_equal(words, match(a, b, 0.9, ratio, mutual))


def test_verify_pair_uses_words_only_when_both_sides_have_them():
    q, c, _ = scene_features(dim=64)
    full = verify.verify_pair(q, c).inliers
    nq, nc = len(q), len(c)
    # words that separate every pair: nothing can match
    qw = LocalFeatures(q.locations, q.descriptors, np.zeros(nq, np.int32))
    cw = LocalFeatures(c.locations, c.descriptors, np.ones(nc, np.int32))
    assert verify.verify_pair(qw, cw).inliers == 0
    assert verify.verify_pair(qw, cw, use_words=False).inliers == full
    assert verify.verify_pair(qw, c).inliers == full  # candidate without words: exhaustive
    assert [r.inliers for r in rerank(qw, [("a", 1.0, cw)])] == [0]
    assert [r.inliers for r in rerank(qw, [("a", 1.0, cw)], use_words=False)] == [full]


def test_pack_round_trip_keeps_words():
    q, c, _ = scene_features(dim=128)
    words = np.arange(len(c), dtype=np.int32) % 1000
    blob = verify.pack_features(LocalFeatures(c.locations, c.descriptors, words))
    assert len(blob) == verify.feature_bytes(len(c), 128, "int8", words=True) == verify.feature_bytes(len(c), 128) + 4 * len(c)
    back = verify.unpack_features(blob)
    assert back.words.shape == (len(c), 1) and np.array_equal(back.words[:, 0], words)
    assert verify.unpack_features(verify.pack_features(c)).words is None  # version 1 stays version 1
    with pytest.raises(d2r.IndexFormatError, match="expected"):
        verify.unpack_features(blob[:-2])
    with pytest.raises(d2r.InputError, match="visual word"):
        verify.pack_features(LocalFeatures(c.locations, c.descriptors, -np.ones(len(c), np.int32)))


def test_bad_words_are_rejected():
    with pytest.raises(d2r.InputError, match="words"):
        LocalFeatures(np.zeros((3, 2)), unit(np.eye(3)), np.zeros(4, np.int32))
    with pytest.raises(d2r.InputError, match="integer"):
        LocalFeatures(np.zeros((3, 2)), unit(np.eye(3)), np.zeros(3, np.float32))
    with pytest.raises(d2r.InputError, match="use_words"):
        verify.verify_pair((np.zeros((3, 2)), unit(np.eye(3))), (np.zeros((3, 2)), unit(np.eye(3))), use_words="yes")


# --------------------------------------------------------------------------------------------
# int8 matching (integer dot products of int8 codes)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, mutual", [(None, False), (0.8, False), (None, True), (0.9, True)])
def test_int8_match_equals_brute_force_on_the_codes(ratio, mutual):
    rng = np.random.default_rng(11)
    a = unit(rng.normal(size=(150, 64)))
    b = unit(np.concatenate([a[:70] + 0.1 * rng.normal(size=(70, 64)), rng.normal(size=(100, 64))]))
    # the oracle sees what int8 matching sees: the unit vectors of the codes
    ca, ia = verify.LocalFeatures(np.zeros((150, 2)), a).codes()
    cb, ib = verify.LocalFeatures(np.zeros((170, 2)), b).codes()
    ref = brute_force_match(ca * ia[:, None], cb * ib[:, None], 0.9, ratio, mutual)
    got = match(a, b, max_distance=0.9, ratio=ratio, mutual=mutual, precision="int8")
    assert 0 < len(ref) < 150
    assert np.array_equal(got, ref)
    # and it differs from exact float matching only at the margins
    exact = match(a, b, max_distance=0.9, ratio=ratio, mutual=mutual)
    assert len(set(map(tuple, got)) ^ set(map(tuple, exact))) <= 2


def test_int8_match_compares_directions_not_lengths():
    a = np.array([[2.0, 0, 0]], np.float32)
    b = np.array([[1.0, 0.05, 0], [0, 1.0, 0]], np.float32)
    # fp32: |a - b0| is about 1, beyond 0.9; int8: the directions are 0.05 apart
    assert match(a, b).shape == (0, 2)
    assert match(a, b, precision="int8").tolist() == [[0, 0]]
    # a row of zeros matches nothing in either precision
    z = np.zeros((1, 3), np.float32)
    assert match(z, b, precision="int8").shape == (0, 2) and match(z, b).shape == (0, 2)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_rerank_precisions_agree_on_a_scene(precision):
    q, c, other = scene_features(seed=3, n_shared=40, dim=128)
    out = rerank(q, [("o", 0.9, other), ("c", 0.1, c)], precision=precision)
    assert [r.id for r in out] == ["c", "o"] and out[0].inliers == 40
    assert verify.verify_pair(q, c, precision=precision).inliers == 40


def test_precision_is_checked():
    q, c, _ = scene_features()
    for call in (lambda: match(q.descriptors, c.descriptors, precision="int4"),
                 lambda: verify.verify_pair(q, c, precision=8),
                 lambda: rerank(q, [("c", 1.0, c)], precision="fp16")):
        with pytest.raises(d2r.InputError, match="precision"):
            call()


def test_unpacked_int8_features_carry_their_stored_codes():
    q, c, _ = scene_features(dim=128)
    back = verify.unpack_features(verify.pack_features(c, "int8"))
    stored, inv = back.codes()
    assert np.array_equal(stored, c.codes()[0])
    # re-quantising the unpacked unit vectors gives the same codes
    assert np.array_equal(verify.LocalFeatures(back.locations, back.descriptors).codes()[0], stored)
    np.testing.assert_allclose(stored * inv[:, None], back.descriptors, atol=1e-6)
    assert np.array_equal(verify.match(q.descriptors, back.descriptors, precision="int8"),
                          verify.match(q.descriptors, c.descriptors, precision="int8"))


def test_features_files_with_8_bit_codes_still_match_exactly():
    # Files written before 7-bit stored codes hold +-127 codes: reading re-scales them to the
    # stored range, so int8 matching neither refuses them nor saturates on AVX2.
    rng = np.random.default_rng(7)
    d = unit(rng.normal(size=(50, 64)))
    loc = rng.uniform(0, 100, size=(50, 2))
    codes8 = np.rint(d * (127 / np.abs(d).max(axis=1, keepdims=True))).astype("<i1")
    old = verify.file._HEADER.pack(b"VF", 1, 1, 50, 64) + np.rint(loc).astype("<u2").tobytes() + codes8.tobytes()
    back = verify.unpack_features(old)
    stored, inv = back.codes()
    assert np.abs(stored.astype(np.int16)).max() == 63
    assert np.einsum("ij,ij->i", stored * inv[:, None], d).min() > 0.998
    assert verify.verify_pair(back, back, precision="int8").inliers == 50
