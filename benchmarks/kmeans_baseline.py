"""The k-means of d2r before issue 18 (commit 55703dc: ``Codebook.train`` and its kernels),
copied verbatim as the baseline of benchmarks/bench_kmeans.py. Not used by d2r.

One thread of Python drives a blocked float32 GEMM ([512, 4096] blocks, BLAS with its default
threads) and a serial Numba scan with a call per 64-codeword chunk; k-means++ is a scalar
float64 loop. It trains the same codebook as ``Codebook.train(backend="d2r")`` today.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ASSIGN_RTOL = 1e-4
_ROW_BLOCK = 512
_COL_BLOCK = 4096
_KMEANSPP_MAX_K = 4096
@njit(nogil=True)
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
@njit(nogil=True, fastmath=True)
def _chunk_min(gram_row, cnorm, a, b):
    best = np.float32(3.0e38)
    for k in range(a, b):
        v = cnorm[k] - np.float32(2.0) * gram_row[k]
        if v < best:
            best = v
    return best


@njit(nogil=True)
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


@njit(nogil=True)
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


@njit(nogil=True)
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


@njit(nogil=True)
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


def _nearest(x, c, cnorm, multiple):
    n = x.shape[0]
    best_d = np.full((n, multiple), np.inf)
    best_k = np.full((n, multiple), -1, dtype=np.int32)
    if n == 0:
        return best_k, best_d
    xnorm = row_sqnorms(x)
    cmax = float(cnorm.max())
    for r0 in range(0, n, _ROW_BLOCK):
        xb = x[r0 : r0 + _ROW_BLOCK]
        bd = best_d[r0 : r0 + _ROW_BLOCK]
        bk = best_k[r0 : r0 + _ROW_BLOCK]
        for k0 in range(0, c.shape[0], _COL_BLOCK):
            cb = c[k0 : k0 + _COL_BLOCK]
            gram = xb @ cb.T  # numpy's multi-threaded sgemm
            update_nearest(gram, cnorm[k0 : k0 + _COL_BLOCK], k0, xb, xnorm[r0 : r0 + _ROW_BLOCK], c, cmax, bd, bk)
    return best_k, best_d


def train(x, k, iterations=20, seed=0, seeding="auto", progress=None):
    """float32 [k, D] centroids: the body of ``Codebook.train`` at 55703dc (input checks left out)."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    if seeding == "auto":
        seeding = "kmeans++" if k <= _KMEANSPP_MAX_K else "random"
    if seeding == "kmeans++":
        sample = np.sort(rng.choice(n, size=min(n, 32 * k), replace=False))
        picks = sample[kmeanspp_seed(x[sample], k, rng.random(k))]
    else:
        picks = np.sort(rng.choice(n, size=k, replace=False))
    centroids = x[picks].copy()
    labels = np.full(n, -1, dtype=np.int32)
    for it in range(iterations):
        cnorm = row_sqnorms(centroids).astype(np.float32)
        new_k, new_d = _nearest(x, centroids, cnorm, 1)
        new_labels = new_k[:, 0]
        moved = int(np.count_nonzero(new_labels != labels))
        labels = new_labels
        sums, counts = accumulate_clusters(x, labels, k)
        empty = np.flatnonzero(counts == 0)
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        if empty.size:
            # Re-seed each empty cluster with one of the worst-fitted descriptors.
            far = np.argsort(-new_d[:, 0], kind="stable")[: empty.size]
            centroids[empty] = x[far]
        if progress is not None:
            progress(it + 1, iterations, moved / n)
        if moved == 0 and not empty.size:
            break
    return centroids
