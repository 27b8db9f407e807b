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
# Exactness: an item's score is accumulated in float64 in ascending query-word order, which is
# the order of the merge-join in ``asmk_star_similarity``; the binary kernel adds the values of
# ``selectivity_table`` (``selectivity`` of ``1 - 2 h / D`` for every Hamming distance h,
# computed with the same expression as ``hamming_similarity``), so the result is bit-for-bit
# the brute-force similarity. Threads split the item range, never a sum.

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
def _run_bounds(offsets, low, run, block, shift, item_lo, item_hi):
    """Entries [a, b) of run ``run`` (word, block) whose items lie in [item_lo, item_hi)."""
    a = np.int64(offsets[run])
    b = np.int64(offsets[run + 1])
    base = np.int64(block) << shift
    if item_lo > base:
        lo_key = item_lo - base
        hi = b
        while a < hi:  # first entry with low >= lo_key
            mid = (a + hi) >> 1
            if np.int64(low[mid]) < lo_key:
                a = mid + 1
            else:
                hi = mid
    end = base + (np.int64(1) << shift)
    if item_hi < end:
        hi_key = item_hi - base
        lo = a
        while lo < b:  # first entry with low >= hi_key
            mid = (lo + b) >> 1
            if np.int64(low[mid]) < hi_key:
                lo = mid + 1
            else:
                b = mid
    return a, b


@njit(cache=True, nogil=True)
def ivf_binary_range(qwords, qcodes, offsets, n_blocks, shift, low, codes, table, item_lo, item_hi, n_items, scores):
    """Add the ASMK* contributions of the items in [item_lo, item_hi); return False if an
    entry names an item >= n_items (corrupt file)."""
    ok = True
    if n_blocks == 0:
        return ok
    b_first = item_lo >> shift
    b_last = min((item_hi - 1) >> shift, n_blocks - 1)
    nw = codes.shape[1]
    for qi in range(qwords.shape[0]):
        w = np.int64(qwords[qi])
        q = qcodes[qi]
        for blk in range(b_first, b_last + 1):
            a, b = _run_bounds(offsets, low, w * n_blocks + blk, blk, shift, item_lo, item_hi)
            base = np.int64(blk) << shift
            for e in range(a, b):
                item = base + np.int64(low[e])
                if item >= n_items:
                    ok = False
                    continue
                ones = 0
                for j in range(nw):
                    ones += np.int64(_popcount(codes[e, j] ^ q[j]))
                scores[item] += table[ones]
    return ok


@njit(cache=True, nogil=True)
def ivf_float_range(qwords, qvecs, offsets, n_blocks, shift, low, vecs, alpha, tau, item_lo, item_hi, n_items, scores):
    """As ``ivf_binary_range`` for ASMK: s = dot product of unit residuals (float64)."""
    ok = True
    if n_blocks == 0:
        return ok
    b_first = item_lo >> shift
    b_last = min((item_hi - 1) >> shift, n_blocks - 1)
    dim = vecs.shape[1]
    for qi in range(qwords.shape[0]):
        w = np.int64(qwords[qi])
        q = qvecs[qi]
        for blk in range(b_first, b_last + 1):
            a, b = _run_bounds(offsets, low, w * n_blocks + blk, blk, shift, item_lo, item_hi)
            base = np.int64(blk) << shift
            for e in range(a, b):
                item = base + np.int64(low[e])
                if item >= n_items:
                    ok = False
                    continue
                s = 0.0
                for d in range(dim):
                    s += np.float64(q[d]) * np.float64(vecs[e, d])
                scores[item] += selectivity(s, alpha, tau)
    return ok


@njit(cache=True, parallel=True, nogil=True)
def ivf_score_binary(qwords, qcodes, offsets, n_blocks, shift, low, codes, table, item_lo, item_hi, n_items, n_chunks, scores):
    """Accumulate ASMK* scores of items [item_lo, item_hi) into float64 ``scores`` [n_items].

    qwords: uint32 [q] ascending; qcodes: [q, W] and codes: [E, W] packed codes as uint8 or
    uint64 words (same dtype); offsets: uint64/int64 [K * n_blocks + 1]; low: uint16/uint32
    [E]; table: ``selectivity_table``. The item range is cut into ``n_chunks`` parts scored in
    parallel. Returns False if the inverted file names an item >= n_items (the segment's end).
    """
    span = item_hi - item_lo
    flags = np.ones(n_chunks, dtype=np.bool_)
    for c in prange(n_chunks):
        lo = item_lo + span * c // n_chunks
        hi = item_lo + span * (c + 1) // n_chunks
        if hi > lo:
            flags[c] = ivf_binary_range(qwords, qcodes, offsets, n_blocks, shift, low, codes, table, lo, hi, n_items, scores)
    return flags.all()


@njit(cache=True, parallel=True, nogil=True)
def ivf_score_float(qwords, qvecs, offsets, n_blocks, shift, low, vecs, alpha, tau, item_lo, item_hi, n_items, n_chunks, scores):
    """As ``ivf_score_binary`` for ASMK (float32 [E, D] unit residuals)."""
    span = item_hi - item_lo
    flags = np.ones(n_chunks, dtype=np.bool_)
    for c in prange(n_chunks):
        lo = item_lo + span * c // n_chunks
        hi = item_lo + span * (c + 1) // n_chunks
        if hi > lo:
            flags[c] = ivf_float_range(qwords, qvecs, offsets, n_blocks, shift, low, vecs, alpha, tau, lo, hi, n_items, scores)
    return flags.all()


@njit(cache=True, nogil=True)
def finish_item_scores(scores, item_words, n_query_words, normalize):
    """Items without words (or an empty query) score -1; else optionally divide by
    sqrt(n_query_words * n_item_words), as ``similarity(normalize=True)`` does."""
    for i in range(scores.shape[0]):
        n = item_words[i]
        if n == 0 or n_query_words == 0:
            scores[i] = -1.0
        elif normalize:
            scores[i] /= np.sqrt(float(n_query_words) * float(n))


@njit(cache=True, nogil=True)
def _worse(sa, ia, sb, ib):
    """True if hit (sa, ia) ranks below (sb, ib): lower score, or equal score and later image."""
    return sa < sb or (sa == sb and ia > ib)


@njit(cache=True, nogil=True)
def pool_top_k(item_scores, image_item_start, dead, use_mean, k):
    """Image scores by max (or mean) over their items, then the k best live images.

    item_scores: float64 [n_items]; image_item_start: int64 [M + 1]; dead: bool [M]
    (tombstones). The mean is a sequential float64 sum in item order divided by the count.
    Returns (int64 [<= k] image numbers, float64 scores), best first; ties go to the image
    added first. A partial selection with a k-element heap: O(M log k).
    """
    m = dead.shape[0]
    heap_i = np.empty(k, dtype=np.int64)
    heap_s = np.empty(k)
    size = 0
    for img in range(m):
        if dead[img]:
            continue
        a = image_item_start[img]
        b = image_item_start[img + 1]
        if b <= a:
            continue
        if use_mean:
            acc = 0.0
            for t in range(a, b):
                acc += item_scores[t]
            s = acc / (b - a)
        else:
            s = item_scores[a]
            for t in range(a + 1, b):
                if item_scores[t] > s:
                    s = item_scores[t]
        if size < k:
            # Sift up in a min-heap ordered by "worse" at the root.
            p = size
            size += 1
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
        elif _worse(heap_s[0], heap_i[0], s, img):
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
    # Pop the heap worst-first into the output from the back.
    out_i = np.empty(size, dtype=np.int64)
    out_s = np.empty(size)
    for r in range(size - 1, -1, -1):
        out_i[r] = heap_i[0]
        out_s[r] = heap_s[0]
        last_s = heap_s[r]
        last_i = heap_i[r]
        p = 0
        n = r
        while True:
            c = 2 * p + 1
            if c >= n:
                break
            if c + 1 < n and _worse(heap_s[c + 1], heap_i[c + 1], heap_s[c], heap_i[c]):
                c += 1
            if _worse(heap_s[c], heap_i[c], last_s, last_i):
                heap_s[p] = heap_s[c]
                heap_i[p] = heap_i[c]
                p = c
            else:
                break
        heap_s[p] = last_s
        heap_i[p] = last_i
    return out_i, out_s
