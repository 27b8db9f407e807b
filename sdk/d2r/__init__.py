"""d2r: Detect-to-Retrieve visual search for phones, kiosks and Jetsons.

Core API::

    cb = d2r.Codebook.train(descriptors, size=1024)
    agg = d2r.aggregate(descriptors, cb, kind="rasmk_star", region_sizes=[...])
    d2r.similarity(agg_a, agg_b)
"""

from . import evaluate, verify
from ._version import __version__
from .aggregate import KINDS, Aggregation, aggregate, similarity
from .codebook import Codebook
from .errors import CodebookError, D2RError, ImageError, IndexFormatError, InputError, ModelError

__all__ = [
    "__version__",
    "KINDS",
    "Aggregation",
    "Codebook",
    "CodebookError",
    "D2RError",
    "ImageError",
    "IndexFormatError",
    "InputError",
    "ModelError",
    "aggregate",
    "evaluate",
    "similarity",
    "verify",
]
