"""Aggregation of local descriptors into one image (or region) representation, and similarity.

Kinds (docs/algorithm.md section 3): ``vlad``, ``asmk``, ``asmk_star`` over all features of an
image, and their regional forms ``rvlad``, ``rasmk``, ``rasmk_star`` in which each region's
residual vector is L2-normalised before the regions are summed (Detect-to-Retrieve).
``naive_rasmk`` is the paper's ablation: the mean over regions of the per-region ASMK
representations (per word, the mean of the regions' unit residuals), one vector per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from ._checks import descriptors_array, positive_int, real_number
from .codebook import Codebook
from .errors import InputError

KINDS = ("vlad", "asmk", "asmk_star", "rvlad", "rasmk", "rasmk_star", "naive_rasmk")
REGIONAL_KINDS = ("rvlad", "rasmk", "rasmk_star", "naive_rasmk")
VLAD_KINDS = ("vlad", "rvlad")
BINARY_KINDS = ("asmk_star", "rasmk_star")
FLOAT_WORD_KINDS = ("asmk", "rasmk", "naive_rasmk")

# ASMK keeps a visual word only if the norm of its residual sum is strictly above this.
KEEP_EPS = 1e-6
# VLAD L2 normalisation: x * rsqrt(max(sum x^2, NORM_SQ_EPS)).
NORM_SQ_EPS = 1e-12


def _family(kind: str) -> str:
    if kind in VLAD_KINDS:
        return "vlad"
    return "binary" if kind in BINARY_KINDS else "float"


@dataclass(frozen=True, eq=False)
class Aggregation:
    """The aggregated representation of one image or region.

    Attributes:
        kind: one of :data:`KINDS`.
        dim: D, the local descriptor dimension.
        words: uint32 [n] ascending visual-word ids (empty for VLAD kinds).
        vectors: float32 [n, D] unit residuals (``asmk`` / ``rasmk``), or for ``naive_rasmk``
            the mean over the R regions of the regions' unit residuals (norm <= 1), else None.
        codes: uint8 [n, ceil(D / 8)] packed signs, MSB-first (``asmk_star`` / ``rasmk_star``),
            else None. Padding bits (when D is not a multiple of 8) are zero.
        vector: float32 [K * D] (``vlad`` / ``rvlad``), else None.
        n_regions: number of regions aggregated (1 for non-regional kinds).
    """

    kind: str
    dim: int
    words: np.ndarray
    vectors: np.ndarray | None = None
    codes: np.ndarray | None = None
    vector: np.ndarray | None = None
    n_regions: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        dim = positive_int(self.dim, "dim")
        object.__setattr__(self, "dim", dim)
        words = np.asarray(self.words if self.words is not None else [], dtype=np.int64)
        if words.ndim != 1:
            raise InputError(f"words: expected a 1-D array, got shape {words.shape}")
        if words.size and (words.min() < 0 or words.max() > np.iinfo(np.uint32).max):
            raise InputError("words: visual-word ids must fit in uint32")
        if words.size > 1 and np.any(np.diff(words) <= 0):
            raise InputError("words: visual-word ids must be strictly ascending (sorted, no duplicates)")
        words = words.astype(np.uint32)
        n = words.shape[0]
        fam = _family(self.kind)
        if fam == "vlad":
            if self.vector is None:
                raise InputError(f"{self.kind}: an aggregation of this kind needs `vector`")
            vec = np.asarray(self.vector)
            if vec.ndim != 1 or vec.dtype.kind != "f" or vec.size % dim:
                raise InputError(f"vector: expected a float32 [K * D] array with D = {dim}, got {vec.dtype} {vec.shape}")
            object.__setattr__(self, "vector", _frozen(vec.astype(np.float32)))
        elif fam == "binary":
            nbytes = (dim + 7) // 8
            codes = np.asarray(self.codes if self.codes is not None else np.zeros((0, nbytes), np.uint8))
            if codes.dtype != np.uint8 or codes.shape != (n, nbytes):
                raise InputError(f"codes: expected uint8 [{n}, {nbytes}] for {n} words of D = {dim}, got {codes.dtype} {codes.shape}")
            object.__setattr__(self, "codes", _frozen(codes))
        else:
            vecs = np.asarray(self.vectors if self.vectors is not None else np.zeros((0, dim), np.float32))
            if vecs.dtype.kind != "f" or vecs.shape != (n, dim):
                raise InputError(f"vectors: expected float32 [{n}, {dim}], got {vecs.dtype} {vecs.shape}")
            object.__setattr__(self, "vectors", _frozen(vecs.astype(np.float32)))
        object.__setattr__(self, "words", _frozen(words))
        object.__setattr__(self, "n_regions", positive_int(self.n_regions, "n_regions", minimum=0))

    def __len__(self) -> int:
        """Number of visual words (or K for VLAD kinds)."""
        if self.vector is not None:
            return self.vector.size // self.dim
        return int(self.words.shape[0])

    @property
    def is_empty(self) -> bool:
        """True when the image has no visual word (similarity with it is -1)."""
        if self.vector is not None:
            return not np.any(self.vector)
        return self.words.shape[0] == 0


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.flags.writeable and a.base is None:
        a.setflags(write=False)
        return a
    a = a.copy()
    a.setflags(write=False)
    return a


def _region_starts(region_sizes, n: int) -> np.ndarray:
    if isinstance(region_sizes, np.ndarray):
        sizes = region_sizes
        if sizes.dtype.kind not in "iu":
            raise InputError(f"region_sizes: expected integers, got dtype {sizes.dtype}")
    else:
        try:
            items = list(region_sizes)
        except TypeError:
            raise InputError(f"region_sizes: expected a list of ints, got {region_sizes!r}") from None
        for v in items:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise InputError(f"region_sizes: expected a list of ints, found {v!r}")
        sizes = np.asarray(items, dtype=np.int64)
    sizes = sizes.astype(np.int64).ravel()
    if sizes.size == 0:
        raise InputError("region_sizes: expected at least one region")
    if np.any(sizes < 0):
        raise InputError(f"region_sizes: sizes must be >= 0, got {sizes.tolist()}")
    if int(sizes.sum()) != n:
        raise InputError(f"region_sizes: sizes sum to {int(sizes.sum())} but there are {n} descriptors")
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def aggregate(
    descriptors,
    codebook: Codebook,
    kind: str = "asmk_star",
    region_sizes=None,
    multiple_assignment: int = 1,
    normalize: bool = True,
    approximate: bool = False,
    assignments=None,
) -> Aggregation:
    """Aggregate float32 [N, D] local descriptors of one image with a codebook.

    Args:
        descriptors: float32 [N, D] (float64 is converted to float32; NaN/inf rejected).
        codebook: the :class:`Codebook` (K words of dimension D).
        kind: one of ``vlad, asmk, asmk_star, rvlad, rasmk, rasmk_star, naive_rasmk``.
        region_sizes: regional kinds only: ints summing to N, the descriptors of each region
            stored one region after the other; zeros are empty regions (still counted in R).
            None means all descriptors form one region.
        multiple_assignment: m nearest words per descriptor (residuals added to each).
        normalize: VLAD kinds only: L2-normalise the whole vector (``rvlad``: the sum of the
            normalised regions) if True; if False ``vlad`` is left raw and ``rvlad`` is divided
            by the number of regions R.
        approximate: use the codebook's two-level approximate assignment.
        assignments: optional precomputed int [N] or [N, m] word ids (skips assignment).
    """
    if not isinstance(codebook, Codebook):
        raise InputError(f"codebook: expected a d2r.Codebook, got {type(codebook).__name__}")
    if kind not in KINDS:
        raise InputError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    x = descriptors_array(descriptors, "descriptors", dim=codebook.dim)
    n = x.shape[0]
    m = positive_int(multiple_assignment, "multiple_assignment")
    if m > codebook.size:
        raise InputError(f"multiple_assignment: {m} exceeds the codebook size K = {codebook.size}")
    regional = kind in REGIONAL_KINDS
    if region_sizes is not None and not regional:
        raise InputError(f"region_sizes: only regional kinds ({', '.join(REGIONAL_KINDS)}) take regions, kind is {kind!r}")
    starts = _region_starts(region_sizes, n) if region_sizes is not None else np.array([0, n], dtype=np.int64)
    n_regions = starts.shape[0] - 1
    if assignments is None:
        assign, _ = codebook._assign_with_distances(x, m, approximate)
    else:
        assign = np.asarray(assignments)
        if assign.ndim == 1:
            assign = assign[:, None]
        if assign.dtype.kind not in "iu" or assign.shape != (n, m):
            raise InputError(f"assignments: expected int [{n}, {m}], got {assign.dtype} {assign.shape}")
        if assign.size and (assign.min() < 0 or assign.max() >= codebook.size):
            raise InputError(f"assignments: word ids must be in [0, {codebook.size})")
        assign = np.ascontiguousarray(assign, dtype=np.int32)
    dim = codebook.dim
    if kind == "naive_rasmk":
        return _naive_rasmk(x, codebook, assign, starts)
    words, sums = kernels.residual_sums(x, codebook.centroids, assign, starts, regional)

    if kind in VLAD_KINDS:
        full = np.zeros((codebook.size, dim))
        full[words] = sums
        vec = full.ravel()
        if normalize:
            vec = vec / np.sqrt(max(float(vec @ vec), NORM_SQ_EPS))
        elif kind == "rvlad":
            vec = vec / n_regions if n_regions else vec
        return Aggregation(kind, dim, np.zeros(0, np.uint32), vector=vec.astype(np.float32), n_regions=n_regions)

    kept, unit = kernels.normalize_words(sums, KEEP_EPS)
    words = words[kept]
    unit = unit[kept]
    if kind in BINARY_KINDS:
        return Aggregation(kind, dim, words, codes=kernels.pack_signs(unit), n_regions=n_regions)
    return Aggregation(kind, dim, words, vectors=unit.astype(np.float32), n_regions=n_regions)


def _naive_rasmk(x, codebook, assign, starts) -> Aggregation:
    """Naive-R-ASMK: ASMK of each region (per-word sum, strict keep rule, unit rows), then per
    word the sum over regions divided by R (empty regions count in R). With a linear kernel
    (alpha = 1, no threshold) its similarity to a query is exactly the mean of the query's ASMK
    similarities to the regions; the selectivity is applied to that averaged match instead."""
    n_regions = starts.shape[0] - 1
    one = np.array([0, 0], dtype=np.int64)
    all_words, all_units = [], []
    for r in range(n_regions):
        a, b = int(starts[r]), int(starts[r + 1])
        if b == a:
            continue
        one[1] = b - a
        w, sums = kernels.residual_sums(x[a:b], codebook.centroids, assign[a:b], one, False)
        kept, unit = kernels.normalize_words(sums, KEEP_EPS)
        all_words.append(w[kept])
        all_units.append(unit[kept])
    dim = codebook.dim
    if not all_words:
        return Aggregation("naive_rasmk", dim, np.zeros(0, np.uint32), vectors=np.zeros((0, dim), np.float32),
                           n_regions=n_regions)
    words, inverse = np.unique(np.concatenate(all_words), return_inverse=True)
    acc = np.zeros((words.shape[0], dim))
    np.add.at(acc, inverse, np.concatenate(all_units))
    acc /= n_regions
    return Aggregation("naive_rasmk", dim, words, vectors=acc.astype(np.float32), n_regions=n_regions)


def similarity(a: Aggregation, b: Aggregation, alpha: float = 3.0, tau: float = 0.0, normalize: bool = False) -> float:
    """Similarity of two aggregations (docs/algorithm.md section 4).

    VLAD kinds: dot product. ASMK kinds: sum over common words of the selectivity
    sigma(s) = sign(s)|s|^alpha if s > tau else 0, with s the residual dot product (``asmk``,
    ``rasmk``) or 1 - 2 * hamming / D (``asmk_star``, ``rasmk_star``); ``normalize=True``
    divides by sqrt(n_words(a) * n_words(b)). Returns -1.0 when either side has no visual word.
    Regional and non-regional kinds of the same family compare (a query aggregated with
    ``asmk_star`` against a database image aggregated with ``rasmk_star``).
    """
    for name, agg in (("a", a), ("b", b)):
        if not isinstance(agg, Aggregation):
            raise InputError(f"{name}: expected a d2r.Aggregation, got {type(agg).__name__}")
    if _family(a.kind) != _family(b.kind):
        raise InputError(f"cannot compare kinds {a.kind!r} and {b.kind!r}")
    if a.dim != b.dim:
        raise InputError(f"descriptor dimensions differ: {a.dim} and {b.dim}")
    alpha = real_number(alpha, "alpha")
    tau = real_number(tau, "tau")
    if _family(a.kind) == "vlad":
        va, vb = a.vector, b.vector
        assert va is not None and vb is not None  # Aggregation requires `vector` for the VLAD kinds
        if va.size != vb.size:
            raise InputError(f"VLAD vectors differ in length: {va.size} and {vb.size}")
        return float(np.dot(va.astype(np.float64), vb.astype(np.float64)))
    if a.is_empty or b.is_empty:
        return -1.0
    if _family(a.kind) == "binary":
        s = kernels.asmk_star_similarity(a.words, a.codes, b.words, b.codes, a.dim, alpha, tau)
    else:
        s = kernels.asmk_similarity(a.words, a.vectors, b.words, b.vectors, alpha, tau)
    if normalize:
        s /= np.sqrt(float(len(a)) * float(len(b)))
    return float(s)
