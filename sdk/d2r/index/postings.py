"""What every part of the index shares: its parameters and its posting lists.

An index of kind ``rasmk_star`` (or another of :data:`INDEX_KINDS`) stores, for every visual
word, the *entries* of the items that contain it: the item number and the item's code for the
word (packed signs for binary kinds, float32 residuals for float kinds). :class:`Postings`
holds one such inverted file; its layout, runs of (word, block) entries, is described in
:mod:`d2r.kernels.similarity` (section "Inverted-file search").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..aggregate import BINARY_KINDS
from ..errors import InputError

INDEX_KINDS = ("asmk", "asmk_star", "rasmk", "rasmk_star", "naive_rasmk")

# Items per block of the stored inverted file: entries store item numbers modulo 2**16 (uint16).
BLOCK_SHIFT = 16
# The in-memory delta stores full uint32 item numbers in a single block.
DELTA_SHIFT = 32


def family(kind: str) -> str:
    """``binary`` (codes are packed signs) or ``float`` (codes are float32 residuals)."""
    return "binary" if kind in BINARY_KINDS else "float"


def payload_bytes(kind: str, dim: int) -> int:
    """Bytes of one entry's code."""
    return (dim + 7) // 8 if kind in BINARY_KINDS else 4 * dim


def check_kind(kind) -> str:
    if kind in ("vlad", "rvlad"):
        raise InputError(f"kind: {kind!r} is a dense vector, not a set of visual words; an inverted file does not apply "
                         f"(use one of {', '.join(INDEX_KINDS)})")
    if kind not in INDEX_KINDS:
        raise InputError(f"kind: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    return kind


@dataclass(frozen=True)
class IndexParams:
    """The parameters of an index, recorded in its file's header.

    k: codebook size K; dim: descriptor dimension D; kind: one of :data:`INDEX_KINDS`;
    alpha, tau: selectivity; normalize: the default of ``search(normalize=None)``;
    checksum: sha256 hex of the codebook.
    """

    k: int
    dim: int
    kind: str
    alpha: float
    tau: float
    normalize: bool
    checksum: str

    @property
    def payload(self) -> int:
        return payload_bytes(self.kind, self.dim)

    @property
    def family(self) -> str:
        return family(self.kind)


class Postings:
    """One inverted file: runs of (word, block) entries, see :mod:`d2r.kernels.similarity`.

    offsets: uint64/int64 [K * n_blocks + 1]; low: uint16 (shift 16) or uint32 (shift 32)
    [E]; codes: uint8 [E, payload].
    """

    __slots__ = ("offsets", "n_blocks", "shift", "low", "codes")

    def __init__(self, offsets, n_blocks, shift, low, codes):
        self.offsets, self.n_blocks, self.shift, self.low, self.codes = offsets, n_blocks, shift, low, codes

    @classmethod
    def empty(cls, payload, shift=BLOCK_SHIFT):
        low = np.zeros(0, dtype=np.uint16 if shift == BLOCK_SHIFT else np.uint32)
        return cls(np.zeros(1, dtype=np.int64), 0, shift, low, np.zeros((0, payload), np.uint8))

    @property
    def n_entries(self) -> int:
        return int(self.low.shape[0])

    def word_counts(self, k: int) -> np.ndarray:
        """int64 [K] entries per visual word."""
        if self.n_blocks == 0:
            return np.zeros(k, dtype=np.int64)
        starts = self.offsets[:: self.n_blocks].astype(np.int64)
        return np.diff(starts)

    def run_entries(self, words: np.ndarray) -> int:
        """Entries in the posting lists of ``words`` (int64), all blocks."""
        if not self.n_blocks:
            return 0
        return int(np.sum(self.offsets[(words + 1) * self.n_blocks] - self.offsets[words * self.n_blocks]))
