"""Residual aggregation: per-visual-word residual sums, the keep rule and sign binarisation
(the kernels of :func:`d2r.aggregate`).

Residual sums are accumulated in float64 so that binarisation (``value > 0``) and the
``> 1e-6`` keep rule do not depend on summation order.
"""

from __future__ import annotations

import numpy as np
from numba import njit


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
