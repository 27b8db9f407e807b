"""Naive-R-ASMK (the paper's ablation) against the numpy oracle.

Its defining property: with a linear kernel its similarity to a query equals the mean of the
query's ASMK similarities to the database image's regions; with the selectivity (alpha = 3)
it does not, because sigma is applied to the averaged match (why it degrades as R grows).
"""

import numpy as np
import pytest

import d2r
from d2r.errors import InputError

import numpy_reference as ref


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


REGIONS = [[60], [30, 30], [20, 0, 25, 15], [0, 60], [10, 10, 10, 10, 10, 10]]


def region_similarities(q_words, q_vecs, x, c, sizes, alpha, tau):
    """Per-region ASMK similarities of the query; an empty region (or one without visual words)
    matches nothing and contributes 0."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    out = []
    for r in range(len(sizes)):
        xr = x[bounds[r] : bounds[r + 1]]
        if len(xr) == 0:
            out.append(0.0)
            continue
        w, v = ref.aggregate(xr, c, "asmk")
        out.append(0.0 if len(w) == 0 else ref.similarity(q_words, q_vecs, w, v, c.shape[1], False, alpha, tau))
    return np.array(out)


@pytest.mark.parametrize("sizes", REGIONS)
@pytest.mark.parametrize("seed,k,d", [(0, 8, 4), (1, 16, 8), (2, 32, 16)])
def test_aggregation_matches_oracle(seed, k, d, sizes):
    rng = np.random.default_rng(seed)
    c = unit_rows(rng, k, d)
    x = unit_rows(rng, sum(sizes), d)
    agg = d2r.aggregate(x, d2r.Codebook(c), kind="naive_rasmk", region_sizes=sizes)
    words, vecs = ref.naive_rasmk(x, c, sizes)
    assert agg.kind == "naive_rasmk" and agg.n_regions == len(sizes)
    np.testing.assert_array_equal(agg.words, words)
    np.testing.assert_allclose(agg.vectors, vecs, atol=1e-6)
    # the mean of unit vectors: norms at most 1, below 1 where regions disagree or miss the word
    assert np.all(np.linalg.norm(agg.vectors, axis=1) <= 1 + 1e-6)


@pytest.mark.parametrize("sizes", REGIONS)
@pytest.mark.parametrize("seed", [3, 4, 5])
def test_linear_kernel_similarity_is_the_mean_of_region_similarities(seed, sizes):
    rng = np.random.default_rng(seed)
    k, d = 12, 8
    c = unit_rows(rng, k, d)
    x = unit_rows(rng, sum(sizes), d)
    cb = d2r.Codebook(c)
    q = d2r.aggregate(unit_rows(rng, 40, d), cb, kind="asmk")
    naive = d2r.aggregate(x, cb, kind="naive_rasmk", region_sizes=sizes)
    # alpha = 1 and tau below -1: sigma is the identity on [-1, 1]
    got = d2r.similarity(q, naive, alpha=1.0, tau=-2.0)
    per_region = region_similarities(q.words, q.vectors, x, c, sizes, 1.0, -2.0)
    assert got == pytest.approx(per_region.mean(), abs=1e-6)
    assert np.any(per_region != 0)


def test_selectivity_breaks_the_equality_and_index_agrees():
    rng = np.random.default_rng(7)
    k, d, sizes = 6, 8, [40, 40, 40, 40]
    c = unit_rows(rng, k, d)
    x = unit_rows(rng, sum(sizes), d)
    cb = d2r.Codebook(c)
    q = d2r.aggregate(unit_rows(rng, 50, d), cb, kind="asmk")
    naive = d2r.aggregate(x, cb, kind="naive_rasmk", region_sizes=sizes)
    got = d2r.similarity(q, naive)  # alpha 3, tau 0
    words, vecs = ref.naive_rasmk(x, c, sizes)
    assert got == pytest.approx(ref.similarity(q.words, q.vectors, words, vecs, d, False), abs=1e-6)
    mean_of_regions = region_similarities(q.words, q.vectors, x, c, sizes, 3.0, 0.0).mean()
    assert abs(got - mean_of_regions) > 1e-3
    index = d2r.Index(cb, kind="naive_rasmk")
    index.add("a", naive)
    index.add("b", d2r.aggregate(x[:40], cb, kind="naive_rasmk", region_sizes=[40]))
    scores = {h.image_id: h.score for h in index.search(q, top_k=2)}
    assert scores["a"] == pytest.approx(got, abs=1e-5)


def test_one_region_equals_asmk_and_no_features_is_empty():
    rng = np.random.default_rng(8)
    c = unit_rows(rng, 10, 8)
    x = unit_rows(rng, 30, 8)
    cb = d2r.Codebook(c)
    a = d2r.aggregate(x, cb, kind="asmk")
    n = d2r.aggregate(x, cb, kind="naive_rasmk")
    np.testing.assert_array_equal(n.words, a.words)
    np.testing.assert_allclose(n.vectors, a.vectors, atol=1e-6)
    empty = d2r.aggregate(np.zeros((0, 8), np.float32), cb, kind="naive_rasmk", region_sizes=[0, 0])
    assert empty.is_empty and empty.n_regions == 2
    assert d2r.similarity(a, empty) == -1.0


def test_eval_kind_needs_regions():
    from d2r_lab import evaluation

    with pytest.raises(InputError, match="naive_rasmk needs regions"):
        evaluation.run("/nonexistent", kind="naive_rasmk", regions="none")
