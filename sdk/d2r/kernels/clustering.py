"""Nearest-codeword assignment and k-means: the kernels of :class:`d2r.Codebook`.

Descriptors ``x`` are float32 ``[N, D]``, codewords ``c`` float32 ``[K, D]``; distances that
decide an assignment are exact float64 (the float32 GEMM of ``d2r.codebook`` only shortlists).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Relative tolerance used to decide which codewords of a float32 GEMM block must be re-checked
# with an exact float64 distance. float32 dot products of D <= 1024 terms are off by far less.
ASSIGN_RTOL = 1e-4


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


# fastmath lets LLVM vectorise the min reductions (a fixed trip count of _CHUNK per chunk, one
# call per row: about twice as fast as a call per chunk); inputs are validated finite upstream,
# and a minimum is exact in any order.
@njit(cache=True, nogil=True, fastmath=True)
def _chunk_minima(gram_row, cnorm, kb, out):
    full = kb // _CHUNK
    for ci in range(full):
        best = np.float32(3.0e38)
        base = ci * _CHUNK
        for k in range(_CHUNK):
            best = min(best, cnorm[base + k] - np.float32(2.0) * gram_row[base + k])
        out[ci] = best
    if kb > full * _CHUNK:
        best = np.float32(3.0e38)
        for k in range(full * _CHUNK, kb):
            best = min(best, cnorm[k] - np.float32(2.0) * gram_row[k])
        out[full] = best


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
    chunk_min = np.empty(n_chunks, dtype=np.float32)
    small = np.empty(m, dtype=np.float64)
    # Serial on purpose: the GEMM before it is multi-threaded BLAS, and BLAS threads that
    # spin after a call would fight a Numba thread pool for the same cores.
    for i in range(nb):
        xn = xnorm[i]
        tol = ASSIGN_RTOL * (xn + cmax) + 1e-30
        # Pass 1 (vectorised): chunk minima of the approximate distance minus |x|^2. The m-th
        # smallest chunk minimum bounds the m-th smallest distance of the block from above.
        small[:] = np.inf
        _chunk_minima(gram[i], cnorm, kb, chunk_min)
        for ci in range(n_chunks):
            v = np.float64(chunk_min[ci])
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
def sqdist_to_rows(x, c, rows):
    """float64 [N]: the exact squared distance of x[i] to c[rows[i]], by the same arithmetic as
    the assignment's re-scoring (so a distance computed here equals the one it would return)."""
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        out[i] = _exact_sqdist(x[i], c[rows[i]])
    return out


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
# k-means
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _sqdist_to_all(xt, c, out):
    """out[i] = exact float64 squared distance of sample i to c, with xt float32 [D, N] the
    transposed samples: the loop runs over samples innermost (vectorised) and adds the D terms
    of each distance in the same order as :func:`_exact_sqdist`, so the sums are bit-identical."""
    out[:] = 0.0
    for j in range(xt.shape[0]):
        cj = np.float64(c[j])
        row = xt[j]
        for i in range(xt.shape[1]):
            d = np.float64(row[i]) - cj
            out[i] += d * d


@njit(cache=True, nogil=True)
def kmeanspp_seed(x, k, rng_uniform):
    """k-means++ seeding (Arthur & Vassilvitskii, D^2 sampling) on float32 [N, D] samples.

    rng_uniform: float64 [k] uniform draws in [0, 1) supplied by the caller (determinism).
    Returns int64 [k] sample indices. O(N * k * D) work, on a transposed copy of the samples
    (4 * N * D bytes) so that each pass is vectorised over samples.
    """
    n = x.shape[0]
    xt = np.ascontiguousarray(x.T)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = min(int(rng_uniform[0] * n), n - 1)
    mind = np.empty(n)
    dist = np.empty(n)
    _sqdist_to_all(xt, x[chosen[0]], mind)
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
        _sqdist_to_all(xt, x[chosen[t]], dist)
        for i in range(n):
            if dist[i] < mind[i]:
                mind[i] = dist[i]
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
