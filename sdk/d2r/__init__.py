"""d2r: Detect-to-Retrieve visual search for phones, kiosks and Jetsons.

Core API::

    cb = d2r.Codebook.train(descriptors, size=1024)
    agg = d2r.aggregate(descriptors, cb, kind="rasmk_star", region_sizes=[...])
    d2r.similarity(agg_a, agg_b)
    idx = d2r.Index(cb, kind="rasmk_star"); idx.add("img", agg); idx.search(query_agg)

Device API::

    engine = d2r.Engine.create(features="xfeat", detector="ssd", codebook=cb, kind="rasmk_star")
    engine.add_images(paths); engine.query(photo).hits; engine.save("museum.d2r")
    engine = d2r.Engine.open("museum.d2r")
"""

import os as _os

# Numba's OpenMP workers spin after each parallel region by default; on a phone or a small
# board that shares its cores with the model runtime this costs tens of ms per search.
# Passive waiting keeps the parallel kernels cheap to enter. A user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import verify  # noqa: E402
from ._version import __version__
from .aggregate import KINDS, Aggregation, aggregate, similarity
from .codebook import Codebook
from .errors import CodebookError, D2RError, ImageError, IndexFormatError, InputError, ModelError
from .index import Index
from .results import Hit

# The device runtime (models, images, engine) is imported on first use: `import d2r` stays
# light for code that only aggregates and searches. The evaluation and research tools are a
# separate package, ``d2r_lab``, that this one never imports (tests/test_runtime_imports.py).
_LAZY_MODULES: tuple[str, ...] = ()
_LAZY = {
    "Engine": ("engine", "Engine"),
    "EngineConfig": ("config", "EngineConfig"),
    "BundleError": ("errors", "BundleError"),
    "QueryResult": ("results", "QueryResult"),
    "load_model": ("backends", "load_model"),
    "load_image": ("image", "load_image"),
    "LocalFeatureExtractor": ("features", "LocalFeatureExtractor"),
    "Features": ("features", "Features"),
    "Detector": ("detect", "Detector"),
    "Detections": ("detect", "Detections"),
}


def __getattr__(name):
    if name in _LAZY or name in _LAZY_MODULES:
        import importlib

        if name in _LAZY_MODULES:
            value = importlib.import_module(f".{name}", __name__)
        else:
            module, attr = _LAZY[name]
            value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'd2r' has no attribute {name!r}")

__all__ = [
    "__version__",
    "KINDS",
    "Aggregation",
    "Codebook",
    "CodebookError",
    "D2RError",
    "Hit",
    "ImageError",
    "Index",
    "IndexFormatError",
    "InputError",
    "ModelError",
    "aggregate",
    "similarity",
    "verify",
    *_LAZY,
]
