"""Plain numpy versions of the core, written from docs/algorithm.md: the oracle of the property tests.

Deliberately naive (dense distance matrices, Python loops over words) so that it is easy to
check against the text; the benchmark also uses it as the "plain numpy" baseline.
"""

from __future__ import annotations

import numpy as np


def assign(x, c, m=1):
    """m nearest codewords by exact squared L2 (float64), ties to the lowest id."""
    d = ((x[:, None, :].astype(np.float64) - c[None, :, :].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :m].astype(np.int32)


def assign_blocked(x, c, m=1, block=256):
    """Same result as :func:`assign` for well-separated data, with GEMM (the numpy baseline)."""
    cn = (c.astype(np.float32) ** 2).sum(1)
    out = np.empty((x.shape[0], m), np.int32)
    for r in range(0, x.shape[0], block):
        d = cn[None, :] - 2.0 * (x[r : r + block] @ c.T)
        if m == 1:
            out[r : r + block, 0] = d.argmin(1)
        else:
            part = np.argpartition(d, m - 1, axis=1)[:, :m]
            order = np.take_along_axis(d, part, 1).argsort(1, kind="stable")
            out[r : r + block] = np.take_along_axis(part, order, 1)
    return out


def residual_vlad(x, c, assignment):
    """Dense float64 [K, D] residual sums of all features."""
    v = np.zeros(c.shape, np.float64)
    for i in range(x.shape[0]):
        for w in assignment[i]:
            v[w] += x[i].astype(np.float64) - c[w].astype(np.float64)
    return v


def _l2(v):
    return v / np.sqrt(max(float((v * v).sum()), 1e-12))


def aggregate(x, c, kind, region_sizes=None, m=1, normalize=True):
    """Returns (words, payload): payload is the vector (VLAD), unit rows (ASMK) or codes."""
    a = assign(x, c, m)
    regional = kind.startswith("r")
    if region_sizes is None:
        region_sizes = [x.shape[0]]
    bounds = np.concatenate([[0], np.cumsum(region_sizes)]).astype(int)
    if regional:
        v = np.zeros(c.shape, np.float64)
        for r in range(len(region_sizes)):
            sl = slice(bounds[r], bounds[r + 1])
            v += _l2(residual_vlad(x[sl], c, a[sl]))
    else:
        v = residual_vlad(x, c, a)
    if kind in ("vlad", "rvlad"):
        vec = v.ravel()
        if normalize:
            vec = _l2(vec)
        elif kind == "rvlad":
            vec = vec / len(region_sizes)
        return np.zeros(0, np.uint32), vec.astype(np.float32)
    norms = np.sqrt((v * v).sum(1))
    words = np.flatnonzero(norms > 1e-6)
    unit = v[words] / norms[words, None]
    if kind.endswith("_star"):
        return words.astype(np.uint32), np.packbits(unit > 0, axis=1)
    return words.astype(np.uint32), unit.astype(np.float32)


def selectivity(s, alpha=3.0, tau=0.0):
    return np.sign(s) * np.abs(s) ** alpha if s > tau else 0.0


def similarity(words_a, pay_a, words_b, pay_b, dim, binary, alpha=3.0, tau=0.0, normalize=False):
    if len(words_a) == 0 or len(words_b) == 0:
        return -1.0
    common, ia, ib = np.intersect1d(words_a, words_b, return_indices=True)
    total = 0.0
    for i, j in zip(ia, ib):
        if binary:
            bits = int(np.unpackbits(pay_a[i] ^ pay_b[j]).sum())
            s = 1.0 - 2.0 * bits / dim
        else:
            s = float(pay_a[i].astype(np.float64) @ pay_b[j].astype(np.float64))
        total += selectivity(s, alpha, tau)
    if normalize:
        total /= np.sqrt(len(words_a) * len(words_b))
    return total


def naive_rasmk(x, c, region_sizes, m=1):
    """Naive-R-ASMK (docs/algorithm.md section 3): per word, the sum over regions of each region's
    ASMK unit residual, divided by the number of regions R (empty regions count in R)."""
    bounds = np.concatenate([[0], np.cumsum(region_sizes)]).astype(int)
    acc = {}
    for r in range(len(region_sizes)):
        sl = slice(bounds[r], bounds[r + 1])
        if bounds[r + 1] == bounds[r]:
            continue
        words, unit = aggregate(x[sl], c, "asmk", m=m)
        for w, u in zip(words, unit):
            acc[int(w)] = acc.get(int(w), 0.0) + u.astype(np.float64)
    words = np.array(sorted(acc), dtype=np.uint32)
    vecs = np.array([acc[int(w)] / len(region_sizes) for w in words]).reshape(len(words), c.shape[1])
    return words, vecs.astype(np.float32)


def _sqdist_sequential(x, c):
    """float64 [N, K] exact squared distances, the D terms added in index order (the kernels'
    order, so that the sums are bit-identical)."""
    x = x.astype(np.float64)
    c = c.astype(np.float64)
    out = np.zeros((x.shape[0], c.shape[0]))
    for j in range(x.shape[1]):
        out += (x[:, j, None] - c[None, :, j]) ** 2
    return out


def kmeanspp(x, k, uniform):
    """k-means++ (D^2 sampling) picks of float32 [N, D] samples with the caller's uniform draws
    float64 [k]: sample i is picked when the running sum of distances first exceeds u * total."""
    n = x.shape[0]
    chosen = [min(int(uniform[0] * n), n - 1)]
    mind = _sqdist_sequential(x, x[chosen[0]][None])[:, 0]
    for t in range(1, k):
        cum = np.cumsum(mind)
        if cum[-1] <= 0.0:
            chosen.append((chosen[-1] + 1) % n)
        else:
            chosen.append(min(int(np.searchsorted(cum, uniform[t] * cum[-1], side="right")), n - 1))
        mind = np.minimum(mind, _sqdist_sequential(x, x[chosen[-1]][None])[:, 0])
    return np.array(chosen, dtype=np.int64)


def lloyd(x, centroids, iterations):
    """Lloyd's k-means from float32 [K, D] centroids: exact float64 assignment (ties to the
    lowest id), float64 means, empty clusters re-seeded with the worst-fitted descriptors, early
    stop when no label changes."""
    c = centroids.astype(np.float32).copy()
    k = c.shape[0]
    labels = np.full(x.shape[0], -1)
    for _ in range(iterations):
        d = _sqdist_sequential(x, c)
        new = d.argmin(1)
        best = d[np.arange(len(x)), new]
        moved = np.count_nonzero(new != labels)
        labels = new
        sums = np.zeros((k, x.shape[1]))
        np.add.at(sums, labels, x.astype(np.float64))
        counts = np.bincount(labels, minlength=k)
        full = counts > 0
        c[full] = (sums[full] / counts[full, None]).astype(np.float32)
        empty = np.flatnonzero(~full)
        if empty.size:
            c[empty] = x[np.argsort(-best, kind="stable")[: empty.size]]
        if moved == 0 and not empty.size:
            break
    return c
