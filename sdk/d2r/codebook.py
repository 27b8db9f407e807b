"""Visual-word codebook: k-means training, nearest-codeword assignment, and its file format.

Exact assignment is what docs/algorithm.md prescribes: the nearest codeword by squared L2, ties to
the lowest id. It costs 2*N*K*D FLOPs, which at K = 65536 is ~17 GFLOP for 1000 descriptors
of D = 128, too much for a phone; ``approximate=True`` uses a two-level codebook instead
(coarse centres over the codewords, only the codewords of the ``probes`` nearest coarse
centres are searched).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from . import kernels
from ._checks import descriptors_array, positive_int
from ._files import atomic_write
from .errors import CodebookError, InputError
from .kmeans import train_centroids

_MAGIC = b"D2RCODEB"
_VERSION = 1
_HEADER = struct.Struct("<8sIIIII")  # magic, version, K, D, flags, n_coarse
_FLAG_COARSE = 1

# Block sizes of the blocked GEMM assignment: a [ROWS, COLS] float32 Gram block is 8 MiB, so
# K = 65536 never needs the B x K x D (or even the N x K) temporary.
_ROW_BLOCK = 512
_COL_BLOCK = 4096

# ``size="auto"``: the default pipeline's K (issue 6: K >= 8192), or fewer words when the
# training set is small. 39 training descriptors per centroid is faiss's warning threshold for
# k-means; below it the words fit noise.
AUTO_MAX_SIZE = 8192
AUTO_PER_WORD = 39
AUTO_MIN_SIZE = 16


def auto_size(n_descriptors: int, max_size: int = AUTO_MAX_SIZE, per_word: int = AUTO_PER_WORD) -> int:
    """K for ``size="auto"``: the largest power of two <= max_size with at least ``per_word``
    training descriptors per word (K = 8192 from 319,488 descriptors, about 200 photos of
    ALIKED-t16 features); InputError below AUTO_MIN_SIZE words."""
    n = int(n_descriptors)
    k = int(max_size)
    while k > AUTO_MIN_SIZE and k * per_word > n:
        k //= 2
    if k * per_word > n:
        raise InputError(f"descriptors: {n} descriptors are too few for a codebook (at least {AUTO_MIN_SIZE * per_word} "
                         f"for K = {AUTO_MIN_SIZE}); add images")
    return k


def train_codebook(descriptors: np.ndarray, size: int | str = "auto", iterations: int = 20, seed: int = 0, n_images: int | None = None,
                   progress=None, backend: str = "d2r", threads: int | None = None) -> "Codebook":
    """The codebook stage of the pipeline: K-means on a training sample (``size``: K, or
    ``"auto"``, see :func:`auto_size`). ``Engine.train_codebook`` and ``d2r eval`` both call it
    on a :class:`d2r.pipeline.DescriptorSample`. backend, threads: see :meth:`Codebook.train`."""
    x = np.asarray(descriptors, np.float32)
    if isinstance(size, str):
        if size != "auto":
            raise InputError(f"size: expected a number of words or 'auto', got {size!r}")
        size = auto_size(len(x))
    size = positive_int(size, "size")
    if len(x) < size:
        src = f" from {n_images} images" if n_images is not None else ""
        raise InputError(f"images: {len(x)} descriptors{src} are fewer than the codebook size {size}; add images or lower size")
    return Codebook.train(x, size=size, iterations=iterations, seed=seed, progress=progress, backend=backend, threads=threads)


def _nearest(x: np.ndarray, c: np.ndarray, cnorm: np.ndarray, multiple: int):
    """Exact m-nearest codewords: (int32 [N, m] ids, float64 [N, m] squared distances)."""
    n = x.shape[0]
    best_d = np.full((n, multiple), np.inf)
    best_k = np.full((n, multiple), -1, dtype=np.int32)
    if n == 0:
        return best_k, best_d
    xnorm = kernels.row_sqnorms(x)
    cmax = float(cnorm.max())
    for r0 in range(0, n, _ROW_BLOCK):
        xb = x[r0 : r0 + _ROW_BLOCK]
        bd = best_d[r0 : r0 + _ROW_BLOCK]
        bk = best_k[r0 : r0 + _ROW_BLOCK]
        for k0 in range(0, c.shape[0], _COL_BLOCK):
            cb = c[k0 : k0 + _COL_BLOCK]
            gram = xb @ cb.T  # numpy's multi-threaded sgemm
            kernels.update_nearest(gram, cnorm[k0 : k0 + _COL_BLOCK], k0, xb, xnorm[r0 : r0 + _ROW_BLOCK], c, cmax, bd, bk)
    return best_k, best_d


class Codebook:
    """K visual words (codewords) of dimension D.

    Build one with :meth:`train` (k-means) or from an existing array, ``Codebook(centroids)``.

    Attributes:
        centroids: float32 [K, D], read-only.
    """

    def __init__(self, centroids):
        centroids = descriptors_array(centroids, "centroids")
        if centroids.shape[0] < 1:
            raise InputError("centroids: a codebook needs at least one codeword, got 0")
        if centroids.shape[1] < 1:
            raise InputError("centroids: descriptor dimension D must be >= 1, got 0")
        centroids = centroids.copy()
        centroids.setflags(write=False)
        self._centroids = centroids
        self._cnorm = kernels.row_sqnorms(centroids).astype(np.float32)
        self._coarse = None  # (coarse centres [G, D], order int32 [K], starts int64 [G + 1])
        self._checksum = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def centroids(self) -> np.ndarray:
        return self._centroids

    @property
    def size(self) -> int:
        """K, the number of visual words."""
        return int(self._centroids.shape[0])

    @property
    def dim(self) -> int:
        """D, the descriptor dimension."""
        return int(self._centroids.shape[1])

    @property
    def checksum(self) -> str:
        """sha256 (hex) of K, D and the centroid bytes: identifies the codebook in an index."""
        if self._checksum is None:
            h = hashlib.sha256(struct.pack("<II", self.size, self.dim))
            h.update(np.ascontiguousarray(self._centroids, dtype="<f4").tobytes())
            self._checksum = h.hexdigest()
        return self._checksum

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Codebook(K={self.size}, D={self.dim}, checksum={self.checksum[:12]})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Codebook) and self.checksum == other.checksum

    __hash__ = None  # type: ignore[assignment]  # equal by content, mutable: not hashable

    # -- training -----------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        descriptors,
        size: int = 1024,
        iterations: int = 20,
        seed: int = 0,
        seeding: str = "auto",
        progress=None,
        backend: str = "d2r",
        threads: int | None = None,
    ) -> "Codebook":
        """k-means (Lloyd) on float32 [N, D] descriptors; deterministic for a given ``seed``.

        seeding: ``"kmeans++"`` (D^2 sampling on a sample of at most 32*K descriptors),
        ``"random"`` (K distinct random descriptors), or ``"auto"``: k-means++ up to
        K = 4096, random above (k-means++ makes K passes over the sample, which at K = 65536
        costs more than all Lloyd iterations). Empty clusters are re-seeded with the
        descriptors farthest from their centroids. Stops early when no label changes.
        progress: optional callable(iteration, iterations, moved_fraction) for reporting.

        backend: ``"d2r"`` (default; ours: exact assignment, the same codebook for any ``threads``),
        ``"faiss"`` (faiss's float32 assignment, the rest ours; the ``kmeans`` extra), or ``"auto"``:
        faiss where it is installed. threads: worker threads (default: every core this
        process may use). See :mod:`d2r.kmeans`. Memory beyond the data: labels and
        distances (12 bytes per descriptor), the K x D sums and a 1 MiB Gram block per thread.
        """
        x = descriptors_array(descriptors, "descriptors")
        k = positive_int(size, "size")
        iterations = positive_int(iterations, "iterations", minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InputError(f"seed: expected an integer, got {seed!r}")
        if seeding not in ("auto", "kmeans++", "random"):
            raise InputError(f"seeding: expected 'auto', 'kmeans++' or 'random', got {seeding!r}")
        n = x.shape[0]
        if n < k:
            raise InputError(f"descriptors: k-means to K = {k} needs at least {k} descriptors, got {n}")
        if threads is not None:
            threads = positive_int(threads, "threads")
        return cls(train_centroids(x, k, iterations, int(seed), seeding, progress, backend, threads))

    # -- assignment ---------------------------------------------------------------------------
    def assign(self, descriptors, multiple: int = 1, approximate: bool = False, probes: int = 8) -> np.ndarray:
        """Nearest codewords of float32 [N, D] descriptors by squared L2.

        Returns int32 [N] for ``multiple=1``, else int32 [N, multiple] nearest first. Ties go
        to the lowest codeword id. ``approximate=True`` searches only the codewords of the
        ``probes`` nearest coarse centres of a two-level codebook (built on first use, see
        :meth:`build_coarse`); exact otherwise.
        """
        x = descriptors_array(descriptors, "descriptors", dim=self.dim)
        m = positive_int(multiple, "multiple")
        if m > self.size:
            raise InputError(f"multiple: cannot assign {m} words with a codebook of K = {self.size}")
        ids, _ = self._assign_with_distances(x, m, approximate, probes)
        return ids[:, 0].copy() if multiple == 1 else ids

    def _assign_with_distances(self, x, m, approximate=False, probes=8):
        if not approximate:
            return _nearest(x, self._centroids, self._cnorm, m)
        probes = positive_int(probes, "probes")
        if self._coarse is None:
            self.build_coarse()
        coarse, order, starts = self._coarse
        n_groups = coarse.shape[0]
        probes = min(probes, n_groups)
        n = x.shape[0]
        best_d = np.full((n, m), np.inf)
        best_k = np.full((n, m), -1, dtype=np.int32)
        if n == 0:
            return best_k, best_d
        group_ids, _ = _nearest(x, coarse, kernels.row_sqnorms(coarse).astype(np.float32), probes)
        csorted = self._centroids[order]
        cnorm_sorted = self._cnorm[order]
        cmax = float(self._cnorm.max())
        xnorm = kernels.row_sqnorms(x)
        # Group descriptors by probed coarse cell, then one small GEMM per cell.
        flat_groups = group_ids.ravel()
        flat_rows = np.repeat(np.arange(n), probes)
        by_group = np.argsort(flat_groups, kind="stable")
        bounds = np.searchsorted(flat_groups[by_group], np.arange(n_groups + 1))
        for g in range(n_groups):
            rows = flat_rows[by_group[bounds[g] : bounds[g + 1]]]
            a, b = starts[g], starts[g + 1]
            if rows.size == 0 or a == b:
                continue
            xb = x[rows]
            bd = best_d[rows]
            bk = best_k[rows]
            gram = xb @ csorted[a:b].T
            kernels.update_nearest(gram, cnorm_sorted[a:b], a, xb, xnorm[rows], csorted, cmax, bd, bk)
            best_d[rows] = bd
            best_k[rows] = bk
        found = best_k >= 0
        best_k[found] = order[best_k[found]]
        if not found.all():
            # Fewer than m codewords in the probed cells: fill the rest exactly.
            missing = np.flatnonzero(~found.all(axis=1))
            ek, ed = _nearest(x[missing], self._centroids, self._cnorm, m)
            best_k[missing], best_d[missing] = ek, ed
        return best_k, best_d

    def build_coarse(self, groups: int | None = None, seed: int = 0, iterations: int = 10) -> None:
        """Build the two-level structure for approximate assignment.

        groups defaults to round(sqrt(K)). Every codeword belongs to the group of its nearest
        coarse centre; the coarse centres are k-means centres of the codewords.
        """
        g = int(round(np.sqrt(self.size))) if groups is None else positive_int(groups, "groups")
        g = min(g, self.size)
        coarse = Codebook.train(self._centroids, size=g, iterations=iterations, seed=seed).centroids
        members = _nearest(self._centroids, coarse, kernels.row_sqnorms(coarse).astype(np.float32), 1)[0][:, 0]
        order = np.argsort(members, kind="stable").astype(np.int32)
        starts = np.searchsorted(members[order], np.arange(g + 1)).astype(np.int64)
        self._coarse = (np.ascontiguousarray(coarse), order, starts)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the codebook (and its coarse level, if built) atomically to ``path``.

        Layout (little-endian): magic ``D2RCODEB``, u32 version, u32 K, u32 D, u32 flags,
        u32 G; float32 centroids [K, D]; if flags & 1: float32 coarse [G, D], int32 order [K],
        int64 starts [G + 1]; sha256 of everything before, 32 bytes.
        """
        path = Path(path)
        coarse = self._coarse
        flags = _FLAG_COARSE if coarse is not None else 0
        parts = [
            _HEADER.pack(_MAGIC, _VERSION, self.size, self.dim, flags, 0 if coarse is None else coarse[0].shape[0]),
            np.ascontiguousarray(self._centroids, dtype="<f4").tobytes(),
        ]
        if coarse is not None:
            parts += [
                np.ascontiguousarray(coarse[0], dtype="<f4").tobytes(),
                np.ascontiguousarray(coarse[1], dtype="<i4").tobytes(),
                np.ascontiguousarray(coarse[2], dtype="<i8").tobytes(),
            ]
        body = b"".join(parts)
        atomic_write(path, body + hashlib.sha256(body).digest())

    @classmethod
    def load(cls, path) -> "Codebook":
        """Read a file written by :meth:`save`; any corruption raises :class:`CodebookError`."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CodebookError(f"{path}: cannot read codebook file ({exc.strerror or exc})") from exc
        if len(data) < _HEADER.size + 32:
            raise CodebookError(f"{path}: not a d2r codebook (file too short: {len(data)} bytes)")
        magic, version, k, d, flags, g = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise CodebookError(f"{path}: not a d2r codebook (bad magic {magic!r})")
        if version > _VERSION:
            raise CodebookError(f"{path}: codebook format version {version} is newer than this d2r supports ({_VERSION}); upgrade d2r")
        if version < 1 or k < 1 or d < 1:
            raise CodebookError(f"{path}: invalid codebook header (version {version}, K={k}, D={d})")
        expected = _HEADER.size + 4 * k * d + 32
        if flags & _FLAG_COARSE:
            expected += 4 * g * d + 4 * k + 8 * (g + 1)
        if len(data) != expected:
            raise CodebookError(f"{path}: truncated or padded codebook: {len(data)} bytes, header says {expected}")
        if hashlib.sha256(data[:-32]).digest() != data[-32:]:
            raise CodebookError(f"{path}: codebook checksum mismatch (the file is corrupt)")
        off = _HEADER.size
        centroids = np.frombuffer(data, dtype="<f4", count=k * d, offset=off).reshape(k, d)
        if not np.isfinite(centroids).all():
            raise CodebookError(f"{path}: codebook contains NaN or inf")
        cb = cls(centroids)
        off += 4 * k * d
        if flags & _FLAG_COARSE:
            coarse = np.frombuffer(data, dtype="<f4", count=g * d, offset=off).reshape(g, d).astype(np.float32)
            off += 4 * g * d
            order = np.frombuffer(data, dtype="<i4", count=k, offset=off).astype(np.int32)
            off += 4 * k
            starts = np.frombuffer(data, dtype="<i8", count=g + 1, offset=off).astype(np.int64)
            if (
                g < 1
                or not np.array_equal(np.sort(order), np.arange(k))
                or starts[0] != 0
                or starts[-1] != k
                or np.any(np.diff(starts) < 0)
            ):
                raise CodebookError(f"{path}: inconsistent coarse level in codebook")
            cb._coarse = (coarse, order, starts)
        return cb


# -- command line -----------------------------------------------------------------------------
