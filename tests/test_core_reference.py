"""The reference test vectors of docs/algorithm.md section 4, reproduced exactly (to 1e-6)."""

import numpy as np
import pytest

import d2r

CODEBOOK = np.array([[0.5, 0.5], [0, 0], [1, 0], [-0.5, -0.5], [0, 1]], np.float32)
FEATURES = np.array([[1, 0], [-1, 0], [1, 2]], np.float32)
FEATURES4 = np.array([[1, 0], [-1, 0], [1, 2], [0, 2]], np.float32)


@pytest.fixture(scope="module")
def cb():
    return d2r.Codebook(CODEBOOK)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-6, rtol=0)


def test_vlad_l2(cb):
    agg = d2r.aggregate(FEATURES, cb, kind="vlad")
    close(agg.vector, [0, 0, 0, 0, 0, 0, -0.316228, 0.316228, 0.632456, 0.632456])
    assert agg.vector.dtype == np.float32 and agg.vector.shape == (10,)


def test_vlad_unnormalised_multiple_assignment(cb):
    agg = d2r.aggregate(FEATURES, cb, kind="vlad", normalize=False, multiple_assignment=3)
    close(agg.vector, [1, 1, 0, 0, 0, 2, -0.5, 0.5, 0, 0])


def test_rvlad_unnormalised(cb):
    agg = d2r.aggregate(FEATURES4, cb, kind="rvlad", region_sizes=[3, 1], normalize=False)
    close(agg.vector, [0, 0, 0, 0, 0, 0, -0.158114, 0.158114, 0.316228, 0.816228])


def test_rvlad_l2(cb):
    agg = d2r.aggregate(FEATURES4, cb, kind="rvlad", region_sizes=[3, 1], normalize=True)
    close(agg.vector, [0, 0, 0, 0, 0, 0, -0.175011, 0.175011, 0.350021, 0.903453])


def test_rvlad_empty_regions_count_in_r(cb):
    two = d2r.aggregate(FEATURES4, cb, kind="rvlad", region_sizes=[3, 1], normalize=False)
    four = d2r.aggregate(FEATURES4, cb, kind="rvlad", region_sizes=[0, 3, 0, 1], normalize=False)
    close(four.vector, two.vector * 2 / 4)
    assert four.n_regions == 4


def test_asmk(cb):
    agg = d2r.aggregate(FEATURES, cb, kind="asmk")
    assert agg.words.tolist() == [3, 4] and agg.words.dtype == np.uint32
    close(agg.vectors.ravel(), [-0.707107, 0.707107, 0.707107, 0.707107])


def test_asmk_star(cb):
    agg = d2r.aggregate(FEATURES, cb, kind="asmk_star")
    assert agg.words.tolist() == [3, 4]
    assert agg.codes.dtype == np.uint8 and agg.codes.ravel().tolist() == [64, 192]


def test_asmk_multiple_assignment(cb):
    agg = d2r.aggregate(FEATURES, cb, kind="asmk", multiple_assignment=3)
    assert agg.words.tolist() == [0, 2, 3]
    close(agg.vectors.ravel(), [0.707107, 0.707107, 0, 1, -0.707107, 0.707107])


def test_rasmk(cb):
    agg = d2r.aggregate(FEATURES4, cb, kind="rasmk", region_sizes=[3, 1])
    assert agg.words.tolist() == [3, 4]
    close(agg.vectors.ravel(), [-0.707107, 0.707107, 0.361261, 0.932465])


def test_rasmk_star(cb):
    agg = d2r.aggregate(FEATURES4, cb, kind="rasmk_star", region_sizes=[3, 1])
    assert agg.words.tolist() == [3, 4]
    assert agg.codes.ravel().tolist() == [64, 192]


def test_feature_equal_to_codeword_is_dropped(cb):
    # [1, 0] is codeword 2: zero residual, so word 2 is not in the ASMK output.
    agg = d2r.aggregate(FEATURES[:1], cb, kind="asmk_star")
    assert agg.words.size == 0 and agg.is_empty


def test_asmk_star_similarity_vector():
    a = d2r.Aggregation("asmk_star", 2, [0, 1, 2, 3, 4], codes=np.array([[0], [0], [3], [3], [3]], np.uint8))
    b = d2r.Aggregation("asmk_star", 2, [1, 2, 4], codes=np.array([[1], [2], [3]], np.uint8))
    close(d2r.similarity(a, b, normalize=True), 0.258199)
    close(d2r.similarity(a, b, normalize=True), 1 / np.sqrt(15))
    close(d2r.similarity(a, b), 1.0)
    assert d2r.similarity(a, b) == d2r.similarity(b, a)
