"""The one configuration object of the pipeline: what ``Engine.create`` builds, what
``bundle.json`` stores under ``config`` and what ``d2r eval`` evaluates."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .manifest import DEFAULT_FEATURES

ENGINE_KINDS = ("asmk_star", "rasmk_star", "d2r_asmk_star")
REGION_MODES = ("crop", "pack", "pool")
# Query expansion a query gets unless told otherwise (Engine.query, d2r query, d2r eval): merge it
# with its 3 best hits, weighted by their similarity cubed. It gained on roxford5k-mini (R-ASMK*,
# ASMK*; ALIKED-t16 and XFeat) and on UKBench-56 (4 photos per object); expanding with 10 hits
# lost on UKBench-56 (benchmarks/DECISIONS.md, 2026-12-03).
QUERY_EXPAND = 3
# The normalised similarity (docs/algorithm.md section 4) for the indexes that Engine builds: their
# header's default, which Engine.query and d2r query use. With query expansion it gained on
# roxford5k-mini for all three kinds (ALIKED-t16, 3 seeds: R-ASMK* +3.4 / +2.5 Medium / Hard over
# expansion alone) and on UKBench-56 (benchmarks/DECISIONS.md, 2026-12-03, session 9). Indexes
# built before keep their own header's setting (un-normalised).
NORMALIZE = True
# `d2r build` keeps this many whole-photo features per photo for `d2r query --verify`.
BUILD_VERIFICATION_FEATURES = 1000


@dataclass
class EngineConfig:
    """The pipeline of an :class:`Engine`; stored in ``bundle.json``."""

    features: str = DEFAULT_FEATURES
    detector: str | None = "ssd_mobilenetv2_landmark"
    kind: str = "rasmk_star"
    backend: str = "tflite"
    precision: str = "int8"
    detector_threshold: float = 0.1
    max_regions: int = 8
    regions: str = "crop"
    pooling: str = "max"
    alpha: float = 3.0
    tau: float = 0.0
    max_features: int | None = None
    scales: list | None = None
    score_threshold: float | None = None
    # What pyramid scale 1 means for the feature model: "canvas" (fit into the model input) or
    # "longest" (longest side = the input's longest side; portrait photos run in tiles).
    feature_fit: str = "canvas"
    approximate_assignment: bool = False
    # Spatial verification: keep the top-N whole-image features of every database image in
    # the bundle (features.d2rv, int8 descriptors: N * (4 + D) bytes per image).
    verification_features: int = 0
    # Matching for verification within visual words: each stored feature keeps its nearest
    # codeword (+4 bytes), a query feature is compared only with the features of its
    # ``verification_words`` nearest codewords. 0 (default): exhaustive matching, no words
    # stored. Words are faster but lose inliers at K = 1024 (benchmarks/RESULTS.md).
    verification_words: int = 0

    def check(self) -> "EngineConfig":
        if self.kind not in ENGINE_KINDS:
            raise InputError(f"kind: expected one of {', '.join(ENGINE_KINDS)}, got {self.kind!r}")
        if self.regions not in REGION_MODES:
            raise InputError(f"regions: expected 'crop' (re-extract on each box), 'pack' (re-extract, four boxes per model run) "
                             f"or 'pool' (whole-image features in the box), got {self.regions!r}")
        if self.backend not in ("tflite", "onnx"):
            raise InputError(f"backend: expected 'tflite' or 'onnx', got {self.backend!r}")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise InputError(f"precision: expected fp32, fp16 or int8, got {self.precision!r}")
        if self.pooling not in ("max", "avg"):
            raise InputError(f"pooling: expected 'max' or 'avg', got {self.pooling!r}")
        if not 0.0 <= float(self.detector_threshold) <= 1.0:
            raise InputError(f"detector_threshold: expected a score in [0, 1], got {self.detector_threshold}")
        if int(self.verification_features) < 0:
            raise InputError(f"verification_features: expected >= 0, got {self.verification_features}")
        if not 0 <= int(self.verification_words) <= 64:
            raise InputError(f"verification_words: expected 0 (exhaustive matching) to 64, got {self.verification_words}")
        if self.feature_fit not in ("canvas", "longest"):
            raise InputError(f"feature_fit: expected 'canvas' or 'longest', got {self.feature_fit!r}")
        if int(self.max_regions) < 0:
            raise InputError(f"max_regions: expected >= 0, got {self.max_regions}")
        return self
