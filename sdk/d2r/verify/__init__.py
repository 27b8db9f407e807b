"""Spatial verification: putative matches, affine RANSAC and re-ranking (docs/algorithm.md section 6).

The re-ranking of Detect-to-Retrieve: the top R images of the initial ranking are verified by
matching the query's local features to each candidate's (nearest neighbour, Euclidean distance
below 0.9, optionally Lowe's ratio test and a mutual check), fitting an affine model with
RANSAC (3-point samples, residual threshold 10 px, 1000 trials), and re-sorting those R by
(inlier count, initial score)::

    matches = d2r.verify.match(desc_q, desc_c)                  # int32 [M, 2]
    result = d2r.verify.ransac_affine(loc_q, loc_c, matches)    # VerifyResult
    reranked = d2r.verify.rerank((loc_q, desc_q), [(id, score, (loc, desc)), ...])

Locations are float32 ``[N, 2]`` in (y, x) pixel order, descriptors float32 ``[N, D]``
(L2-normalised by the feature extractors; the distance is computed for any vectors). The hot
loops are Numba kernels in :mod:`d2r.verify_kernels`; the descriptor distance matrix is one
float32 GEMM in numpy's BLAS.

Matching within visual words: when both sides carry visual-word ids (``LocalFeatures.words``:
the query's m nearest codewords per feature, each database feature's nearest codeword), a query
feature is compared only with the candidate features of its words, instead of with all of them.
This is what makes re-ranking 100 candidates cheap (see benchmarks/RESULTS.md), at the cost of
missing a nearest neighbour that fell into another word. The engine stores the words with the
features and uses them when the bundle has a codebook.

Verification features can be stored compactly with :func:`pack_features` (uint16 pixel
coordinates, int8 or float16 descriptors: 4 + D bytes per feature in int8, so 132,010 bytes for
an image of 1000 features of D = 128) and many images in one checksummed side file with
:func:`save_features`, read one image at a time with :class:`FeatureFile`.

One module per concept: :mod:`.features` (:class:`LocalFeatures`), :mod:`.matching`
(:func:`match`), :mod:`.ransac` (:func:`ransac_affine`), :mod:`.reranking` (:func:`verify_pair`,
:func:`rerank`) and :mod:`.file` (the verification features file, ``features.d2rv``).
"""

from .features import LocalFeatures
from .file import FeatureFile, feature_bytes, load_features, pack_features, save_features, unpack_features
from .matching import MAX_DISTANCE, PRECISIONS, match
from .ransac import CONFIDENCE, MAX_TRIALS, MIN_MATCHES, RESIDUAL_THRESHOLD, VerifyResult, ransac_affine
from .reranking import TOP_R, Reranked, rerank, verify_pair

__all__ = [
    "CONFIDENCE",
    "FeatureFile",
    "MAX_DISTANCE",
    "MAX_TRIALS",
    "MIN_MATCHES",
    "PRECISIONS",
    "RESIDUAL_THRESHOLD",
    "TOP_R",
    "LocalFeatures",
    "Reranked",
    "VerifyResult",
    "feature_bytes",
    "load_features",
    "match",
    "pack_features",
    "ransac_affine",
    "rerank",
    "save_features",
    "unpack_features",
    "verify_pair",
]
