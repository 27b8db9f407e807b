"""Numba kernels of spatial verification: putative matching and affine RANSAC.

Pure functions over typed arrays; nothing here validates its input (``d2r.verify`` does).
Every kernel is compiled once and cached on disk (``cache=True``).

Conventions: locations are float64 ``[M, 2]`` in (y, x) order; an affine model is a float64
``[2, 3]`` matrix ``A`` with ``[y', x'] = A @ [y, x, 1]``. Random numbers come from a
SplitMix64 generator owned by each call, so a seed draws the same samples on every platform
and no global random state is touched.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# A sample of 3 points is rejected as degenerate (collinear or coincident) when the cross
# product of its edges (twice the triangle's area) is below this fraction of the squared
# length of its longer edge from the first point; checked on both the query and candidate side.
COLLINEAR_RTOL = 1e-6

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


# --------------------------------------------------------------------------------------------
# Putative matches
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, fastmath=True)
def _min_range(v, lo, hi, acc):
    """min(v[lo:hi]) of finite values (inf if empty); acc: float32 [16] scratch.

    16 independent running minima: LLVM does not vectorise a float min reduction here, and
    one dependency chain is 3-4 times slower than 16 interleaved ones.
    """
    acc[:] = np.inf
    n16 = lo + (hi - lo) - (hi - lo) % 16
    for j0 in range(lo, n16, 16):
        for k in range(16):
            x = v[j0 + k]
            acc[k] = x if x < acc[k] else acc[k]
    m = np.float32(np.inf)
    for k in range(16):
        m = acc[k] if acc[k] < m else m
    for j in range(n16, hi):
        m = v[j] if v[j] < m else m
    return m


@njit(cache=True, nogil=True, fastmath=True)
def _row_values(g, norm_b, scale_b, scale_a, out, acc):
    """out[j] = |b_j|^2 - 2 s_a s_b[j] g[j]: the squared distance less |a|^2. Returns min(out).

    ``g`` is a row of float32 dot products (scales of 1) or of exact int32 dot products of int8
    codes, which the scales turn into dot products of unit vectors. fastmath only lets LLVM
    vectorise: the products by 1 and by 2 are exact, so a fused multiply-add rounds the same,
    and the min of finite values does not depend on the order of the reduction.
    """
    two_sa = np.float32(2.0) * scale_a
    for j in range(g.shape[0]):
        out[j] = norm_b[j] - two_sa * (np.float32(g[j]) * scale_b[j])
    return _min_range(out, 0, out.shape[0], acc)


@njit(cache=True, nogil=True, fastmath=True)
def _update_columns(v, shift, i, col_d, col_best):
    """Fold row i (values v + shift) into the running column minima; ties keep the lower i."""
    for j in range(v.shape[0]):
        x = v[j] + shift
        better = x < col_d[j]
        col_d[j] = x if better else col_d[j]
        col_best[j] = i if better else col_best[j]


@njit(cache=True, nogil=True)
def nearest_neighbours(gram, norm_a, norm_b, scale_a, scale_b, max_sqdist, ratio, mutual):
    """Putative matches from a similarity block.

    gram: float32 [Na, Nb] = a @ b.T (from BLAS), or int32 dot products of int8 codes;
    norm_a: float32 [Na], norm_b: float32 [Nb] squared descriptor norms; scale_a: float32 [Na],
    scale_b: float32 [Nb] factors that turn gram[i, j] into <a_i, b_j> (ones for a float gram,
    the inverse code norms for int8 codes, with norms of 1). max_sqdist: squared distance threshold (strict ``<``); ratio:
    Lowe's ratio on distances (``d1 < ratio * d2``), or a value <= 0 to disable; mutual: keep a
    match only if the query feature is also the nearest neighbour of its match in ``a``.
    Ties keep the lowest index. Returns int32 [M, 2] (index in a, index in b), ascending in a.

    Squared distances are |a|^2 + (|b|^2 - 2 <a, b>) with the bracket in float32 (the precision
    of the GEMM), so they are exact to about 1e-6.
    """
    na, nb = gram.shape
    out = np.empty((na, 2), dtype=np.int32)
    if nb == 0:
        return out[:0].copy()
    row = np.empty(nb, dtype=np.float32)
    acc = np.empty(16, dtype=np.float32)
    # The column minima of |a|^2 - 2 <a, b> give each b's nearest a (for the mutual check).
    col_d = np.full(nb, np.inf, dtype=np.float32)
    col_best = np.full(nb, -1, dtype=np.int64)
    row_best = np.full(na, -1, dtype=np.int64)
    use_ratio = ratio > 0.0
    r2 = ratio * ratio
    for i in range(na):
        vmin = _row_values(gram[i], norm_b, scale_b, scale_a[i], row, acc)
        if mutual:
            # Column order needs |a_i|^2 too: shift the row by it (exact enough at 1e-6).
            _update_columns(row, norm_a[i], i, col_d, col_best)
        d1 = max(np.float64(norm_a[i]) + np.float64(vmin), 0.0)
        if not d1 < max_sqdist:
            continue
        j1 = 0
        while row[j1] != vmin:
            j1 += 1
        if use_ratio and nb > 1:
            v2 = min(_min_range(row, 0, j1, acc), _min_range(row, j1 + 1, nb, acc))
            d2 = max(np.float64(norm_a[i]) + np.float64(v2), 0.0)
            if not d1 < r2 * d2:
                continue
        row_best[i] = j1
    return _collect(row_best, col_best, mutual, out)


@njit(cache=True, nogil=True)
def _collect(row_best, col_best, mutual, out):
    """Rows (i, row_best[i]) of the matched i, ascending; with ``mutual`` only if the match's
    own nearest query is i. ``out``: int32 [Na, 2] scratch."""
    m = 0
    for i in range(row_best.shape[0]):
        j = row_best[i]
        if j < 0:
            continue
        if mutual and col_best[j] != i:
            continue
        out[m, 0] = i
        out[m, 1] = j
        m += 1
    return out[:m].copy()


@njit(cache=True, nogil=True)
def word_matches(qd, qw, cd, cw, max_sqdist, ratio, mutual):
    """Putative matches among features that share a visual word (no exhaustive distance matrix).

    qd: float32 [Na, D] query descriptors; qw: int32 [Na, m] the query's m nearest words per
    feature (multiple assignment; -1 = none); cd: float32 [Nb, D] candidate descriptors;
    cw: int32 [Nb] the candidate's word per feature. Query feature i is compared only with
    candidate features whose word is one of qw[i]; among them the rules of
    :func:`nearest_neighbours` apply (threshold, ratio against the second nearest *seen*,
    mutual among the pairs compared, ties to the lowest index). Returns int32 [M, 2].
    (``d2r.verify`` refuses the ratio test here: against the second nearest seen it passes
    far too many false matches, measured in benchmarks/RESULTS.md.)
    """
    na = qd.shape[0]
    nb = cd.shape[0]
    dim = qd.shape[1]
    out = np.empty((na, 2), dtype=np.int32)
    if nb == 0 or na == 0:
        return out[:0].copy()
    order = np.argsort(cw, kind="mergesort")
    sw = cw[order]
    col_d = np.full(nb, np.inf, dtype=np.float64)
    col_best = np.full(nb, -1, dtype=np.int64)
    row_best = np.full(na, -1, dtype=np.int64)
    use_ratio = ratio > 0.0
    r2 = ratio * ratio
    m = qw.shape[1]
    for i in range(na):
        best = np.inf
        second = np.inf
        jbest = -1
        for t in range(m):
            w = qw[i, t]
            if w < 0:
                continue
            dup = False
            for u in range(t):
                if qw[i, u] == w:
                    dup = True
            if dup:
                continue
            lo = np.searchsorted(sw, w, side="left")
            hi = np.searchsorted(sw, w, side="right")
            for p in range(lo, hi):
                j = order[p]
                acc = np.float32(0.0)
                for k in range(dim):
                    diff = qd[i, k] - cd[j, k]
                    acc += diff * diff
                d = np.float64(acc)
                if d < best or (d == best and j < jbest):
                    second = best
                    best = d
                    jbest = j
                elif d < second:
                    second = d
                if mutual and (d < col_d[j] or (d == col_d[j] and i < col_best[j])):
                    col_d[j] = d
                    col_best[j] = i
        if jbest < 0 or not best < max_sqdist:
            continue
        if use_ratio and second < np.inf and not best < r2 * second:
            continue
        row_best[i] = jbest
    return _collect(row_best, col_best, mutual, out)


# --------------------------------------------------------------------------------------------
# Affine RANSAC
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _splitmix64(state):
    """One SplitMix64 step: returns (new state, 64 random bits)."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return state, z


@njit(cache=True, nogil=True)
def _affine_from_3(src, dst, i0, i1, i2, model):
    """Exact affine through 3 correspondences into ``model`` [2, 3].

    False if degenerate: collinear (or coincident) points on either side.
    """
    y0 = src[i0, 0]
    x0 = src[i0, 1]
    ay = src[i1, 0] - y0
    ax = src[i1, 1] - x0
    by = src[i2, 0] - y0
    bx = src[i2, 1] - x0
    det = ay * bx - ax * by
    extent = max(ay * ay + ax * ax, by * by + bx * bx)
    if extent == 0.0 or abs(det) <= COLLINEAR_RTOL * extent:
        return False
    # A sample whose targets are collinear gives a singular map (a plane onto a line), which
    # can only collect chance inliers along that line.
    cy = dst[i1, 0] - dst[i0, 0]
    cx = dst[i1, 1] - dst[i0, 1]
    ey = dst[i2, 0] - dst[i0, 0]
    ex = dst[i2, 1] - dst[i0, 1]
    dext = max(cy * cy + cx * cx, ey * ey + ex * ex)
    if dext == 0.0 or abs(cy * ex - cx * ey) <= COLLINEAR_RTOL * dext:
        return False
    for r in range(2):
        u0 = dst[i0, r]
        du1 = dst[i1, r] - u0
        du2 = dst[i2, r] - u0
        # Solve [ay ax; by bx] @ [p, q] = [du1, du2] (Cramer's rule), then the offset.
        p = (du1 * bx - ax * du2) / det
        q = (ay * du2 - du1 * by) / det
        model[r, 0] = p
        model[r, 1] = q
        model[r, 2] = u0 - p * y0 - q * x0
    return True


@njit(cache=True, nogil=True)
def _count_inliers(sy, sx, dy, dx, model, sqthresh):
    """Number of matches with residual**2 < sqthresh under ``model``.

    The hot loop of RANSAC: separate coordinate arrays and an integer count let LLVM
    vectorise it without fast-math, so it classifies exactly like :func:`_mark_inliers`.
    """
    a00 = model[0, 0]
    a01 = model[0, 1]
    a02 = model[0, 2]
    a10 = model[1, 0]
    a11 = model[1, 1]
    a12 = model[1, 2]
    n = 0
    for k in range(sy.shape[0]):
        ey = a00 * sy[k] + a01 * sx[k] + a02 - dy[k]
        ex = a10 * sy[k] + a11 * sx[k] + a12 - dx[k]
        n += 1 if ey * ey + ex * ex < sqthresh else 0
    return n


@njit(cache=True, nogil=True)
def _mark_inliers(sy, sx, dy, dx, model, sqthresh, mask):
    """Marks ``mask`` with residual**2 < sqthresh; returns (count, sum of inlier residual**2)."""
    a00 = model[0, 0]
    a01 = model[0, 1]
    a02 = model[0, 2]
    a10 = model[1, 0]
    a11 = model[1, 1]
    a12 = model[1, 2]
    n = 0
    cost = 0.0
    for k in range(sy.shape[0]):
        ey = a00 * sy[k] + a01 * sx[k] + a02 - dy[k]
        ex = a10 * sy[k] + a11 * sx[k] + a12 - dx[k]
        r = ey * ey + ex * ex
        if r < sqthresh:
            mask[k] = True
            n += 1
            cost += r
        else:
            mask[k] = False
    return n, cost


@njit(cache=True, nogil=True)
def _fit_affine_lsq(src, dst, mask, model):
    """Least-squares affine on the masked correspondences; False if degenerate."""
    # Centre the points: the normal equations of centred coordinates are far better conditioned.
    n = 0
    my = 0.0
    mx = 0.0
    uy = 0.0
    ux = 0.0
    for k in range(src.shape[0]):
        if mask[k]:
            n += 1
            my += src[k, 0]
            mx += src[k, 1]
            uy += dst[k, 0]
            ux += dst[k, 1]
    if n < 3:
        return False
    my /= n
    mx /= n
    uy /= n
    ux /= n
    syy = 0.0
    syx = 0.0
    sxx = 0.0
    t = np.zeros((2, 2))  # t[r, 0] = sum(dy * du_r), t[r, 1] = sum(dx * du_r)
    for k in range(src.shape[0]):
        if mask[k]:
            dy = src[k, 0] - my
            dx = src[k, 1] - mx
            du0 = dst[k, 0] - uy
            du1 = dst[k, 1] - ux
            syy += dy * dy
            syx += dy * dx
            sxx += dx * dx
            t[0, 0] += dy * du0
            t[0, 1] += dx * du0
            t[1, 0] += dy * du1
            t[1, 1] += dx * du1
    det = syy * sxx - syx * syx
    if det <= COLLINEAR_RTOL * max(syy, sxx) ** 2:
        return False
    for r in range(2):
        p = (t[r, 0] * sxx - syx * t[r, 1]) / det
        q = (syy * t[r, 1] - syx * t[r, 0]) / det
        model[r, 0] = p
        model[r, 1] = q
        model[r, 2] = (uy if r == 0 else ux) - p * my - q * mx
    return True


@njit(cache=True, nogil=True)
def _trials_needed(n_inliers, n, confidence):
    """Standard adaptive RANSAC count: log(1 - p) / log(1 - w**3) for inlier ratio w."""
    w = n_inliers / n
    w3 = w * w * w
    if w3 >= 1.0:
        return 0.0
    if w3 <= 0.0:
        return np.inf
    return np.ceil(np.log(1.0 - confidence) / np.log(1.0 - w3))


@njit(cache=True, nogil=True)
def ransac_affine(src, dst, threshold, max_trials, confidence, seed, refit):
    """Affine RANSAC on 3-point samples.

    src, dst: float64 [M, 2] (y, x) locations of the M putative matches (M >= 3).
    threshold: residual threshold in pixels (inlier if Euclidean residual < threshold).
    max_trials: sample budget; the loop stops early once the standard adaptive count for
    ``confidence`` is reached (confidence >= 1 disables early termination). Degenerate
    (collinear) samples use up a trial. seed: uint64 seed of the sampler. refit: re-estimate
    the model by least squares on its inliers, repeated while the inlier count grows.

    Returns (n_inliers, mask bool [M], model float64 [2, 3], found, trials run). A better
    model has more inliers; equal counts keep the one with the smaller sum of squared
    residuals over its inliers.
    """
    m = src.shape[0]
    sqthresh = threshold * threshold
    sy = src[:, 0].copy()
    sx = src[:, 1].copy()
    dy = dst[:, 0].copy()
    dx = dst[:, 1].copy()
    best_n = 0
    best_cost = np.inf
    best_model = np.zeros((2, 3))
    best_mask = np.zeros(m, dtype=np.bool_)
    found = False
    model = np.zeros((2, 3))
    mask = np.zeros(m, dtype=np.bool_)
    state = np.uint64(seed)
    mu = np.uint64(m)
    needed = np.inf
    trials = 0
    while trials < max_trials and trials < needed:
        trials += 1
        state, z = _splitmix64(state)
        i0 = np.int64(z % mu)
        state, z = _splitmix64(state)
        i1 = np.int64(z % mu)
        while i1 == i0:
            state, z = _splitmix64(state)
            i1 = np.int64(z % mu)
        state, z = _splitmix64(state)
        i2 = np.int64(z % mu)
        while i2 == i0 or i2 == i1:
            state, z = _splitmix64(state)
            i2 = np.int64(z % mu)
        if not _affine_from_3(src, dst, i0, i1, i2, model):
            continue
        n = _count_inliers(sy, sx, dy, dx, model, sqthresh)
        if n == 0 or n < best_n:
            continue
        # Candidates for best only: the residual sum breaks ties between equal counts.
        n, cost = _mark_inliers(sy, sx, dy, dx, model, sqthresh, mask)
        if n > best_n or cost < best_cost:
            best_n = n
            best_cost = cost
            best_model[:, :] = model
            best_mask[:] = mask
            found = True
            if confidence < 1.0:
                needed = _trials_needed(best_n, m, confidence)
    if refit and found:
        for _ in range(10):
            if not _fit_affine_lsq(src, dst, best_mask, model):
                break
            n, cost = _mark_inliers(sy, sx, dy, dx, model, sqthresh, mask)
            if n < best_n or (n == best_n and cost >= best_cost):
                break
            best_n = n
            best_cost = cost
            best_model[:, :] = model
            best_mask[:] = mask
    return best_n, best_mask, best_model, found, trials
