"""``d2r eval``: run one experiment on a dataset folder and score it (Revisited protocol).

An :class:`Experiment` is the pipeline ``d2r build`` ships (an :class:`d2r.config.EngineConfig`,
the same defaults), how its codebook is made, whether the top is verified, and at most a few
lab variants that sit in a stage's slot (feature sources without a converted model, an R-MAC
grid or another photo's boxes as regions, the non-binary kinds). :func:`run` runs it through the
stage objects of :mod:`d2r.pipeline`, the ones :class:`d2r.Engine` runs, with whole-photo
features, detector boxes and crop features cached on disk so that sweeps over codebooks, kinds,
thresholds and box counts are cheap. Metrics come from :mod:`d2r_lab.evaluate`.

R-MAC grid cells pool the whole-image features that fall inside them (a grid of up to 14 cells
per image would multiply extraction time, and the grid is a baseline).
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from d2r import verify
from d2r.aggregate import aggregate
from d2r.codebook import Codebook, train_codebook
from d2r.config import BUILD_VERIFICATION_FEATURES, ENGINE_KINDS, NORMALIZE, QUERY_EXPAND, EngineConfig
from d2r.errors import InputError
from d2r.features import Features
from d2r.image import load_image
from d2r.index import Index
from d2r.manifest import ALIASES
from d2r.pipeline import CODEBOOK_SAMPLE, WHOLE_BOX, DescriptorSample, FeatureStage, Pipeline, Regions

from . import evaluate

# Detector boxes are extracted down to this score (the paper's lowest threshold) and cached.
DETECT_FLOOR = 0.1
# Detector boxes kept per image (the detector's own cap); ``--max-regions`` keeps fewer.
MAX_REGIONS = 25
EVAL_KINDS = ("asmk_star", "rasmk_star", "d2r_asmk_star", "asmk", "rasmk", "naive_rasmk", "vlad", "rvlad")
# Region controls for a detector: its boxes dealt to other photos, or moved to the centre.
BOX_CONTROLS = ("shuffled", "centred")
# Aggregations the Engine does not ship: the lab's baselines.
LAB_KINDS = tuple(k for k in EVAL_KINDS if k not in ENGINE_KINDS)



def rmac_boxes(height: int, width: int, levels: int) -> list:
    """R-MAC regions (Tolias et al.): square cells of side 2*min(H, W)/(l+1) at levels l=1..L,
    evenly spread with about 40% overlap; normalised (ymin, xmin, ymax, xmax)."""
    boxes = []
    short = min(height, width)
    for level in range(1, levels + 1):
        side = 2.0 * short / (level + 1)
        ny = max(1, int(round((height - side) / (side * 0.6))) + 1) if height > side else 1
        nx = max(1, int(round((width - side) / (side * 0.6))) + 1) if width > side else 1
        for iy in range(ny):
            for ix in range(nx):
                y0 = 0.0 if ny == 1 else iy * (height - side) / (ny - 1)
                x0 = 0.0 if nx == 1 else ix * (width - side) / (nx - 1)
                boxes.append((y0 / height, x0 / width, min(1.0, (y0 + side) / height), min(1.0, (x0 + side) / width)))
    return boxes


def parse_regions(value: str):
    """``none`` | ``rmac:L`` | ``detector:NAME@THRESH`` | ``shuffled:NAME@THRESH`` |
    ``centred:NAME@THRESH`` -> (source, parameter).

    ``shuffled`` is a control for the detector: each database image gets the boxes the detector
    found on another database image (a fixed derangement), re-extracted on its own pixels. The
    number, sizes and shapes of the regions are the detector's; only where they fall is not.
    ``centred`` is the zoom control: each image's own detector boxes, moved to the centre of the
    photo (:func:`centred_boxes`): the same count and sizes, so the same upscaling of crops,
    but not where the detector put them.
    """
    if value == "none":
        return "none", None
    if value.startswith("rmac:"):
        try:
            levels = int(value[5:])
        except ValueError:
            levels = 0
        if not 1 <= levels <= 5:
            raise InputError(f"regions: rmac:L needs L in 1..5, got {value!r}")
        return "rmac", levels
    for source in ("detector", "shuffled", "centred"):
        if value.startswith(source + ":"):
            name, _, thresh = value[len(source) + 1:].partition("@")
            try:
                t = float(thresh) if thresh else 0.1
            except ValueError:
                raise InputError(f"regions: expected {source}:NAME@THRESHOLD, got {value!r}") from None
            return source, (name or "ssd", t)
    raise InputError(f"regions: expected none, rmac:L, detector:NAME@THRESH, shuffled:NAME@THRESH or centred:NAME@THRESH, got {value!r}")


def centred_boxes(boxes) -> np.ndarray:
    """Normalised boxes [n, 4] (ymin, xmin, ymax, xmax) of the same heights and widths,
    centred on the photo (0.5, 0.5): float32 [n, 4]."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    h = np.clip(b[:, 2] - b[:, 0], 0.0, 1.0)
    w = np.clip(b[:, 3] - b[:, 1], 0.0, 1.0)
    return np.stack([0.5 - h / 2, 0.5 - w / 2, 0.5 + h / 2, 0.5 + w / 2], axis=1).astype(np.float32)


def _derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) without fixed points (n >= 2): a random cyclic shift order."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, 1)
    return out


def parse_scales(value):
    """``"0.5,0.707,1"`` or a sequence -> tuple of floats; InputError otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise InputError(f"scales: expected comma-separated positive numbers, got {value!r}") from None
    if not out or any(not (0 < v <= 4) for v in out):
        raise InputError(f"scales: expected comma-separated numbers in (0, 4], got {value!r}")
    return out


def feature_setting(model_sha: str, ex) -> str:
    """Cache key material of a model-based extractor: the model file and every extraction setting."""
    setting = f"{model_sha}|{ex.scales}|{ex.max_features}|{ex.score_threshold}"
    if getattr(ex, "fit", "canvas") != "canvas":
        setting += f"|fit {ex.fit}"
    tiles = getattr(ex, "tile_overlap", None)
    if (any(s > 1 for s in ex.scales) or getattr(ex, "fit", "canvas") != "canvas") and tiles is not None:
        setting += f"|tiles {tiles}"
    return setting


class FeatureCache:
    """Features per image on disk, keyed by the model file's sha256, the extractor settings,
    and the sha256 of the image file's bytes (not its path or mtime: a dataset copied, moved
    or provisioned again keeps its cache). One .npz per image and setting."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)
        self._digests: dict = {}  # (path, size, mtime_ns) -> sha256 of the bytes, per process
        self._write_failed = False  # warned once that an entry could not be written

    def _digest(self, image: Path) -> str:
        st = image.stat()
        key = (str(image.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = hashlib.sha256(image.read_bytes()).hexdigest()
        return self._digests[key]

    def _path(self, image: Path, tag: str) -> Path:
        h = hashlib.sha256(f"{self._digest(image)}|{tag}".encode()).hexdigest()[:24]
        return self.dir / f"{h}.npz"

    def get(self, image: Path, tag: str, compute, keys=None):
        """The cached arrays of (image, tag), computed and stored if missing. ``keys``: read
        only these arrays of a stored entry (an .npz reads each array on its own), e.g. a few
        regions of an entry that holds 25; an entry without one of them is recomputed (and
        then returned whole)."""
        path = self._path(image, tag)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return {k: z[k] for k in (z.files if keys is None else keys)}
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is recomputed
        value = compute()
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        try:
            np.savez(tmp, **value)
            os.replace(tmp, path)
        except OSError as e:  # a full disk: keep the result, leave no partial file, go on uncached
            tmp.unlink(missing_ok=True)
            if not self._write_failed:
                print(f"warning: feature cache {self.dir}: cannot write {path.name} ({e.strerror or e}); "
                      "going on without caching", file=sys.stderr)
            self._write_failed = True
        return value


def cached_codebook(cache: FeatureCache, sample: np.ndarray, size, seed: int, n_images: int, progress=None) -> Codebook:
    """:func:`d2r.codebook.train_codebook` on ``sample``, kept in the cache folder: k-means is
    deterministic given the sample, K, seed and iterations, so the key is their hash (a sweep
    over scoring choices trains each seed's K = 8192 codebook once, not once per run)."""
    x = np.ascontiguousarray(sample, np.float32)
    h = hashlib.sha256(x.tobytes())
    h.update(f"|{size}|{seed}|{n_images}|{x.shape}".encode())
    path = Path(cache.dir) / f"codebook-{h.hexdigest()[:24]}.d2rc"
    if path.is_file():
        try:
            return Codebook.load(path)
        except ValueError:  # CodebookError: a damaged entry is trained again
            pass
    cb = train_codebook(x, size, seed=seed, n_images=n_images, progress=progress)
    cb.save(path)  # atomic
    return cb


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/d2r/eval`` (``~/.cache/d2r/eval``): where ``d2r eval`` and
    ``d2r detector mine-boxes`` keep extracted features."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "d2r" / "eval"


def open_cache(cache_dir, setting: str) -> FeatureCache:
    """The feature cache of one extraction ``setting`` (see :func:`feature_setting`)."""
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return FeatureCache(root, hashlib.sha256(setting.encode()).hexdigest()[:16])


def cached_whole(cache: FeatureCache, ex, path):
    """Whole-image features of ``path`` by extractor ``ex``, through ``cache``:
    (Features, (height, width))."""

    def compute():
        rgb = load_image(path)
        out = _pack(ex.extract(rgb))
        out["shape"] = np.array(rgb.shape[:2])
        return out

    d = cache.get(path, "whole+shape", compute)
    return _unpack(d), tuple(int(v) for v in d["shape"])


# The arrays of a cached detection entry without its crops' features, and those of one feature set.
DETECTION_HEAD = ("boxes", "scores", "n")
_FEATURE_KEYS = ("locations", "descriptors", "scores", "scales")


def _pack(f: Features) -> dict:
    return {"locations": f.locations, "descriptors": f.descriptors, "scores": f.scores, "scales": f.scales}


def _unpack(d: dict) -> Features:
    return Features(d["locations"], d["descriptors"], d["scores"], d["scales"])


@dataclass
class Experiment:
    """What ``d2r eval`` measures: the shipped pipeline's configuration (``pipeline``, the
    :class:`d2r.config.EngineConfig` that ``d2r build`` stores in bundle.json), how the codebook
    is made, whether the top is verified, and the lab's variants of a stage that the product
    does not ship (each None = the pipeline's own stage).

    feature_source: ``rootsift`` or ``aliked`` (torch): features without a converted model.
    region_source: ``rmac:L`` (an R-MAC grid pooling whole-photo features) or
        ``shuffled`` (the detector's boxes dealt to other photos: a control) or ``centred``
        (each photo's detector boxes moved to its centre: the zoom control).
    kind: an aggregation the Engine does not ship (``asmk``, ``rasmk``, ``naive_rasmk``, ``vlad``, ``rvlad``).
    """

    pipeline: EngineConfig = field(default_factory=lambda: EngineConfig(verification_features=BUILD_VERIFICATION_FEATURES))
    codebook_size: int | str = "auto"
    codebook: str | Codebook | None = None
    seed: int = 0
    verify_top: int = 0
    verify_precision: str = "int8"
    feature_source: str | None = None
    region_source: str | None = None
    kind: str | None = None
    expand: int = QUERY_EXPAND  # the query expansion of Engine.query (0: off)

    def check(self) -> "Experiment":
        self.pipeline.check()
        if self.kind is not None and self.kind not in LAB_KINDS:
            raise InputError(f"kind: expected one of {', '.join(EVAL_KINDS)}, got {self.kind!r}")
        if self.region_source is not None and self.region_source not in BOX_CONTROLS:
            source, _ = parse_regions(self.region_source)
            if source != "rmac":
                raise InputError(f"region_source: expected rmac:L, shuffled or centred, got {self.region_source!r} (detector regions are pipeline.detector)")
        if self.feature_source is not None:
            from .feature_sources import SOURCES

            if self.feature_source not in SOURCES:
                raise InputError(f"feature_source: expected one of {', '.join(SOURCES)}, got {self.feature_source!r}")
        if self.region_source in BOX_CONTROLS and not self.pipeline.detector:
            raise InputError(f"region_source: the {self.region_source} control moves the detector's boxes; the pipeline has no detector")
        if not 0 <= int(self.pipeline.max_regions) <= MAX_REGIONS:
            raise InputError(f"max_regions: expected 0 to {MAX_REGIONS} (the detector's own cap), got {self.pipeline.max_regions!r}")
        if isinstance(self.expand, bool) or not isinstance(self.expand, int) or self.expand < 0:
            raise InputError(f"expand: expected the number of hits to expand with, 0 or more, got {self.expand!r}")
        if self.verify_precision not in verify.PRECISIONS:
            raise InputError(f"verify_precision: expected one of {', '.join(verify.PRECISIONS)}, got {self.verify_precision!r}")
        if self.verify_top and not self.pipeline.verification_features:
            raise InputError("verify_top: the pipeline keeps no verification features (pipeline.verification_features is 0)")
        kind = self.kind or self.pipeline.kind
        if kind in ("rasmk_star", "d2r_asmk_star", "rasmk", "naive_rasmk", "rvlad") and not self.has_regions:
            raise InputError(f"kind {kind} needs regions (a detector, or region_source rmac:L)")
        return self

    @property
    def has_regions(self) -> bool:
        if self.region_source is not None:
            return True
        return bool(self.pipeline.detector) and self.pipeline.max_regions > 0

    def regions_label(self) -> str:
        if self.region_source in BOX_CONTROLS:
            return f"{self.region_source}:{self.pipeline.detector}@{self.pipeline.detector_threshold:g}"
        if self.region_source is not None:
            return self.region_source
        if not self.pipeline.detector:
            return "none"
        return f"detector:{self.pipeline.detector}@{self.pipeline.detector_threshold:g}"


# The baselines of our comparisons, by name: changes to the default experiment (= what `d2r
# build` ships with its defaults). benchmarks/RESULTS.md names its rows by these.
PRESETS: dict[str, dict] = {
    "default": {},
    "asmk": {"detector": None, "kind": "asmk_star"},
    "d2r-asmk": {"kind": "d2r_asmk_star"},
    "xfeat": {"features": "xfeat"},
    "xfeat-asmk": {"features": "xfeat", "detector": None, "kind": "asmk_star", "codebook_size": 1024},
}


def experiment(preset: str | None = None, base: Experiment | None = None, **changes) -> Experiment:
    """An :class:`Experiment` from a preset (or ``base``) and changes given by name.

    Changes: any :class:`EngineConfig` field (``features``, ``detector``, ``kind``, ...), any
    Experiment field, and the shorthands ``features`` = a feature source (rootsift, aliked),
    ``kind`` = a lab kind, ``regions`` = ``none`` | ``detector:NAME@T`` | ``rmac:L`` |
    ``shuffled[:NAME@T]`` | ``centred[:NAME@T]``, ``verify_words`` = ``verification_words``. None values are ignored.
    """
    from .feature_sources import SOURCES

    if preset is not None and base is not None:
        raise InputError("preset: give a preset or a base experiment, not both")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    exp = copy.deepcopy(base) if base is not None else Experiment()
    changes = {**PRESETS.get(preset or "", {}), **{k: v for k, v in changes.items() if v is not None}}
    cfg = asdict(exp.pipeline)
    fields = set(EngineConfig.__dataclass_fields__)
    if "verify_words" in changes:
        changes["verification_words"] = changes.pop("verify_words")
    if "fit" in changes:
        changes["feature_fit"] = changes.pop("fit")
    if "regions" in changes and changes["regions"] not in ("crop", "pack", "pool"):
        source, param = parse_regions(changes.pop("regions"))
        if source == "none":
            cfg["detector"], exp.region_source = None, None
        elif source == "detector":
            cfg["detector"], cfg["detector_threshold"], exp.region_source = ALIASES.get(param[0], param[0]), param[1], None
        elif source == "rmac":
            exp.region_source = f"rmac:{param}"
        else:
            cfg["detector"], cfg["detector_threshold"], exp.region_source = ALIASES.get(param[0], param[0]), param[1], source
    if changes.get("features") in SOURCES:
        exp.feature_source = changes.pop("features")
    elif "features" in changes:
        from d2r.manifest import load_manifest

        models = sorted({m.name for m in load_manifest().models if m.task == "local_features"})
        if ALIASES.get(changes["features"], changes["features"]) not in models:
            raise InputError(f"features: unknown {changes['features']!r}; expected a local-feature model of the manifest "
                             f"({', '.join(models)}) or a feature source ({', '.join(SOURCES)})")
        exp.feature_source = None
    if "kind" in changes:
        kind = changes.pop("kind")
        if kind in LAB_KINDS:
            exp.kind = kind
        else:
            cfg["kind"], exp.kind = kind, None
    if "scales" in changes and changes["scales"] is not None:
        changes["scales"] = list(parse_scales(changes["scales"]))
    for key, value in changes.items():
        if key in fields:
            cfg[key] = value
        elif key in Experiment.__dataclass_fields__ and key != "pipeline":
            setattr(exp, key, value)
        else:
            raise InputError(f"{key}: not a field of the pipeline configuration or of an experiment")
    if cfg.get("detector") is not None:
        cfg["detector"] = ALIASES.get(cfg["detector"], cfg["detector"])
    exp.pipeline = EngineConfig(**cfg)
    return exp.check()


def experiment_of_bundle(path) -> Experiment:
    """The experiment that evaluates what a bundle ships: its bundle.json's pipeline
    configuration (the codebook is trained on the dataset, with the bundle's K unless changed)."""
    from d2r.engine import read_bundle_info

    info = read_bundle_info(path)
    config = EngineConfig(**info["config"])
    if not config.verification_features:
        config.verification_features = BUILD_VERIFICATION_FEATURES
    from d2r.codebook import Codebook

    size = Codebook.load(Path(path) / "codebook.d2rcb").size
    return Experiment(pipeline=config, codebook_size=size).check()


def _cache_setting(pipeline: Pipeline, ex, feature_source) -> str:
    if feature_source is None:
        setting = feature_setting(pipeline.feature_entry.sha256, ex)
    else:
        setting = ex.setting
    if pipeline.detector_entry is not None:
        setting += f"|{pipeline.detector_entry.sha256}|{pipeline.regions.detector.threshold}"
    return setting


def run(dataset, experiment_: Experiment | str | None = None, *, limit: int | None = None, cache_dir=None, threads: int | None = None,
        progress=True, variants=None, **changes) -> dict:
    """Evaluate one experiment on a dataset folder; the JSON-ready result (mAP in percent).

    experiment_: an :class:`Experiment`, a preset name (:data:`PRESETS`), or None (the
    default: what ``d2r build`` ships). ``changes`` are applied on top (see :func:`experiment`).
    The database and queries run through the stage objects of :mod:`d2r.pipeline`, the same
    ones :class:`d2r.Engine` runs; features, boxes and crops are cached on disk so that
    sweeps are cheap (the cached crops are the region stage's own).
    progress: True (bars on stderr), False, or a callable(what, done, total) that receives the
    same events (``"index"`` reaches total when the database is aggregated).
    variants: scoring variants evaluated over the one aggregated database (a sweep without
    re-aggregation): a list of :class:`Scoring` (or dicts of its fields); the result then has
    ``"variants"``, one entry per variant with its mAP, mP and query time (see :func:`score_variants`).
    """
    from .feature_sources import make_extractor

    if isinstance(experiment_, Experiment):
        exp = experiment(base=experiment_, **changes) if changes else experiment_.check()
    else:
        exp = experiment(experiment_, **changes)
    cfg = exp.pipeline
    kind = exp.kind or cfg.kind
    ds = evaluate.load_dataset(dataset)
    timings = {}
    t0 = time.perf_counter()
    if exp.region_source in BOX_CONTROLS:
        region_source = exp.region_source
    elif exp.region_source:
        region_source = parse_regions(exp.region_source)[0]
    else:
        region_source = "detector" if exp.has_regions else "none"
    # Boxes are detected (and cached) down to DETECT_FLOOR whatever the threshold asked for, and
    # selected by score by the region stage: one extraction serves every threshold >= the floor
    # (NMS keeps a box only against higher-scoring boxes, so the boxes above t are the same).
    if exp.feature_source is None:
        pipeline = Pipeline.load(cfg, threads=threads, detector_threshold=DETECT_FLOOR, detector_max_boxes=MAX_REGIONS)
        ex = pipeline.features.extractor
    else:
        ex = make_extractor(exp.feature_source, threads=threads, max_features=cfg.max_features, scales=cfg.scales,
                            score_threshold=cfg.score_threshold)
        # the detector still comes from the models (on the default feature model's manifest)
        host = Pipeline.load(replace(cfg, features="xfeat", scales=None, max_features=None, score_threshold=None, feature_fit="canvas"),
                             threads=threads, detector_threshold=DETECT_FLOOR, detector_max_boxes=MAX_REGIONS)
        pipeline = Pipeline.compose(cfg, FeatureStage(ex), host.regions.detector, None, host.detector_entry, host._models)
    try:
        return _run(ds, exp, pipeline, ex, kind, region_source, limit, cache_dir, progress, timings, t0, variants)
    finally:
        pipeline.close()


def _run(ds, exp: Experiment, pipeline: Pipeline, ex, kind: str, region_source: str, limit, cache_dir, progress, timings, t0,
         variants=None) -> dict:
    cfg = exp.pipeline
    variants = _check_variants(variants, exp, kind)
    kept = [] if variants else None  # the database's aggregations, for variants with another alpha or tau
    stage = pipeline.regions
    cache = open_cache(cache_dir, _cache_setting(pipeline, ex, exp.feature_source))
    db_paths = ds.image_paths
    q_paths = ds.query_paths[:limit] if limit else ds.query_paths
    report = _progress(progress)

    def whole(p):
        return cached_whole(cache, ex, p)

    def crops(rgb, boxes, out):
        """The region stage's crop features of each box, packed into ``out``."""
        for i, box in enumerate(boxes):
            for k, v in _pack(stage.crop(rgb, box)).items():
                out[f"r{i}_{k}"] = v
        return out

    def unpack_regions(d, keep):
        return [Features(d[f"r{i}_locations"], d[f"r{i}_descriptors"], d[f"r{i}_scores"], d[f"r{i}_scales"]) for i in keep]

    def detections(p, keys=None):
        """The cached detections of a photo (boxes, scores, n and each box's crop features
        r{i}_*); ``keys``: only these arrays."""

        def compute():
            rgb = load_image(p)
            det = stage.detect(rgb)
            out = {"boxes": det.boxes.astype(np.float32), "scores": det.scores.astype(np.float32), "n": np.array([len(det)])}
            return crops(rgb, det.boxes, out) if cfg.regions == "crop" else out

        return cache.get(p, "detector" if cfg.regions == "crop" else "detector-boxes", compute, keys=keys)

    def selected(d) -> np.ndarray:
        n = int(d["n"][0])
        return np.flatnonzero(d["scores"][:n] >= stage.threshold)[: stage.max_regions]

    def packed(p, boxes):
        """regions="pack": the region stage packs the selected boxes together, so a photo's
        crop features depend on which boxes share a canvas: cached per set of boxes."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        tag = f"pack{ex.max_features}-" + hashlib.sha256(boxes.tobytes()).hexdigest()[:16]

        def compute():
            out = {"n": np.array([len(boxes)])}
            for i, feats in enumerate(stage.packed(load_image(p), boxes)):
                for k, v in _pack(feats).items():
                    out[f"r{i}_{k}"] = v
            return out

        got = cache.get(p, tag, compute)
        return unpack_regions(got, range(int(got["n"][0])))

    def detected_regions(p, f, shape):
        d = detections(p, DETECTION_HEAD)
        keep = selected(d)
        if cfg.regions == "pool":
            return [f.in_box(b, shape) for b in d["boxes"][keep]]
        if cfg.regions == "pack":
            return packed(p, d["boxes"][keep])
        # read only the selected boxes' crop features (the entry holds up to MAX_REGIONS)
        return unpack_regions(detections(p, [f"r{i}_{k}" for i in keep for k in _FEATURE_KEYS]), keep)

    def n_regions_of(p, f, shape) -> int:
        """len(regions_of(...).features), without reading the crops' features when the cache has them."""
        if region_source == "detector" and kind not in ("asmk_star", "asmk", "vlad"):
            return 1 + len(selected(detections(p, DETECTION_HEAD)))
        return len(regions_of(p, f, shape).features)

    # The shuffled control: image k takes the boxes of image donor[k] (a derangement, fixed seed).
    if region_source == "shuffled" and len(db_paths) < 2:
        raise InputError(f"region_source {exp.region_source}: the shuffled control needs at least 2 database images")
    donor = _derangement(len(db_paths), seed=12345) if region_source == "shuffled" else None
    db_index = {str(p): k for k, p in enumerate(db_paths)}

    def control_regions(p):
        if region_source == "centred":  # the zoom control: the image's own boxes, centred
            d = detections(p, DETECTION_HEAD)
            boxes = centred_boxes(d["boxes"][selected(d)])
        else:
            d = detections(db_paths[donor[db_index[str(p)]]], DETECTION_HEAD)
            boxes = d["boxes"][selected(d)].astype(np.float32).reshape(-1, 4)
        if cfg.regions == "pack":
            return packed(p, boxes)
        tag = "boxes-" + hashlib.sha256(boxes.tobytes()).hexdigest()[:16]
        got = cache.get(p, tag, lambda: crops(load_image(p), boxes, {"n": np.array([len(boxes)])}))
        return unpack_regions(got, range(int(got["n"][0])))

    def regions_of(p, f, shape) -> Regions:
        if region_source == "none" or kind in ("asmk_star", "asmk", "vlad"):
            boxes, feats = [], []
        elif region_source == "rmac":
            boxes = rmac_boxes(shape[0], shape[1], parse_regions(exp.region_source)[1])
            feats = [f.in_box(b, shape) for b in boxes]
        elif region_source in BOX_CONTROLS:
            feats = control_regions(p)
            boxes = [None] * len(feats)
        else:
            feats = detected_regions(p, f, shape)
            boxes = [None] * len(feats)
        return Regions([f, *feats], [WHOLE_BOX, *boxes])

    # Pass 1: features (and regions) of every image into the disk cache; only the codebook's
    # bounded sample of descriptors stays in memory.
    sample = DescriptorSample(len(db_paths), CODEBOOK_SAMPLE, exp.seed) if exp.codebook is None else None
    n_regions = []
    for i, p in enumerate(db_paths):
        f, shape = whole(p)
        if sample is not None:
            sample.add(f.descriptors)
        n_regions.append(n_regions_of(p, f, shape))
        report("database features" + (" and regions" if region_source != "none" else ""), i + 1, len(db_paths))
    q_feats = []
    for i, p in enumerate(q_paths):
        q_feats.append(whole(p)[0])
        report("query features", i + 1, len(q_paths))
    timings["features_s"] = time.perf_counter() - t0

    t2 = time.perf_counter()
    if sample is not None:
        cb = cached_codebook(cache, sample.array(ex.dim), exp.codebook_size, exp.seed, len(db_paths),
                             progress=lambda it, n, moved: report("k-means", it, n))
        codebook_source = f"trained on the database, K={cb.size}, seed {exp.seed}"
    elif isinstance(exp.codebook, Codebook):
        cb = exp.codebook
        codebook_source = f"given, K={cb.size}"
    else:
        cb = Codebook.load(exp.codebook)
        codebook_source = str(exp.codebook)
    pipeline.set_codebook(cb)
    agg_stage = pipeline.require_aggregation()
    timings["codebook_s"] = time.perf_counter() - t2

    # Pass 2: aggregate image by image from the cache, into the pipeline's index.
    t3 = time.perf_counter()
    index = None
    vectors = None
    if kind in ("vlad", "rvlad"):
        vectors = np.zeros((len(db_paths), cb.size * cb.dim), np.float32)
    elif kind in ENGINE_KINDS:
        index = agg_stage.new_index()
    else:
        index = Index(cb, kind=kind)
    for i, p in enumerate(db_paths):
        f, shape = whole(p)
        regions = regions_of(p, f, shape)
        if kind in ENGINE_KINDS:
            aggregated = agg_stage.database(regions)
            agg_stage.add(index, str(i), aggregated)
            if kept is not None:
                kept.append(aggregated)
        elif kind == "vlad":
            vectors[i] = aggregate(f.descriptors, cb, kind="vlad").vector
        elif kind == "rvlad":
            vectors[i] = aggregate(np.concatenate([r.descriptors for r in regions.features]), cb, kind="rvlad", region_sizes=regions.sizes).vector
        elif kind == "asmk":
            index.add(str(i), aggregate(f.descriptors, cb, kind=kind))
        else:  # rasmk, naive_rasmk
            index.add(str(i), aggregate(np.concatenate([r.descriptors for r in regions.features]), cb, kind=kind, region_sizes=regions.sizes))
        report("index", i + 1, len(db_paths))
    if index is not None:
        tmp = Path(cache.dir) / f"index-{os.getpid()}.d2ri"
        index.save(tmp)
        index_bytes = tmp.stat().st_size
        tmp.unlink()
    else:
        index_bytes = vectors.nbytes
    timings["index_s"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    n = ds.n_images
    ranks = []
    q_times = []
    q_aggs, agg_times = [], []
    for f in q_feats:
        tq = time.perf_counter()
        if vectors is not None:
            scores = vectors @ aggregate(f.descriptors, cb, kind="vlad").vector
            ranks.append(np.argsort(-scores.astype(np.float64), kind="stable"))
        else:
            q = agg_stage.query(f) if kind in ENGINE_KINDS else aggregate(f.descriptors, cb, kind="asmk")
            agg_times.append((time.perf_counter() - tq) * 1e3)
            q_aggs.append(q if len(f) else None)
            hits = index.search(q, top_k=n, pooling=cfg.pooling, expand=exp.expand) if len(f) else []
            ranks.append(_full_ranking(hits, n))
        q_times.append((time.perf_counter() - tq) * 1e3)
    timings["query_ms_median"] = float(np.median(q_times)) if q_times else 0.0

    gnd = ds.gnd[: len(q_paths)]
    per_protocol = {}
    if exp.verify_top:
        tv = time.perf_counter()
        vstage = pipeline.verification
        loaded = {}

        def vfeats(c):
            if c not in loaded:
                loaded[c] = vstage.database_features(whole(db_paths[c])[0], cb)
            return loaded[c]

        q_verify = [vstage.query_features(f, cb) for f in q_feats]
        for protocol in evaluate.PROTOCOLS:
            _, junk = evaluate.protocol_lists(gnd, protocol)
            out = []
            for qi, (qv, r) in enumerate(zip(q_verify, ranks)):
                clean = evaluate.remove_junk(r, junk[qi])
                cands = [(int(c), float(-k), vfeats(int(c)) if k < exp.verify_top else None) for k, c in enumerate(clean)]
                rr = vstage.rerank(qv, cands, exp.verify_top, precision=exp.verify_precision)
                out.append(np.array([x.id for x in rr], dtype=np.int64))
            per_protocol[protocol] = out
        timings["verify_ms_per_query"] = (time.perf_counter() - tv) * 1e3 / max(1, len(q_feats) * 3)
        result = evaluate.compute_map(per_protocol, gnd)
    else:
        result = evaluate.compute_map(ranks, gnd)
    timings["search_s"] = time.perf_counter() - t4
    regions_per_image = float(np.mean(n_regions)) if n_regions else 1.0
    scored = score_variants(variants, index, kept, cb, q_aggs, agg_times, ds.gnd[: len(q_paths)], cfg.pooling, progress=report) if variants else None
    out = result.to_dict()
    regional = region_source in ("detector", *BOX_CONTROLS) and kind not in ("asmk_star", "asmk", "vlad")
    return {
        "dataset": str(ds.root),
        "options": {
            "features": exp.feature_source or cfg.features, "precision": cfg.precision, "backend": cfg.backend, "codebook": codebook_source,
            "codebook_size": cb.size, "kind": kind, "pooling": cfg.pooling, "regions": exp.regions_label(),
            "region_mode": cfg.regions, "max_regions": int(cfg.max_regions) if regional else None,
            "expand": exp.expand, "verify": bool(exp.verify_top), "verify_words": int(cfg.verification_words) if exp.verify_top else None,
            "verify_precision": exp.verify_precision if exp.verify_top else None,
            "max_features": ex.max_features, "scales": list(ex.scales), "score_threshold": ex.score_threshold,
            "fit": getattr(ex, "fit", None),
            "seed": exp.seed,
            "pipeline": asdict(cfg),
        },
        "map": out["map"],
        "mp": {p: out["mp"][p] for p in ("easy", "medium", "hard")},
        "n_queries": len(q_paths),
        "n_evaluated": out["n_evaluated"],
        "n_images": n,
        "regions_per_image": regions_per_image,
        "index_bytes": int(index_bytes),
        "index_bytes_per_image": index_bytes / max(n, 1),
        "timings": timings,
        "table": result.table(),
        **({"variants": scored} if scored is not None else {}),
        "_codebook": cb,  # for sweeps that reuse it (benchmarks/bench_features.py); not in the JSON
        "_rankings": ranks,  # every query's full ranking of the database (positions in imlist), before verification
        "_verified": per_protocol,  # with verification: protocol -> each query's re-ranked list (junk removed)
        # For --report: the Medium ranking of each query (junk kept, as shown to a user).
        "_report": {
            "queries": [str(p) for p in q_paths],
            "images": [str(p) for p in db_paths],
            "rankings": [np.asarray(r[:20]).tolist() for r in (per_protocol["medium"] if exp.verify_top else ranks)],
            "gnd": [{k: np.asarray(g[k]).tolist() for k in ("easy", "hard", "junk")} for g in gnd],
            "ap_medium": [None if np.isnan(v) else float(v) for v in result.protocols["medium"].aps],
        },
    }


def _full_ranking(hits, n: int) -> np.ndarray:
    """Positions in imlist of the hits, then every other image in imlist order."""
    order = [int(h.image_id) for h in hits]
    seen = set(order)
    return np.array(order + [i for i in range(n) if i not in seen], dtype=np.int64)


@dataclass(frozen=True)
class Scoring:
    """A scoring variant of a search over one aggregated database: the selectivity
    (``alpha``, ``tau``; None = the pipeline's), ``normalize`` (``Index.search(normalize=...)``;
    default: what the indexes Engine builds do, ``NORMALIZE``) and query expansion (``expand`` images, weights ``expand_alpha``; default: what
    ``Engine.query`` does, ``QUERY_EXPAND``; 0 = off).

    alpha and tau enter only the similarity (docs/algorithm.md section 4): the stored codes
    are the same, so a variant rebuilds the inverted file from the kept aggregations, it does
    not aggregate again. A bundle stores them in its index header: changing them there means
    rebuilding the index from the same aggregations.
    """

    alpha: float | None = None
    tau: float | None = None
    normalize: bool = NORMALIZE
    expand: int = QUERY_EXPAND
    expand_alpha: float = 3.0

    def label(self, cfg: EngineConfig | None = None) -> str:
        a = self.alpha if self.alpha is not None else (cfg.alpha if cfg else None)
        t = self.tau if self.tau is not None else (cfg.tau if cfg else None)
        out = f"alpha {a:g}, tau {t:g}" + (", normalised" if self.normalize else "")
        if self.expand:
            out += f", QE n={self.expand} a={self.expand_alpha:g}"
        return out


def _check_variants(variants, exp: Experiment, kind: str):
    if not variants:
        return None
    if kind not in ENGINE_KINDS:
        raise InputError(f"variants: scoring variants apply to the Engine's kinds ({', '.join(ENGINE_KINDS)}), not {kind!r}")
    if exp.verify_top:
        raise InputError("variants: scoring variants rank without verification (verify_top=0)")
    out = []
    for v in variants:
        if isinstance(v, dict):
            try:
                v = Scoring(**v)
            except TypeError as exc:
                raise InputError(f"variants: {exc}") from None
        if not isinstance(v, Scoring):
            raise InputError(f"variants: expected Scoring objects or dicts, got {type(v).__name__}")
        out.append(replace(v, alpha=exp.pipeline.alpha if v.alpha is None else float(v.alpha),
                           tau=exp.pipeline.tau if v.tau is None else float(v.tau)))
    return out


def score_variants(variants, index: Index, kept, codebook: Codebook, q_aggs, agg_times, gnd, pooling: str, progress=None) -> list:
    """Rank every query under each :class:`Scoring` variant over the database of ``index``
    (rebuilt from the kept aggregations ``kept`` when alpha or tau differ from the index's);
    each entry: the variant's fields, ``map``, ``mp`` and ``query_ms_median`` (the query's
    aggregation, timed once, plus this variant's search)."""
    report = progress or (lambda what, done, total: None)
    n = len(index)
    indexes = {(index.alpha, index.tau): index}
    out = []
    for k, v in enumerate(variants):
        key = (v.alpha, v.tau)
        if key not in indexes:
            idx = Index(codebook, kind=index.kind, alpha=v.alpha, tau=v.tau)
            for i, aggregated in enumerate(kept):
                if isinstance(aggregated, list):
                    idx.add_regions(str(i), aggregated)
                else:
                    idx.add(str(i), aggregated)
            indexes[key] = idx
        idx = indexes[key]
        ranks, times = [], []
        for q, ta in zip(q_aggs, agg_times):
            ts = time.perf_counter()
            hits = idx.search(q, top_k=n, normalize=v.normalize, pooling=pooling, expand=v.expand, expand_alpha=v.expand_alpha) if q is not None else []
            times.append(ta + (time.perf_counter() - ts) * 1e3)
            ranks.append(_full_ranking(hits, n))
        res = evaluate.compute_map(ranks, gnd).to_dict()
        out.append({**asdict(v), "map": res["map"], "mp": {p: res["mp"][p] for p in ("easy", "medium", "hard")},
                    "query_ms_median": float(np.median(times)) if times else 0.0})
        report("scoring variants", k + 1, len(variants))
    return out


def _thumb_data_uri(path: str, size=(120, 90)) -> str:
    import base64
    import io

    from PIL import Image

    img = Image.fromarray(load_image(path))
    img.thumbnail(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(res: dict, path, top: int = 10) -> None:
    """A self-contained HTML page: the summary table, then per query its ranked thumbnails with
    green (positive, Medium protocol), red (wrong) or grey (junk) borders."""
    import html

    rep = res["_report"]
    o = res["options"]
    rows = []
    for q, (query, ranking, g, ap) in enumerate(zip(rep["queries"], rep["rankings"], rep["gnd"], rep["ap_medium"])):
        positives = set(g["easy"]) | set(g["hard"])
        junk = set(g["junk"])
        cells = []
        for rank, i in enumerate(ranking[:top], start=1):
            cls = "pos" if i in positives else "junk" if i in junk else "neg"
            name = html.escape(Path(rep["images"][i]).name)
            cells.append(f'<figure class="{cls}"><img src="{_thumb_data_uri(rep["images"][i])}" alt="{name}">'
                         f"<figcaption>{rank}. {name}</figcaption></figure>")
        ap_text = "no positives (skipped)" if ap is None else f"AP Medium {ap:.1f}"
        qname = html.escape(Path(query).name)
        rows.append(f'<section><h3>{q + 1}. {qname} <small>{ap_text}</small></h3><div class="row">'
                    f'<figure class="query"><img src="{_thumb_data_uri(query)}" alt="{qname}"><figcaption>query</figcaption></figure>'
                    + "".join(cells) + "</div></section>")
    table = "".join(
        f"<tr><td>{p}</td><td>{res['map'][p]:.2f}</td>" + "".join(f"<td>{v:.2f}</td>" for v in res["mp"].get(p, {}).values()) + "</tr>"
        for p in ("easy", "medium", "hard")
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>d2r eval: {html.escape(Path(res['dataset']).name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #bbb; padding: .2em .6em; text-align: right; }}
.row {{ display: flex; flex-wrap: wrap; gap: 6px; }}
figure {{ margin: 0; padding: 3px; border: 4px solid #ddd; font-size: 11px; width: 120px; }}
figure img {{ display: block; max-width: 120px; max-height: 90px; }}
figure.pos {{ border-color: #2a2; }} figure.neg {{ border-color: #d33; }} figure.junk {{ border-color: #999; }}
figure.query {{ border-color: #333; }}
figcaption {{ overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
</style></head><body>
<h1>d2r eval: {html.escape(res['dataset'])}</h1>
<p>{res['n_queries']} queries, {res['n_images']} images; features {html.escape(o['features'])} {o['precision']} ({o['backend']}),
kind {o['kind']} ({o['pooling']}), regions {html.escape(o['regions'])} ({res['regions_per_image']:.1f} per image),
K = {o['codebook_size']}, verification {'on' if o['verify'] else 'off'}.
Borders: <b style="color:#2a2">positive</b>, <b style="color:#d33">wrong</b>, <b style="color:#999">junk</b> (Medium protocol).</p>
<table><tr><th>protocol</th><th>mAP</th><th>mP@1</th><th>mP@5</th><th>mP@10</th></tr>{table}</table>
{''.join(rows)}
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")


def _progress(enabled):
    if callable(enabled):  # a caller's own callable(what, done, total)
        return enabled
    if not enabled:
        return lambda what, done, total: None
    last = {"t": 0.0}

    def report(what, done, total):
        now = time.monotonic()
        if done == total or now - last["t"] > 2.0:
            last["t"] = now
            print(f"\r{what}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return report


def parse_seeds(value) -> list:
    """``"0"`` or ``"0,1,2"`` -> list of ints (codebook seeds)."""
    try:
        seeds = [int(v) for v in str(value).split(",")]
    except ValueError:
        raise InputError(f"seed: expected an integer or comma-separated integers, got {value!r}") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seed: repeated seed in {value!r}")
    return seeds
