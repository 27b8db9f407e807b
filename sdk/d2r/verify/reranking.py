"""Verification of image pairs (:func:`verify_pair`: matching then RANSAC) and the re-ranking of
the top R of an initial ranking by inliers (:func:`rerank`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._checks import positive_int, real_number
from ..errors import InputError
from .features import LocalFeatures, _features
from .matching import MAX_DISTANCE, _match_features, _match_params, _precision, _query_side
from .ransac import CONFIDENCE, MAX_TRIALS, RESIDUAL_THRESHOLD, VerifyResult, _ransac_checked, _ransac_params

# Default of docs/algorithm.md section 6.
TOP_R = 100


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
    mp = _match_params(max_distance, ratio, mutual)
    rp = _ransac_params(threshold, max_trials, seed, confidence, refit)
    use_words = _flag(use_words, "use_words")
    side = _query_side(q, _precision(precision))

    def inliers(c: LocalFeatures, name: str) -> int:
        _same_dim(q, c, name)
        return _ransac_checked(q.locations, c.locations, _match_features(q, c, side, mp, use_words), rp).inliers

    return rerank_by(candidates, top_r, inliers)


def rerank_by(candidates: Sequence, top_r: int, inliers: Callable[[LocalFeatures, str], int]) -> list[Reranked]:
    """The re-ranking of :func:`rerank` with any matcher: ``inliers(features, name)`` gives a
    candidate's inlier count (``name`` for its errors). The top ``top_r`` candidates sorted by
    (inliers, initial score), then the others in their order with ``inliers = -1``."""
    top_r = positive_int(top_r, "top_r")
    items = []
    for k, cand in enumerate(candidates):
        if not isinstance(cand, (tuple, list)) or len(cand) != 3:
            raise InputError(f"candidates[{k}]: expected an (id, score, features) triple, got {type(cand).__name__}")
        items.append((cand[0], real_number(cand[1], f"candidates[{k}] score"), cand[2]))
    verified = []
    for k, (cid, score, feats) in enumerate(items[:top_r]):
        name = f"candidates[{k}] features"
        verified.append(Reranked(cid, score, inliers(_features(feats, name), name)))
    # Python's sort is stable: equal (inliers, score) keep the initial order.
    verified.sort(key=lambda r: (-r.inliers, -r.score))
    return verified + [Reranked(cid, score, -1) for cid, score, _ in items[top_r:]]
