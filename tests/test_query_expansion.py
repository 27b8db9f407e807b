"""Query expansion (``Index.search(expand=n)``): a constructed case where it must reorder, and
equality with a brute-force oracle (vote per word over the query and its top hits' best items,
then brute-force search with the merged query) on random indexes, base file and delta."""

import numpy as np
import pytest

import d2r

from test_index import build, make_codebook, oracle, random_agg


def agg(words, codes, dim=8):
    return d2r.Aggregation("asmk_star", dim, np.array(words, np.uint32), codes=np.array(codes, np.uint8).reshape(-1, 1))


def test_expansion_reaches_an_image_that_shares_no_word_with_the_query():
    # A shares the query's words and has two more (7, 8); B has only 7 and 8; C only noise.
    cb = make_codebook(16, 8)
    idx = d2r.Index(cb, kind="rasmk_star")
    idx.add("A", agg([1, 2, 3, 7, 8], [0xFF, 0xFF, 0xFF, 0x0F, 0x0F]))
    idx.add("C", agg([9, 10], [0x00, 0xF0]))
    idx.add("B", agg([7, 8], [0x0F, 0x0F]))
    q = agg([1, 2, 3], [0xFF, 0xFF, 0xFF])
    plain = idx.search(q, top_k=3)
    assert [h.image_id for h in plain] == ["A", "C", "B"]  # B and C score 0: insertion order
    assert [h.score for h in plain] == [3.0, 0.0, 0.0]
    assert [(h.image_id, h.score) for h in idx.search(q, top_k=3, expand=0)] == [(h.image_id, h.score) for h in plain]
    expanded = idx.search(q, top_k=3, expand=1)
    assert [h.image_id for h in expanded] == ["A", "B", "C"]
    # The merged query is A's words with A's codes (query and A agree on 1-3): A scores 5, B 2.
    assert [h.score for h in expanded] == [5.0, 2.0, 0.0]


def test_a_tie_keeps_the_query_bit_and_weights_follow_the_similarity():
    # Word 1: the query says 0xFF, hit A says 0x00 with equal weight (expand_alpha=0): the sum is
    # 0 on every bit and the query's bits are kept. With two hits that say 0x00 they win.
    cb = make_codebook(16, 8)
    idx = d2r.Index(cb, kind="asmk_star", tau=-1.0, alpha=1.0)
    idx.add("A", agg([1, 2, 3], [0x00, 0xFF, 0xFF]))
    idx.add("B", agg([1, 2, 3], [0x00, 0xFF, 0xFF]))
    q = agg([1, 2, 3], [0xFF, 0xFF, 0xFF])
    s = idx._searcher
    store = idx._store
    store.flush()
    qwords = q.words.astype(np.uint32)
    one = s.expanded(store, q, qwords, False, "max", 1, 0.0)
    assert one.codes[:, 0].tolist() == [0xFF, 0xFF, 0xFF]
    two = s.expanded(store, q, qwords, False, "max", 2, 0.0)
    assert two.codes[:, 0].tolist() == [0x00, 0xFF, 0xFF]


def oracle_expanded(db, q, n, expand_alpha, alpha, tau, normalize, pooling):
    """The merged query, computed from d2r.similarity and Python dicts."""
    live = {image_id: aggs for image_id, aggs, alive in db if alive}
    top = oracle(db, q, alpha, tau, normalize, pooling)[:n]
    chosen = []
    for image_id, _ in top:
        sims = [d2r.similarity(q, a, alpha=alpha, tau=tau, normalize=True) for a in live[image_id]]
        best = int(np.argmax(sims))
        if sims[best] > 0:
            chosen.append((live[image_id][best], sims[best]))
    if not len(q) or not chosen:
        return q
    voters = [(q, 1.0)] + [(a, (s / chosen[0][1]) ** expand_alpha) for a, s in chosen]
    dim = q.dim
    acc, first = {}, {}
    for a, weight in voters:
        for w, code in zip(a.words.tolist(), a.codes):
            signs = np.unpackbits(code)[:dim].astype(np.float64) * 2 - 1
            acc[w] = acc.get(w, np.zeros(dim)) + weight * signs
            first.setdefault(w, signs)
    words = sorted(acc)
    bits = np.array([[(acc[w][d] if acc[w][d] != 0 else first[w][d]) > 0 for d in range(dim)] for w in words])
    return d2r.Aggregation(q.kind, dim, np.array(words, np.uint32), codes=np.packbits(bits, axis=1))


def check_expansion(idx, db, rng, k, dim, n_queries, alpha=3.0, tau=0.0):
    checked = 0
    for qn in range(n_queries):
        q = random_agg(rng, k, dim, 0 if qn == 0 else int(rng.integers(1, k // 2 + 1)), "asmk_star")
        for normalize in (False, True):
            for pooling in ("max", "avg"):
                for n, ea in ((1, 3.0), (3, 0.0), (5, 3.0), (len(db) + 2, 1.5)):
                    merged = oracle_expanded(db, q, n, ea, alpha, tau, normalize, pooling)
                    want = oracle(db, merged, alpha, tau, normalize, pooling)
                    got = idx.search(q, top_k=len(db), normalize=normalize, pooling=pooling, expand=n, expand_alpha=ea)
                    assert [(h.image_id, h.score) for h in got] == want, (qn, normalize, pooling, n, ea)
                    checked += 1
    return checked


@pytest.mark.parametrize("dim", [8, 64])
@pytest.mark.parametrize("regions", [False, True])
def test_expansion_equals_the_oracle(dim, regions, tmp_path):
    rng = np.random.default_rng(100 + dim + regions)
    k = 32
    _, idx, db = build(rng, k, dim, 40, kind="rasmk_star", regions=regions)
    assert check_expansion(idx, db, rng, k, dim, 3) == 48
    # A saved file (the base, memory-mapped) with more images in the delta and some removed.
    path = tmp_path / "x.d2ri"
    idx.save(path)
    opened = d2r.Index.open(path)
    for i in range(40, 50):
        aggs = [random_agg(rng, k, dim, int(rng.integers(1, k // 2)), "rasmk_star") for _ in range(2 if regions else 1)]
        if regions:
            opened.add_regions(f"img{i:05d}", aggs)
        else:
            opened.add(f"img{i:05d}", aggs[0])
        db.append([f"img{i:05d}", aggs, True])
    for i in (0, 3, 44):
        opened.remove(db[i][0])
        db[i][2] = False
    check_expansion(opened, db, rng, k, dim, 2)
    opened.close()


def test_off_is_todays_search():
    rng = np.random.default_rng(5)
    _, idx, db = build(rng, 32, 24, 30, kind="rasmk_star", regions=True)
    for _ in range(3):
        q = random_agg(rng, 32, 24, 10, "asmk_star")
        want = oracle(db, q, 3.0, 0.0, False, "max")
        assert [(h.image_id, h.score) for h in idx.search(q, top_k=30)] == want
        assert [(h.image_id, h.score) for h in idx.search(q, top_k=30, expand=0)] == want


def test_float_kind_expansion_sums_and_renormalises():
    cb = make_codebook(8, 4)
    idx = d2r.Index(cb, kind="asmk")
    e = np.eye(4, dtype=np.float32)
    idx.add("A", d2r.Aggregation("asmk", 4, np.array([1, 2], np.uint32), vectors=np.stack([e[0], e[1]])))
    idx.add("B", d2r.Aggregation("asmk", 4, np.array([2], np.uint32), vectors=e[1][None]))
    q = d2r.Aggregation("asmk", 4, np.array([1], np.uint32), vectors=((e[0] + e[1]) / np.sqrt(2)).astype(np.float32)[None])
    assert [h.image_id for h in idx.search(q, top_k=2)] == ["A", "B"]
    hits = idx.search(q, top_k=2, expand=1, expand_alpha=0.0)
    # merged: word 1 = normalise(q + e0), word 2 = e1 -> B now scores 1 on word 2
    assert [h.image_id for h in hits] == ["A", "B"] and hits[1].score == pytest.approx(1.0)
    s = (np.dot((e[0] + e[1]) / np.sqrt(2) + e[0], e[0]) / np.linalg.norm((e[0] + e[1]) / np.sqrt(2) + e[0])) ** 3
    assert hits[0].score == pytest.approx(s + 1.0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, 101, "3"])
def test_bad_expand_is_refused(bad):
    rng = np.random.default_rng(0)
    _, idx, _ = build(rng, 16, 8, 5)
    with pytest.raises(d2r.InputError, match="expand"):
        idx.search(random_agg(rng, 16, 8, 3), expand=bad)
    with pytest.raises(d2r.InputError, match="expand_alpha"):
        idx.search(random_agg(rng, 16, 8, 3), expand=2, expand_alpha=-1)
