"""Index search equals brute-force d2r.similarity over every image, exactly."""

import numba
import numpy as np
import pytest

import d2r


def make_codebook(k, dim, seed=0):
    return d2r.Codebook(np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32))


def random_agg(rng, k, dim, n, kind="asmk_star"):
    """A random aggregation with n distinct words (binary codes or unit residuals)."""
    words = np.sort(rng.choice(k, n, replace=False)).astype(np.uint32)
    if kind in ("asmk_star", "rasmk_star"):
        codes = rng.integers(0, 256, (n, (dim + 7) // 8), dtype=np.uint8)
        if dim % 8:
            codes[:, -1] &= np.uint8((0xFF << (8 - dim % 8)) & 0xFF)
        return d2r.Aggregation(kind, dim, words, codes=codes)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    # Quantise to few values so that dot products tie often.
    v = np.round(v)
    v[np.all(v == 0, axis=1), 0] = 1
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return d2r.Aggregation(kind, dim, words, vectors=v)


def oracle(db, query, alpha, tau, normalize, pooling):
    """Brute force: [(image_id, score)] of live images, score desc then insertion order."""
    rows = []
    for order, (image_id, aggs, alive) in enumerate(db):
        if not alive:
            continue
        s = [d2r.similarity(query, a, alpha=alpha, tau=tau, normalize=normalize) for a in aggs]
        if pooling == "max":
            v = max(s)
        else:
            acc = 0.0
            for x in s:  # sequential sum (Python's sum() compensates since 3.12)
                acc += x
            v = acc / len(s)
        rows.append((-v, order, image_id, v))
    rows.sort()
    return [(r[2], r[3]) for r in rows]


def build(rng, k, dim, n_images, kind="asmk_star", regions=False, alpha=3.0, tau=0.0, max_words=None, p_empty=0.1):
    cb = make_codebook(k, dim)
    idx = d2r.Index(cb, kind=kind, alpha=alpha, tau=tau)
    db = []
    max_words = max_words or k // 2
    for i in range(n_images):
        n_regions = int(rng.integers(1, 4)) if regions else 1
        aggs = []
        for _ in range(n_regions):
            n = 0 if rng.random() < p_empty else int(rng.integers(1, max_words + 1))
            aggs.append(random_agg(rng, k, dim, n, kind))
        image_id = f"img{i:05d}"
        if regions:
            idx.add_regions(image_id, aggs, metadata={"i": i})
        else:
            idx.add(image_id, aggs[0], metadata={"i": i})
        db.append([image_id, aggs, True])
    return cb, idx, db


def check(idx, db, rng, k, dim, kind, n_queries=4, alpha=3.0, tau=0.0):
    for qn in range(n_queries):
        n = 0 if qn == 0 else int(rng.integers(1, k // 2 + 1))
        q = random_agg(rng, k, dim, n, "asmk_star" if kind in ("asmk_star", "rasmk_star") else "asmk")
        for normalize in (False, True):
            for pooling in ("max", "avg"):
                want = oracle(db, q, alpha, tau, normalize, pooling)
                for top_k in (1, 7, len(db) + 5):
                    hits = idx.search(q, top_k=top_k, normalize=normalize, pooling=pooling)
                    got = [(h.image_id, h.score) for h in hits]
                    assert got == want[:top_k], (normalize, pooling, top_k)


@pytest.mark.parametrize("dim", [8, 24, 128])
@pytest.mark.parametrize("regions", [False, True])
def test_binary_search_equals_brute_force(dim, regions):
    rng = np.random.default_rng(dim + 7 * regions)
    k = 32
    _, idx, db = build(rng, k, dim, 60, kind="rasmk_star", regions=regions)
    check(idx, db, rng, k, dim, "rasmk_star")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(d2r.index.search, "PARALLEL_MIN_ENTRIES", 0)
        check(idx, db, rng, k, dim, "rasmk_star", n_queries=2)
    # Removing images (ties and order of the rest unchanged).
    for i in (0, 5, 17, 59):
        idx.remove(db[i][0])
        db[i][2] = False
    check(idx, db, rng, k, dim, "rasmk_star")
    assert len(idx) == 56
    assert db[5][0] not in idx and db[6][0] in idx


@pytest.mark.parametrize("kind", ["asmk", "rasmk"])
def test_float_search_equals_brute_force(kind, monkeypatch):
    rng = np.random.default_rng(3)
    k, dim = 16, 4
    _, idx, db = build(rng, k, dim, 40, kind=kind, regions=True)
    check(idx, db, rng, k, dim, kind)
    monkeypatch.setattr(d2r.index.search, "PARALLEL_MIN_ENTRIES", 0)  # the parallel kernel too
    check(idx, db, rng, k, dim, kind, n_queries=2)


@pytest.mark.parametrize("alpha,tau", [(1.0, -0.5), (3.0, 0.25), (2.5, -1.0)])
def test_selectivity_parameters(alpha, tau):
    rng = np.random.default_rng(11)
    k, dim = 16, 16
    cb = make_codebook(k, dim)
    idx = d2r.Index(cb, kind="asmk_star", alpha=alpha, tau=tau)
    db = []
    for i in range(30):
        a = random_agg(rng, k, dim, int(rng.integers(0, 10)))
        idx.add(f"x{i}", a)
        db.append([f"x{i}", [a], True])
    check(idx, db, rng, k, dim, "asmk_star", alpha=alpha, tau=tau)


def test_ties_rank_insertion_order():
    cb = make_codebook(8, 8)
    idx = d2r.Index(cb, kind="asmk_star")
    a = d2r.Aggregation("asmk_star", 8, np.array([1, 3], np.uint32), codes=np.array([[7], [9]], np.uint8))
    for name in ["c", "a", "b", "d"]:
        idx.add(name, a)
    idx.remove("a")
    idx.add("a", a)  # re-added: now last
    hits = idx.search(a, top_k=10)
    assert [h.image_id for h in hits] == ["c", "b", "d", "a"]
    assert all(h.score == 2.0 for h in hits)


def test_reference_vector_normalised():
    # docs/algorithm.md: ASMK*, D = 2, descriptors [0,0,3,3,3] words [0..4] vs [1,2,3] words [1,2,4].
    cb = make_codebook(5, 2)
    x = d2r.Aggregation("asmk_star", 2, np.arange(5, dtype=np.uint32), codes=(np.array([0, 0, 3, 3, 3], np.uint8) << 6)[:, None])
    y = d2r.Aggregation("asmk_star", 2, np.array([1, 2, 4], np.uint32), codes=(np.array([1, 2, 3], np.uint8) << 6)[:, None])
    idx = d2r.Index(cb, kind="asmk_star")
    idx.add("y", y)
    (hit,) = idx.search(x, normalize=True)
    assert hit.score == pytest.approx(0.258199, abs=1e-6)
    assert hit.score == d2r.similarity(x, y, normalize=True)


@pytest.mark.slow
def test_many_blocks_and_threads(tmp_path, monkeypatch):
    """More than 2**16 items (several stored blocks), in memory and from a file (plus a delta
    on top of it), scored with 1 and with all threads."""
    rng = np.random.default_rng(5)
    k, dim = 8, 64
    cb = make_codebook(k, dim)
    idx = d2r.Index(cb, kind="asmk_star")
    n = 70_000
    words = [np.sort(rng.choice(k, int(rng.integers(0, 4)), replace=False)).astype(np.uint32) for _ in range(n)]
    codes = rng.integers(0, 256, (n * 3, 8), dtype=np.uint8)
    aggs = [d2r.Aggregation("asmk_star", dim, w, codes=codes[3 * i : 3 * i + w.size]) for i, w in enumerate(words)]
    for i, a in enumerate(aggs):
        idx.add(str(i), a)
    idx.remove("65537")
    q = random_agg(rng, k, dim, 6)
    want_all = np.array([d2r.similarity(q, a) for a in aggs])
    want_all[65537] = -np.inf
    order = np.lexsort((np.arange(n), -want_all))[:50]
    want = [(str(i), float(want_all[i])) for i in order]
    idx.save(tmp_path / "big.d2ri")
    opened = d2r.Index.open(tmp_path / "big.d2ri")
    opened_delta = d2r.Index.open(tmp_path / "big.d2ri")
    extra = random_agg(rng, k, dim, 5)
    opened_delta.add("extra", extra)
    opened_delta.remove("3")
    want_delta_all = np.append(want_all, d2r.similarity(q, extra))
    want_delta_all[3] = -np.inf
    order = np.lexsort((np.arange(n + 1), -want_delta_all))[:50]
    want_delta = [("extra" if i == n else str(i), float(want_delta_all[i])) for i in order]
    default = numba.get_num_threads()
    try:
        for min_entries in (d2r.index.search.PARALLEL_MIN_ENTRIES, 0):  # 0: always the parallel kernel
            monkeypatch.setattr(d2r.index.search, "PARALLEL_MIN_ENTRIES", min_entries)
            for threads in sorted({1, 2, default}):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                for index in (idx, opened):
                    assert [(h.image_id, h.score) for h in index.search(q, top_k=50)] == want
                assert [(h.image_id, h.score) for h in opened_delta.search(q, top_k=50)] == want_delta
    finally:
        numba.set_num_threads(default)
    assert opened._store.base.n_blocks == 2
    # Any number of parts and any chunking (chunk edges inside and across blocks) give the same hits.
    qwords = d2r.index.search.query_words(opened._params, "q", q)
    for chunk in (1 << 16, 1 << 12, 1000):
        monkeypatch.setattr(d2r.index.search, "CHUNK_ITEMS", chunk)
        for parts in (1, 2, 3, 7):
            images, scores = opened._searcher.top_k_images(opened._store, q, qwords, 50, False, "max", threads=parts)
            assert [(str(i), float(s)) for i, s in zip(images, scores)] == want


def test_add_after_search_and_remove_delta():
    rng = np.random.default_rng(9)
    k, dim = 16, 16
    _, idx, db = build(rng, k, dim, 20, kind="asmk_star")
    check(idx, db, rng, k, dim, "asmk_star", n_queries=2)
    for i in range(20, 30):
        a = random_agg(rng, k, dim, int(rng.integers(0, 8)))
        idx.add(f"img{i:05d}", a)
        db.append([f"img{i:05d}", [a], True])
    idx.remove("img00025")
    db[25][2] = False
    check(idx, db, rng, k, dim, "asmk_star", n_queries=2)
    idx.compact()
    del db[25]
    assert idx.n_items == 29 and len(idx) == 29
    check(idx, db, rng, k, dim, "asmk_star", n_queries=2)


def test_metadata_and_ids():
    cb = make_codebook(8, 8)
    idx = d2r.Index(cb, kind="asmk_star")
    a = d2r.Aggregation("asmk_star", 8, np.array([2], np.uint32), codes=np.array([[1]], np.uint8))
    idx.add("é-1", a, metadata={"title": "Mona Lisa", "tags": [1, 2]})
    idx.add("plain", a)
    (h1, h2) = idx.search(a)
    assert h1.metadata == {"title": "Mona Lisa", "tags": [1, 2]} and h1.image_id == "é-1"
    assert h2.metadata is None
    h1.metadata["title"] = "changed"
    assert idx.get_metadata("é-1")["title"] == "Mona Lisa"
    assert idx.image_ids() == ["é-1", "plain"]


def test_argument_errors():
    cb = make_codebook(8, 16)
    a = d2r.Aggregation("asmk_star", 16, np.array([2], np.uint32), codes=np.array([[1, 2]], np.uint8))
    with pytest.raises(d2r.InputError, match="dense vector"):
        d2r.Index(cb, kind="vlad")
    with pytest.raises(d2r.InputError, match="kind"):
        d2r.Index(cb, kind="nope")
    with pytest.raises(d2r.InputError, match="Codebook"):
        d2r.Index("cb")
    idx = d2r.Index(cb, kind="asmk_star")
    idx.add("a", a)
    with pytest.raises(d2r.InputError, match="already"):
        idx.add("a", a)
    with pytest.raises(d2r.InputError, match="non-empty string"):
        idx.add(3, a)
    with pytest.raises(d2r.InputError, match="not in the index"):
        idx.remove("zz")
    with pytest.raises(d2r.InputError, match="JSON"):
        idx.add("b", a, metadata={"x": object()})
    with pytest.raises(d2r.InputError, match="at least one"):
        idx.add_regions("b", [])
    f = d2r.Aggregation("asmk", 16, np.array([2], np.uint32), vectors=np.ones((1, 16), np.float32) / 4)
    with pytest.raises(d2r.InputError, match="cannot store"):
        idx.add("b", f)
    other_d = d2r.Aggregation("asmk_star", 8, np.array([2], np.uint32), codes=np.array([[1]], np.uint8))
    with pytest.raises(d2r.InputError, match="dimension"):
        idx.add("b", other_d)
    big_word = d2r.Aggregation("asmk_star", 16, np.array([9], np.uint32), codes=np.array([[1, 2]], np.uint8))
    with pytest.raises(d2r.InputError, match="outside the codebook"):
        idx.add("b", big_word)
    assert "b" not in idx and len(idx) == 1  # failed adds leave nothing behind
    with pytest.raises(d2r.IndexFormatError, match="D = 16"):
        idx.search(other_d)
    with pytest.raises(d2r.IndexFormatError, match="codebook"):
        idx.search(big_word)
    with pytest.raises(d2r.IndexFormatError, match="kind"):
        idx.search(f)
    with pytest.raises(d2r.InputError, match="pooling"):
        idx.search(a, pooling="sum")
    with pytest.raises(d2r.InputError, match="top_k"):
        idx.search(a, top_k=0)


def test_empty_index():
    cb = make_codebook(8, 8)
    idx = d2r.Index(cb)
    q = d2r.Aggregation("asmk_star", 8, np.array([2], np.uint32), codes=np.array([[1]], np.uint8))
    assert idx.search(q) == [] and len(idx) == 0
    idx.add("a", q)
    idx.remove("a")
    assert idx.search(q) == []
    idx.compact()
    assert idx.n_items == 0 and idx.search(q) == []
