"""The end-to-end Engine and its bundle: what runs on the phone, the Pi and the Jetson.

    engine = d2r.Engine.create(detector="landmark", kind="rasmk_star")   # ALIKED-t16 features
    engine.train_codebook(images)              # K = 8192, fewer for small collections
    engine.add_images(images, ids=..., metadata=...)
    res = engine.query(photo, top_k=10); engine.save("museum.d2r")   # res.hits, res.timings

A bundle is a folder holding everything a device needs, with one ``bundle.json`` that lists
the pipeline configuration, every file with its sha256 and size, and a checksum of itself
(the format: :mod:`d2r.bundle`). ``save`` writes a new folder beside the target and swaps it
in; a reader never sees a half-written bundle. ``save`` replaces only a d2r bundle (or an
empty folder): see :func:`d2r.bundle.check_bundle_target`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from ._checks import positive_int
from ._files import clean_stale
from ._progress import counter as _progress
from ._progress import end_line as _end_progress_line
from ._version import __version__
from .bundle import folder as _bundle
from .bundle.folder import BUNDLE_FORMAT, BUNDLE_VERSION, check_bundle_target, read_bundle_info  # noqa: F401  (re-exported)
from .codebook import Codebook, train_codebook
from .config import ENGINE_KINDS, QUERY_EXPAND, REGION_MODES, EngineConfig  # noqa: F401  (re-exported)
from .errors import BundleError, D2RError, ImageError, InputError, ModelError
from .features import Features
from .image import load_image
from .index import Index
from .manifest import ALIASES as _ALIASES
from .manifest import DEFAULT_FEATURES
from .pipeline import CODEBOOK_SAMPLE, DescriptorSample, Pipeline, find_entry
from .results import Hit, QueryResult

if TYPE_CHECKING:  # verify is imported on first use
    from .verify import FeatureFile
    from .verify.lightglue import LightGlue

log = logging.getLogger("d2r")



def _manifest_module():
    from . import manifest

    return manifest


class Engine:
    """Detect-to-Retrieve on a device: features, regions, aggregation, index, search.

    Made by one of two factories, MediaPipe-style: :meth:`create` (a new collection, from an
    :class:`EngineConfig` or its fields) or :meth:`open` (a saved bundle). The constructor
    loads nothing: it takes a ready :class:`d2r.pipeline.Pipeline`. Close with :meth:`close`
    or use as a context manager.
    """

    def __init__(self, pipeline: Pipeline, codebook: Codebook | None = None, index: Index | None = None, *,
                 threads: int | None = None, accelerator: str = "cpu", bundle_path: Path | None = None, bundle_version: int = 0):
        self.pipeline = pipeline
        self.config = pipeline.config
        self.threads = threads
        self.accelerator = accelerator
        self.codebook = codebook
        self.index = index
        pipeline.set_codebook(codebook)
        self.bundle_path = bundle_path
        self.bundle_version = bundle_version
        # Verification features: packed bytes of images added in this session, and the side
        # file of the bundle this engine was opened from (image_id -> position in it).
        self._vfeats: dict = {}
        self._vfile: FeatureFile | None = None
        self._vfile_ids: dict = {}
        self._lightglue: LightGlue | None = None  # loaded on the first verify="lightglue"
        #: photos left out of this collection because they could not be read: image id (or
        #: file name) -> the reason. Filled by :meth:`train_codebook` and :meth:`add_images`,
        #: saved in bundle.json as ``skipped``.
        self.skipped: dict[str, str] = {}

    # The pipeline's parts, by the names earlier versions used.
    @property
    def extractor(self):
        return self.pipeline.features.extractor

    @property
    def detector(self):
        return self.pipeline.regions.detector

    @property
    def feature_entry(self):
        return self.pipeline.feature_entry

    @property
    def detector_entry(self):
        return self.pipeline.detector_entry

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        options: EngineConfig | str | None = None,
        detector: str | None = "landmark",
        codebook: Codebook | None = None,
        kind: str = "rasmk_star",
        *,
        features: str | None = None,
        backend: str = "tflite",
        precision: str = "int8",
        threads: int | None = None,
        accelerator: str = "cpu",
        manifest=None,
        **fields,
    ) -> "Engine":
        """A new, empty engine.

        options: an :class:`EngineConfig` (the whole pipeline; ``detector``, ``kind``,
        ``backend``, ``precision`` and ``fields`` are then not allowed), or for short the
        local-feature model's name (the first positional argument of earlier versions), or
        None for the default. ``fields`` are other :class:`EngineConfig` fields
        (detector_threshold, max_regions, regions, pooling, alpha, tau, max_features, scales,
        score_threshold, feature_fit, approximate_assignment, verification_features,
        verification_words). Models are loaded here; ``threads`` and ``accelerator`` are
        runtime settings, not part of the configuration.
        """
        if isinstance(options, EngineConfig):
            if fields or features is not None or detector != "landmark" or kind != "rasmk_star" or backend != "tflite" or precision != "int8":
                raise InputError("options: give either an EngineConfig or its fields as keywords, not both")
            config = EngineConfig(**asdict(options))
        else:
            if options is not None and features is not None:
                raise InputError("features: given twice (first argument and features=)")
            unknown = set(fields) - set(EngineConfig.__dataclass_fields__)
            if unknown:
                raise InputError(f"unknown Engine option(s): {', '.join(sorted(unknown))}")
            if detector in ("none", ""):
                detector = None
            if detector is not None:
                detector = _ALIASES.get(detector, detector)
            config = EngineConfig(features=options or features or DEFAULT_FEATURES, detector=detector, kind=kind, backend=backend,
                                  precision=precision, **fields)
        config.check()
        if codebook is not None and not isinstance(codebook, Codebook):
            raise InputError(f"codebook: expected a d2r.Codebook, got {type(codebook).__name__}")
        pipeline = Pipeline.load(config, manifest, threads=threads, accelerator=accelerator)
        engine = cls(pipeline, codebook, None, threads=threads, accelerator=accelerator)
        if codebook is not None:
            engine._new_index()
        return engine

    @classmethod
    def _assemble(cls, config: EngineConfig, feature_entry, detector_entry, codebook, index, threads=None, accelerator="cpu",
                  bundle_path=None, bundle_version=0) -> "Engine":
        """An engine on the given manifest entries (a bundle's own models)."""
        pipeline = Pipeline.load_entries(config, feature_entry, detector_entry, threads=threads, accelerator=accelerator)
        return cls(pipeline, codebook, index, threads=threads, accelerator=accelerator, bundle_path=bundle_path,
                   bundle_version=bundle_version)

    def _new_index(self):
        self.pipeline.set_codebook(self.codebook)
        self.index = self.pipeline.require_aggregation().new_index()

    def close(self) -> None:
        self.pipeline.close()
        if self.index is not None:
            self.index.close()
        if self._vfile is not None:
            self._vfile.close()
        if self._lightglue is not None:
            self._lightglue.close()
            self._lightglue = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        n = len(self.index) if self.index is not None else 0
        return f"<d2r.Engine features={self.config.features} detector={self.config.detector} kind={self.config.kind} images={n}>"

    # -- features and regions -------------------------------------------------------------------
    def extract(self, image) -> Features:
        """Whole-image local features."""
        return self.pipeline.features(load_image(image))

    def regions(self, image) -> tuple[list, list]:
        """Database-side regions: (list of Features, list of boxes); region 0 is the whole image.

        Boxes come from the detector (score >= detector_threshold, at most max_regions); each
        region's features are re-extracted on the crop (``regions="crop"``, docs/algorithm.md
        section 2) or taken from the whole-image features inside the box (``"pool"``).
        """
        _, regions = self.pipeline.database_regions(image)
        return regions.features, regions.boxes

    # -- codebook ---------------------------------------------------------------------------------
    def train_codebook(self, images, size: int | str = "auto", iterations: int = 20, seed: int = 0, max_descriptors: int = CODEBOOK_SAMPLE,
                       progress=True, on_error: str = "skip", memo=None) -> Codebook:
        """Train the codebook on whole-image features of ``images`` (paths or arrays).

        size: K, or ``"auto"`` (default): 8192 words, fewer when the images give fewer than 39
        descriptors per word (:func:`d2r.codebook.auto_size`; 512 for the 24 demo photos).
        Uses at most ``max_descriptors``: an equal share per image, drawn at random (seeded).
        Replaces the engine's codebook and starts an empty index (images added before are
        dropped: their words belonged to the old codebook). on_error: ``"skip"`` (default)
        leaves out a photo that cannot be read and records it in :attr:`skipped`; ``"raise"``
        raises its :class:`ImageError`. memo: a :class:`d2r.memo.FeatureMemo` that keeps each
        photo's features for :meth:`add_images` (a build extracts each photo once).
        """
        images = list(images)
        _check_on_error(on_error)
        if not images:
            raise InputError("images: no images to train a codebook on")
        report = _progress(progress, "features", len(images), unit="photos")
        sample = DescriptorSample(len(images), max_descriptors, seed)
        for i, img in enumerate(images):
            try:
                whole = self.extract(img)
                sample.add(whole.descriptors)
                if memo is not None:
                    memo.put(img, whole)
            except ImageError as exc:
                if on_error == "raise":
                    raise
                self._skip(img, i, exc)
            report(i + 1)
        kreport = _progress(progress, "k-means", iterations)
        self.codebook = train_codebook(sample.array(self.pipeline.features.dim), size, iterations=iterations, seed=seed, n_images=len(images),
                                       progress=lambda it, total, moved: kreport(it))
        self._new_index()
        return self.codebook

    # -- database -------------------------------------------------------------------------------
    def _require_index(self) -> tuple[Codebook, Index]:
        if self.codebook is None or self.index is None:
            raise InputError("this engine has no codebook yet: pass codebook= to Engine.create or call engine.train_codebook(images) first")
        return self.codebook, self.index

    def add_image(self, image, image_id: str, metadata=None, whole: Features | None = None) -> int:
        """Index one image; returns the number of regions stored (1 + detected boxes).
        whole: its whole-photo features, when already extracted."""
        codebook, _ = self._require_index()
        stage = self.pipeline.require_aggregation()
        _, regions = self.pipeline.database_regions(image, whole)
        packed = None
        if self.config.verification_features:
            from .verify import pack_features

            packed = pack_features(self.pipeline.verification.database_features(regions.features[0], codebook))
        self.add_aggregated(image_id, stage.database(regions), metadata, packed)
        return len(regions.features)

    def add_aggregated(self, image_id: str, aggregated, metadata=None, verification: bytes | None = None) -> None:
        """Index one image whose regions were aggregated elsewhere (:meth:`add_image` does both;
        a distributed build's workers aggregate and its driver adds, in the same order).

        aggregated: what ``pipeline.aggregation.database(regions)`` returns with this engine's
        codebook; verification: the image's packed verification features
        (:func:`d2r.verify.pack_features`), required when the configuration keeps them.
        """
        _, index = self._require_index()
        if self.config.verification_features and not isinstance(verification, (bytes, bytearray)):
            raise InputError(f"verification: image {image_id!r} needs its packed verification features "
                             f"(verification_features is {self.config.verification_features})")
        self.pipeline.require_aggregation().add(index, image_id, aggregated, metadata)
        if verification is not None:  # after the index took it (a duplicate id changes nothing)
            self._vfeats[image_id] = bytes(verification)

    def add_images(self, paths_or_images, ids=None, metadata=None, progress=True, on_error: str = "skip", memo=None) -> list:
        """Index several images. ids default to the file names (without folder) of paths.

        metadata: None, a list (one dict per image) or a dict image_id -> dict.
        on_error: ``"skip"`` (default) leaves out an image that cannot be read (corrupt,
        truncated, not an image, too many pixels) and records it in :attr:`skipped`, so one
        bad photo never stops a batch; ``"raise"`` raises its :class:`ImageError` instead.
        memo: the :class:`d2r.memo.FeatureMemo` given to :meth:`train_codebook` (whole-photo
        features not extracted again). Returns the ids added.
        """
        _check_on_error(on_error)
        items = list(paths_or_images)
        if ids is None:
            ids = []
            for i, item in enumerate(items):
                if isinstance(item, (str, os.PathLike)):
                    ids.append(Path(item).name)
                else:
                    raise InputError(f"ids: required when images are not paths (item {i} is {type(item).__name__})")
        ids = [str(v) for v in ids]
        if len(ids) != len(items):
            raise InputError(f"ids: {len(ids)} ids for {len(items)} images")
        if len(set(ids)) != len(ids):
            raise InputError("ids: duplicate image ids")
        if isinstance(metadata, dict):
            metas = [metadata.get(i) for i in ids]
        elif metadata is None:
            metas = [None] * len(items)
        else:
            metas = list(metadata)
            if len(metas) != len(items):
                raise InputError(f"metadata: {len(metas)} entries for {len(items)} images")
        report = _progress(progress, "index", len(items), unit="photos")
        added = []
        for n, (item, image_id, meta) in enumerate(zip(items, ids, metas)):
            try:
                self.add_image(item, image_id, meta, whole=memo.get(item) if memo is not None else None)
            except ImageError as exc:
                if on_error == "raise":
                    raise
                self._skip(image_id, n, exc)
            else:
                added.append(image_id)
                self.skipped.pop(image_id, None)
            report(n + 1)
        return added

    def _skip(self, item, position: int, exc: Exception) -> None:
        key = item if isinstance(item, str) else Path(item).name if isinstance(item, os.PathLike) else f"#{position}"
        self.skipped[key] = str(exc)
        _end_progress_line()
        log.warning("d2r: skipped %s: %s", key, exc)

    def remove(self, image_id: str) -> None:
        _, index = self._require_index()
        index.remove(image_id)

    # -- query ----------------------------------------------------------------------------------
    def match_distance(self) -> float:
        """Putative-match distance for verification (see :func:`d2r.pipeline.match_distance`)."""
        return self.pipeline.verification.max_distance

    def _verification_features(self, image_id: str):
        from .verify import unpack_features

        if image_id in self._vfeats:
            return unpack_features(self._vfeats[image_id], image_id)
        if self._vfile is not None and image_id in self._vfile_ids:
            return self._vfile[self._vfile_ids[image_id]]
        return None

    def query(self, image, top_k: int = 10, normalize: bool | None = None, verify: bool | str = False, verify_top: int = 100,
              expand: int = QUERY_EXPAND, expand_alpha: float = 3.0) -> QueryResult:
        """Rank the indexed images for a query photo (whole image, no detector: docs/algorithm.md).

        expand: query expansion (:meth:`d2r.Index.search`): the query merged with its ``expand``
        best images (default 3, ``d2r.config.QUERY_EXPAND``; 0: off), searched again. normalize:
        None = the index header's (``d2r.config.NORMALIZE`` for built ones, off for older).
        verify: re-rank the top ``verify_top`` by RANSAC inliers, then initial score
        (docs/algorithm.md section 6); needs an engine built with ``verification_features > 0``.
        True or ``"nn"``: putative matches by nearest neighbours (the default matcher);
        ``"lightglue"``: LightGlue's matches (:mod:`d2r.verify.lightglue`, the "accurate"
        setting: needs 128-D ALIKED-n16 features and the converted LightGlue files in the models'
        manifest; about a second per verified photo on one core, docs/usage.md).
        Verified hits carry their inlier count (:attr:`d2r.Hit.inliers`).
        """
        if verify is not False:
            from .verify.lightglue import matcher_name

            verify = matcher_name(verify)
        top_k = positive_int(top_k, "top_k")
        verify_top = positive_int(verify_top, "verify_top")
        codebook, index = self._require_index()
        stages = self.pipeline
        if verify and not self.config.verification_features:
            raise InputError("verify: this bundle stores no verification features (build it with verification_features=1000)")
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        rgb = load_image(image)
        t1 = time.perf_counter()
        feats = stages.features(rgb)
        t2 = time.perf_counter()
        agg = stages.require_aggregation().query(feats)
        t3 = time.perf_counter()
        hits: list[Hit]
        if len(feats) == 0:  # a blank or tiny photo: nothing to compare, so nothing matches
            hits = []
        else:
            hits = index.search(agg, top_k=max(top_k, verify_top) if verify else top_k, normalize=normalize, pooling=self.config.pooling,
                                expand=expand, expand_alpha=expand_alpha)
        t4 = time.perf_counter()
        t.update(load_image=(t1 - t0) * 1e3, features=(t2 - t1) * 1e3, aggregation=(t3 - t2) * 1e3, search=(t4 - t3) * 1e3)
        if verify:
            from .verify import LocalFeatures

            q = stages.verification.query_features(feats, codebook)
            none = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, feats.descriptors.shape[1]), np.float32))
            cands = [(h, h.score, (self._verification_features(h.image_id) or none) if i < verify_top else None) for i, h in enumerate(hits)]
            if verify == "lightglue":
                ranked = self._lightglue_matcher(q.descriptors.shape[1]).rerank(q, cands, verify_top)
            else:
                ranked = stages.verification.rerank(q, cands, verify_top)
            # the ids given to rerank are the hits; a verified hit carries its inliers
            hits = [replace(cast(Hit, r.id), inliers=int(r.inliers)) if r.inliers >= 0 else cast(Hit, r.id) for r in ranked]
            t["verify"] = (time.perf_counter() - t4) * 1e3
        t["total"] = (time.perf_counter() - t0) * 1e3
        return QueryResult(list(hits[:top_k]), t, len(feats))

    def _lightglue_matcher(self, dim: int):
        """LightGlue from the models' manifest (``$D2R_MODELS_DIR`` or the shipped ``models/``), loaded once."""
        from .verify.lightglue import LightGlue, check_features

        check_features(dim, self.feature_entry.name if self.feature_entry is not None else None)
        if self._lightglue is None:
            self._lightglue = LightGlue.load(threads=self.threads, accelerator=self.accelerator)
        return self._lightglue

    # -- bundles --------------------------------------------------------------------------------
    def save(self, path, version: int | None = None, *, protect=()) -> Path:
        """Write the bundle folder ``path`` atomically (new folder beside it, then swapped in).

        version: bundle version number (default: one more than the bundle this engine was
        opened from, or 1). protect: folders that must survive (e.g. the photos the bundle
        was built from): ``path`` may not be one of them or hold one.

        ``path`` must be new, an empty folder or a d2r bundle holding nothing but its own
        files; anything else raises :class:`BundleError` before any work and is left as it is
        (:func:`check_bundle_target`). Temporaries of an interrupted save of ``path`` are
        removed first (and a bundle lost between the two renames of a swap is restored).
        """
        codebook, index = self._require_index()
        path = Path(path)
        version = int(version if version is not None else self.bundle_version + 1)
        with _bundle.writing(path, protect) as tmp:
            index.save(tmp / "index.d2ri")
            codebook.save(tmp / "codebook.d2rcb")
            if self.config.verification_features:
                from .verify import save_features

                ids = index.image_ids()
                missing = [i for i in ids if self._verification_features(i) is None]
                if missing:
                    raise BundleError(f"{path}: no verification features for {len(missing)} image(s), e.g. {missing[0]!r}")
                save_features(tmp / "features.d2rv", [self._verification_features(i) for i in ids])
                (tmp / "features.ids.json").write_text(json.dumps(ids))
            (tmp / "models").mkdir()
            entries = []
            for entry in (self.feature_entry, self.detector_entry):
                if entry is None:
                    continue
                shutil.copyfile(entry.path, tmp / "models" / Path(entry.file).name)
                if entry.head_path is not None:  # host-side weights (ALIKED's descriptor head)
                    shutil.copyfile(entry.head_path, tmp / "models" / Path(entry.head["file"]).name)
                raw = _raw_entry(entry)
                raw["file"] = Path(entry.file).name
                entries.append(raw)
            (tmp / "models" / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": entries}, indent=1) + "\n")
            _bundle.write_bundle_json(tmp, {
                "version": version,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "d2r_version": __version__,
                "config": asdict(self.config),
                "models": {"features": Path(self.feature_entry.file).name, "detector": Path(self.detector_entry.file).name if self.detector_entry else None},
                "codebook_sha256": codebook.checksum,
                "n_images": len(index),
                "skipped": dict(sorted(self.skipped.items())),
            })
        self.bundle_path = path
        self.bundle_version = version
        return path

    @classmethod
    def open(cls, path, threads: int | None = None, accelerator: str = "cpu", verify: bool = True, mmap: bool = True,
             warm_up: bool = False) -> "Engine":
        """Open a bundle folder written by :meth:`save`.

        verify: check every file's size and sha256 against ``bundle.json`` (models, codebook,
        index) before use; with False only sizes and the index's own header checks are made.
        warm_up: run :meth:`warm_up` before returning, so that the first query is as fast as
        the next (for a kiosk or an app that opens once and queries for hours).
        Raises :class:`BundleError` naming the bundle and the problem (for a malformed
        ``bundle.json``, the field). Temporaries of an interrupted save of ``path`` are removed.
        """
        path = Path(path)
        clean_stale(path)
        info = read_bundle_info(path)

        def bad(field, problem):
            return BundleError(f"{path}: bundle.json: {field}: {problem}")

        config = _bundle.config_from(path, info["config"])
        needed = ["index.d2ri", "codebook.d2rcb", "models/manifest.json"]
        if config.verification_features:
            needed += ["features.d2rv", "features.ids.json"]
        for rel in needed:
            if rel not in info["files"]:
                why = f" (config.verification_features is {config.verification_features})" if rel.startswith("features.") else ""
                raise bad("files", f"does not list {rel}{why}")
        _bundle.check_files(path, info, hashes=verify)
        try:
            codebook = Codebook.load(path / "codebook.d2rcb")
        except D2RError as exc:
            raise BundleError(f"{path}: {exc}") from exc
        if codebook.checksum != info["codebook_sha256"]:
            raise bad("codebook_sha256", "does not match codebook.d2rcb")
        try:
            man = _manifest_module().load_manifest(path / "models" / "manifest.json")
        except D2RError as exc:
            raise BundleError(f"{path}: {exc}") from exc
        entries = []
        for field_name, task in (("features", "local_features"), ("detector", "detector")):
            name = getattr(config, field_name)
            try:
                entries.append(_find_entry(man, name, task, config.backend, config.precision) if name else None)
            except D2RError as exc:
                raise bad(f"config.{field_name}", f"{name!r} with backend {config.backend!r}: {exc}") from exc
        fe, de = entries
        for entry in (fe, de):
            if entry is not None:
                try:
                    entry.verify()
                except ModelError as exc:
                    raise BundleError(f"{path}: {exc}") from exc
        try:
            index = Index.open(path / "index.d2ri", mmap=mmap, codebook=codebook)
        except D2RError as exc:
            raise BundleError(f"{path}: {exc}") from exc
        try:
            index_kind = "asmk_star" if config.kind == "d2r_asmk_star" else config.kind
            if index.kind != index_kind:
                raise bad("config.kind", f"{config.kind!r}, but index.d2ri is of kind {index.kind!r}")
            for field_name in ("alpha", "tau"):
                if float(getattr(config, field_name)) != getattr(index, field_name):
                    raise bad(f"config.{field_name}", f"{getattr(config, field_name)!r}, but index.d2ri has {getattr(index, field_name)!r}")
            if "n_images" in info and info["n_images"] != len(index):
                raise bad("n_images", f"{info['n_images']}, but index.d2ri holds {len(index)} images")
        except BundleError:
            index.close()
            raise
        try:
            engine = cls._assemble(config, fe, de, codebook, index, threads, accelerator, bundle_path=path, bundle_version=info["version"])
        except BundleError:
            index.close()
            raise
        except InputError as exc:  # a config value the model runtime refuses (scales, max_features...)
            index.close()
            raise BundleError(f"{path}: bundle.json: config.{exc}") from exc
        except D2RError as exc:
            index.close()
            raise BundleError(f"{path}: {exc}") from exc
        if config.verification_features:
            from .verify import FeatureFile

            try:
                ids = json.loads((path / "features.ids.json").read_text())
                if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                    raise ValueError("expected a JSON list of image ids")
                engine._vfile_ids = {image_id: i for i, image_id in enumerate(ids)}
                engine._vfile = FeatureFile(path / "features.d2rv")
            except (OSError, ValueError, D2RError) as exc:
                engine.close()
                raise BundleError(f"{path}: verification features unusable ({exc})") from exc
        engine.skipped = dict(info.get("skipped", {}))
        if warm_up:
            engine.warm_up()
        return engine

    def warm_up(self) -> float:
        """Run the query path once on a synthetic photo: loads the compiled kernels (see
        ``d2r warmup``), lets the model runtime prepare its first inference and touches the
        index. Changes nothing; returns the seconds it took."""
        from .warmup import texture

        t0 = time.perf_counter()
        if self.index is None:
            self.extractor.extract(texture(0))
        else:
            self.query(texture(0), top_k=1, verify=bool(self.config.verification_features), verify_top=1)
        return time.perf_counter() - t0


def _check_on_error(value) -> None:
    if value not in ("skip", "raise"):
        raise InputError(f"on_error: expected 'skip' or 'raise', got {value!r}")


def _raw_entry(entry) -> dict:
    """The manifest JSON object of an entry (re-read from its manifest file)."""
    src = None
    for cand in (entry.path.parent / "manifest.json",):
        if cand.is_file():
            src = json.loads(cand.read_text())
    for d in (src or {}).get("models", []):
        if d.get("file") == entry.file:
            return dict(d)
    raise ModelError(f"{entry.path}: its manifest entry cannot be found next to it")


_find_entry = find_entry
