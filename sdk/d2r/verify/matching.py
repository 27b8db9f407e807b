"""Putative matches: each query feature's nearest neighbour among a candidate's features,
exhaustively (one GEMM, float32 or int8) or within shared visual words."""

from __future__ import annotations

import numpy as np

from .. import int8_gemm, verify_kernels
from .._checks import descriptors_array, real_number
from ..errors import InputError
from .features import LocalFeatures

# Default of docs/algorithm.md section 6.
MAX_DISTANCE = 0.9


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
