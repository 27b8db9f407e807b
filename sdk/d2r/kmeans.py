"""k-means (Lloyd) for :meth:`d2r.Codebook.train`: seeding, our own Lloyd iterations, and faiss's.

Two backends run the same algorithm from the same seeds for the same number of iterations:

- ``"d2r"`` (ours, always available): exact assignment (float32 GEMM shortlist, float64
  re-scoring, ties to the lowest id, as :meth:`Codebook.assign`) on row blocks spread over
  ``threads`` worker threads, each calling a one-thread BLAS; float64 cluster sums in a fixed
  order. The result is bit-identical for any number of threads and any block split, and stops
  early when no descriptor changes word. From the second iteration on, the assignment is
  bounded (:class:`_BoundedAssign`): a descriptor is compared with every centroid only when
  the centroids' moves could have changed its word; otherwise only with the few centroids that
  moved most. The labels, and so the codebook, are the same bit for bit as a full assignment.
- ``"faiss"`` (the ``kmeans`` extra, ``faiss-cpu``): the assignment of each iteration is the
  search of a ``faiss.IndexFlatL2`` (the engine of ``faiss.Kmeans``: BLAS GEMM and a fused
  argmin, on ``threads`` OpenMP threads); the update, the empty-cluster re-seeding and the early
  stop are ours, so both backends differ only in the assignment. faiss's distances are float32
  (no exact re-scoring), so near-ties may go another way than in ours: its codebook is close to
  ours in quality, not equal. It holds no random state; run to run on one machine, and on 1 and
  2 threads, its result is the same (tests/test_kmeans.py checks it), but faiss documents no
  guarantee across versions, CPUs or thread counts.

The default is ours (``backend="d2r"``): a codebook, and so a bundle, must not depend on
whether an optional package is installed or on the CPU. ``backend="auto"`` takes faiss where it
imports, ours otherwise. faiss (and threadpoolctl) are imported only inside the functions that
train.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import kernels
from .errors import InputError

BACKENDS = ("auto", "d2r", "faiss")

# Above this K, k-means++ seeding (K passes over the sample) costs more than the Lloyd
# iterations themselves; distinct random samples are used instead (as faiss does).
KMEANSPP_MAX_K = 4096
# k-means++ runs on a random sample of at most this many descriptors per centroid.
KMEANSPP_SAMPLE_PER_CENTROID = 32

# Work unit of a worker thread: this many descriptors against all centroids, in GEMM blocks of
# [_ROW_BLOCK, _COL_BLOCK] (a 1 MiB float32 Gram block, which stays in the core's L2 cache for
# the scan that follows the GEMM).
_ROWS_PER_TASK = 2048
_ROW_BLOCK = 256
_COL_BLOCK = 1024


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def train_centroids(x: np.ndarray, k: int, iterations: int, seed: int, seeding: str, progress=None, backend: str = "d2r",
                    threads: int | None = None) -> np.ndarray:
    """float32 [k, D] k-means centroids of the checked float32 [N, D] descriptors ``x``
    (N >= k): seeds from :func:`seed_centroids`, then ``iterations`` Lloyd iterations on the
    chosen backend. progress: callable(iteration, iterations, moved_fraction) or None."""
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "d2r"
    elif backend == "faiss" and not faiss_available():
        raise InputError("backend: 'faiss' needs the faiss-cpu package (pip install 'd2r[kmeans]'); or use backend='d2r'")
    threads = default_threads() if threads is None else threads
    rng = np.random.default_rng(seed)
    centroids = seed_centroids(x, k, rng, seeding)
    if backend == "faiss":
        return _faiss_lloyd(x, centroids, iterations, threads, progress)
    return _d2r_lloyd(x, centroids, iterations, threads, progress)


def seed_centroids(x: np.ndarray, k: int, rng: np.random.Generator, seeding: str) -> np.ndarray:
    """Initial float32 [k, D] centroids: k-means++ (D^2 sampling) on a random sample of at most
    32*k descriptors, or k distinct random descriptors; ``"auto"``: k-means++ up to K = 4096."""
    n = x.shape[0]
    if seeding == "auto":
        seeding = "kmeans++" if k <= KMEANSPP_MAX_K else "random"
    if seeding == "kmeans++":
        sample = np.sort(rng.choice(n, size=min(n, KMEANSPP_SAMPLE_PER_CENTROID * k), replace=False))
        picks = sample[kernels.kmeanspp_seed(x[sample], k, rng.random(k))]
    else:
        picks = np.sort(rng.choice(n, size=k, replace=False))
    return x[picks].copy()


def nearest_centroid(x: np.ndarray, c: np.ndarray, threads: int = 1, pool: ThreadPoolExecutor | None = None):
    """Exact nearest centroid of each row of float32 [N, D] ``x``: (int32 [N] ids, float64 [N]
    squared distances), ties to the lowest id. Rows are split in fixed tasks of
    _ROWS_PER_TASK over ``pool`` (or run here when it is None); each row's answer is exact, so
    neither the split nor the thread count changes it."""
    ids, d = nearest_centroids(x, c, 1, threads, pool)
    return ids[:, 0], d[:, 0]


def nearest_centroids(x: np.ndarray, c: np.ndarray, m: int, threads: int = 1, pool: ThreadPoolExecutor | None = None):
    """The ``m`` exact nearest centroids of each row of ``x``, nearest first: (int32 [N, m],
    float64 [N, m]); as :func:`nearest_centroid`."""
    n = x.shape[0]
    cnorm = kernels.row_sqnorms(c).astype(np.float32)
    cmax = float(cnorm.max())
    best_d = np.full((n, m), np.inf)
    best_k = np.full((n, m), -1, dtype=np.int32)

    def task(r0: int) -> None:
        for a in range(r0, min(r0 + _ROWS_PER_TASK, n), _ROW_BLOCK):
            xb = x[a : a + _ROW_BLOCK]
            xnorm = kernels.row_sqnorms(xb)
            bd = best_d[a : a + _ROW_BLOCK]
            bk = best_k[a : a + _ROW_BLOCK]
            for k0 in range(0, c.shape[0], _COL_BLOCK):
                gram = xb @ c[k0 : k0 + _COL_BLOCK].T
                kernels.update_nearest(gram, cnorm[k0 : k0 + _COL_BLOCK], k0, xb, xnorm, c, cmax, bd, bk)

    starts = range(0, n, _ROWS_PER_TASK)
    if pool is None or threads <= 1:
        for r0 in starts:
            task(r0)
    else:
        list(pool.map(task, starts))  # list(): re-raises a worker's exception here
    return best_k, best_d


def _one_thread_blas():
    """Context in which BLAS runs one thread per call: our worker threads share the cores
    instead (a multi-threaded BLAS called from several threads at once oversubscribes them, and
    its spinning threads slow every small GEMM on a busy machine). A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _lloyd(x, centroids, iterations, progress, assign):
    """Lloyd iterations from ``centroids`` (updated in place) with ``assign(centroids)`` ->
    (int32 [N] labels, [N] squared distances): float64 means, each empty cluster re-seeded with
    one of the worst-fitted descriptors, early stop when no label changes."""
    n, k = x.shape[0], centroids.shape[0]
    labels = np.full(n, -1, dtype=np.int32)
    for it in range(iterations):
        new_labels, new_d = assign(centroids)
        moved = int(np.count_nonzero(new_labels != labels))
        labels = new_labels
        sums, counts = kernels.accumulate_clusters(x, labels, k)
        empty = np.flatnonzero(counts == 0)
        nonempty = counts > 0
        centroids[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        if empty.size:
            far = np.argsort(-new_d, kind="stable")[: empty.size]
            centroids[empty] = x[far]
        if progress is not None:
            progress(it + 1, iterations, moved / n)
        if moved == 0 and not empty.size:
            break
    return centroids


class _BoundedAssign:
    """Exact assignment for Lloyd iterations that skips work the centroids' moves make
    unnecessary (in the manner of Hamerly's k-means, 2010), with the same labels and distances,
    bit for bit, as :func:`nearest_centroid` on every iteration.

    Each descriptor keeps ``lower``: a lower bound of its distance (not squared) to every
    centroid but its own. After an update, every centroid j has moved by ``drift[j]``; the
    ``moved`` centroids that moved most (at most K / _MOVED_SHARE) are checked directly, and
    every other centroid is still at least ``lower - (their largest drift)`` away. A descriptor
    whose exact distance to its own (moved) centroid is below that, by a margin for rounding,
    can only have been captured by a ``moved`` centroid: it is compared with those alone.
    The others are compared with every centroid. ``stats``, per iteration: (descriptors compared
    with every centroid, with the moved ones only, of which captured by a moved centroid)."""

    def __init__(self, x, threads, pool):
        self.x, self.threads, self.pool = x, threads, pool
        self.prev = self.labels = self.lower = None
        self.stats: list = []

    def __call__(self, c):
        n, k = self.x.shape[0], c.shape[0]
        if self.prev is None or k < 2:
            ids, d = nearest_centroids(self.x, c, min(k, 2), self.threads, self.pool)
            labels, dist = ids[:, 0].copy(), d[:, 0].copy()
            self.lower = np.sqrt(d[:, 1]) if k >= 2 else None
            self.stats.append((n, 0, 0))
        else:
            labels, dist = self._bounded(c)
        self.prev, self.labels = c.copy(), labels
        return labels.copy(), dist

    def _bounded(self, c):
        x, labels, lower = self.x, self.labels, self.lower
        k = c.shape[0]
        drift = np.sqrt(kernels.sqdist_to_rows(c, self.prev, np.arange(k)))
        order = np.argsort(-drift, kind="stable")
        n_moved = min(max(1, k // _MOVED_SHARE), int(np.count_nonzero(drift > 0)))
        moved = np.sort(order[:n_moved]).astype(np.int32)
        rest = float(drift[order[n_moved]]) if n_moved < k else 0.0
        dist = kernels.sqdist_to_rows(x, c, labels)  # exact, to each descriptor's own centroid
        u = np.sqrt(dist)
        bound = lower - rest
        # The margin covers the rounding of the float64 distances and drifts (about 1e-16 of
        # their size per operation); any descriptor within it is compared with every centroid.
        safe = u + 1e-9 * (u + np.abs(lower) + rest) + 1e-300 < bound
        labels = labels.copy()
        lower = np.minimum(lower, bound)  # stays valid for the descriptors whose word cannot change
        near = np.flatnonzero(safe)
        captured = 0
        if near.size and n_moved:
            m = min(2, n_moved)
            ids, d = nearest_centroids(x[near], c[moved], m, self.threads, self.pool)
            ids = moved[ids]
            # Candidates: the moved centroids' best (and second) and the descriptor's own word;
            # every other centroid is farther than the bound, so the best of these is exact.
            own = labels[near]
            cand_k = np.concatenate([ids, own[:, None]], axis=1)
            cand_d = np.concatenate([d, dist[near, None]], axis=1)
            dup = (ids == own[:, None]).any(axis=1)
            cand_d[dup, m] = np.inf  # the own word is among the moved ones' results already
            pick = np.lexsort((cand_k, cand_d), axis=1)  # distance, then the lower id (as a full pass)
            first = np.take_along_axis(cand_k, pick[:, :1], axis=1)[:, 0]
            d_sorted = np.take_along_axis(cand_d, pick, axis=1)
            captured = int(np.count_nonzero(first != own))
            labels[near] = first
            dist[near] = d_sorted[:, 0]
            lower[near] = np.minimum(bound[near], np.sqrt(d_sorted[:, 1]))
        far = np.flatnonzero(~safe)
        if far.size:
            ids, d = nearest_centroids(x[far], c, 2, self.threads, self.pool)
            labels[far], dist[far], lower[far] = ids[:, 0], d[:, 0], np.sqrt(d[:, 1])
        self.lower = lower
        self.stats.append((int(far.size), int(near.size), captured))
        return labels, dist


# The bounded assignment checks at most K / _MOVED_SHARE centroids (those that moved most)
# for the descriptors it does not compare with every centroid.
_MOVED_SHARE = 32


def _d2r_lloyd(x, centroids, iterations, threads, progress, stats=None):
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    assign = _BoundedAssign(x, threads, pool)
    try:
        with _one_thread_blas():
            return _lloyd(x, centroids, iterations, progress, assign)
    finally:
        if stats is not None:
            stats.extend(assign.stats)
        if pool is not None:
            pool.shutdown()


def _faiss_lloyd(x, centroids, iterations, threads, progress):
    import faiss  # the `kmeans` extra; never needed at run time on a device

    index = faiss.IndexFlatL2(x.shape[1])

    def assign(c):
        index.reset()
        index.add(c)
        dist, ids = index.search(x, 1)
        return ids[:, 0].astype(np.int32), dist[:, 0].astype(np.float64)

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        return _lloyd(x, centroids, iterations, progress, assign)
    finally:
        faiss.omp_set_num_threads(before)
