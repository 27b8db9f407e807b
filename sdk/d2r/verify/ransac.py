"""Affine RANSAC (3-point samples) on putative matches: :func:`ransac_affine` and its result,
:class:`VerifyResult`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import verify_kernels
from .._checks import positive_int, real_number
from ..errors import InputError
from .features import _locations_array

# Defaults of docs/algorithm.md section 6.
RESIDUAL_THRESHOLD = 10.0
MAX_TRIALS = 1000
# RANSAC runs only with more than 3 putative matches: 3 points fit any affine model exactly.
MIN_MATCHES = 4
# Early termination: stop once this probability of having drawn an all-inlier sample is reached.
CONFIDENCE = 0.99


@dataclass(frozen=True, eq=False)
class VerifyResult:
    """The outcome of affine RANSAC on one image pair.

    Attributes:
        inliers: number of inlier matches (0 when no model was found).
        inlier_mask: bool [M], True for the inlier rows of the ``matches`` given.
        affine: float64 [2, 3] matrix A mapping query to candidate locations,
            ``[y', x'] = A @ [y, x, 1]``, or None when no model was found (fewer than
            :data:`MIN_MATCHES` matches, or every sample degenerate).
        matches: int32 [M, 2] the putative matches verified (query index, candidate index).
        trials: number of RANSAC samples drawn.
    """

    inliers: int
    inlier_mask: np.ndarray
    affine: np.ndarray | None
    matches: np.ndarray
    trials: int = 0


def _matches_array(value, n_a: int, n_b: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"matches: expected an int array [M, 2], got {type(value).__name__}") from exc
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int32)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"matches: expected an array [M, 2] of (query index, candidate index), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"matches: expected an integer array, got dtype {arr.dtype}")
    if arr.min() < 0 or arr[:, 0].max() >= n_a or arr[:, 1].max() >= n_b:
        raise InputError(
            f"matches: indices out of range: query indices must be in [0, {n_a}), candidate indices in [0, {n_b})"
        )
    return np.ascontiguousarray(arr, dtype=np.int32)


def _seed(value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"seed: expected a non-negative integer, got {value!r}")
    if not 0 <= int(value) < 2**64:
        raise InputError(f"seed: expected an integer in [0, 2**64), got {value}")
    return int(value)


def _ransac_params(threshold, max_trials, seed, confidence, refit) -> tuple:
    """Checked (threshold, max_trials, confidence, seed, refit): the kernel's argument order."""
    threshold = real_number(threshold, "threshold")
    if threshold <= 0:
        raise InputError(f"threshold: expected a positive residual threshold in pixels, got {threshold}")
    max_trials = positive_int(max_trials, "max_trials")
    seed = _seed(seed)
    confidence = real_number(confidence, "confidence")
    if not 0 < confidence <= 1:
        raise InputError(f"confidence: expected a probability in (0, 1], got {confidence}")
    if not isinstance(refit, (bool, np.bool_)):
        raise InputError(f"refit: expected True or False, got {refit!r}")
    return threshold, max_trials, confidence, np.uint64(seed), bool(refit)


def _ransac_checked(la, lb, mt, params) -> VerifyResult:
    m = mt.shape[0]
    if m < MIN_MATCHES:
        return VerifyResult(0, np.zeros(m, dtype=bool), None, mt, 0)
    src = la[mt[:, 0]].astype(np.float64)
    dst = lb[mt[:, 1]].astype(np.float64)
    n, mask, model, found, trials = verify_kernels.ransac_affine(src, dst, *params)
    if not found:
        return VerifyResult(0, np.zeros(m, dtype=bool), None, mt, int(trials))
    return VerifyResult(int(n), mask, model, mt, int(trials))


def ransac_affine(
    loc_a,
    loc_b,
    matches,
    threshold: float = RESIDUAL_THRESHOLD,
    max_trials: int = MAX_TRIALS,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    refit: bool = False,
) -> VerifyResult:
    """Fit an affine model to putative matches with RANSAC (3-point samples).

    Args:
        loc_a: float32 [Na, 2] (y, x) query locations.
        loc_b: float32 [Nb, 2] (y, x) candidate locations.
        matches: int [M, 2] (query index, candidate index), e.g. from :func:`match`.
        threshold: residual threshold in pixels; a match is an inlier if the Euclidean distance
            between the mapped query location and its candidate location is below it.
        max_trials: most samples drawn; a degenerate sample (collinear points on either side)
            uses up a trial. The loop also stops once the standard adaptive count
            ``log(1 - confidence) / log(1 - w**3)`` (w: best inlier ratio so far) is reached.
        seed: seed of the sampler; the same seed and input give the same result.
        confidence: probability for early termination in (0, 1]; 1 disables it and always
            draws ``max_trials`` samples, like the reference code (scikit-image's ransac).
        refit: re-estimate the best model by least squares on its inliers (repeated while
            that gains inliers); the inlier count reported is then the refit model's.

    Returns:
        :class:`VerifyResult`. The best model has the most inliers (equal counts: the smaller
        sum of squared inlier residuals). With fewer than :data:`MIN_MATCHES` matches, or when
        every sample is degenerate, ``inliers`` is 0 and ``affine`` is None.
    """
    la = _locations_array(loc_a, "loc_a")
    lb = _locations_array(loc_b, "loc_b")
    mt = _matches_array(matches, la.shape[0], lb.shape[0])
    params = _ransac_params(threshold, max_trials, seed, confidence, refit)
    return _ransac_checked(la, lb, mt, params)
