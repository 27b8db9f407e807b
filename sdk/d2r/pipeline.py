"""The pipeline as stage objects, composed from one :class:`d2r.config.EngineConfig`.

    features      FeatureStage       photo -> whole-photo local features
    regions       RegionStage        photo + its features -> regions (detector boxes, each box's features)
    codebook      DescriptorSample   a bounded per-photo sample of descriptors -> k-means
    aggregation   AggregationStage   regions -> R-ASMK* / ASMK* / D2R-ASMK* (database), features -> ASMK* (query)
    index         Index              aggregations -> inverted file, search
    verification  VerificationStage  top features of each photo, matching + RANSAC re-ranking

:class:`d2r.Engine` (build, query, bundles), ``d2r eval`` and box mining
(``d2r_lab``) all run these same objects: what the lab measures is what ``d2r build`` ships.
The lab may put another object with the same methods in a slot (a cached feature stage, an R-MAC
grid as regions), never another copy of the pipeline. docs/algorithm.md states the method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .aggregate import Aggregation, aggregate
from .backends import load_model
from .codebook import Codebook
from .config import NORMALIZE, EngineConfig
from .errors import InputError, ModelError
from .features import Features, LocalFeatureExtractor
from .features.core import box_pixels
from .image import load_image
from .index import Index
from .manifest import ALIASES

log = logging.getLogger("d2r")

# When a model has no file of the requested precision, the nearest one is used instead.
_PRECISION_FALLBACK = {"fp32": ("fp32", "fp16", "int8"), "fp16": ("fp16", "fp32", "int8"), "int8": ("int8", "fp16", "fp32")}
# Codebook training keeps at most this many descriptors (a per-photo sample).
CODEBOOK_SAMPLE = 500_000
# regions="pack": crops per model run (a rows x cols grid of cells on the canvas).
PACK_CELLS = (2, 2)


def find_entry(manifest, name: str, task: str, backend: str, precision: str):
    """The manifest entry of model ``name`` (aliases resolved) for a backend and precision;
    the nearest precision when the model has no file of the one asked for."""
    name = ALIASES.get(name, name)
    cands = [m for m in manifest.models if m.name == name and m.format == backend]
    if not cands:
        names = sorted({m.name for m in manifest.models if m.task == task})
        raise ModelError(f"{manifest.path}: no {backend} model named {name!r} (available {task} models: {names})")
    if cands[0].task != task:
        raise ModelError(f"{manifest.path}: model {name!r} is a {cands[0].task} model, not {task}")
    for prec in _PRECISION_FALLBACK[precision]:
        hits = [m for m in cands if m.precision == prec]
        if hits:
            if prec != precision:
                log.info("d2r: model %r has no %s %s file; using %s", name, precision, backend, prec)
            return hits[0]
    raise ModelError(f"{manifest.path}: no {precision} {backend} file for model {name!r}")


class FeatureStage:
    """Whole-photo local features: a :class:`LocalFeatureExtractor` on a converted model."""

    def __init__(self, extractor):
        self.extractor = extractor

    @property
    def dim(self) -> int:
        return int(self.extractor.dim)

    def __call__(self, image) -> Features:
        return self.extractor.extract(image)


@dataclass
class Regions:
    """A database photo's regions: region 0 is the whole photo (box 0, 0, 1, 1)."""

    features: list
    boxes: list

    @property
    def sizes(self) -> list:
        return [len(f) for f in self.features]


WHOLE_BOX = np.array([0.0, 0.0, 1.0, 1.0], np.float32)


class RegionStage:
    """Region proposal on the database side (docs/algorithm.md section 2): the detector's boxes
    with score >= ``threshold``, the best ``max_regions`` of them, and each box's features:
    re-extracted on the crop (``mode="crop"``) or the whole-photo features inside it (``"pool"``).

    ``detector`` may be None (no regions: the whole photo only). Its own threshold may be lower
    than ``threshold`` (the lab detects once at a floor and selects here).
    """

    def __init__(self, detector, features: FeatureStage, threshold: float, max_regions: int, mode: str = "crop"):
        self.detector = detector
        self.features = features
        self.threshold = float(threshold)
        self.max_regions = int(max_regions)
        self.mode = mode

    @property
    def active(self) -> bool:
        return self.detector is not None and self.max_regions > 0

    def detect(self, rgb: np.ndarray):
        """The detector's :class:`d2r.Detections` of a photo."""
        return self.detector.detect(rgb)

    def select(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Boxes (best first) with score >= threshold, at most ``max_regions``: float32 [n, 4]."""
        keep = np.asarray(scores) >= self.threshold
        return np.asarray(boxes, np.float32).reshape(-1, 4)[keep][: self.max_regions]

    def boxes(self, rgb: np.ndarray) -> np.ndarray:
        if not self.active:
            return np.zeros((0, 4), np.float32)
        det = self.detect(rgb)
        return self.select(det.boxes, det.scores)

    def crop(self, rgb: np.ndarray, box) -> Features:
        """Features re-extracted on the crop of a normalised box, in photo coordinates."""
        y0, x0, y1, x1 = box_pixels(box, rgb.shape)
        patch = rgb[y0:y1, x0:x1]
        sub = self.features(patch) if patch.shape[0] and patch.shape[1] else Features.empty(self.features.dim)
        sub.locations = sub.locations + np.array([y0, x0], np.float32)
        return sub

    def packed(self, rgb: np.ndarray, boxes) -> list:
        """Features of the crops of ``boxes``, four crops per model run (``regions="pack"``:
        :meth:`d2r.LocalFeatureExtractor.extract_crops`, each crop fitted into a quarter of the
        canvas); a feature stage that cannot pack extracts each crop on its own. About 3 model
        runs per photo instead of 9; it keeps XFeat's mAP but costs ALIKED-t16 its regions' gain
        (benchmarks/RESULTS.md, "Build time per photo"), so ``crop`` stays the default."""
        ex = getattr(self.features, "extractor", None)
        if ex is None or not hasattr(ex, "extract_crops"):
            return [self.crop(rgb, b) for b in boxes]
        return ex.extract_crops(rgb, boxes, cells=PACK_CELLS)

    def region_features(self, rgb: np.ndarray, whole: Features, boxes) -> list:
        if self.mode == "pool":
            return [whole.in_box(b, rgb.shape) for b in boxes]
        if self.mode == "pack":
            return self.packed(rgb, boxes)
        return [self.crop(rgb, b) for b in boxes]

    def __call__(self, rgb: np.ndarray, whole: Features) -> Regions:
        boxes = self.boxes(rgb)
        return Regions([whole, *self.region_features(rgb, whole, boxes)], [WHOLE_BOX, *boxes])


class DescriptorSample:
    """The codebook's training sample, gathered photo by photo in bounded memory: each photo
    gives at most ``ceil(max_descriptors / n_photos)`` descriptors, drawn without replacement
    (seeded), so the sample never exceeds ``max_descriptors`` however large the collection."""

    def __init__(self, n_photos: int, max_descriptors: int = CODEBOOK_SAMPLE, seed: int = 0):
        self.per_photo = -(-int(max_descriptors) // max(int(n_photos), 1))
        self.rng = np.random.default_rng(seed)
        self.parts: list = []

    def add(self, descriptors: np.ndarray) -> None:
        n = len(descriptors)
        if n > self.per_photo:
            descriptors = descriptors[np.sort(self.rng.choice(n, size=self.per_photo, replace=False))]
        self.parts.append(np.asarray(descriptors, np.float32))

    def array(self, dim: int) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros((0, dim), np.float32)


class AggregationStage:
    """Aggregation of a database photo's regions and of a query's features, and the index
    they go in. ``kind``: ``rasmk_star`` (R-ASMK*: one aggregation over the photo and its
    regions), ``asmk_star`` (the whole photo only) or ``d2r_asmk_star`` (one ASMK* item per region)."""

    def __init__(self, codebook: Codebook, kind: str, approximate: bool = False, alpha: float = 3.0, tau: float = 0.0):
        self.codebook = codebook
        self.kind = kind
        self.approximate = bool(approximate)
        self.alpha, self.tau = alpha, tau

    def new_index(self) -> Index:
        index_kind = "asmk_star" if self.kind == "d2r_asmk_star" else self.kind
        return Index(self.codebook, kind=index_kind, alpha=self.alpha, tau=self.tau, normalize=NORMALIZE)

    def database(self, regions: Regions):
        """An :class:`Aggregation` (or, for d2r_asmk_star, one per region)."""
        cb, ap = self.codebook, self.approximate
        if self.kind == "rasmk_star":
            allx = np.concatenate([f.descriptors for f in regions.features])
            return aggregate(allx, cb, kind="rasmk_star", region_sizes=regions.sizes, approximate=ap)
        if self.kind == "asmk_star":
            return aggregate(regions.features[0].descriptors, cb, kind="asmk_star", approximate=ap)
        return [aggregate(f.descriptors, cb, kind="asmk_star", approximate=ap) for f in regions.features]

    def add(self, index: Index, image_id: str, aggregated, metadata=None) -> None:
        if isinstance(aggregated, Aggregation):
            index.add(image_id, aggregated, metadata=metadata)
        else:
            index.add_regions(image_id, aggregated, metadata=metadata)

    def query(self, features: Features) -> Aggregation:
        """The query is the whole photo, ASMK* (docs/algorithm.md: no detector at query time)."""
        return aggregate(features.descriptors, self.codebook, kind="asmk_star", approximate=self.approximate)


class VerificationStage:
    """Spatial verification (docs/algorithm.md section 6): the top ``n_features`` whole-photo
    features of each photo (with their nearest visual word when ``words`` > 0), putative
    matches within ``max_distance``, affine RANSAC, re-ranking by inliers."""

    def __init__(self, n_features: int, words: int, max_distance: float, approximate: bool = False):
        self.n_features = int(n_features)
        self.words = int(words)
        self.max_distance = float(max_distance)
        self.approximate = bool(approximate)

    def database_features(self, whole: Features, codebook: Codebook | None):
        from .verify import LocalFeatures

        n = self.n_features
        words = codebook.assign(whole.descriptors[:n], approximate=self.approximate) if self.words and codebook is not None else None
        return LocalFeatures(whole.locations[:n], whole.descriptors[:n], words)

    def query_features(self, features: Features, codebook: Codebook | None):
        from .verify import LocalFeatures

        n = self.n_features
        words = None
        if self.words and codebook is not None:
            words = codebook.assign(features.descriptors[:n], multiple=min(self.words, codebook.size), approximate=self.approximate)
        return LocalFeatures(features.locations[:n], features.descriptors[:n], words)

    def rerank(self, query, candidates, top: int, precision: str = "int8") -> list:
        """``candidates``: ``(id, score, features or None)`` best first; the re-ranked list of
        :class:`d2r.verify.Verified` (``id``, ``inliers``)."""
        from .verify import rerank

        return rerank(query, candidates, top_r=top, max_distance=self.max_distance, precision=precision)


def match_distance(feature_entry) -> float:
    """Putative-match distance for verification: from the model's ``match_min_cosine``
    (unit descriptors: |a - b| = sqrt(2 - 2 cos)); 0.9 (DELF, docs/algorithm.md) otherwise."""
    cos = ((feature_entry.defaults if feature_entry is not None else None) or {}).get("match_min_cosine")
    return float(np.sqrt(2.0 - 2.0 * cos)) if cos is not None else 0.9


class Pipeline:
    """The stages of one configuration, with their models loaded.

    Build with :meth:`load`. ``aggregation`` exists once a codebook is set (:meth:`set_codebook`).
    """

    def __init__(self, config: EngineConfig, features: FeatureStage, regions: RegionStage, verification: VerificationStage,
                 feature_entry=None, detector_entry=None, models=()):
        self.config = config
        self.features = features
        self.regions = regions
        self.verification = verification
        self.feature_entry = feature_entry
        self.detector_entry = detector_entry
        self.aggregation: AggregationStage | None = None
        self._models = list(models)

    @classmethod
    def load(cls, config: EngineConfig, manifest=None, *, threads: int | None = None, accelerator: str = "cpu",
             detector_threshold: float | None = None, detector_max_boxes: int | None = None) -> "Pipeline":
        """Load the models of ``config`` from the manifest (default: the shipped ``models/``).

        detector_threshold / detector_max_boxes: let the detector itself keep more boxes than
        the configuration selects (the lab detects once at a floor and caches); the region
        stage still selects ``config.detector_threshold`` and ``config.max_regions``.
        """
        from . import manifest as manifest_module

        config = config.check()
        man = manifest if hasattr(manifest, "models") else manifest_module.load_manifest(manifest)
        fe = find_entry(man, config.features, "local_features", config.backend, config.precision)
        de = find_entry(man, config.detector, "detector", config.backend, config.precision) if config.detector else None
        return cls.load_entries(config, fe, de, threads=threads, accelerator=accelerator, detector_threshold=detector_threshold,
                                detector_max_boxes=detector_max_boxes)

    @classmethod
    def load_entries(cls, config: EngineConfig, feature_entry, detector_entry=None, *, threads: int | None = None, accelerator: str = "cpu",
                     detector_threshold: float | None = None, detector_max_boxes: int | None = None) -> "Pipeline":
        """Load the models of the given manifest entries (e.g. a bundle's own ``models/``)."""
        from .detect import Detector

        config = config.check()
        fe, de = feature_entry, detector_entry
        models = []
        try:
            fmodel = load_model(fe.path, backend=config.backend, threads=threads, accelerator=accelerator)
            models.append(fmodel)
            extractor = LocalFeatureExtractor(fmodel, scales=config.scales, max_features=config.max_features,
                                              score_threshold=config.score_threshold, entry=fe, fit=config.feature_fit)
            detector = None
            if de is not None:
                dmodel = load_model(de.path, backend=config.backend, threads=threads, accelerator=accelerator)
                models.append(dmodel)
                t = config.detector_threshold if detector_threshold is None else min(detector_threshold, config.detector_threshold)
                mb = max(config.max_regions, 1) if detector_max_boxes is None else max(detector_max_boxes, config.max_regions, 1)
                detector = Detector(dmodel, threshold=t, max_boxes=mb, entry=de)
        except BaseException:
            for m in models:
                m.close()
            raise
        return cls.compose(config, FeatureStage(extractor), detector, fe, de, models)

    @classmethod
    def compose(cls, config: EngineConfig, features, detector=None, feature_entry=None, detector_entry=None, models=()) -> "Pipeline":
        """A pipeline from a feature stage (anything with ``dim`` and ``__call__(image)``) and a
        detector (or None): the lab's entry point for other feature sources."""
        regions = RegionStage(detector, features, config.detector_threshold, config.max_regions, config.regions)
        verification = VerificationStage(config.verification_features, config.verification_words, match_distance(feature_entry),
                                          config.approximate_assignment)
        return cls(config, features, regions, verification, feature_entry, detector_entry, models)

    def set_codebook(self, codebook: Codebook | None) -> None:
        self.aggregation = None if codebook is None else AggregationStage(
            codebook, self.config.kind, self.config.approximate_assignment, self.config.alpha, self.config.tau)

    def require_aggregation(self) -> AggregationStage:
        if self.aggregation is None:
            raise InputError("this engine has no codebook yet: pass codebook= to Engine.create or call engine.train_codebook(images) first")
        return self.aggregation

    def database_regions(self, image, whole: Features | None = None) -> tuple[np.ndarray, Regions]:
        """Decode a database photo, extract its features and regions: (rgb, regions).
        ``whole``: the photo's whole-photo features when already extracted (a build's codebook
        pass, :class:`d2r.memo.FeatureMemo`)."""
        rgb = load_image(image)
        if whole is None:
            whole = self.features(rgb)
        if self.config.kind == "asmk_star":  # the aggregation uses the whole photo only
            return rgb, Regions([whole], [WHOLE_BOX])
        return rgb, self.regions(rgb, whole)

    def close(self) -> None:
        for m in self._models:
            m.close()
        self._models = []
