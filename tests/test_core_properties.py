"""Property tests: the Numba core against the plain numpy oracle on random data."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import d2r

import numpy_reference as ref


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# Hypothesis draws the sizes and a seed for the data; derandomized, so every run tries the same
# examples (no flaky CI, no example database written next to the tests).
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=40)


@PROPERTY
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 160), d=st.integers(1, 130), n=st.integers(1, 300), m=st.integers(1, 4))
def test_assign_matches_oracle(seed, k, d, n, m):
    m = min(m, k)
    rng = np.random.default_rng(seed)
    c = unit_rows(rng, k, d)
    x = unit_rows(rng, n, d)
    cb = d2r.Codebook(c)
    got = cb.assign(x, multiple=m)
    want = ref.assign(x, c, m)
    if m == 1:
        assert got.shape == (n,) and got.dtype == np.int32
        want = want[:, 0]
    else:
        assert got.shape == (n, m)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_assign_across_many_blocks():
    # K larger than one GEMM column block and N larger than one row block.
    rng = np.random.default_rng(5)
    c = unit_rows(rng, 9000, 16)
    x = unit_rows(rng, 1100, 16)
    np.testing.assert_array_equal(d2r.Codebook(c).assign(x), ref.assign(x, c)[:, 0])


def test_assign_ties_go_to_lowest_id():
    c = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [-1, 0]], np.float32)
    x = np.array([[1, 0], [0, 1], [0.5, 0.5], [-1, 0]], np.float32)
    cb = d2r.Codebook(c)
    assert cb.assign(x).tolist() == [0, 1, 0, 4]
    assert cb.assign(x, multiple=3).tolist() == [[0, 2, 1], [1, 3, 0], [0, 1, 2], [4, 1, 3]]


def test_feature_equal_to_codeword_assigned_to_it():
    rng = np.random.default_rng(1)
    c = unit_rows(rng, 50, 32)
    assert d2r.Codebook(c).assign(c).tolist() == list(range(50))


@PROPERTY
@given(kind=st.sampled_from(["vlad", "asmk", "asmk_star", "rvlad", "rasmk", "rasmk_star"]), seed=st.integers(0, 2**32 - 1),
       k=st.integers(1, 130), d=st.integers(1, 130), m=st.integers(1, 3),
       sizes=st.lists(st.integers(0, 60), min_size=1, max_size=6).filter(lambda v: sum(v) > 0))
def test_aggregate_matches_oracle(kind, seed, k, d, m, sizes):
    """Regions of any sizes, empty ones included; non-regional kinds take all the features."""
    m = min(m, k)
    rng = np.random.default_rng(seed)
    c = unit_rows(rng, k, d)
    x = unit_rows(rng, sum(sizes), d)
    sizes = sizes if kind.startswith("r") else None
    cb = d2r.Codebook(c)
    for normalize in ([True, False] if "vlad" in kind else [True]):
        agg = d2r.aggregate(x, cb, kind=kind, region_sizes=sizes, multiple_assignment=m, normalize=normalize)
        words, payload = ref.aggregate(x, c, kind, sizes, m, normalize)
        assert agg.kind == kind and agg.dim == d
        if "vlad" in kind:
            np.testing.assert_allclose(agg.vector, payload, atol=1e-6)
            continue
        np.testing.assert_array_equal(agg.words, words)
        if kind.endswith("_star"):
            np.testing.assert_array_equal(agg.codes, payload)
            assert agg.codes.shape == (len(words), (d + 7) // 8)
        else:
            np.testing.assert_allclose(agg.vectors, payload, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("alpha,tau", [(3.0, 0.0), (1.0, -1.0), (2.0, 0.25)])
def test_similarity_matches_oracle(binary, normalize, alpha, tau):
    rng = np.random.default_rng(7)
    d, k = 16, 24
    c = unit_rows(rng, k, d)
    cb = d2r.Codebook(c)
    kind = "asmk_star" if binary else "asmk"
    imgs = [unit_rows(rng, n, d) for n in (40, 25, 3, 60)]
    aggs = [d2r.aggregate(x, cb, kind=kind) for x in imgs]
    refs = [ref.aggregate(x, c, kind) for x in imgs]
    for a, ra in zip(aggs, refs):
        for b, rb in zip(aggs, refs):
            got = d2r.similarity(a, b, alpha=alpha, tau=tau, normalize=normalize)
            want = ref.similarity(*ra, *rb, d, binary, alpha, tau, normalize)
            assert got == pytest.approx(want, abs=1e-9)


def test_regional_query_against_rasmk_star_database():
    rng = np.random.default_rng(3)
    c = unit_rows(rng, 32, 64)
    cb = d2r.Codebook(c)
    x = unit_rows(rng, 200, 64)
    db = d2r.aggregate(x, cb, kind="rasmk_star", region_sizes=[100, 60, 40])
    q = d2r.aggregate(x[:100], cb, kind="asmk_star")
    assert d2r.similarity(q, db) > 0
    assert d2r.similarity(db, db, normalize=True) == pytest.approx(1.0)


def test_codes_are_msb_first_packbits():
    rng = np.random.default_rng(11)
    c = unit_rows(rng, 8, 24)
    x = unit_rows(rng, 80, 24)
    cb = d2r.Codebook(c)
    star = d2r.aggregate(x, cb, kind="asmk_star")
    flt = d2r.aggregate(x, cb, kind="asmk")
    np.testing.assert_array_equal(star.words, flt.words)
    np.testing.assert_array_equal(star.codes, np.packbits(flt.vectors > 0, axis=1))
