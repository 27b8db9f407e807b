"""Numba kernels: the hot loops of d2r, as pure functions over typed arrays.

Nothing here validates its input: the Python wrappers in ``codebook``, ``aggregate`` and
``index`` check shapes, dtypes and values first and raise :class:`d2r.D2RError` subclasses.
Every kernel is compiled once and cached on disk (``cache=True``).

Conventions: descriptors ``x`` are float32 ``[N, D]``, codewords ``c`` float32 ``[K, D]``;
residual sums are accumulated in float64 so that binarisation (``value > 0``) and the
``> 1e-6`` keep rule do not depend on summation order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Relative tolerance used to decide which codewords of a float32 GEMM block must be re-checked
# with an exact float64 distance. float32 dot products of D <= 1024 terms are off by far less.
ASSIGN_RTOL = 1e-4

# An 8-bit popcount table; Numba has no portable popcount intrinsic for uint8.
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Nearest-codeword assignment
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _exact_sqdist(x, c):
    acc = 0.0
    for j in range(x.shape[0]):
        d = np.float64(x[j]) - np.float64(c[j])
        acc += d * d
    return acc


# Codewords are scanned in chunks of this many; a chunk whose vectorised minimum cannot beat
# the current m-th best is skipped without a per-codeword branch.
_CHUNK = 64


# fastmath lets LLVM vectorise the min reduction; inputs are validated finite upstream.
@njit(cache=True, nogil=True, fastmath=True)
def _chunk_min(gram_row, cnorm, a, b):
    best = np.float32(3.0e38)
    for k in range(a, b):
        v = cnorm[k] - np.float32(2.0) * gram_row[k]
        if v < best:
            best = v
    return best


@njit(cache=True, nogil=True)
def update_nearest(gram, cnorm, k0, x, xnorm, c, cmax, best_d, best_k):
    """Fold one block of codewords into the running m-nearest lists of a block of descriptors.

    gram: float32 [B, Kb] = x @ c[k0:k0+Kb].T (from BLAS); cnorm: float32 [Kb] squared norms
    of those codewords; x: float32 [B, D]; xnorm: float64 [B]; c: float32 [K, D] all codewords;
    cmax: max squared codeword norm. best_d: float64 [B, m] exact squared distances (ascending),
    best_k: int32 [B, m] codeword ids; updated in place. Ties keep the lowest codeword id.

    The float32 GEMM only shortlists: every codeword whose approximate distance is within a
    tolerance (a bound on the float32 rounding error) of the current m-th best is re-scored
    with an exact float64 distance, so the result equals a brute-force exact search.
    """
    nb, kb = gram.shape
    m = best_d.shape[1]
    n_chunks = (kb + _CHUNK - 1) // _CHUNK
    chunk_min = np.empty(n_chunks, dtype=np.float64)
    small = np.empty(m, dtype=np.float64)
    # Serial on purpose: the GEMM before it is multi-threaded BLAS, and BLAS threads that
    # spin after a call would fight a Numba thread pool for the same cores.
    for i in range(nb):
        xn = xnorm[i]
        tol = ASSIGN_RTOL * (xn + cmax) + 1e-30
        # Pass 1 (vectorised): chunk minima of the approximate distance minus |x|^2. The m-th
        # smallest chunk minimum bounds the m-th smallest distance of the block from above.
        small[:] = np.inf
        for ci in range(n_chunks):
            v = np.float64(_chunk_min(gram[i], cnorm, ci * _CHUNK, min((ci + 1) * _CHUNK, kb)))
            chunk_min[ci] = v
            if v < small[m - 1]:
                p = m - 1
                while p > 0 and small[p - 1] > v:
                    small[p] = small[p - 1]
                    p -= 1
                small[p] = v
        bound = min(small[m - 1], best_d[i, m - 1] - xn) + tol
        # Pass 2: exact float64 distances only for codewords within the tolerance of the bound
        # (usually one per descriptor), inserted in (distance, id) order.
        for ci in range(n_chunks):
            if chunk_min[ci] > bound:
                continue
            for k in range(ci * _CHUNK, min((ci + 1) * _CHUNK, kb)):
                a = np.float64(cnorm[k]) - 2.0 * np.float64(gram[i, k])
                if a > bound:
                    continue
                kk = k0 + k
                d = _exact_sqdist(x[i], c[kk])
                if d < best_d[i, m - 1]:
                    p = m - 1
                    while p > 0 and best_d[i, p - 1] > d:
                        best_d[i, p] = best_d[i, p - 1]
                        best_k[i, p] = best_k[i, p - 1]
                        p -= 1
                    best_d[i, p] = d
                    best_k[i, p] = kk
                    bound = min(bound, best_d[i, m - 1] - xn + tol)


@njit(cache=True, nogil=True)
def row_sqnorms(a):
    """float64 [N] squared L2 norms of the rows of a float32 [N, D] array."""
    out = np.empty(a.shape[0])
    for i in range(a.shape[0]):
        acc = 0.0
        for j in range(a.shape[1]):
            v = np.float64(a[i, j])
            acc += v * v
        out[i] = acc
    return out


# --------------------------------------------------------------------------------------------
# Residual aggregation
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def residual_sums(x, c, assign, region_starts, regional):
    """Per-visual-word residual sums of one image, optionally region-normalised (R-VLAD sum).

    x: float32 [N, D]; c: float32 [K, D]; assign: int32 [N, m] (every assignment of a feature
    adds its residual to that word); region_starts: int64 [R + 1] feature offsets of the
    regions; regional: if True each region's residual vector (all its words together) is
    L2-normalised before the regions are summed (eps: rsqrt(max(sum x^2, 1e-12))).
    Returns (words int64 [n] ascending, sums float64 [n, D]) over the words that any feature
    was assigned to (rows may be zero).
    """
    n, m = assign.shape
    dim = x.shape[1]
    k_total = c.shape[0]
    # Dense word -> row map: O(K) ints per call, negligible next to the assignment itself.
    slot = np.full(k_total, -1, dtype=np.int64)
    words = np.empty(n * m, dtype=np.int64)
    n_words = 0
    for i in range(n):
        for j in range(m):
            w = assign[i, j]
            if slot[w] < 0:
                slot[w] = n_words
                words[n_words] = w
                n_words += 1
    sums = np.zeros((n_words, dim))
    region_sum = np.zeros((n_words, dim)) if regional else sums
    touched = np.empty(n * m, dtype=np.int64)
    last_region = np.full(n_words, -1, dtype=np.int64)
    n_regions = region_starts.shape[0] - 1
    for r in range(n_regions):
        a, b = region_starts[r], region_starts[r + 1]
        n_touched = 0
        for i in range(a, b):
            for j in range(m):
                s = slot[assign[i, j]]
                if regional and last_region[s] != r:
                    # Remember the rows this region wrote so it can be normalised and cleared.
                    last_region[s] = r
                    touched[n_touched] = s
                    n_touched += 1
                w = assign[i, j]
                for d in range(dim):
                    region_sum[s, d] += np.float64(x[i, d]) - np.float64(c[w, d])
        if regional:
            norm2 = 0.0
            for t in range(n_touched):
                s = touched[t]
                for d in range(dim):
                    norm2 += region_sum[s, d] * region_sum[s, d]
            scale = 1.0 / np.sqrt(max(norm2, 1e-12))
            for t in range(n_touched):
                s = touched[t]
                for d in range(dim):
                    sums[s, d] += region_sum[s, d] * scale
                    region_sum[s, d] = 0.0
    order = np.argsort(words[:n_words], kind="mergesort")
    return words[:n_words][order], sums[order]


@njit(cache=True, nogil=True)
def normalize_words(sums, keep_eps):
    """Per-word L2 normalisation with the strict keep rule ||V_k|| > keep_eps.

    sums: float64 [n, D]. Returns (kept bool [n], normalised float64 [n, D]); rows not kept
    are left zero.
    """
    n, dim = sums.shape
    kept = np.zeros(n, dtype=np.bool_)
    out = np.zeros((n, dim))
    for i in range(n):
        acc = 0.0
        for d in range(dim):
            acc += sums[i, d] * sums[i, d]
        norm = np.sqrt(acc)
        if norm > keep_eps:
            kept[i] = True
            for d in range(dim):
                out[i, d] = sums[i, d] / norm
    return kept, out


@njit(cache=True, nogil=True)
def pack_signs(v):
    """Binarise float64 [n, D] by ``value > 0`` and pack MSB-first -> uint8 [n, ceil(D/8)].

    Dimension 0 is the high bit of byte 0 (numpy ``packbits`` order); padding bits are 0.
    """
    n, dim = v.shape
    nbytes = (dim + 7) // 8
    out = np.zeros((n, nbytes), dtype=np.uint8)
    for i in range(n):
        for d in range(dim):
            if v[i, d] > 0.0:
                out[i, d >> 3] |= np.uint8(0x80 >> (d & 7))
    return out


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
# Local features (dense model outputs -> keypoints)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def cell_heatmap(logits, cell):
    """Keypoint heatmap [h*cell, w*cell] from per-cell logits [h, w, cell*cell + 1].

    Softmax over the cell*cell positions plus the "no keypoint" bin, the bin dropped, and the
    positions (row-major within the cell) moved to their pixels (depth-to-space).
    """
    h, w, c = logits.shape
    out = np.empty((h * cell, w * cell), dtype=np.float32)
    for i in range(h):
        for j in range(w):
            mx = logits[i, j, 0]
            for k in range(1, c):
                if logits[i, j, k] > mx:
                    mx = logits[i, j, k]
            total = 0.0
            for k in range(c):
                total += np.exp(np.float64(logits[i, j, k] - mx))
            for k in range(cell * cell):
                out[i * cell + k // cell, j * cell + k % cell] = np.float32(np.exp(np.float64(logits[i, j, k] - mx)) / total)
    return out


@njit(cache=True, nogil=True)
def local_maxima(heat, radius, threshold, valid_h, valid_w):
    """(ys, xs) int64 of pixels that equal the max of their (2r+1)^2 window and exceed threshold.

    Only the top-left valid_h x valid_w part of the map is searched (the rest is padding).
    """
    h = min(heat.shape[0], valid_h)
    w = min(heat.shape[1], valid_w)
    ys = np.empty(h * w, dtype=np.int64)
    xs = np.empty(h * w, dtype=np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            v = heat[y, x]
            if not v > threshold:
                continue
            is_max = True
            for yy in range(max(0, y - radius), min(heat.shape[0], y + radius + 1)):
                for xx in range(max(0, x - radius), min(heat.shape[1], x + radius + 1)):
                    if heat[yy, xx] > v:
                        is_max = False
                        break
                if not is_max:
                    break
            if is_max:
                ys[n] = y
                xs[n] = x
                n += 1
    return ys[:n], xs[:n]


@njit(cache=True, nogil=True)
def bilinear_sample(grid, ys, xs, full_h, full_w):
    """Sample grid [h, w, C] at full-resolution pixel positions -> float32 [N, C].

    Follows grid_sample(align_corners=False) at u = 2x / (W - 1) - 1 (XFeat's convention):
    grid coordinate gx = x * w / (W - 1) - 0.5; zero outside the grid.
    """
    h, w, c = grid.shape
    n = ys.shape[0]
    out = np.zeros((n, c), dtype=np.float32)
    sy = h / max(full_h - 1, 1)
    sx = w / max(full_w - 1, 1)
    for i in range(n):
        gy = ys[i] * sy - 0.5
        gx = xs[i] * sx - 0.5
        y0 = int(np.floor(gy))
        x0 = int(np.floor(gx))
        fy = gy - y0
        fx = gx - x0
        for dy in range(2):
            yy = y0 + dy
            if yy < 0 or yy >= h:
                continue
            wy = fy if dy else 1.0 - fy
            for dx in range(2):
                xx = x0 + dx
                if xx < 0 or xx >= w:
                    continue
                wgt = wy * (fx if dx else 1.0 - fx)
                for k in range(c):
                    out[i, k] += np.float32(wgt * grid[yy, xx, k])
    return out


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def kmeanspp_seed(x, k, rng_uniform):
    """k-means++ seeding (Arthur & Vassilvitskii, D^2 sampling) on float32 [N, D] samples.

    rng_uniform: float64 [k] uniform draws in [0, 1) supplied by the caller (determinism).
    Returns int64 [k] sample indices. O(N * k * D) work.
    """
    n = x.shape[0]
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = min(int(rng_uniform[0] * n), n - 1)
    mind = np.empty(n)
    for i in range(n):
        mind[i] = _exact_sqdist(x[i], x[chosen[0]])
    for t in range(1, k):
        total = 0.0
        for i in range(n):
            total += mind[i]
        if total <= 0.0:
            # All remaining points coincide with a chosen one: take the next unused index.
            chosen[t] = (chosen[t - 1] + 1) % n
        else:
            target = rng_uniform[t] * total
            acc = 0.0
            pick = n - 1
            for i in range(n):
                acc += mind[i]
                if acc > target:
                    pick = i
                    break
            chosen[t] = pick
        c = x[chosen[t]]
        for i in range(n):
            d = _exact_sqdist(x[i], c)
            if d < mind[i]:
                mind[i] = d
    return chosen


@njit(cache=True, nogil=True)
def accumulate_clusters(x, labels, k):
    """Cluster sums float64 [k, D] and counts int64 [k] for one Lloyd update."""
    dim = x.shape[1]
    sums = np.zeros((k, dim))
    counts = np.zeros(k, dtype=np.int64)
    for i in range(x.shape[0]):
        lab = labels[i]
        counts[lab] += 1
        for d in range(dim):
            sums[lab, d] += x[i, d]
    return sums, counts


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

from numba import types as _nb_types  # noqa: E402
from numba.extending import intrinsic as _nb_intrinsic  # noqa: E402


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


@njit(cache=True, nogil=True)
def group_by_word(words, n_words_total):
    """Counting sort of entries by visual word, stable: (int64 [K + 1] offsets, int64 [E] order)."""
    counts = np.zeros(n_words_total + 1, dtype=np.int64)
    for e in range(words.shape[0]):
        counts[np.int64(words[e]) + 1] += 1
    for w in range(n_words_total):
        counts[w + 1] += counts[w]
    pos = counts[:-1].copy()
    order = np.empty(words.shape[0], dtype=np.int64)
    for e in range(words.shape[0]):
        w = np.int64(words[e])
        order[pos[w]] = e
        pos[w] += 1
    return counts, order


@njit(cache=True, nogil=True)
def _copy_word(w, offsets, n_blocks, shift, low, codes, item_map, row, out_blocks, out_shift, out_low, out_codes, out_counts, n):
    mask = (np.int64(1) << out_shift) - 1
    for blk in range(n_blocks):
        base = np.int64(blk) << shift
        for e in range(offsets[w * n_blocks + blk], offsets[w * n_blocks + blk + 1]):
            item = base + np.int64(low[e])
            if item >= item_map.shape[0]:
                return -1  # corrupt input: an item out of range
            new = item_map[item]
            if new < 0:
                continue
            if n >= out_low.shape[0]:
                return -1  # more entries than the word counts say
            out_low[n] = new & mask
            out_codes[n, :] = codes[e, :]
            out_counts[row * out_blocks + (new >> out_shift)] += 1
            n += 1
    return n


@njit(cache=True, nogil=True)
def merge_ivf_words(w0, w1, a_offsets, a_blocks, a_shift, a_low, a_codes, b_offsets, b_blocks, b_shift, b_low, b_codes,
                    item_map, out_blocks, out_shift, out_low, out_codes, out_counts):
    """Merge words [w0, w1) of two inverted files (``a`` then ``b``, items of ``b`` after those
    of ``a``) into a new one, renumbering items through ``item_map`` (int64, -1 drops the
    entry). Writes entries to out_low / out_codes (uint8 [E, P]) and adds run lengths to
    out_counts [(w1 - w0) * out_blocks]; returns the number of entries written, or -1 if an
    entry names an item outside item_map or the output is full (corrupt input)."""
    n = 0
    for w in range(w0, w1):
        n = _copy_word(w, a_offsets, a_blocks, a_shift, a_low, a_codes, item_map, w - w0, out_blocks, out_shift, out_low, out_codes, out_counts, n)
        if n < 0:
            return n
        n = _copy_word(w, b_offsets, b_blocks, b_shift, b_low, b_codes, item_map, w - w0, out_blocks, out_shift, out_low, out_codes, out_counts, n)
        if n < 0:
            return n
    return n


@njit(cache=True, nogil=True)
def ivf_check_entries(offsets, n_blocks, shift, low, n_items, item_words):
    """Full structural check of an inverted file: every run strictly ascending, every item
    < n_items, and every item has exactly item_words[item] entries. Returns an error code:
    0 ok, 1 item out of range, 2 run not ascending, 3 entry count differs from item_words."""
    counts = np.zeros(n_items, dtype=np.int64)
    n_runs = offsets.shape[0] - 1
    for run in range(n_runs):
        base = np.int64(run % n_blocks) << shift
        prev = -1
        for e in range(offsets[run], offsets[run + 1]):
            item = base + np.int64(low[e])
            if item >= n_items:
                return 1
            if item <= prev:
                return 2
            prev = item
            counts[item] += 1
    for i in range(n_items):
        if counts[i] != item_words[i]:
            return 3
    return 0
