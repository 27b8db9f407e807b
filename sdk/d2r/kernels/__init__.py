"""Numba kernels: the hot loops of d2r, as pure functions over typed arrays, one module per concept.

- :mod:`~d2r.kernels.clustering`: nearest-codeword assignment and k-means (``d2r.codebook``);
- :mod:`~d2r.kernels.aggregation`: residual sums, the keep rule, sign packing (``d2r.aggregate``);
- :mod:`~d2r.kernels.similarity`: ASMK(*) similarity of two aggregations and of a query with an
  inverted file, pooling and top k (``d2r.aggregate.similarity``, ``d2r.index.search``);
- :mod:`~d2r.kernels.postings`: grouping, merging and checking posting lists (``d2r.index``);
- :mod:`~d2r.kernels.keypoints`: keypoint heatmaps, NMS and bilinear sampling (``d2r.features``).

The kernels of spatial verification are in :mod:`d2r.verify_kernels`.

Nothing here validates its input: the Python wrappers in ``codebook``, ``aggregate``, ``index``
and ``features`` check shapes, dtypes and values first and raise :class:`d2r.D2RError`
subclasses. Every kernel is compiled once and cached on disk (``cache=True``; ``d2r warmup``
compiles them all ahead of the first query). Numba's cache notices a change of a kernel only in
the kernel's own file, so a kernel and every kernel it calls live in one module: no module here
imports another (tests/test_layout.py checks it).

Conventions: descriptors ``x`` are float32 ``[N, D]``, codewords ``c`` float32 ``[K, D]``;
residual sums are accumulated in float64 so that binarisation (``value > 0``) and the
``> 1e-6`` keep rule do not depend on summation order.
"""

from .aggregation import normalize_words, pack_signs, residual_sums
from .clustering import ASSIGN_RTOL, accumulate_clusters, kmeanspp_seed, row_sqnorms, sqdist_to_rows, update_nearest
from .keypoints import bilinear_sample, cell_heatmap, local_maxima
from .postings import group_by_word, ivf_check_entries, ivf_item_entries, merge_ivf_words
from .similarity import asmk_similarity, asmk_star_similarity, hamming_similarity, ivf_top_k, ivf_top_k_parallel, selectivity, selectivity_table

__all__ = [
    "ASSIGN_RTOL",
    "accumulate_clusters",
    "asmk_similarity",
    "asmk_star_similarity",
    "bilinear_sample",
    "cell_heatmap",
    "group_by_word",
    "hamming_similarity",
    "ivf_check_entries",
    "ivf_top_k",
    "ivf_top_k_parallel",
    "ivf_item_entries",
    "kmeanspp_seed",
    "local_maxima",
    "merge_ivf_words",
    "normalize_words",
    "pack_signs",
    "residual_sums",
    "row_sqnorms",
    "selectivity",
    "selectivity_table",
    "sqdist_to_rows",
    "update_nearest",
]
