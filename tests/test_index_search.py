"""The blocked search kernel (issue 18) equals brute force bit for bit, for any chunking and
any number of threads: scores, ranking and ties.

The kernels are called on inverted files with small blocks (shift 3..6, so that a few hundred
items make many blocks, partial last blocks and images cut by chunk edges) built here with
numpy from the items' words, and through ``d2r.Index`` (in memory, from a file, with a delta)
with the chunk size and the thread count forced small.
"""

import numba
import numpy as np
import pytest

import d2r
from d2r import kernels
from d2r.index import search as search_mod

# alpha = 2.5 and tau < 0: contributions with many bits and of both signs, so that a sum in
# another order differs in its last bits (with alpha = 3 and D a power of two every ASMK*
# contribution is a small multiple of a power of two and every order gives the same sum).
ALPHA, TAU = 2.5, -0.3


def random_items(rng, n_images, k, dim, max_regions=3, p_empty=0.1, max_words=None):
    """[(words, codes) per item], image_item_start: images of 1..max_regions items, some empty.
    D need not be a multiple of 8: unused bits of the last code byte are zero."""
    items, start = [], [0]
    max_words = max_words or k
    for _ in range(n_images):
        for _ in range(int(rng.integers(1, max_regions + 1))):
            n = 0 if rng.random() < p_empty else int(rng.integers(1, max_words + 1))
            words = np.sort(rng.choice(k, n, replace=False)).astype(np.uint32)
            codes = rng.integers(0, 256, (n, (dim + 7) // 8), dtype=np.uint8)
            if dim % 8:
                codes[:, -1] &= np.uint8((0xFF << (8 - dim % 8)) & 0xFF)
            items.append((words, codes))
        start.append(len(items))
    return items, np.array(start, dtype=np.int64)


def postings(items, k, shift, payload):
    """An inverted file of ``items`` with blocks of 2**shift items, as the index stores it."""
    n_blocks = max(-(-len(items) // (1 << shift)), 1)
    word = np.concatenate([w.astype(np.int64) for w, _ in items] + [np.zeros(0, np.int64)])
    item = np.repeat(np.arange(len(items)), [w.size for w, _ in items])
    codes = np.concatenate([c for _, c in items] + [np.zeros((0, payload), np.uint8)])
    run = word * n_blocks + (item >> shift)
    order = np.lexsort((item, run))  # by run, items ascending in each
    offsets = np.zeros(k * n_blocks + 1, dtype=np.int64)
    np.cumsum(np.bincount(run, minlength=k * n_blocks), out=offsets[1:])
    low = (item[order] & ((1 << shift) - 1)).astype(np.uint16)
    return offsets, n_blocks, low, np.ascontiguousarray(codes[order])


def brute_force(items, start, dead, q, dim, normalize, use_mean):
    """(images, scores) of every live image with items, best first, ties to the smaller image."""
    scores = []
    for a in range(start.shape[0] - 1):
        s = []
        for words, codes in items[start[a] : start[a + 1]]:
            item = d2r.Aggregation("asmk_star", dim, words, codes=codes)
            s.append(d2r.similarity(q, item, alpha=ALPHA, tau=TAU, normalize=normalize))
        if use_mean:
            acc = 0.0
            for x in s:
                acc += x
            scores.append(acc / len(s))
        else:
            scores.append(max(s))
    scores = np.array(scores)
    live = np.flatnonzero(~dead)
    order = live[np.lexsort((live, -scores[live]))]
    return order, scores[order]


def kernel_top_k(q, ivf, shift, n_items, start, item_words, dead, dim, chunk, parts, normalize, use_mean, k):
    offsets, n_blocks, low, codes = ivf
    qcodes = np.ascontiguousarray(q.codes)
    if dim % 64 == 0:
        qcodes, codes = qcodes.view(np.uint64), codes.view(np.uint64)
    args = (True, q.words, qcodes, np.zeros((0, 1), np.float32), offsets, n_blocks, shift, low, codes,
            np.zeros((0, 1), np.float32), kernels.selectivity_table(dim, ALPHA, TAU), ALPHA, TAU, 0, n_items, chunk, start,
            item_words, dead, normalize, use_mean, k)
    if parts == 1:
        return kernels.ivf_top_k(*args)
    return kernels.ivf_top_k_parallel(*args, parts)


@pytest.mark.parametrize("dim", [12, 64, 128])
@pytest.mark.parametrize("shift", [3, 6])
def test_kernel_equals_brute_force_for_any_chunking_and_parts(dim, shift):
    rng = np.random.default_rng(dim * 10 + shift)
    k = 12  # few words, short codes: many equal scores
    items, start = random_items(rng, 150, k, dim)
    n_items = len(items)
    item_words = np.array([w.size for w, _ in items], dtype=np.int64)
    dead = rng.random(150) < 0.1
    ivf = postings(items, k, shift, (dim + 7) // 8)
    assert ivf[1] >= 4  # several blocks
    queries = [d2r.Aggregation("asmk_star", dim, words, codes=codes) for words, codes in
               random_items(rng, 4, k, dim, max_regions=1, p_empty=0.0)[0]] + [
               d2r.Aggregation("asmk_star", dim, np.zeros(0, np.uint32), codes=np.zeros((0, (dim + 7) // 8), np.uint8))]
    block = 1 << shift
    for q in queries:
        for normalize in (False, True):
            for use_mean in (False, True):
                want_i, want_s = brute_force(items, start, dead, q, dim, normalize, use_mean)
                for top in (1, 10, 200):
                    for chunk in (block, block // 2, 3, block * 4, 1 << 20):
                        for parts in (1, 2, 3, 7):
                            ok, got_i, got_s = kernel_top_k(q, ivf, shift, n_items, start, item_words, dead, dim, chunk, parts,
                                                            normalize, use_mean, top)
                            assert ok
                            assert got_i.tolist() == want_i[:top].tolist(), (chunk, parts, top)
                            # Bit for bit: == on float64, not approx.
                            assert got_s.tolist() == want_s[:top].tolist(), (chunk, parts, top)


def test_the_comparison_sees_the_order_of_the_sum():
    """With these alpha and tau the bit-for-bit comparison can tell a sum in another order from
    the right one: summed in descending word order, items' ASMK* scores differ in their last
    bits, so a kernel that changed the order of an item's sum (split it between threads, say)
    fails the tests above."""
    rng = np.random.default_rng(1)
    for dim in (12, 64, 128):
        table = kernels.selectivity_table(dim, ALPHA, TAU)
        differs = 0
        for _ in range(50):
            h = rng.integers(0, dim // 2, 12)  # Hamming distances of the matched words of one item
            forward = backward = 0.0
            for x in h:
                forward += table[x]
            for x in h[::-1]:
                backward += table[x]
            differs += forward != backward
        assert differs > 5, dim


def test_corrupt_entry_in_a_partial_block_is_reported():
    """An entry naming an item beyond the segment (past the end of its last, partial block) is
    reported (ok False) and skipped, whatever code it carries, for any chunking."""
    rng = np.random.default_rng(3)
    dim, k, shift = 64, 8, 4
    items, start = random_items(rng, 20, k, dim, max_regions=1, p_empty=0.0)
    n_items = len(items)
    offsets, n_blocks, low, codes = postings(items, k, shift, dim // 8)
    assert n_items % (1 << shift)  # the last block is partial
    last_run_end = offsets[-1]
    low = low.copy()
    low[last_run_end - 1] = (1 << shift) - 1  # the last entry of the last word's last block: beyond n_items
    q = d2r.Aggregation("asmk_star", dim, np.arange(k, dtype=np.uint32), codes=np.zeros((k, dim // 8), np.uint8))
    item_words = np.array([w.size for w, _ in items], dtype=np.int64)
    dead = np.zeros(20, np.bool_)
    for chunk in (1 << shift, 3, 1 << 20):
        for parts in (1, 2):
            ok, _, _ = kernel_top_k(q, (offsets, n_blocks, low, codes), shift, n_items, start, item_words, dead, dim, chunk,
                                    parts, False, False, 5)
            assert not ok, (chunk, parts)


def random_agg(rng, kind, k, dim, n):
    words = np.sort(rng.choice(k, n, replace=False)).astype(np.uint32)
    if kind.endswith("_star"):
        return d2r.Aggregation(kind, dim, words, codes=rng.integers(0, 256, (n, dim // 8), dtype=np.uint8))
    v = np.round(rng.standard_normal((n, dim)) * 2).astype(np.float32)  # few values: equal scores happen
    v[np.all(v == 0, axis=1), 0] = 1
    return d2r.Aggregation(kind, dim, words, vectors=v / np.linalg.norm(v, axis=1, keepdims=True))


def make_index(rng, n_images, k, dim, kind):
    cb = d2r.Codebook(np.random.default_rng(0).standard_normal((k, dim)).astype(np.float32))
    idx = d2r.Index(cb, kind=kind, alpha=ALPHA, tau=TAU)
    db = []
    for i in range(n_images):
        aggs = [random_agg(rng, kind, k, dim, 0 if rng.random() < 0.1 else int(rng.integers(1, k + 1)))
                for _ in range(int(rng.integers(1, 4)))]
        idx.add_regions(f"im{i:04d}", aggs)
        db.append((f"im{i:04d}", aggs))
    return cb, idx, db


def oracle(db, dead, q, normalize, pooling):
    rows = []
    for order, (image_id, aggs) in enumerate(db):
        if image_id in dead:
            continue
        s = [d2r.similarity(q, a, alpha=ALPHA, tau=TAU, normalize=normalize) for a in aggs]
        if pooling == "max":
            v = max(s)
        else:
            v = 0.0
            for x in s:
                v += x
            v /= len(s)
        rows.append((-v, order, image_id, v))
    rows.sort()
    return [(r[2], r[3]) for r in rows]


@pytest.mark.parametrize("kind", ["rasmk_star", "rasmk"])
def test_index_search_any_chunk_and_thread_count(kind, tmp_path, monkeypatch):
    """Through d2r.Index: in memory, from a file and from a file with a delta and tombstones,
    chunks of 5, 64 and 2**16 items (MIN_SPLIT_ITEMS lowered so the split for threads is
    exercised too), 1, 2 and 5 parts and numba's own threads: the same hits as brute force."""
    rng = np.random.default_rng(7)
    k, dim = 10, 64 if kind == "rasmk_star" else 8
    cb, idx, db = make_index(rng, 120, k, dim, kind)
    idx.save(tmp_path / "a.d2ri")
    opened = d2r.Index.open(tmp_path / "a.d2ri")
    with_delta = d2r.Index.open(tmp_path / "a.d2ri")
    extra = []
    for i in range(30):
        a = random_agg(rng, kind, k, dim, 4)
        with_delta.add_regions(f"new{i:02d}", [a, a])
        extra.append((f"new{i:02d}", [a, a]))
    for image_id in ("im0003", "new05"):
        with_delta.remove(image_id)
    cases = [(idx, db, set()), (opened, db, set()), (with_delta, db + extra, {"im0003", "new05"})]
    queries = [random_agg(rng, kind, k, dim, n) for n in (0, 3, k)]
    monkeypatch.setattr(search_mod, "MIN_SPLIT_ITEMS", 1)
    default = numba.get_num_threads()
    try:
        for chunk in (5, 64, 1 << 16):
            monkeypatch.setattr(search_mod, "CHUNK_ITEMS", chunk)
            for index, items, dead in cases:
                for q in queries:
                    for normalize, pooling in ((False, "max"), (True, "avg")):
                        want = oracle(items, dead, q, normalize, pooling)
                        qwords = search_mod.query_words(index._params, "q", q)
                        for parts in (1, 2, 5):
                            images, scores = index._searcher.top_k_images(index._store, q, qwords, 1000, normalize, pooling,
                                                                          threads=parts)
                            got = [(index._store.image_id(int(i)), float(s)) for i, s in zip(images, scores)]
                            assert got == want, (chunk, parts, normalize, pooling)
                        monkeypatch.setattr(search_mod, "PARALLEL_MIN_ENTRIES", 0)
                        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                            numba.set_num_threads(threads)
                            got = [(h.image_id, h.score) for h in index.search(q, top_k=1000, normalize=normalize,
                                                                                 pooling=pooling)]
                            assert got == want, (chunk, threads)
    finally:
        numba.set_num_threads(default)


def test_chunk_items_splits_for_threads_on_block_edges(monkeypatch):
    monkeypatch.setattr(search_mod, "CHUNK_ITEMS", 1 << 16)
    monkeypatch.setattr(search_mod, "MIN_SPLIT_ITEMS", 1 << 12)
    assert search_mod.chunk_items(1_000_000, 1) == 1 << 16
    assert search_mod.chunk_items(1_000_000, 2) == 1 << 16  # 16 chunks: enough for 2 threads
    assert search_mod.chunk_items(100_000, 2) == 1 << 14  # 7 chunks
    assert search_mod.chunk_items(10_000, 2) == 1 << 12  # not below MIN_SPLIT_ITEMS
    for n in (1000, 100_000, 1_000_000):
        for t in (1, 2, 4, 16):
            c = search_mod.chunk_items(n, t)
            assert (1 << 16) % c == 0  # chunk edges fall on block edges: no binary search of a run
