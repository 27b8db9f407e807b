"""Landmark boxes mined from a photo collection by retrieval and spatial verification.

No annotation needed: what a photo shares with other photos of the collection, verified by an
affine model, is the object the collection is about (a building, an exhibit). For each image:

1. its local features (cached on disk with the same cache as ``d2r eval``),
2. ASMK* search of an index of the whole collection (codebook trained on the collection)
   for its top-k neighbours, itself excluded,
3. affine RANSAC against each neighbour (:func:`d2r.verify.verify_pair`); a neighbour with
   at least ``min_inliers`` inliers *supports* the image,
4. each supporting neighbour votes for the robust extent of its inliers' locations in the
   image (percentiles plus a margin); the box is the extent of the area that at least
   ``vote_fraction`` of the (weighted) votes cover, one box per image, or None when no
   neighbour verifies.

Voting rather than the union of boxes is what keeps a near-duplicate photo (whose inliers
cover the whole frame, trees and sky included) from blowing the box up to the whole image:
it is one vote among the supporting neighbours. Repeated structure (windows, arches) can give
RANSAC a wrong model with some inliers; ``min_inliers`` and the voting keep those rare. Sky
and foliage have few stable features, so they rarely hold inliers.

    result = d2r_lab.mining.mine_boxes(paths, root="photos/", top_k=20, min_inliers=25)
    result["images"][0]["box"]  # [ymin, xmin, ymax, xmax] in [0, 1], or None

Images outside the collection (``queries=``) are searched and verified against it the same
way and get boxes too (they are not added to the index).

The result is the ``boxes.json`` document (docs/landmark-detector.md); :func:`write_boxes`
writes it atomically. The two stages are separate so that box parameters can be tuned
without re-running retrieval: :func:`collect_evidence` then :func:`box_from_evidence`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r import verify
from d2r._files import atomic_write
from d2r.errors import InputError

from .evaluation import _progress

__all__ = [
    "BOXES_FORMAT",
    "BOXES_VERSION",
    "BoxParams",
    "Evidence",
    "Support",
    "box_from_evidence",
    "collect_evidence",
    "document",
    "list_images",
    "load_boxes",
    "mine_boxes",
    "write_boxes",
]

BOXES_FORMAT = "d2r-boxes"
BOXES_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
GRID = 64  # vote grid cells per side (normalised coordinates)


@dataclass
class Support:
    """One verified neighbour of an image.

    neighbour: its position in the collection; score: its ASMK* similarity; inliers: RANSAC
    inlier count; points: float32 [inliers, 2] the inliers' (y, x) pixel locations in the image.
    """

    neighbour: int
    score: float
    inliers: int
    points: np.ndarray


@dataclass
class Evidence:
    """What retrieval and verification found for one image: its size (height, width) and
    every neighbour verified, best first (inliers may be below any threshold)."""

    shape: tuple
    supports: list = field(default_factory=list)


@dataclass(frozen=True)
class BoxParams:
    """How verified inliers become a box.

    min_inliers: a neighbour supports the image with at least this many inliers.
    min_support: no box unless at least this many neighbours support the image (two
        independent verifications rarely agree by chance).
    max_support: use only the best-verified this-many supporting neighbours.
    percentile: robust extent of one neighbour's inliers: the [p, 100 - p] percentiles.
    margin: grow that extent by this fraction of its side on each side (inlier features sit
        inside an object's outline; its edge itself carries few keypoints).
    vote_fraction: the box covers the cells that at least this fraction of the votes cover.
    weighting: "equal" (one vote per neighbour) or "sqrt" (sqrt of inliers).
    """

    min_inliers: int = 25
    min_support: int = 1
    max_support: int = 10
    percentile: float = 2.0
    margin: float = 0.05
    vote_fraction: float = 0.3
    weighting: str = "equal"

    def check(self) -> "BoxParams":
        if int(self.min_inliers) < verify.MIN_MATCHES:
            raise InputError(f"min_inliers: expected >= {verify.MIN_MATCHES} (3 points fit any affine model), got {self.min_inliers}")
        if int(self.min_support) < 1:
            raise InputError(f"min_support: expected >= 1, got {self.min_support}")
        if int(self.max_support) < int(self.min_support):
            raise InputError(f"max_support: expected >= min_support ({self.min_support}), got {self.max_support}")
        if not 0.0 <= float(self.percentile) < 50.0:
            raise InputError(f"percentile: expected a value in [0, 50), got {self.percentile}")
        if not 0.0 <= float(self.margin) <= 1.0:
            raise InputError(f"margin: expected a fraction in [0, 1], got {self.margin}")
        if not 0.0 < float(self.vote_fraction) <= 1.0:
            raise InputError(f"vote_fraction: expected a fraction in (0, 1], got {self.vote_fraction}")
        if self.weighting not in ("equal", "sqrt"):
            raise InputError(f"weighting: expected 'equal' or 'sqrt', got {self.weighting!r}")
        return self


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def list_images(source) -> tuple[list[Path], Path]:
    """Image paths of a folder (recursive, sorted) or of a list file (one path a line,
    relative to the list's folder, ``#`` comments); and the root that relative names use."""
    src = Path(source)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise InputError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return paths, src
    if src.is_file():
        if src.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{src}: expected a folder of images or a list file, got one image")
        try:
            lines = src.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{src}: cannot read the image list ({exc})") from None
        paths = []
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            p = p if p.is_absolute() else src.parent / p
            if not p.is_file():
                raise InputError(f"{src}, line {n}: no such image file {p}")
            paths.append(p)
        if not paths:
            raise InputError(f"{src}: the image list names no images")
        return paths, src.parent
    raise InputError(f"{src}: no such folder or list file")


def _check_paths(paths, name: str) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        raise InputError(f"{name}: expected a list of image paths, got one path {paths!r} (use list_images for a folder)")
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(f"{name}: no such image file {p}")
        out.append(p)
    return out


def _positive(value, name: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a positive integer, got {value!r}") from None
    if v < 1 or v != value:
        raise InputError(f"{name}: expected a positive integer, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------
# Stage 1: features, codebook, index, neighbours, verification
# --------------------------------------------------------------------------------------------


def collect_evidence(
    image_paths,
    queries=(),
    *,
    features: str = "xfeat",
    precision: str = "int8",
    backend: str = "tflite",
    codebook=None,
    codebook_size: int = 1024,
    top_k: int = 20,
    verify_features: int = 1000,
    ratio: float | None = None,
    mutual: bool = True,
    cache_dir=None,
    seed: int = 0,
    threads: int | None = None,
    progress=True,
) -> dict:
    """Retrieve and verify the neighbours of every image (and of every query image).

    Returns {"images": [Evidence], "queries": [Evidence], "settings": {...}, "timings": {...},
    "codebook": the Codebook used}.
    ``codebook``: a :class:`d2r.Codebook`, a codebook file, or None to train one of
    ``codebook_size`` words on the collection (seed ``seed``). ``ratio`` and ``mutual``: the
    putative-match filters of :func:`d2r.verify.match` (Lowe's ratio test, mutual nearest
    neighbours; on by default: one-to-one matches keep a textured patch from piling up
    inliers on one feature), on top of the model's descriptor distance threshold.
    """
    from d2r.codebook import Codebook, train_codebook
    from d2r.config import EngineConfig
    from d2r.pipeline import CODEBOOK_SAMPLE, WHOLE_BOX, DescriptorSample, Pipeline, Regions

    from .evaluation import cached_whole, feature_setting, open_cache

    paths = _check_paths(image_paths, "images")
    qpaths = _check_paths(queries, "queries")
    if len(paths) < 2:
        raise InputError(f"images: mining needs at least 2 images (a box is what an image shares with others), got {len(paths)}")
    # The same file twice would verify against itself: a whole-frame box out of nothing.
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise InputError(f"images: {p} is listed twice (also as {seen[key]})")
        seen[key] = p
    for q in qpaths:
        if q.resolve() in seen:
            raise InputError(f"queries: {q} is also in the collection; queries are images outside it")
    top_k = _positive(top_k, "top_k")
    verify_features = _positive(verify_features, "verify_features")
    codebook_size = _positive(codebook_size, "codebook_size")
    if threads is not None:
        import numba

        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]  # set at import
    report = _progress(progress)
    timings = {}
    t0 = time.perf_counter()
    # The pipeline's stages: whole-photo features, ASMK* aggregation and index, verification features.
    config = EngineConfig(features=features, detector=None, kind="asmk_star", backend=backend, precision=precision,
                          verification_features=verify_features)
    pipeline = Pipeline.load(config, threads=threads)
    try:
        ex = pipeline.features.extractor
        match_distance = pipeline.verification.max_distance
        # The same key as d2r eval's, so features extracted by either are shared.
        cache = open_cache(cache_dir, feature_setting(pipeline.feature_entry.sha256, ex))

        def whole(p):
            return cached_whole(cache, ex, p)

        sample = DescriptorSample(len(paths), CODEBOOK_SAMPLE, seed) if codebook is None else None
        vfeats, shapes = [], []
        for i, p in enumerate(paths):
            f, shape = whole(p)
            shapes.append(shape)
            # Features come sorted by score: verification uses the strongest, like d2r eval.
            vfeats.append(pipeline.verification.database_features(f, None))
            if sample is not None:
                sample.add(f.descriptors)
            report("features", i + 1, len(paths))
        timings["features_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        if sample is not None:
            cb = train_codebook(sample.array(ex.dim), codebook_size, seed=seed, n_images=len(paths),
                                progress=lambda it, n, moved: report("k-means", it, n))
            codebook_source = f"trained on the collection, K={codebook_size}, seed {seed}"
        else:
            cb = codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)
            codebook_source = str(codebook) if not isinstance(codebook, Codebook) else f"given, K={cb.size}"
        pipeline.set_codebook(cb)
        stage = pipeline.require_aggregation()
        timings["codebook_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        index = stage.new_index()
        aggs = []
        for i, p in enumerate(paths):
            agg = stage.database(Regions([whole(p)[0]], [WHOLE_BOX]))
            aggs.append(agg)
            stage.add(index, str(i), agg)
            report("index", i + 1, len(paths))
        timings["index_s"] = time.perf_counter() - t2

        def neighbours_of(agg, exclude):
            hits = index.search(agg, top_k=top_k + (1 if exclude is not None else 0))
            return [(int(h.image_id), float(h.score)) for h in hits if int(h.image_id) != exclude][:top_k]

        def evidence_of(f: verify.LocalFeatures, shape, agg, exclude):
            ev = Evidence(shape=shape)
            for j, score in neighbours_of(agg, exclude):
                r = verify.verify_pair(f, vfeats[j], max_distance=match_distance, ratio=ratio, mutual=mutual, seed=seed)
                if r.inliers == 0:
                    continue
                pts = f.locations[r.matches[r.inlier_mask, 0]]
                ev.supports.append(Support(j, score, int(r.inliers), pts.astype(np.float32)))
            ev.supports.sort(key=lambda s: (-s.inliers, -s.score))
            return ev

        t3 = time.perf_counter()
        out_images = []
        for i in range(len(paths)):
            out_images.append(evidence_of(vfeats[i], shapes[i], aggs[i], i))
            report("verification", i + 1, len(paths))
        out_queries = []
        for i, p in enumerate(qpaths):
            f, shape = whole(p)
            lf = pipeline.verification.query_features(f, None)
            out_queries.append(evidence_of(lf, shape, stage.query(f), None))
            report("queries", i + 1, len(qpaths))
        timings["verification_s"] = time.perf_counter() - t3
        index.close()
        settings = {
            "features": features, "precision": precision, "backend": backend, "max_features": ex.max_features,
            "codebook": codebook_source, "codebook_size": cb.size, "top_k": top_k, "verify_features": verify_features,
            "match_max_distance": round(match_distance, 6), "match_ratio": ratio, "match_mutual": bool(mutual),
            "ransac_threshold_px": verify.RESIDUAL_THRESHOLD, "seed": seed,
        }
    finally:
        pipeline.close()
    return {"images": out_images, "queries": out_queries, "settings": settings, "timings": timings, "codebook": cb}


# --------------------------------------------------------------------------------------------
# Stage 2: inliers -> box
# --------------------------------------------------------------------------------------------


def _extent(points: np.ndarray, shape, params: BoxParams) -> np.ndarray:
    """Normalised (ymin, xmin, ymax, xmax) of one neighbour's inlier locations."""
    h, w = shape
    p = float(params.percentile)
    lo = np.percentile(points, p, axis=0)
    hi = np.percentile(points, 100.0 - p, axis=0)
    side = hi - lo
    lo = lo - params.margin * side
    hi = hi + params.margin * side
    return np.array([max(lo[0] / h, 0.0), max(lo[1] / w, 0.0), min(hi[0] / h, 1.0), min(hi[1] / w, 1.0)])


def box_from_evidence(ev: Evidence, params: BoxParams = BoxParams()) -> dict:
    """The box of one image from its verified neighbours.

    Returns {"box": [ymin, xmin, ymax, xmax] normalised or None, "support": number of
    supporting neighbours used, "inliers": their total inliers, "used": [Support]}.
    """
    params.check()
    used = [s for s in ev.supports if s.inliers >= params.min_inliers][: params.max_support]
    if len(used) < params.min_support:
        return {"box": None, "support": 0, "inliers": 0, "used": []}
    votes = np.zeros((GRID, GRID), np.float64)
    total = 0.0
    for s in used:
        b = _extent(s.points, ev.shape, params)
        y0, x0 = int(np.floor(b[0] * GRID)), int(np.floor(b[1] * GRID))
        y1, x1 = int(np.ceil(b[2] * GRID)), int(np.ceil(b[3] * GRID))
        wgt = 1.0 if params.weighting == "equal" else float(np.sqrt(s.inliers))
        votes[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] += wgt
        total += wgt
    # Disjoint extents can leave no cell with that many votes: then the most-voted cells.
    mask = votes >= min(params.vote_fraction * total, votes.max()) - 1e-9
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = [rows[0] / GRID, cols[0] / GRID, (rows[-1] + 1) / GRID, (cols[-1] + 1) / GRID]
    return {"box": [round(float(v), 4) for v in box], "support": len(used), "inliers": int(sum(s.inliers for s in used)), "used": used}


# --------------------------------------------------------------------------------------------
# The whole job and its file
# --------------------------------------------------------------------------------------------


def _relative(p: Path, root: Path | None) -> str:
    """``p`` relative to ``root`` with "/" separators; as given when outside it (or no root)."""
    if root is not None:
        p_abs, root_abs = p.resolve(), root.resolve()
        if p_abs.is_relative_to(root_abs):
            return p_abs.relative_to(root_abs).as_posix()
    return str(p)


def document(evidence: dict, paths, queries=(), root=None, params: BoxParams = BoxParams()) -> dict:
    """The boxes.json document from :func:`collect_evidence`'s result."""
    params.check()
    paths = [Path(p) for p in paths]
    root = Path(root) if root is not None else None

    def entries(evs, ps, rel_root):
        out = []
        for ev, p in zip(evs, ps):
            b = box_from_evidence(ev, params)
            out.append({
                "path": _relative(p, rel_root), "width": int(ev.shape[1]), "height": int(ev.shape[0]), "box": b["box"],
                "support": b["support"], "inliers": b["inliers"],
                "neighbours": [{"path": _relative(paths[s.neighbour], root), "inliers": s.inliers, "score": round(s.score, 5)} for s in b["used"]],
            })
        return out

    doc = {
        "format": BOXES_FORMAT,
        "version": BOXES_VERSION,
        "settings": {**evidence["settings"], "min_inliers": params.min_inliers, "min_support": params.min_support, "max_support": params.max_support,
                     "percentile": params.percentile, "margin": params.margin, "vote_fraction": params.vote_fraction,
                     "weighting": params.weighting, "root": str(root) if root is not None else None},
        "images": entries(evidence["images"], paths, root),
    }
    if len(queries):
        doc["queries"] = entries(evidence["queries"], [Path(q) for q in queries], None)
    return doc


def mine_boxes(
    image_paths,
    queries=(),
    *,
    root=None,
    min_inliers: int = 25,
    min_support: int = 1,
    max_support: int = 10,
    percentile: float = 2.0,
    margin: float = 0.05,
    vote_fraction: float = 0.3,
    weighting: str = "equal",
    **options,
) -> dict:
    """Mine one landmark box per image of a collection (and per query image outside it).

    Args:
        image_paths: the collection's image files (at least 2).
        queries: image files outside the collection: searched and verified against it.
        root: folder that the "path" of each collection image is written relative to.
        min_inliers, min_support, max_support, percentile, margin, vote_fraction, weighting: see
            :class:`BoxParams`.
        options: :func:`collect_evidence`'s (features, precision, backend, codebook,
            codebook_size, top_k, verify_features, ratio, mutual, cache_dir, seed, threads,
            progress).

    Returns:
        the boxes.json document (docs/landmark-detector.md): "images" (and "queries") entries
        with "box" ([ymin, xmin, ymax, xmax] normalised, or None), "support", "inliers",
        "neighbours"; plus "timings" (seconds; not part of the file format).
    """
    params = BoxParams(min_inliers=min_inliers, min_support=min_support, max_support=max_support, percentile=percentile,
                       margin=margin, vote_fraction=vote_fraction, weighting=weighting).check()
    image_paths = _check_paths(image_paths, "images")
    queries = _check_paths(queries, "queries")
    ev = collect_evidence(image_paths, queries, **options)
    doc = document(ev, image_paths, queries, root=root, params=params)
    doc["timings"] = ev["timings"]
    return doc


def write_boxes(doc: dict, path) -> None:
    """Write a boxes.json document atomically (timings left out)."""
    data = {k: v for k, v in doc.items() if k != "timings"}
    atomic_write(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def load_boxes(path) -> dict:
    """Read and check a boxes.json file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read a boxes file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != BOXES_FORMAT:
        raise InputError(f"{path}: not a {BOXES_FORMAT} file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != BOXES_VERSION:
        raise InputError(f"{path}: {BOXES_FORMAT} version {doc.get('version')!r}, this d2r reads version {BOXES_VERSION}")
    if not isinstance(doc.get("images"), list):
        raise InputError(f"{path}: 'images' must be a list")
    for k, e in enumerate(doc["images"] + doc.get("queries", [])):
        box = e.get("box") if isinstance(e, dict) else 0
        if box is not None and not (isinstance(box, list) and len(box) == 4 and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise InputError(f"{path}: entry {k} ({e.get('path') if isinstance(e, dict) else e!r}): "
                             f"box must be [ymin, xmin, ymax, xmax] in [0, 1] or null, got {box!r}")
    return doc
