"""ASMK / ASMK* similarity: of two aggregations (merge-join of their word lists) and of a query
with every item of an inverted file (the search kernels of :class:`d2r.Index`), then pooling
of item scores into image scores and the top k.

Both live in one module on purpose: the inverted-file kernels must add exactly what the
pairwise similarity adds (see "Exactness" below), and Numba's disk cache notices a change of
a kernel only in the kernel's own file, so a kernel and the kernels it calls share a file.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba import types as _nb_types
from numba.extending import intrinsic as _nb_intrinsic

# An 8-bit popcount table; Numba has no portable popcount intrinsic for uint8.
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Similarity
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def selectivity(s, alpha, tau):
    """sigma(s) = sign(s) * |s|^alpha if s > tau (strict) else 0."""
    if s > tau:
        if s >= 0.0:
            return s ** alpha
        return -((-s) ** alpha)
    return 0.0


@njit(cache=True, nogil=True)
def hamming_similarity(a, b, dim):
    """s = 1 - 2 * popcount(a xor b) / D for two packed uint8 code rows."""
    ones = 0
    for j in range(a.shape[0]):
        ones += _POPCOUNT8[a[j] ^ b[j]]
    return 1.0 - 2.0 * ones / dim


@njit(cache=True, nogil=True)
def asmk_star_similarity(words_a, codes_a, words_b, codes_b, dim, alpha, tau):
    """Un-normalised ASMK* similarity: merge-join of two ascending word lists."""
    i = 0
    j = 0
    total = 0.0
    while i < words_a.shape[0] and j < words_b.shape[0]:
        wa = words_a[i]
        wb = words_b[j]
        if wa < wb:
            i += 1
        elif wb < wa:
            j += 1
        else:
            total += selectivity(hamming_similarity(codes_a[i], codes_b[j], dim), alpha, tau)
            i += 1
            j += 1
    return total


@njit(cache=True, nogil=True)
def asmk_similarity(words_a, vecs_a, words_b, vecs_b, alpha, tau):
    """Un-normalised ASMK similarity: merge-join with dot products of normalised residuals."""
    i = 0
    j = 0
    total = 0.0
    while i < words_a.shape[0] and j < words_b.shape[0]:
        wa = words_a[i]
        wb = words_b[j]
        if wa < wb:
            i += 1
        elif wb < wa:
            j += 1
        else:
            s = 0.0
            for d in range(vecs_a.shape[1]):
                s += np.float64(vecs_a[i, d]) * np.float64(vecs_b[j, d])
            total += selectivity(s, alpha, tau)
            i += 1
            j += 1
    return total


# --------------------------------------------------------------------------------------------
# Inverted-file search
# --------------------------------------------------------------------------------------------
# An inverted file holds, for every visual word w, the entries of the items (images or regions)
# that contain w: the item number and the item's code for w. Entries of one word are grouped
# in blocks of items (block b holds items [b << shift, (b + 1) << shift)), ascending by item;
# ``offsets[w * n_blocks + b]`` .. ``offsets[w * n_blocks + b + 1]`` is the run of (w, b) and
# ``low[e]`` the item number minus the block start. The file stores shift = 16 (uint16 ``low``,
# two bytes per entry); the in-memory delta uses one block with shift = 32 (uint32 ``low``).
#
# Search is blocked by items: the items of a segment are cut into *chunks* (by default one
# stored block, 2**16 items: a float64 score buffer of 512 KiB that stays in the core's L2
# cache). A chunk zeroes its buffer, scans the runs of every query word in that chunk (in
# ascending word order), finishes each item's score (-1 without words, the normalisation),
# pools the images that lie wholly inside the chunk (max or mean) into a top-k heap, and leaves
# the final scores of its other items (those of an image cut by a chunk edge) in ``edge``; those
# images are pooled at the end. No array of the size of the collection is read or written per
# query besides the per-item word counts and the image ranges, once each.
#
# Exactness: an item's score is accumulated in float64 in ascending query-word order, which is
# the order of the merge-join in ``asmk_star_similarity``; the binary kernel adds the values of
# ``selectivity_table`` (``selectivity`` of ``1 - 2 h / D`` for every Hamming distance h,
# computed with the same expression as ``hamming_similarity``), so the result is bit-for-bit
# the brute-force similarity. Every item lies in exactly one chunk, so its sum is never split;
# threads take whole chunks, and the heaps are merged under a strict total order (score
# descending, then image number ascending), so the top k do not depend on the chunking nor on
# the number of threads.

@_nb_intrinsic
def _popcount(typingctx, x):
    """LLVM ctpop of an unsigned integer (one POPCNT instruction for uint64)."""
    if not isinstance(x, _nb_types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@njit(cache=True, nogil=True)
def selectivity_table(dim, alpha, tau):
    """float64 [D + 1]: entry h is selectivity(1 - 2 h / D) (what ASMK* adds for distance h)."""
    out = np.empty(dim + 1)
    for h in range(dim + 1):
        out[h] = selectivity(1.0 - 2.0 * h / dim, alpha, tau)
    return out


@njit(cache=True, nogil=True)
def _first_at_least(low, a, b, key):
    """The first entry e in [a, b) with low[e] >= key (b if none; low ascending), searched
    outward from a (galloping, then binary): it reads only entries near a, which the scan
    that follows reads anyway, instead of probing the whole run (a cache miss per probe)."""
    if a >= b or np.int64(low[a]) >= key:
        return a
    prev = a  # low[prev] < key
    step = np.int64(1)
    cur = a + 1
    while cur < b and np.int64(low[cur]) < key:
        prev = cur
        step <<= 1
        cur = a + step
    lo = prev + 1
    hi = min(cur, b)
    while lo < hi:
        mid = (lo + hi) >> 1
        if np.int64(low[mid]) < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _run_bounds(offsets, low, run, block, shift, item_lo, item_hi, start):
    """Entries [a, b) of run ``run`` (word, block) whose items lie in [item_lo, item_hi).
    ``start`` >= 0: the entry where the previous, adjacent range of the same block ended (its
    b), so the first entry is known; otherwise it is searched where the range cuts the block."""
    a = np.int64(offsets[run])
    b = np.int64(offsets[run + 1])
    base = np.int64(block) << shift
    if start >= 0:
        a = start
    elif item_lo > base:
        a = _first_at_least(low, a, b, item_lo - base)
    if item_hi < base + (np.int64(1) << shift):
        b = _first_at_least(low, a, b, item_hi - base)
    return a, b


@njit(cache=True, nogil=True)
def _scan_binary(q, codes, table, low, a, b, off, acc, n):
    """acc[off + low[e]] += table[popcount(codes[e] ^ q)] for entries [a, b); an entry outside
    acc[:n] is skipped and False returned (a corrupt file)."""
    ok = True
    nw = codes.shape[1]
    un = np.uint64(n)
    if nw == 2:  # D = 128 as two uint64 words
        q0 = q[0]
        q1 = q[1]
        for e in range(a, b):
            i = off + np.int64(low[e])
            if np.uint64(i) >= un:
                ok = False
                continue
            acc[i] += table[_popcount(codes[e, 0] ^ q0) + _popcount(codes[e, 1] ^ q1)]
    elif nw == 1:  # D = 64
        q0 = q[0]
        for e in range(a, b):
            i = off + np.int64(low[e])
            if np.uint64(i) >= un:
                ok = False
                continue
            acc[i] += table[_popcount(codes[e, 0] ^ q0)]
    else:
        for e in range(a, b):
            i = off + np.int64(low[e])
            if np.uint64(i) >= un:
                ok = False
                continue
            ones = 0
            for j in range(nw):
                ones += np.int64(_popcount(codes[e, j] ^ q[j]))
            acc[i] += table[ones]
    return ok


@njit(cache=True, nogil=True)
def _scan_float(q, vecs, alpha, tau, low, a, b, off, acc, n):
    """As ``_scan_binary`` for ASMK: selectivity of the float64 dot product of unit residuals."""
    ok = True
    un = np.uint64(n)
    dim = vecs.shape[1]
    for e in range(a, b):
        i = off + np.int64(low[e])
        if np.uint64(i) >= un:
            ok = False
            continue
        s = 0.0
        for d in range(dim):
            s += np.float64(q[d]) * np.float64(vecs[e, d])
        acc[i] += selectivity(s, alpha, tau)
    return ok


@njit(cache=True, nogil=True)
def _score_chunk(binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, lo, hi, seg_hi,
                 acc, cursor, prev_hi):
    """acc[i - lo] = the un-normalised similarity of the query with item i, for i in [lo, hi)
    (acc may be longer). Returns False if an entry names an item beyond seg_hi, the end of the
    segment (a corrupt file; such entries are skipped).

    A run is searched only where the chunk cuts its block: not at all when chunks are whole
    stored blocks, as by default (the last chunk of the segment takes its block's runs whole:
    an entry beyond seg_hi is corrupt and is caught by the range check). cursor: int64 [q],
    where each word's run ended in the previous chunk of the same thread, which ended at item
    ``prev_hi``; when that chunk ends where this one starts inside a block, the runs start
    there, and only their ends are searched (near their starts)."""
    ok = True
    span = hi - lo
    acc[:span] = 0.0
    if n_blocks == 0:
        return ok
    b_first = lo >> shift
    b_last = min((hi - 1) >> shift, n_blocks - 1)
    for blk in range(b_first, b_last + 1):  # items of different blocks are distinct: any order
        base = np.int64(blk) << shift
        top = hi if hi < seg_hi else base + (np.int64(1) << shift)
        resume = blk == b_first and prev_hi == lo and lo > base  # the previous chunk ended inside this block
        for qi in range(qwords.shape[0]):  # ascending words: the merge-join's order
            w = np.int64(qwords[qi])
            a, b = _run_bounds(offsets, low, w * n_blocks + blk, blk, shift, lo, top, cursor[qi] if resume else -1)
            if blk == b_last:
                cursor[qi] = b
            if b > a:
                if binary:
                    ok &= _scan_binary(qcodes[qi], codes, table, low, a, b, base - lo, acc, span)
                else:
                    ok &= _scan_float(qvecs[qi], vecs, alpha, tau, low, a, b, base - lo, acc, span)
    return ok


@njit(cache=True, nogil=True)
def _finish(s, n_words, n_query_words, normalize):
    """An item's final score: -1 without words (or for an empty query), else optionally divided
    by sqrt(n_query_words * n_item_words), as ``similarity(normalize=True)`` does."""
    if n_words == 0 or n_query_words == 0:
        return -1.0
    if normalize:
        return s / np.sqrt(float(n_query_words) * float(n_words))
    return s


@njit(cache=True, nogil=True)
def _worse(sa, ia, sb, ib):
    """True if hit (sa, ia) ranks below (sb, ib): lower score, or equal score and later image."""
    return sa < sb or (sa == sb and ia > ib)


@njit(cache=True, nogil=True)
def _heap_push(heap_s, heap_i, size, s, img):
    """Offer (s, img) to a min-heap of the best len(heap_s) hits ("worse" at the root); returns its new size."""
    k = heap_s.shape[0]
    if size < k:
        p = size
        while p > 0:
            parent = (p - 1) >> 1
            if _worse(s, img, heap_s[parent], heap_i[parent]):
                heap_s[p] = heap_s[parent]
                heap_i[p] = heap_i[parent]
                p = parent
            else:
                break
        heap_s[p] = s
        heap_i[p] = img
        return size + 1
    if _worse(heap_s[0], heap_i[0], s, img):
        _sift_down(heap_s, heap_i, size, s, img)
    return size


@njit(cache=True, nogil=True)
def _sift_down(heap_s, heap_i, size, s, img):
    """Put (s, img) in place of the root of the min-heap heap_[:size], moving it down."""
    p = 0
    while True:
        c = 2 * p + 1
        if c >= size:
            break
        if c + 1 < size and _worse(heap_s[c + 1], heap_i[c + 1], heap_s[c], heap_i[c]):
            c += 1
        if _worse(heap_s[c], heap_i[c], s, img):
            heap_s[p] = heap_s[c]
            heap_i[p] = heap_i[c]
            p = c
        else:
            break
    heap_s[p] = s
    heap_i[p] = img


@njit(cache=True, nogil=True)
def _pool(acc, a, b, use_mean):
    """Max, or sequential float64 sum / count, of acc[a:b] (an image's item scores in item order)."""
    if use_mean:
        t = 0.0
        for j in range(a, b):
            t += acc[j]
        return t / (b - a)
    s = acc[a]
    for j in range(a + 1, b):
        if acc[j] > s:
            s = acc[j]
    return s


@njit(cache=True, nogil=True)
def _better_than_root(heap_s, heap_i, size, s, img):
    """True if (s, img) would enter the heap (cheap test before ``_heap_push``)."""
    return size < heap_s.shape[0] or s > heap_s[0] or (s == heap_s[0] and img < heap_i[0])


@njit(cache=True, nogil=True)
def _chunk_top_k(binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, lo, hi, seg_hi,
                 acc, item_start, item_words, dead, normalize, use_mean, edge, seg_lo, heap_s, heap_i, size, cursor, prev_hi):
    """Score items [lo, hi), offer the live images wholly inside to the heap, and store the
    final scores of the other items in edge[item - seg_lo]. Returns (ok, new heap size)."""
    ok = _score_chunk(binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, lo, hi, seg_hi,
                      acc, cursor, prev_hi)
    nq = qwords.shape[0]
    span = hi - lo
    m = dead.shape[0]
    first = np.searchsorted(item_start[:m], lo)  # first image starting at or after lo
    if first + span <= m and item_start[first] == lo and item_start[first + span] == hi:
        # One item per image (every image has at least one): image first + j is item lo + j.
        for j in range(span):
            img = first + j
            if not dead[img]:
                v = _finish(acc[j], item_words[lo + j], nq, normalize)
                if _better_than_root(heap_s, heap_i, size, v, img):
                    size = _heap_push(heap_s, heap_i, size, v, img)
        return ok, size
    for j in range(span):
        acc[j] = _finish(acc[j], item_words[lo + j], nq, normalize)
    img = first
    a = item_start[img] if img < m else hi
    while img < m:
        b = item_start[img + 1]
        if b > hi:
            break
        if b > a and not dead[img]:
            if use_mean:  # sequential float64 sum in item order, then / count
                v = 0.0
                for t in range(a - lo, b - lo):
                    v += acc[t]
                v /= b - a
            else:
                v = acc[a - lo]
                for t in range(a - lo + 1, b - lo):
                    if acc[t] > v:
                        v = acc[t]
            if _better_than_root(heap_s, heap_i, size, v, img):
                size = _heap_push(heap_s, heap_i, size, v, img)
        a = b
        img += 1
    head = item_start[first] if first < m else hi
    for i in range(lo, min(head, hi)):  # items of an image that began before lo
        edge[i - seg_lo] = acc[i - lo]
    tail = item_start[img] if img < m else hi
    for i in range(max(tail, lo), hi):  # items of an image that ends after hi
        edge[i - seg_lo] = acc[i - lo]
    return ok, size


@njit(cache=True, nogil=True)
def _part(p, n_parts, binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, seg_lo,
          seg_hi, chunk, item_start, item_words, dead, normalize, use_mean, edge, acc, heaps_s, heaps_i, sizes, oks):
    """Part p of n_parts: chunks [p * C // n_parts, (p + 1) * C // n_parts) of the C chunks,
    scored in ``acc`` (float64 [chunk]; allocated by the caller, outside any parallel region:
    freeing memory inside one costs every running thread a TLB flush)."""
    n_chunks = (seg_hi - seg_lo + chunk - 1) // chunk
    size = 0
    ok = True
    cursor = np.empty(qwords.shape[0], dtype=np.int64)
    prev_hi = np.int64(-1)
    for c in range(p * n_chunks // n_parts, (p + 1) * n_chunks // n_parts):
        lo = seg_lo + c * chunk
        hi = min(lo + chunk, seg_hi)
        good, size = _chunk_top_k(binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau,
                                  lo, hi, seg_hi, acc, item_start, item_words, dead, normalize, use_mean, edge, seg_lo,
                                  heaps_s[p], heaps_i[p], size, cursor, prev_hi)
        prev_hi = hi
        ok &= good
    sizes[p] = size
    oks[p] = ok


@njit(cache=True, nogil=True)
def _merge_parts(n_parts, seg_lo, seg_hi, chunk, item_start, dead, use_mean, edge, heaps_s, heaps_i, sizes, k):
    """Pool the images cut by chunk edges (from ``edge``) and merge every part's heap: the
    best k (images int64, scores float64), best first."""
    heap_s = np.empty(k)
    heap_i = np.empty(k, dtype=np.int64)
    size = 0
    for p in range(n_parts):
        for j in range(sizes[p]):
            size = _heap_push(heap_s, heap_i, size, heaps_s[p, j], heaps_i[p, j])
    m = dead.shape[0]
    last = -1
    for t in range(seg_lo + chunk, seg_hi, chunk):  # chunk edges
        img = np.searchsorted(item_start[: m + 1], t, side="right") - 1  # the image holding item t
        if img != last and item_start[img] < t:
            last = img
            a = item_start[img]
            b = item_start[img + 1]
            if not dead[img]:
                size = _heap_push(heap_s, heap_i, size, _pool(edge, a - seg_lo, b - seg_lo, use_mean), img)
    # Pop the heap worst-first into the output from the back.
    out_i = np.empty(size, dtype=np.int64)
    out_s = np.empty(size)
    for r in range(size - 1, -1, -1):
        out_i[r] = heap_i[0]
        out_s[r] = heap_s[0]
        _sift_down(heap_s, heap_i, r, heap_s[r], heap_i[r])
    return out_i, out_s


@njit(cache=True, nogil=True)
def ivf_top_k(binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, seg_lo, seg_hi,
              chunk, item_start, item_words, dead, normalize, use_mean, k):
    """The k best live images of one segment (items [seg_lo, seg_hi), whole images) for a query.

    binary: ASMK* (qcodes [q, W] and codes [E, W] packed signs, uint8 or uint64 words, and
    ``table`` = ``selectivity_table``) or ASMK (qvecs [q, D] and vecs [E, D] float32 unit
    residuals, alpha and tau); the other pair may be empty. qwords: uint32 [q] ascending;
    offsets, n_blocks, shift, low: the inverted file; chunk: items per chunk (a power of two
    up to 2**shift keeps chunk edges on block edges, so no run needs a binary search);
    item_start: int64 [M + 1] items of each image, item_words: int64 [n_items], dead: bool [M]
    of all images (global item numbers). Returns (ok, images int64 [<= k], scores float64),
    best first, ties to the smaller image number; ok is False if an entry names an item
    outside the segment (a corrupt file; such entries are skipped). One thread.
    """
    heaps_s = np.empty((1, k))
    heaps_i = np.empty((1, k), dtype=np.int64)
    sizes = np.zeros(1, dtype=np.int64)
    oks = np.ones(1, dtype=np.bool_)
    edge = np.empty(seg_hi - seg_lo)
    acc = np.empty(chunk)
    _part(0, 1, binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, seg_lo, seg_hi,
          chunk, item_start, item_words, dead, normalize, use_mean, edge, acc, heaps_s, heaps_i, sizes, oks)
    out_i, out_s = _merge_parts(1, seg_lo, seg_hi, chunk, item_start, dead, use_mean, edge, heaps_s, heaps_i, sizes, k)
    return oks[0], out_i, out_s


@njit(cache=True, nogil=True, parallel=True)
def ivf_top_k_parallel(binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, seg_lo,
                       seg_hi, chunk, item_start, item_words, dead, normalize, use_mean, k, n_parts):
    """``ivf_top_k`` with the chunks split into ``n_parts`` contiguous parts scored in parallel
    (the same result, bit for bit)."""
    heaps_s = np.empty((n_parts, k))
    heaps_i = np.empty((n_parts, k), dtype=np.int64)
    sizes = np.zeros(n_parts, dtype=np.int64)
    oks = np.ones(n_parts, dtype=np.bool_)
    edge = np.empty(seg_hi - seg_lo)
    accs = np.empty((n_parts, chunk))
    for p in prange(n_parts):
        _part(p, n_parts, binary, qwords, qcodes, qvecs, offsets, n_blocks, shift, low, codes, vecs, table, alpha, tau, seg_lo,
              seg_hi, chunk, item_start, item_words, dead, normalize, use_mean, edge, accs[p], heaps_s, heaps_i, sizes, oks)
    out_i, out_s = _merge_parts(n_parts, seg_lo, seg_hi, chunk, item_start, dead, use_mean, edge, heaps_s, heaps_i, sizes, k)
    return oks.all(), out_i, out_s
