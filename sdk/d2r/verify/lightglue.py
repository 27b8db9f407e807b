"""LightGlue (Lindenberger et al., ICCV 2023) for ALIKED features: learned matching for re-ranking.

The network runs as the pieces ``d2r convert lightglue`` writes (one file per transformer layer
and one for the assignment, TFLite or ONNX, through :func:`d2r.backends.load_model`); this
module runs LightGlue's loop around them in numpy:

- keypoints are normalised by the image size (or, when it is not known, by the keypoints'
  extent, as LightGlue does without an image size) and padded to the files' fixed N, with a
  validity mask (the files make masked keys contribute exactly nothing);
- after layer i < 8, **early exit**: stop when more than ``depth_confidence`` (0.95) of all
  points have a token confidence of at least 0.8 + 0.1 exp(-4 i / 9); **point pruning**: drop
  (mask) the points whose matchability is at most 1 - ``width_confidence`` (0.01) unless they
  are still unconfident;
- the assignment of the exit layer; matches are mutual maxima with probability above
  ``filter_threshold`` (0.1).

``early_exit=False`` runs all 9 layers on all points (depth and width confidence off).

Re-ranking (:meth:`LightGlue.rerank`) counts the inliers of the LightGlue matches under the same
affine RANSAC as :func:`d2r.verify.rerank` and sorts the top R by (inliers, initial score).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .._checks import descriptors_array, positive_int, real_number
from ..errors import InputError, ModelError
from .features import _features
from .ransac import CONFIDENCE, MAX_TRIALS, RESIDUAL_THRESHOLD, _ransac_checked, _ransac_params
from .reranking import TOP_R, Reranked, rerank_by

NAME = "lightglue_aliked"
LAYERS = 9
INPUT_DIM = 128
FILTER_THRESHOLD = 0.1
DEPTH_CONFIDENCE = 0.95
WIDTH_CONFIDENCE = 0.99

Piece = Callable[[dict], dict]


#: the matchers of ``Engine.query(verify=...)``: nearest neighbours (the default) and LightGlue
MATCHERS = ("nn", "lightglue")


def matcher_name(value) -> str | bool:
    """``verify=`` of a query: False, or the matcher's name (True is the default matcher, ``"nn"``)."""
    if value is False or value is None:
        return False
    if value is True:
        return "nn"
    if value in MATCHERS:
        return value
    raise InputError(f"verify: expected True, False or one of {', '.join(MATCHERS)}, got {value!r}")


def check_features(dim: int, name: str | None = None) -> None:
    """Raise :class:`InputError` unless descriptors of dimension ``dim`` fit LightGlue for ALIKED."""
    if dim != INPUT_DIM:
        raise InputError(f"verify='lightglue': LightGlue matches {INPUT_DIM}-D ALIKED-n16 descriptors; {name or 'these features'} "
                         f"gives {dim}-D (build the bundle with features='aliked_n16', or use verify=True)")


def confidence_threshold(layer: int, n_layers: int = LAYERS) -> float:
    """LightGlue's token-confidence threshold after layer ``layer`` (0-based)."""
    return float(np.clip(0.8 + 0.1 * math.exp(-4.0 * layer / n_layers), 0.0, 1.0))


def normalize_keypoints(xy: np.ndarray, size=None) -> np.ndarray:
    """(x, y) pixels [N, 2] -> LightGlue's normalised coordinates: centred on the image and
    divided by half its longer side. ``size``: (width, height); None: 1 + the keypoints' extent."""
    xy = np.asarray(xy, np.float32)
    if size is None:
        size = 1.0 + xy.max(0) - xy.min(0) if len(xy) else np.ones(2, np.float32)
    size = np.asarray(size, np.float32)
    return ((xy - size / 2) / (size.max() / 2)).astype(np.float32)


@dataclass(frozen=True)
class LightGlueMatches:
    """Matches of one image pair.

    Attributes:
        matches: int32 [M, 2] (index in image 0, index in image 1), ascending in image 0.
        scores: float32 [M] match probabilities in (filter_threshold, 1].
        layers: transformer layers run (1 to 9; fewer with early exit).
        kept0, kept1: keypoints of each image still in play at the end (pruning removes the others).
    """

    matches: np.ndarray
    scores: np.ndarray
    layers: int
    kept0: int
    kept1: int


def _clean(name: str) -> str:
    """A file's tensor name -> the piece's own name (TFLite adds ``serving_default_`` and ``:0``)."""
    return re.sub(r":\d+$", "", re.sub(r"^serving_default_", "", name))


class _FilePiece:
    """One loaded piece: inputs by their names in the file, outputs by the manifest's names."""

    def __init__(self, model, entry):
        self.model = model
        self.inputs = [_clean(t.name) for t in model.inputs]
        self.outputs = [o.name for o in entry.outputs]
        if len(self.outputs) != len(model.outputs):
            raise ModelError(f"{entry.path}: {len(model.outputs)} outputs in the file, {len(self.outputs)} in the manifest")

    def __call__(self, feed: dict) -> dict:
        return dict(zip(self.outputs, self.model.run(*[feed[name] for name in self.inputs])))


class LightGlue:
    """LightGlue's host loop over its exported pieces.

    Args:
        pieces: ``{"layer0": f, ..., "layer8": f, "assign": f}``, each a function from a dict of
            float32 arrays to a dict of float32 arrays (see ``converters/d2r_convert/lightglue.py``
            for names and shapes). Use :meth:`load` for the shipped files.
        keypoints: N, the pieces' fixed number of keypoints per image; an image with more is cut
            to its first N (the extractors list keypoints best first).
        early_exit: adaptive depth and point pruning (LightGlue's defaults); False runs all layers on all points.
    """

    def __init__(self, pieces: Mapping[str, Piece], keypoints: int, early_exit: bool = True,
                 filter_threshold: float = FILTER_THRESHOLD, depth_confidence: float = DEPTH_CONFIDENCE,
                 width_confidence: float = WIDTH_CONFIDENCE, models=()):
        missing = [p for p in [f"layer{i}" for i in range(LAYERS)] + ["assign"] if p not in pieces]
        if missing:
            raise ModelError(f"LightGlue needs the pieces layer0..layer{LAYERS - 1} and assign; missing {missing}")
        self.pieces = pieces
        self.keypoints = positive_int(keypoints, "keypoints")
        if not isinstance(early_exit, (bool, np.bool_)):
            raise InputError(f"early_exit: expected True or False, got {early_exit!r}")
        self.early_exit = bool(early_exit)
        self.filter_threshold = real_number(filter_threshold, "filter_threshold")
        self.depth_confidence = real_number(depth_confidence, "depth_confidence") if self.early_exit else -1.0
        self.width_confidence = real_number(width_confidence, "width_confidence") if self.early_exit else -1.0
        self._models = list(models)

    @classmethod
    def load(cls, manifest=None, backend: str = "tflite", precision: str | None = None, keypoints: int | None = None,
             threads: int | None = None, accelerator: str = "cpu", early_exit: bool = True) -> "LightGlue":
        """The pieces of ``lightglue_aliked`` listed in a manifest (default: the shipped ``models/``).

        backend: ``tflite`` or ``onnx``; precision: None picks fp16, then fp32; keypoints: None
        takes the only N the manifest has (an error if several).
        """
        from .. import manifest as manifest_module
        from ..backends import load_model

        if backend not in ("tflite", "onnx"):
            raise InputError(f"backend: expected tflite or onnx, got {backend!r}")
        man = manifest if hasattr(manifest, "models") else manifest_module.load_manifest(manifest)
        entries = [m for m in man.models if m.name == NAME and m.format == backend]
        if not entries:
            raise ModelError(f"{man.path}: no {backend} files of {NAME} (convert them with `d2r convert lightglue`)")
        if precision is None:
            have = {m.precision for m in entries}
            precision = next((p for p in ("fp16", "fp32") if p in have), sorted(have)[0])
        entries = [m for m in entries if m.precision == precision]
        sizes = sorted({int(m.defaults.get("keypoints", 0)) for m in entries})
        if keypoints is None:
            if len(sizes) != 1:
                raise ModelError(f"{man.path}: {NAME} {backend} {precision} exists for N = {sizes}; pass keypoints=")
            keypoints = sizes[0]
        by_piece = {m.geometry.get("piece"): m for m in entries if int(m.defaults.get("keypoints", 0)) == keypoints}
        models: list = []
        pieces: dict[str, Piece] = {}
        try:
            for piece in [f"layer{i}" for i in range(LAYERS)] + ["assign"]:
                if piece not in by_piece:
                    raise ModelError(f"{man.path}: {NAME} {backend} {precision} N = {keypoints} has no piece {piece!r}")
                model = load_model(by_piece[piece].path, backend=backend, threads=threads, accelerator=accelerator)
                models.append(model)
                pieces[piece] = _FilePiece(model, by_piece[piece])
        except BaseException:
            for m in models:
                m.close()
            raise
        return cls(pieces, keypoints, early_exit=early_exit, models=models)

    def close(self) -> None:
        for m in self._models:
            m.close()
        self._models = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ matching
    def _pad(self, xy, desc, size, name: str):
        n = self.keypoints
        desc = descriptors_array(desc, f"{name} descriptors", dim=INPUT_DIM)
        xy = np.asarray(xy, np.float32)
        if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != desc.shape[0]:
            raise InputError(f"{name} keypoints: expected float32 [{desc.shape[0]}, 2] (x, y), got shape {xy.shape}")
        m = min(len(xy), n)
        xy, desc = xy[:m], desc[:m]
        kp = np.zeros((1, n, 2), np.float32)
        kp[0, :m] = normalize_keypoints(xy, size) if m else kp[0, :0]
        d = np.zeros((1, n, INPUT_DIM), np.float32)
        d[0, :m] = desc
        mask = np.zeros((1, n), np.float32)
        mask[0, :m] = 1.0
        return kp, d, mask, m

    def match(self, xy0, desc0, xy1, desc1, size0=None, size1=None) -> LightGlueMatches:
        """Match two images' keypoints.

        xy0, xy1: float32 [N0, 2], [N1, 2] keypoints as (x, y) pixels; desc0, desc1: float32
        [N0, 128], [N1, 128] ALIKED descriptors; size0, size1: (width, height) of the images the
        keypoints come from, or None (normalise by the keypoints' extent). Only the first N
        keypoints of each image are used.
        """
        kp0, d0, mask0, m = self._pad(xy0, desc0, size0, "image 0")
        kp1, d1, mask1, n = self._pad(xy1, desc1, size1, "image 1")
        empty = LightGlueMatches(np.zeros((0, 2), np.int32), np.zeros(0, np.float32), 0, m, n)
        if m == 0 or n == 0:
            return empty
        feed = {"descriptors0": d0, "descriptors1": d1, "keypoints0": kp0, "keypoints1": kp1}
        active0, active1 = mask0[0] > 0, mask1[0] > 0
        out = {}
        for i in range(LAYERS):
            feed["mask0"], feed["mask1"] = mask0, mask1
            out = self.pieces[f"layer{i}"](feed)
            feed = {"states0": out["next_states0"], "states1": out["next_states1"], "keypoints0": kp0, "keypoints1": kp1}
            if i == LAYERS - 1:
                break
            th = confidence_threshold(i)
            c0, c1 = out["confidence0"][0], out["confidence1"][0]
            if self.depth_confidence > 0:
                unsure = int(np.count_nonzero(active0 & (c0 < th)) + np.count_nonzero(active1 & (c1 < th)))
                if 1.0 - unsure / (m + n) > self.depth_confidence:
                    break
            if self.width_confidence > 0:
                for active, z, c, mask in ((active0, out["matchability0"][0], c0, mask0), (active1, out["matchability1"][0], c1, mask1)):
                    keep = _sigmoid(z) > 1.0 - self.width_confidence
                    if self.depth_confidence > 0:
                        keep |= c <= th
                    active &= keep
                    mask[0] = active
            if not active0.any() or not active1.any():
                return LightGlueMatches(empty.matches, empty.scores, i + 1, int(active0.sum()), int(active1.sum()))
        scores = self.pieces["assign"]({"match_descriptors0": out["match_descriptors0"], "match_descriptors1": out["match_descriptors1"],
                                        "matchability0": out["matchability0"], "matchability1": out["matchability1"],
                                        "mask0": mask0, "mask1": mask1})["log_assignment"][0]
        idx0, idx1 = np.flatnonzero(active0), np.flatnonzero(active1)
        pairs, probs = filter_matches(scores[np.ix_(idx0, idx1)], self.filter_threshold)
        return LightGlueMatches(np.stack([idx0[pairs[:, 0]], idx1[pairs[:, 1]]], 1).astype(np.int32), probs,
                                i + 1, len(idx0), len(idx1))

    # ------------------------------------------------------------ re-ranking
    def verify_pair(self, query, candidate, threshold: float = RESIDUAL_THRESHOLD, max_trials: int = MAX_TRIALS,
                    seed: int = 0, confidence: float = CONFIDENCE):
        """LightGlue matches then :func:`d2r.verify.ransac_affine` on two images' features
        (:class:`d2r.verify.LocalFeatures` or (locations (y, x), descriptors) pairs). Returns a
        :class:`d2r.verify.VerifyResult`."""
        q, c = _features(query, "query"), _features(candidate, "candidate")
        rp = _ransac_params(threshold, max_trials, seed, confidence, False)
        return self._verify(q, c, rp)

    def _verify(self, q, c, rp):
        mt = self.match(q.locations[:, ::-1], q.descriptors, c.locations[:, ::-1], c.descriptors).matches
        return _ransac_checked(q.locations, c.locations, mt, rp)

    def rerank(self, query, candidates: Sequence, top_r: int = TOP_R, threshold: float = RESIDUAL_THRESHOLD,
               max_trials: int = MAX_TRIALS, seed: int = 0, confidence: float = CONFIDENCE) -> list[Reranked]:
        """:func:`d2r.verify.rerank` with LightGlue's matches instead of nearest neighbours:
        the top ``top_r`` of ``candidates`` (``(id, score, features)`` best first) sorted by
        (inliers, initial score), then the others with ``inliers = -1``."""
        q = _features(query, "query")
        rp = _ransac_params(threshold, max_trials, seed, confidence, False)
        return rerank_by(candidates, top_r, lambda c, name: self._verify(q, c, rp).inliers)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


def filter_matches(scores: np.ndarray, threshold: float = FILTER_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """LightGlue's match filter on a log assignment [M, N]: mutual row/column maxima whose
    probability exp(score) exceeds ``threshold``. Returns (int [K, 2] pairs ascending in rows,
    float32 [K] probabilities). Ties keep the lowest index."""
    if scores.size == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    j = scores.argmax(1)
    i = scores.argmax(0)
    rows = np.arange(scores.shape[0])
    p = np.exp(scores[rows, j].astype(np.float64))
    ok = (i[j] == rows) & (p > threshold)
    return np.stack([rows[ok], j[ok]], 1), p[ok].astype(np.float32)
