"""Spatial verification: putative matches, affine RANSAC and re-ranking (docs/algorithm.md section 6).

The re-ranking of Detect-to-Retrieve: the top R images of the initial ranking are verified by
matching the query's local features to each candidate's (nearest neighbour, Euclidean distance
below 0.9, optionally Lowe's ratio test and a mutual check), fitting an affine model with
RANSAC (3-point samples, residual threshold 10 px, 1000 trials), and re-sorting those R by
(inlier count, initial score)::

    matches = d2r.verify.match(desc_q, desc_c)                  # int32 [M, 2]
    result = d2r.verify.ransac_affine(loc_q, loc_c, matches)    # VerifyResult
    reranked = d2r.verify.rerank((loc_q, desc_q), [(id, score, (loc, desc)), ...])

Locations are float32 ``[N, 2]`` in (y, x) pixel order, descriptors float32 ``[N, D]``
(L2-normalised by the feature extractors; the distance is computed for any vectors). The hot
loops are Numba kernels in :mod:`d2r.verify_kernels`; the descriptor distance matrix is one
float32 GEMM in numpy's BLAS.

Matching within visual words: when both sides carry visual-word ids (``LocalFeatures.words``:
the query's m nearest codewords per feature, each database feature's nearest codeword), a query
feature is compared only with the candidate features of its words, instead of with all of them.
This is what makes re-ranking 100 candidates cheap (see benchmarks/RESULTS.md), at the cost of
missing a nearest neighbour that fell into another word. The engine stores the words with the
features and uses them when the bundle has a codebook.

Verification features can be stored compactly with :func:`pack_features` (uint16 pixel
coordinates, int8 or float16 descriptors: 4 + D bytes per feature in int8, so 132,010 bytes for
an image of 1000 features of D = 128) and many images in one checksummed side file with
:func:`save_features`, read one image at a time with :class:`FeatureFile`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import int8_gemm, verify_kernels
from ._checks import descriptors_array, positive_int, real_number
from ._files import atomic_file
from .errors import IndexFormatError, InputError

# Defaults of docs/algorithm.md section 6.
MAX_DISTANCE = 0.9
RESIDUAL_THRESHOLD = 10.0
MAX_TRIALS = 1000
TOP_R = 100
# RANSAC runs only with more than 3 putative matches: 3 points fit any affine model exactly.
MIN_MATCHES = 4
# Early termination: stop once this probability of having drawn an all-inlier sample is reached.
CONFIDENCE = 0.99

__all__ = [
    "CONFIDENCE",
    "FeatureFile",
    "MAX_DISTANCE",
    "MAX_TRIALS",
    "MIN_MATCHES",
    "RESIDUAL_THRESHOLD",
    "TOP_R",
    "LocalFeatures",
    "Reranked",
    "VerifyResult",
    "feature_bytes",
    "load_features",
    "match",
    "pack_features",
    "ransac_affine",
    "rerank",
    "save_features",
    "unpack_features",
    "verify_pair",
]


# --------------------------------------------------------------------------------------------
# Results and inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """The local features of one image, as used for verification.

    Attributes:
        locations: float32 [N, 2] keypoint (y, x) coordinates in pixels.
        descriptors: float32 [N, D] descriptors.
        words: optional visual-word ids, int32 [N, m] (given as [N] or [N, m]; -1 = none):
            a query's m nearest codewords per feature, or a database image's nearest one.
            When both sides of a pair have words, matching is restricted to shared words.
    """

    locations: np.ndarray
    descriptors: np.ndarray
    words: np.ndarray | None = None

    def __post_init__(self):
        desc = descriptors_array(self.descriptors, "descriptors")
        loc = _locations_array(self.locations, "locations", desc.shape[0])
        object.__setattr__(self, "descriptors", desc)
        object.__setattr__(self, "locations", loc)
        if self.words is not None:
            object.__setattr__(self, "words", _words_array(self.words, desc.shape[0]))

    def __len__(self) -> int:
        return int(self.locations.shape[0])

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored int8 codes of the descriptors (+-63, the candidate side of int8 matching)
        and their float32 inverse norms (see :mod:`d2r.int8_gemm`), computed once; features
        read from an int8 side file carry the stored codes."""
        cached = self.__dict__.get("_codes")
        if cached is None:
            cached = int8_gemm.quantize_rows(self.descriptors, int8_gemm.STORED_MAX)
            object.__setattr__(self, "_codes", cached)
        return cached

    def query_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Query int8 codes of the descriptors (+-127, the left operand of int8 matching) and
        their float32 inverse norms, computed once."""
        cached = self.__dict__.get("_query_codes")
        if cached is None:
            cached = int8_gemm.quantize_rows(self.descriptors, int8_gemm.INT8_MAX)
            object.__setattr__(self, "_query_codes", cached)
        return cached


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


@dataclass(frozen=True)
class Reranked:
    """One entry of a re-ranked list.

    Attributes:
        id: the candidate's id, as given.
        score: its initial score, as given.
        inliers: its RANSAC inlier count, or -1 if it was beyond the top R and not verified.
    """

    id: object
    score: float
    inliers: int


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _locations_array(value, name: str, n: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"{name}: expected a float32 array [N, 2] of (y, x), got {type(value).__name__}") from exc
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"{name}: expected an array [N, 2] of (y, x) locations, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InputError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name}: expected {n} rows (one per descriptor), got {arr.shape[0]}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InputError(f"{name}: row {bad} contains NaN or inf")
    return arr


def _words_array(value, n: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"words: expected an int array [N] or [N, m], got {type(value).__name__}") from exc
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
        raise InputError(f"words: expected {n} rows of visual-word ids ([N] or [N, m]), got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"words: expected integer visual-word ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < -1 or arr.max() > np.iinfo(np.int32).max):
        raise InputError("words: ids must be >= 0 (or -1 for none) and fit in int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


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


def _features(value, name: str) -> LocalFeatures:
    if isinstance(value, LocalFeatures):
        return value
    if hasattr(value, "locations") and hasattr(value, "descriptors"):
        return LocalFeatures(value.locations, value.descriptors, getattr(value, "words", None))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            return LocalFeatures(value[0], value[1])
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from exc
    raise InputError(
        f"{name}: expected LocalFeatures, an object with .locations and .descriptors, or a "
        f"(locations, descriptors) pair, got {type(value).__name__}"
    )


def _seed(value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"seed: expected a non-negative integer, got {value!r}")
    if not 0 <= int(value) < 2**64:
        raise InputError(f"seed: expected an integer in [0, 2**64), got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Matching and RANSAC
# --------------------------------------------------------------------------------------------


def _match_params(max_distance, ratio, mutual) -> tuple:
    """Checked (squared distance threshold, ratio or 0, mutual) for the kernel."""
    max_distance = real_number(max_distance, "max_distance")
    if max_distance <= 0:
        raise InputError(f"max_distance: expected a positive distance, got {max_distance}")
    if ratio is None:
        ratio_v = 0.0
    else:
        ratio_v = real_number(ratio, "ratio")
        if not 0 < ratio_v <= 1:
            raise InputError(f"ratio: expected a Lowe ratio in (0, 1] or None, got {ratio_v}")
    if not isinstance(mutual, (bool, np.bool_)):
        raise InputError(f"mutual: expected True or False, got {mutual!r}")
    return max_distance * max_distance, ratio_v, bool(mutual)


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


PRECISIONS = ("int8", "fp32")


def _precision(value) -> str:
    if value not in PRECISIONS:
        raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def _query_side(q: LocalFeatures, precision: str) -> tuple:
    """What every pair of one query needs, computed once: (precision, left operand, |a|^2, scale)."""
    if precision == "int8":
        codes, inv = q.query_codes()
        return precision, int8_gemm.query_operand(codes), (inv > 0).astype(np.float32), inv
    a = q.descriptors
    return precision, a, np.einsum("ij,ij->i", a, a), np.ones(a.shape[0], np.float32)


def _match_exhaustive(side: tuple, c: LocalFeatures, params) -> np.ndarray:
    _, a, norm_a, scale_a = side
    if a.shape[0] == 0 or c.descriptors.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int32)
    return verify_kernels.nearest_neighbours(*_distance_block(side, c), *params)


def _distance_block(side: tuple, c: LocalFeatures) -> tuple:
    """The nearest-neighbour kernel's operands for one candidate: (gram, |a|^2, |b|^2, scale_a, scale_b)."""
    precision, a, norm_a, scale_a = side
    nb = c.descriptors.shape[0]
    if precision == "int8":
        codes, scale_b = c.codes()
        gram = int8_gemm.gram(a, codes)
        norm_b = (scale_b > 0).astype(np.float32)
    else:
        b = c.descriptors
        gram = a @ b.T
        norm_b = np.einsum("ij,ij->i", b, b)
        scale_b = np.ones(nb, np.float32)
    return gram, norm_a, norm_b, scale_a, scale_b


def _match_features(q: LocalFeatures, c: LocalFeatures, side: tuple, params, use_words: bool) -> np.ndarray:
    """Putative matches of a pair: within shared visual words when both have words (and
    ``use_words``), else exhaustively (one GEMM)."""
    if use_words and q.words is not None and c.words is not None:
        if params[1] > 0:
            raise InputError("ratio: Lowe's ratio test needs exhaustive matching (within words the second nearest "
                             "is not seen and the test lets false matches through); pass use_words=False or ratio=None")
        return verify_kernels.word_matches(q.descriptors, q.words, c.descriptors, np.ascontiguousarray(c.words[:, 0]), *params)
    return _match_exhaustive(side, c, params)


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


def match(
    desc_a, desc_b, max_distance: float = MAX_DISTANCE, ratio: float | None = None, mutual: bool = False, precision: str = "fp32"
) -> np.ndarray:
    """Putative matches: each row of ``desc_a`` to its nearest neighbour in ``desc_b``.

    Args:
        desc_a: float32 [Na, D] query descriptors.
        desc_b: float32 [Nb, D] candidate descriptors.
        max_distance: keep a match if the Euclidean distance is strictly below this.
        ratio: Lowe's ratio test, keep only if ``d1 < ratio * d2`` (d2: second nearest);
            None disables it. With Nb == 1 there is no second neighbour and the test passes.
        mutual: keep only mutual nearest neighbours.
        precision: ``"fp32"`` compares the vectors as given (one float32 GEMM); ``"int8"``
            compares their directions through int8 codes (:mod:`d2r.int8_gemm`: integer dot
            products, several times faster), i.e. the distance between the unit vectors, to a few 1e-2.

    Returns:
        int32 [M, 2] rows (index in a, index in b), ascending in a; each a appears at most once.
        With fp32, a pair within ~1e-6 of the threshold may fall either side of it. Ties keep
        the lowest index in b.
    """
    a = descriptors_array(desc_a, "desc_a")
    b = descriptors_array(desc_b, "desc_b", dim=a.shape[1])
    params = _match_params(max_distance, ratio, mutual)
    side = _query_side(LocalFeatures(np.zeros((a.shape[0], 2), np.float32), a), _precision(precision))
    return _match_exhaustive(side, LocalFeatures(np.zeros((b.shape[0], 2), np.float32), b), params)


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


def verify_pair(
    query,
    candidate,
    max_distance: float = MAX_DISTANCE,
    ratio: float | None = None,
    mutual: bool = False,
    threshold: float = RESIDUAL_THRESHOLD,
    max_trials: int = MAX_TRIALS,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    refit: bool = False,
    use_words: bool = True,
    precision: str = "int8",
) -> VerifyResult:
    """:func:`match` then :func:`ransac_affine` on two images' features.

    ``query`` and ``candidate``: :class:`LocalFeatures`, objects with ``.locations`` and
    ``.descriptors``, or (locations, descriptors) pairs, of the same descriptor dimension.
    use_words: when both carry visual words, match only within shared words (see the module
    notes); False always matches exhaustively. precision: of exhaustive matching, as in
    :func:`match`; the default ``"int8"`` suits the unit-length descriptors of verification.
    """
    q = _features(query, "query")
    c = _features(candidate, "candidate")
    _same_dim(q, c, "candidate")
    mp = _match_params(max_distance, ratio, mutual)
    rp = _ransac_params(threshold, max_trials, seed, confidence, refit)
    matches = _match_features(q, c, _query_side(q, _precision(precision)), mp, _flag(use_words, "use_words"))
    return _ransac_checked(q.locations, c.locations, matches, rp)


def _flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _same_dim(q: LocalFeatures, c: LocalFeatures, name: str) -> None:
    if c.descriptors.shape[1] != q.descriptors.shape[1]:
        raise InputError(
            f"{name}: descriptors of dimension D = {c.descriptors.shape[1]}, the query has D = {q.descriptors.shape[1]}"
        )


def rerank(
    query,
    candidates: Sequence,
    top_r: int = TOP_R,
    max_distance: float = MAX_DISTANCE,
    ratio: float | None = None,
    mutual: bool = False,
    threshold: float = RESIDUAL_THRESHOLD,
    max_trials: int = MAX_TRIALS,
    seed: int = 0,
    confidence: float = CONFIDENCE,
    refit: bool = False,
    use_words: bool = True,
    precision: str = "int8",
) -> list[Reranked]:
    """Re-rank the top R of an initial ranking by (inliers, initial score), docs/algorithm.md section 6.

    Args:
        query: the query's features (see :func:`verify_pair`).
        candidates: the initial ranking, best first: a sequence of ``(id, score, features)``.
            Only the first ``top_r`` need features; later entries may have None. To follow the
            Revisited Oxford protocol, remove junk images before calling
            (:func:`d2r_lab.evaluate.remove_junk`).
        top_r: how many candidates to verify.
        use_words: match within shared visual words when the query and a candidate both
            carry words (see the module notes); False always matches exhaustively.
        precision: of exhaustive matching, ``"int8"`` (default: integer dot products of int8
            codes, 7-10x faster) or ``"fp32"``; see :func:`match`.
        Other arguments: as :func:`match` and :func:`ransac_affine`; every pair uses ``seed``.

    Returns:
        list of :class:`Reranked`: the top R sorted by inliers, then initial score, both
        descending (ties keep the initial order), followed by the other candidates in their
        initial order with ``inliers = -1``. With an initial ranking sorted by score this is
        the order of the reference code, which sorts every image by (inliers, score) with 0
        inliers for the images it did not verify.
    """
    q = _features(query, "query")
    top_r = positive_int(top_r, "top_r")
    mp = _match_params(max_distance, ratio, mutual)
    rp = _ransac_params(threshold, max_trials, seed, confidence, refit)
    use_words = _flag(use_words, "use_words")
    side = _query_side(q, _precision(precision))
    items = []
    for k, cand in enumerate(candidates):
        if not isinstance(cand, (tuple, list)) or len(cand) != 3:
            raise InputError(f"candidates[{k}]: expected an (id, score, features) triple, got {type(cand).__name__}")
        items.append((cand[0], real_number(cand[1], f"candidates[{k}] score"), cand[2]))
    verified = []
    for k, (cid, score, feats) in enumerate(items[:top_r]):
        c = _features(feats, f"candidates[{k}] features")
        _same_dim(q, c, f"candidates[{k}] features")
        matches = _match_features(q, c, side, mp, use_words)
        verified.append(Reranked(cid, score, _ransac_checked(q.locations, c.locations, matches, rp).inliers))
    # Python's sort is stable: equal (inliers, score) keep the initial order.
    verified.sort(key=lambda r: (-r.inliers, -r.score))
    return verified + [Reranked(cid, score, -1) for cid, score, _ in items[top_r:]]


# --------------------------------------------------------------------------------------------
# Compact storage of verification features
# --------------------------------------------------------------------------------------------

# One image packed: a 10-byte header (magic "VF", uint8 version, uint8 descriptor code, uint32 N,
# uint16 D), then N (y, x) uint16 pixel coordinates, then N descriptors, all little-endian.
# Version 2 (written only for features that carry visual words) appends N uint32 word ids.
_PACK_MAGIC = b"VF"
_PACK_VERSION = 1
_PACK_VERSION_WORDS = 2
_DESC_CODES = {"int8": 1, "float16": 2}
_DESC_DTYPES = {1: np.int8, 2: np.float16}
_HEADER = struct.Struct("<2sBBIH")  # magic, version, descriptor code, N, D -> 10 bytes
# int8 descriptors store each row's stored codes (d2r.int8_gemm.quantize_rows: scaled so that its
# largest component is +-63; files written before 7-bit stored codes hold +-127 and are re-scaled
# on reading): the row is re-normalised on reading, so only its direction matters and no scale
# needs storing.


def feature_bytes(n: int, dim: int, descriptor_dtype: str = "int8", words: bool = False) -> int:
    """Bytes of one packed image: 10-byte header + N * (4 + D) for int8 (4 + 2D for float16).

    For 1000 features of D = 128: 132,010 bytes (int8) or 260,010 bytes (float16), against
    520,000 bytes for float32 descriptors with float32 locations (+8,000). ``words``: each
    feature also stores its visual word (4 bytes more per feature).
    """
    n = positive_int(n, "n", minimum=0)
    dim = positive_int(dim, "dim")
    if descriptor_dtype not in _DESC_CODES:
        raise InputError(f"descriptor_dtype: expected one of {', '.join(_DESC_CODES)}, got {descriptor_dtype!r}")
    per = 4 + dim * (1 if descriptor_dtype == "int8" else 2) + (4 if words else 0)
    return _HEADER.size + n * per


def pack_features(features, descriptor_dtype: str = "int8") -> bytes:
    """Pack one image's verification features into bytes (:func:`feature_bytes` long).

    Locations are rounded to whole pixels and stored as uint16 (at most 0.5 px of error,
    far below the 10 px RANSAC threshold); they must lie in [0, 65535]. Descriptors are stored
    as float16, or as int8 ``round(63 * x / max|x|)`` per row (the stored codes of int8 matching): only the direction is kept, and
    :func:`unpack_features` returns unit vectors (the descriptors of verification are
    L2-normalised). Scaling each row to its own maximum, rather than by a fixed scale, uses the
    whole int8 range for descriptors with small components such as RootSIFT. Features with
    ``words`` keep each feature's first word (format version 2).
    """
    f = _features(features, "features")
    if descriptor_dtype not in _DESC_CODES:
        raise InputError(f"descriptor_dtype: expected one of {', '.join(_DESC_CODES)}, got {descriptor_dtype!r}")
    n, dim = f.descriptors.shape
    if n > 0xFFFFFFFF or dim > 0xFFFF:
        raise InputError(f"features: too many features or too large a dimension to pack ({n} x {dim})")
    loc = np.rint(f.locations)
    if loc.size and (loc.min() < 0 or loc.max() > 65535):
        raise InputError("features: locations must lie in [0, 65535] pixels to be packed as uint16")
    loc = loc.astype("<u2")
    if descriptor_dtype == "int8":
        desc = f.codes()[0]
    else:
        desc = f.descriptors.astype("<f2")
    if f.words is None:
        header = _HEADER.pack(_PACK_MAGIC, _PACK_VERSION, _DESC_CODES[descriptor_dtype], n, dim)
        return header + loc.tobytes() + desc.tobytes()
    if n and f.words[:, 0].min() < 0:
        raise InputError("features: every feature needs a visual word (>= 0) to be packed with words")
    header = _HEADER.pack(_PACK_MAGIC, _PACK_VERSION_WORDS, _DESC_CODES[descriptor_dtype], n, dim)
    return header + loc.tobytes() + desc.tobytes() + f.words[:, 0].astype("<u4").tobytes()


def unpack_features(data: bytes, name: str = "packed features") -> LocalFeatures:
    """Inverse of :func:`pack_features`: float32 locations and descriptors.

    int8 descriptors are re-normalised to unit length (rows of zeros stay zero). Raises :class:`IndexFormatError` naming ``name`` if the bytes are malformed.
    """
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise IndexFormatError(f"{name}: truncated ({len(data)} bytes, a header alone is {_HEADER.size})")
    magic, version, code, n, dim = _HEADER.unpack_from(data, 0)
    if magic != _PACK_MAGIC:
        raise IndexFormatError(f"{name}: not packed verification features (bad magic {magic!r})")
    if version not in (_PACK_VERSION, _PACK_VERSION_WORDS):
        raise IndexFormatError(f"{name}: unknown version {version} (this d2r reads versions 1 and 2)")
    with_words = version == _PACK_VERSION_WORDS
    if code not in _DESC_DTYPES or dim == 0:
        raise IndexFormatError(f"{name}: bad descriptor code {code} or dimension {dim}")
    dtype = np.dtype(_DESC_DTYPES[code]).newbyteorder("<")
    expected = _HEADER.size + n * 4 + n * dim * dtype.itemsize + (4 * n if with_words else 0)
    if len(data) != expected:
        raise IndexFormatError(f"{name}: expected {expected} bytes for {n} features of D = {dim}, got {len(data)}")
    off = _HEADER.size
    loc = np.frombuffer(data, dtype="<u2", count=2 * n, offset=off).reshape(n, 2).astype(np.float32)
    off += 4 * n
    raw = np.frombuffer(data, dtype=dtype, count=n * dim, offset=off).reshape(n, dim)
    desc = raw.astype(np.float32)
    if code == 1:
        norms = np.sqrt(np.einsum("ij,ij->i", desc, desc))
        desc /= np.where(norms > 0, norms, 1.0)[:, None]
    if not np.isfinite(desc).all():
        raise IndexFormatError(f"{name}: descriptors contain NaN or inf")
    words = None
    if with_words:
        off += n * dim * dtype.itemsize
        words = np.frombuffer(data, dtype="<u4", count=n, offset=off)
        if n and words.max() > np.iinfo(np.int32).max:
            raise IndexFormatError(f"{name}: visual-word id out of range")
        words = words.astype(np.int32)
    feats = LocalFeatures(loc, desc, words)
    if code == 1:
        # The stored codes are what int8 matching needs: keep them rather than re-quantise
        # (codes of +-127 from older files are re-scaled to the 7-bit stored range).
        object.__setattr__(feats, "_codes", int8_gemm.to_stored(raw))
    return feats


# Side file: many images' packed features, each read on its own (a phone need not load them all).
#   header: magic b"D2RVERIF" | uint32 version | uint32 count
#   table:  uint64 offsets[count + 1] (from the start of the payload) | uint32 crc[count]
#           (CRC-32 of each packed image) | uint32 CRC-32 of header and table
#   payload: the packed images back to back.
# All little-endian. The table is checked on open, each image when it is read.
_FILE_MAGIC = b"D2RVERIF"
_FILE_VERSION = 1
_FILE_HEADER = struct.Struct("<8sII")
# Refuse absurd counts from a corrupt header before allocating a table for them.
_MAX_IMAGES = 1 << 32


def _table_size(count: int) -> int:
    return _FILE_HEADER.size + 8 * (count + 1) + 4 * count + 4


def save_features(path, images: Iterable, descriptor_dtype: str = "int8") -> int:
    """Write many images' verification features to one side file; returns its size in bytes.

    ``images``: an iterable of features (see :func:`verify_pair`), in database order; the
    size is 28 + 12 * count + the sum of :func:`feature_bytes`. The file is written to a
    temporary name and renamed, so a crash never leaves a half-written file.
    """
    blobs = [pack_features(f, descriptor_dtype) for f in images]
    offsets = np.zeros(len(blobs) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    crcs = np.array([zlib.crc32(b) & 0xFFFFFFFF for b in blobs], dtype="<u4")
    table = _FILE_HEADER.pack(_FILE_MAGIC, _FILE_VERSION, len(blobs)) + offsets.tobytes() + crcs.tobytes()
    table += struct.pack("<I", zlib.crc32(table) & 0xFFFFFFFF)
    with atomic_file(Path(path)) as fh:
        fh.write(table)
        for b in blobs:
            fh.write(b)
    return len(table) + int(offsets[-1])


class FeatureFile:
    """Random access to a side file written by :func:`save_features`.

    ``len(f)`` images; ``f[i]`` reads, checks (CRC-32) and unpacks image i as
    :class:`LocalFeatures`. Use as a context manager, or call :meth:`close`.

    Raises :class:`IndexFormatError` naming the file: on open if it is truncated, of another
    format or version, or its table fails its checksum; on ``f[i]`` if image i is corrupt.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise IndexFormatError(f"{self.path}: cannot read verification features ({exc.strerror or exc})") from exc
        try:
            self._read_table()
        except BaseException:
            self._fh.close()
            raise

    def _read_table(self) -> None:
        path = self.path
        size = self._fh.seek(0, 2)
        self._fh.seek(0)
        head = self._fh.read(_FILE_HEADER.size)
        if len(head) < _FILE_HEADER.size:
            raise IndexFormatError(f"{path}: truncated ({size} bytes), not a verification features file")
        magic, version, count = _FILE_HEADER.unpack(head)
        if magic != _FILE_MAGIC:
            raise IndexFormatError(f"{path}: not a d2r verification features file (bad magic {magic!r})")
        if version != _FILE_VERSION:
            raise IndexFormatError(f"{path}: unknown version {version} (this d2r reads version {_FILE_VERSION})")
        start = _table_size(count)
        if count >= _MAX_IMAGES or size < start:
            raise IndexFormatError(f"{path}: truncated table for {count} images ({size} bytes)")
        rest = self._fh.read(start - _FILE_HEADER.size)
        table = head + rest
        (crc,) = struct.unpack_from("<I", table, start - 4)
        if zlib.crc32(table[:-4]) & 0xFFFFFFFF != crc:
            raise IndexFormatError(f"{path}: table checksum mismatch, the file is corrupt")
        offsets = np.frombuffer(table, dtype="<u8", count=count + 1, offset=_FILE_HEADER.size).astype(np.int64)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise IndexFormatError(f"{path}: inconsistent offset table")
        if start + int(offsets[-1]) != size:
            raise IndexFormatError(
                f"{path}: expected {start + int(offsets[-1])} bytes for {count} images, got {size} (truncated or padded)"
            )
        self._offsets = offsets
        self._crcs = np.frombuffer(table, dtype="<u4", count=count, offset=_FILE_HEADER.size + 8 * (count + 1))
        self._start = start

    def __len__(self) -> int:
        return len(self._crcs)

    def __getitem__(self, i) -> LocalFeatures:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise InputError(f"image index: expected an integer, got {i!r}")
        n = len(self)
        if not -n <= i < n:
            raise InputError(f"image index {i} out of range for {n} images in {self.path}")
        i = int(i) % n
        if self._fh.closed:
            raise InputError(f"{self.path}: the feature file is closed")
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        self._fh.seek(self._start + lo)
        blob = self._fh.read(hi - lo)
        if len(blob) != hi - lo or zlib.crc32(blob) & 0xFFFFFFFF != int(self._crcs[i]):
            raise IndexFormatError(f"{self.path}: image {i} fails its checksum, the file is corrupt")
        return unpack_features(blob, f"{self.path} image {i}")

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_features(path) -> list[LocalFeatures]:
    """Every image of a side file written by :func:`save_features`, in order.

    Raises :class:`IndexFormatError` naming the file if it is truncated, of another format or
    version, or fails a checksum.
    """
    with FeatureFile(path) as f:
        return [f[i] for i in range(len(f))]
