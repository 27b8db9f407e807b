"""Edge cases and bad input of the core: empty images, degenerate data, clear errors."""

import numpy as np
import pytest

import d2r

KINDS = ["vlad", "asmk", "asmk_star", "rvlad", "rasmk", "rasmk_star"]


@pytest.fixture(scope="module")
def cb():
    rng = np.random.default_rng(0)
    return d2r.Codebook(rng.standard_normal((16, 8)).astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_no_features(cb, kind):
    agg = d2r.aggregate(np.zeros((0, 8), np.float32), cb, kind=kind)
    assert agg.is_empty
    if "vlad" in kind:
        assert agg.vector.shape == (16 * 8,) and not agg.vector.any()
    else:
        assert agg.words.shape == (0,)
        other = d2r.aggregate(np.ones((5, 8), np.float32), cb, kind=kind)
        assert d2r.similarity(agg, other) == -1.0
        assert d2r.similarity(other, agg, normalize=True) == -1.0


def test_all_features_in_one_word(cb):
    x = np.repeat(cb.centroids[3:4] + 0.01, 50, axis=0)
    agg = d2r.aggregate(x, cb, kind="asmk")
    assert agg.words.tolist() == [3]
    np.testing.assert_allclose(np.linalg.norm(agg.vectors, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["rvlad", "rasmk", "rasmk_star"])
def test_all_regions_empty_but_one(cb, kind):
    x = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    a = d2r.aggregate(x, cb, kind=kind, region_sizes=[0, 10, 0])
    b = d2r.aggregate(x, cb, kind=kind, region_sizes=[10])
    assert a.n_regions == 3 and b.n_regions == 1
    if kind == "rvlad":
        np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)  # L2 of the sum
    else:
        np.testing.assert_array_equal(a.words, b.words)


def test_regional_kind_without_regions_is_one_region(cb):
    x = np.random.default_rng(2).standard_normal((30, 8)).astype(np.float32)
    a = d2r.aggregate(x, cb, kind="rasmk_star")
    b = d2r.aggregate(x, cb, kind="asmk_star")
    # One region: the region normalisation is a positive scale, per-word normalisation removes it.
    np.testing.assert_array_equal(a.words, b.words)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_float64_input_is_converted(cb):
    x = np.random.default_rng(3).standard_normal((20, 8))
    a = d2r.aggregate(x, cb, kind="asmk_star")
    b = d2r.aggregate(x.astype(np.float32), cb, kind="asmk_star")
    np.testing.assert_array_equal(a.codes, b.codes)
    assert cb.assign(x).tolist() == cb.assign(x.astype(np.float32)).tolist()


def test_input_arrays_are_not_mutated(cb):
    x = np.random.default_rng(4).standard_normal((20, 8)).astype(np.float32)
    before = x.copy()
    d2r.aggregate(x, cb, kind="rasmk_star", region_sizes=[10, 10])
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize(
    "value,match",
    [
        (np.full((3, 8), np.nan, np.float32), "NaN or inf"),
        (np.array([[np.inf] * 8], np.float32), "NaN or inf"),
        (np.zeros((3, 7), np.float32), "dimension D = 8"),
        (np.zeros(8, np.float32), "2-D"),
        (np.zeros((3, 8), np.int32), "floating-point"),
        ("not an array", "2-D"),
    ],
)
def test_bad_descriptors(cb, value, match):
    with pytest.raises(d2r.InputError, match=match):
        d2r.aggregate(value, cb, kind="asmk_star")
    with pytest.raises(d2r.D2RError):
        cb.assign(value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="nope"), "kind"),
        (dict(kind="asmk_star", region_sizes=[5]), "only regional kinds"),
        (dict(kind="rasmk_star", region_sizes=[2, 2]), "sum to 4 but there are 5"),
        (dict(kind="rasmk_star", region_sizes=[6, -1]), ">= 0"),
        (dict(kind="rasmk_star", region_sizes=[]), "at least one region"),
        (dict(kind="rasmk_star", region_sizes=[2.5, 2.5]), "list of ints"),
        (dict(kind="asmk", multiple_assignment=0), "multiple_assignment"),
        (dict(kind="asmk", multiple_assignment=17), "exceeds the codebook size"),
    ],
)
def test_bad_arguments(cb, kwargs, match):
    x = np.ones((5, 8), np.float32)
    with pytest.raises(d2r.InputError, match=match):
        d2r.aggregate(x, cb, **kwargs)


def test_bad_codebook_argument():
    with pytest.raises(d2r.InputError, match="Codebook"):
        d2r.aggregate(np.ones((2, 8), np.float32), np.ones((4, 8), np.float32))


def test_similarity_rejects_mixed_kinds(cb):
    x = np.random.default_rng(5).standard_normal((20, 8)).astype(np.float32)
    with pytest.raises(d2r.InputError, match="cannot compare"):
        d2r.similarity(d2r.aggregate(x, cb, kind="asmk"), d2r.aggregate(x, cb, kind="asmk_star"))
    with pytest.raises(d2r.InputError, match="alpha"):
        d2r.similarity(d2r.aggregate(x, cb, kind="asmk"), d2r.aggregate(x, cb, kind="asmk"), alpha=float("nan"))


def test_aggregation_validates_its_fields():
    with pytest.raises(d2r.InputError, match="ascending"):
        d2r.Aggregation("asmk_star", 8, [3, 1], codes=np.zeros((2, 1), np.uint8))
    with pytest.raises(d2r.InputError, match="codes"):
        d2r.Aggregation("asmk_star", 16, [1, 3], codes=np.zeros((2, 1), np.uint8))
    agg = d2r.Aggregation("asmk_star", 8, [1, 3], codes=np.zeros((2, 1), np.uint8))
    with pytest.raises(ValueError):
        agg.codes[0, 0] = 1  # results are read-only
