"""The index: an inverted file over ASMK* / R-ASMK* aggregations, in memory or memory-mapped.

Every database *item* is one aggregation: an image added with :meth:`Index.add`, or one region
of an image added with :meth:`Index.add_regions` (Detect-to-Retrieve regional search, where the
image score is the max or the mean over its regions). For every visual word the inverted file
lists the items that contain it with their codes, so a query touches only the posting lists of
its own words; the Numba kernels in ``kernels`` (section "Inverted-file search") score them.

Scores equal the brute-force :func:`d2r.similarity` of the query with every item, bit for bit
(see ``kernels``); an item without visual words, or an empty query, scores -1. Ranking is by
score descending, ties broken by insertion order (the image added first ranks first).

Storage: an index is a *base* segment (read from a file, possibly memory-mapped, never
modified) plus an in-memory *delta* of the images added since; removals set a tombstone bit.
:meth:`Index.save` writes base + delta into one new file atomically; :meth:`Index.compact`
drops tombstoned images. The file format is documented in ``docs/index-format.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numba
import numpy as np

from . import kernels
from ._checks import positive_int, real_number
from ._files import atomic_file, clean_stale
from .aggregate import BINARY_KINDS, Aggregation
from .codebook import Codebook
from .errors import IndexFormatError, InputError
from .results import Hit  # noqa: F401  (re-exported: d2r.index.Hit)

__all__ = ["Hit", "Index"]

INDEX_KINDS = ("asmk", "asmk_star", "rasmk", "rasmk_star", "naive_rasmk")
_KIND_CODES = {"asmk": 0, "asmk_star": 1, "rasmk": 2, "rasmk_star": 3, "naive_rasmk": 4}
_CODE_KINDS = {v: k for k, v in _KIND_CODES.items()}

MAGIC = b"D2RINDEX"
# Version 2 adds section 10, a crc32 per visual word of its inverted-file entries (verified when
# a search first touches the word). Version 1 files (10 sections) are still read.
VERSION = 2
# Items per block of the stored inverted file: entries store item numbers modulo 2**16 (uint16).
BLOCK_SHIFT = 16
# The in-memory delta stores full uint32 item numbers in a single block.
_DELTA_SHIFT = 32
# Section boundaries are aligned so that every array view is aligned for its dtype (and for
# the uint64 view of the codes).
ALIGN = 64
# Index.open(verify=None) checks the full sha256 of files up to this size; larger files get the
# eager checks (header, directory sections, all offsets) and the crc32 of each visual word's
# entries the first time a search (or a save) reads them.
VERIFY_AUTO_MAX_BYTES = 64 * 1024 * 1024
# A query scans its posting lists with all of numba's threads only when they hold at least
# this many entries (~1 ms of work); below that, waking the threads costs more than it saves.
PARALLEL_MIN_ENTRIES = 1 << 18
# Entries per chunk when merging inverted files (bounds the temporary memory of save/compact).
_MERGE_CHUNK_ENTRIES = 1 << 22

# magic, version, header size, K, D, kind, flags, alpha, tau, codebook sha256, images, items,
# entries, blocks, payload bytes per entry, number of sections.
_HEADER = struct.Struct("<8sIIIIII dd 32s QQQQ II")
_SECTION = struct.Struct("<QQ32s")  # offset, length, sha256
_SECTIONS = (
    "image_item_start",  # uint64 [M + 1]
    "item_words",  # uint32 [n_items]
    "tombstones",  # uint8 [ceil(M / 8)], bit i (LSB first) = image i removed
    "id_offsets",  # uint64 [M + 1]
    "ids",  # utf-8 image ids, concatenated
    "metadata_offsets",  # uint64 [M + 1]
    "metadata",  # utf-8 JSON texts, concatenated ("" = no metadata)
    "ivf_offsets",  # uint64 [K * n_blocks + 1]
    "ivf_items",  # uint16 [E]
    "ivf_codes",  # uint8 [E, payload]
    "ivf_word_crc32",  # uint32 [K]: crc32 of word w's ivf_items bytes followed by its ivf_codes bytes (v2)
)
_SECTIONS_V1 = _SECTIONS[:10]
_LAZY_SECTIONS = ("ivf_items", "ivf_codes")  # covered by the per-word crc32 and idx.verify(), not by open
_FLAG_NORMALIZE = 1


class _Postings:
    """One inverted file: runs of (word, block) entries, see ``kernels``.

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


def _payload_bytes(kind: str, dim: int) -> int:
    return (dim + 7) // 8 if kind in BINARY_KINDS else 4 * dim


def _family(kind: str) -> str:
    return "binary" if kind in BINARY_KINDS else "float"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Index:
    """An inverted-file index of ASMK* / R-ASMK* (or float ASMK / R-ASMK) aggregations.

    Args:
        codebook: the :class:`d2r.Codebook` the aggregations were made with (its size K,
            dimension D and checksum are recorded; the centroids are not stored).
        kind: ``rasmk_star`` (default), ``asmk_star``, ``rasmk``, ``asmk`` or ``naive_rasmk``. Binary kinds
            accept aggregations of both binary kinds (and float kinds both float kinds), as
            :func:`d2r.similarity` does. VLAD kinds are dense vectors and are not indexed.
        alpha, tau: selectivity sigma(s) = sign(s)|s|^alpha if s > tau else 0.
        normalize: default of :meth:`search`'s ``normalize``.

    ``Index.open(path)`` reads a saved index; ``len(idx)`` counts live images and
    ``image_id in idx`` tests one.
    """

    def __init__(self, codebook: Codebook, kind: str = "rasmk_star", alpha: float = 3.0, tau: float = 0.0,
                 normalize: bool = False):
        if not isinstance(codebook, Codebook):
            raise InputError(f"codebook: expected a d2r.Codebook, got {type(codebook).__name__}")
        self._setup(codebook.size, codebook.dim, _check_kind(kind), real_number(alpha, "alpha"),
                    real_number(tau, "tau"), bool(normalize), codebook.checksum, None)
        self._base = _Postings.empty(self._payload)
        self._base_items = 0
        self._base_images = 0
        self._b_item_start = np.zeros(1, dtype=np.int64)
        self._b_item_words = np.zeros(0, dtype=np.int64)
        self._b_ids = (np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))
        self._b_meta = (np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))
        self._dead_base = np.zeros(0, dtype=np.bool_)

    def _setup(self, k, dim, kind, alpha, tau, normalize, checksum, path):
        self._k, self._dim, self._kind = int(k), int(dim), kind
        self._alpha, self._tau, self._normalize = alpha, tau, normalize
        self._checksum = checksum
        self._path = path
        self._payload = _payload_bytes(kind, self._dim)
        self._mmap = None
        self._sections = None  # section table of the file the base was read from
        self._data = None
        self._closed = False
        self._n_dead = 0
        self._dead_base = np.zeros(0, dtype=np.bool_)
        self._dead_delta = bytearray()
        # Delta: images added since the base, and their items not yet in the delta postings.
        self._d_ids: list[str] = []
        self._d_meta: list[str] = []
        self._d_item_start: list[int] = []  # first item of each delta image (global numbering)
        self._d_item_words: list[int] = []
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (words, codes) per item
        self._pending_first_item = 0
        self._delta = _Postings.empty(self._payload, _DELTA_SHIFT)
        self._id_map: dict[str, int] | None = None
        self._cache: dict[str, Any] = {}
        # Lazy check of a stored inverted file opened without the full check: crc32 per word
        # (section ivf_word_crc32) and which words passed. None: nothing left to check.
        self._word_crc = None
        self._word_ok = None

    # -- properties -----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._kind

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def codebook_size(self) -> int:
        return self._k

    @property
    def codebook_checksum(self) -> str:
        """sha256 hex of the codebook (:attr:`d2r.Codebook.checksum`) the index was built with."""
        return self._checksum

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def tau(self) -> float:
        return self._tau

    @property
    def path(self) -> Path | None:
        """The file the base was read from, or None for an index built in memory."""
        return self._path

    @property
    def n_items(self) -> int:
        """Stored items (images and regions), tombstoned ones included until compaction."""
        return self._base_items + len(self._d_item_words)

    @property
    def n_entries(self) -> int:
        """Stored (item, visual word) entries, tombstoned ones included."""
        return self._base.n_entries + self._delta.n_entries + sum(w.shape[0] for w, _ in self._pending)

    def _n_images(self) -> int:
        return self._base_images + len(self._d_ids)

    def _name(self) -> str:
        return str(self._path) if self._path is not None else "in-memory index"

    def __len__(self) -> int:
        return self._n_images() - self._n_dead

    def __contains__(self, image_id) -> bool:
        return isinstance(image_id, str) and image_id in self._ids()

    def __repr__(self) -> str:
        return (f"Index(kind={self._kind!r}, K={self._k}, D={self._dim}, images={len(self)}, items={self.n_items}, "
                f"path={self._name()!r})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Release the memory map (the index is unusable afterwards if it was mapped)."""
        self._base = _Postings.empty(self._payload)
        empty = (np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))
        self._b_ids = self._b_meta = empty
        self._mmap = None
        self._data = None
        self._closed = True

    # -- adding and removing ----------------------------------------------------------------------
    def add(self, image_id: str, agg: Aggregation, metadata=None) -> None:
        """Add one image as one item. ``metadata``: anything JSON can encode (returned in hits)."""
        self.add_regions(image_id, [agg], metadata=metadata)

    def add_regions(self, image_id: str, aggs, metadata=None) -> None:
        """Add one image as several items, e.g. [whole image, box 1, box 2, ...] (D2R-ASMK*).

        The image score of a search is the max or the mean (``pooling``) over its items.
        """
        image_id = self._check_new_id(image_id)
        if isinstance(aggs, Aggregation):
            raise InputError("aggs: expected a list of d2r.Aggregation (one per region), got a single Aggregation")
        try:
            aggs = list(aggs)
        except TypeError:
            raise InputError(f"aggs: expected a list of d2r.Aggregation, got {type(aggs).__name__}") from None
        if not aggs:
            raise InputError("aggs: expected at least one aggregation (region 0 is usually the whole image)")
        items = [self._item_arrays(a, f"aggs[{i}]") for i, a in enumerate(aggs)]
        meta = _encode_metadata(metadata)
        # Validation is over: mutate.
        self._d_ids.append(image_id)
        self._d_meta.append(meta)
        self._d_item_start.append(self.n_items)
        for words, codes in items:
            self._d_item_words.append(int(words.shape[0]))
            self._pending.append((words, codes))
        self._dead_delta.append(0)
        if self._id_map is not None:
            self._id_map[image_id] = self._n_images() - 1
        self._cache.clear()

    def remove(self, image_id: str) -> None:
        """Tombstone an image (its entries stay stored until :meth:`compact` or a compacting save)."""
        ids = self._ids()
        if not isinstance(image_id, str) or image_id not in ids:
            raise InputError(f"image_id: {image_id!r} is not in the index")
        img = ids.pop(image_id)
        if img < self._base_images:
            self._dead_base[img] = True
        else:
            self._dead_delta[img - self._base_images] = 1
        self._n_dead += 1
        self._cache.clear()

    def _check_new_id(self, image_id) -> str:
        if not isinstance(image_id, str) or not image_id:
            raise InputError(f"image_id: expected a non-empty string, got {image_id!r}")
        try:
            image_id.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"image_id: {image_id!r} is not valid unicode") from None
        if image_id in self._ids():
            raise InputError(f"image_id: {image_id!r} is already in the index (remove it first to replace it)")
        return image_id

    def _item_arrays(self, agg, name):
        """(uint32 words [n], uint8 codes [n, payload]) of one aggregation, checked."""
        if not isinstance(agg, Aggregation):
            raise InputError(f"{name}: expected a d2r.Aggregation, got {type(agg).__name__}")
        if agg.kind not in INDEX_KINDS or _family(agg.kind) != _family(self._kind):
            raise InputError(f"{name}: an index of kind {self._kind!r} cannot store an aggregation of kind {agg.kind!r}")
        if agg.dim != self._dim:
            raise InputError(f"{name}: descriptor dimension D = {agg.dim} differs from the index's D = {self._dim}")
        words = np.asarray(agg.words, dtype=np.uint32)
        if words.size and int(words[-1]) >= self._k:
            raise InputError(f"{name}: visual word {int(words[-1])} is outside the codebook (K = {self._k})")
        if _family(self._kind) == "binary":
            codes = np.ascontiguousarray(agg.codes, dtype=np.uint8)
        else:
            codes = np.ascontiguousarray(agg.vectors, dtype="<f4").view(np.uint8).reshape(words.shape[0], self._payload)
        return words, codes

    # -- lookup helpers ---------------------------------------------------------------------------
    def _ids(self) -> dict[str, int]:
        """id -> image number of live images (built on first use: decoding 1M ids takes a while)."""
        if self._id_map is None:
            m = {}
            dead = self._dead_all()
            offsets, blob = self._b_ids
            raw = blob.tobytes()
            o = offsets.tolist()
            for img in range(self._base_images):
                if not dead[img]:
                    try:
                        key = raw[o[img] : o[img + 1]].decode("utf-8")
                    except UnicodeDecodeError:
                        raise IndexFormatError(f"{self._name()}: id of image {img} is not valid UTF-8") from None
                    if key in m:
                        raise IndexFormatError(f"{self._name()}: image id {key!r} appears twice")
                    m[key] = img
            for j, key in enumerate(self._d_ids):
                img = self._base_images + j
                if not dead[img]:
                    m[key] = img
            self._id_map = m
        return self._id_map

    def _blob_text(self, table, img, what):
        offsets, blob = table
        a, b = int(offsets[img]), int(offsets[img + 1])
        try:
            return blob[a:b].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise IndexFormatError(f"{self._name()}: {what} of image {img} is not valid UTF-8") from None

    def _image_id(self, img: int) -> str:
        if img < self._base_images:
            return self._blob_text(self._b_ids, img, "id")
        return self._d_ids[img - self._base_images]

    def _metadata(self, img: int):
        text = self._blob_text(self._b_meta, img, "metadata") if img < self._base_images else self._d_meta[img - self._base_images]
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise IndexFormatError(f"{self._name()}: metadata of image {img} is not valid JSON") from None

    def image_ids(self) -> list[str]:
        """Ids of the live images in insertion order."""
        dead = self._dead_all()
        return [self._image_id(i) for i in range(self._n_images()) if not dead[i]]

    def get_metadata(self, image_id: str):
        """The metadata stored with ``image_id`` (a fresh copy)."""
        ids = self._ids()
        if not isinstance(image_id, str) or image_id not in ids:
            raise InputError(f"image_id: {image_id!r} is not in the index")
        return self._metadata(ids[image_id])

    # -- the delta's postings ---------------------------------------------------------------------
    def _flush(self) -> None:
        """Fold pending items into the delta's inverted file."""
        if not self._pending:
            return
        first = self._pending_first_item
        words = np.concatenate([w for w, _ in self._pending])
        codes = np.concatenate([c for _, c in self._pending]) if words.size else np.zeros((0, self._payload), np.uint8)
        items = np.repeat(np.arange(first, first + len(self._pending), dtype=np.uint32),
                          [w.shape[0] for w, _ in self._pending])
        offsets, order = kernels.group_by_word(words, self._k)
        new = _Postings(offsets, 1, _DELTA_SHIFT, items[order], codes[order])
        old = self._delta
        if old.n_entries:
            new = self._merge_in_memory(old, new, None, _DELTA_SHIFT, 1)
        self._delta = new
        self._pending = []
        self._pending_first_item = self.n_items

    def _merge_in_memory(self, a: _Postings, b: _Postings, item_map, shift, n_blocks) -> _Postings:
        total_items = self.n_items
        if item_map is None:
            item_map = np.arange(total_items, dtype=np.int64)
            expected = a.n_entries + b.n_entries
        else:
            expected = int(np.sum(self._all_item_words()[item_map >= 0]))
        low = np.empty(expected, dtype=np.uint16 if shift == BLOCK_SHIFT else np.uint32)
        codes = np.empty((expected, self._payload), dtype=np.uint8)
        counts = np.zeros(self._k * n_blocks, dtype=np.int64)
        n = kernels.merge_ivf_words(0, self._k, a.offsets, a.n_blocks, a.shift, a.low, a.codes, b.offsets, b.n_blocks,
                                    b.shift, b.low, b.codes, item_map, n_blocks, shift, low, codes, counts)
        if n != expected:
            raise self._inconsistent()
        offsets = np.zeros(self._k * n_blocks + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return _Postings(offsets, n_blocks, shift, low, codes)

    def _dead_all(self) -> np.ndarray:
        """bool [M] tombstones of all images."""
        c = self._cache.get("dead")
        if c is None:
            c = np.concatenate([self._dead_base, np.frombuffer(bytes(self._dead_delta), dtype=np.bool_)])
            self._cache["dead"] = c
        return c

    def _all_item_words(self) -> np.ndarray:
        c = self._cache.get("item_words")
        if c is None:
            c = np.concatenate([self._b_item_words.astype(np.int64), np.asarray(self._d_item_words, dtype=np.int64)])
            self._cache["item_words"] = c
        return c

    def _all_item_start(self) -> np.ndarray:
        c = self._cache.get("item_start")
        if c is None:
            c = np.concatenate([self._b_item_start[:-1], np.asarray(self._d_item_start + [self.n_items], dtype=np.int64)])
            self._cache["item_start"] = c
        return c

    # -- search -----------------------------------------------------------------------------------
    def search(self, query: Aggregation, top_k: int = 100, normalize: bool | None = None, pooling: str = "max") -> list[Hit]:
        """The ``top_k`` best live images for ``query``, best first.

        The score of an item is ``d2r.similarity(query, item, alpha, tau, normalize)`` exactly
        (-1 if either has no visual word); an image's score is the max (``pooling="max"``) or
        the mean (``"avg"``: sequential sum over its items in insertion order, divided by their
        number) over its items. Ties rank the image added first first. ``normalize=None`` uses
        the index's default.

        Threads: queries whose posting lists hold at least ``PARALLEL_MIN_ENTRIES`` entries are
        split over numba's threads (``numba.set_num_threads``); where other work shares the
        cores, ``numba.set_num_threads(1)`` gives steadier latency.
        """
        if not isinstance(query, Aggregation):
            raise InputError(f"query: expected a d2r.Aggregation, got {type(query).__name__}")
        if query.kind not in INDEX_KINDS or _family(query.kind) != _family(self._kind):
            raise IndexFormatError(f"{self._name()}: an index of kind {self._kind!r} cannot answer a query of kind {query.kind!r}")
        if query.dim != self._dim:
            raise IndexFormatError(f"{self._name()}: index has descriptor dimension D = {self._dim}, the query has D = {query.dim}")
        qwords = np.ascontiguousarray(query.words, dtype=np.uint32)
        if qwords.size and int(qwords[-1]) >= self._k:
            raise IndexFormatError(f"{self._name()}: query visual word {int(qwords[-1])} does not exist in the index's codebook "
                                   f"(K = {self._k}); was the query aggregated with another codebook?")
        top_k = positive_int(top_k, "top_k")
        if pooling not in ("max", "avg"):
            raise InputError(f"pooling: expected 'max' or 'avg', got {pooling!r}")
        normalize = self._normalize if normalize is None else bool(normalize)
        if self._closed:
            raise InputError(f"{self._name()}: the index is closed")
        self._flush()
        scores = self._item_scores(query, qwords, normalize)
        dead = self._dead_all()
        images, values = kernels.pool_top_k(scores, self._all_item_start(), dead, pooling == "avg", min(top_k, len(dead) or 1))
        return [Hit(self._image_id(int(i)), float(s), self._metadata(int(i))) for i, s in zip(images, values)]

    def _item_scores(self, query, qwords, normalize) -> np.ndarray:
        n_items = self.n_items
        scores = np.zeros(n_items)
        if qwords.size and n_items:
            self._check_words(qwords)
            n_chunks = self._chunks_for(qwords)
            ok = True
            if _family(self._kind) == "binary":
                table = self._cache.get("table")
                if table is None:
                    table = kernels.selectivity_table(self._dim, self._alpha, self._tau)
                    self._cache["table"] = table
                qcodes = np.ascontiguousarray(query.codes, dtype=np.uint8)
                if self._payload % 8 == 0:
                    qcodes = qcodes.view(np.uint64)
                for seg, lo, hi in ((self._base, 0, self._base_items), (self._delta, self._base_items, n_items)):
                    if hi > lo and seg.n_entries:
                        codes = seg.codes.view(np.uint64) if self._payload % 8 == 0 else seg.codes
                        if n_chunks == 1:  # no parallel launch: waking idle threads costs more than small jobs
                            ok &= kernels.ivf_binary_range(qwords, qcodes, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                            codes, table, lo, hi, hi, scores)
                        else:
                            ok &= kernels.ivf_score_binary(qwords, qcodes, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                           codes, table, lo, hi, hi, n_chunks, scores)
            else:
                qvecs = np.ascontiguousarray(query.vectors, dtype=np.float32)
                for seg, lo, hi in ((self._base, 0, self._base_items), (self._delta, self._base_items, n_items)):
                    if hi > lo and seg.n_entries:
                        vecs = seg.codes.view("<f4")
                        if n_chunks == 1:
                            ok &= kernels.ivf_float_range(qwords, qvecs, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                           vecs, self._alpha, self._tau, lo, hi, hi, scores)
                        else:
                            ok &= kernels.ivf_score_float(qwords, qvecs, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                          vecs, self._alpha, self._tau, lo, hi, hi, n_chunks, scores)
            if not ok:
                raise IndexFormatError(f"{self._name()}: the inverted file names an item beyond the {self._base_items} "
                                       "stored items (the file is corrupt; idx.verify() checks it fully)")
        kernels.finish_item_scores(scores, self._all_item_words(), int(qwords.size), normalize)
        return scores

    def _check_words(self, words) -> None:
        """Check the crc32 of the stored entries of every visual word in ``words`` that no
        search has checked yet (files opened with ``verify=None`` without the full check).

        Raises :class:`d2r.IndexFormatError` naming the file and the word. Safe from several
        threads at once: a word is marked as checked only after it passed, so at worst two
        threads check the same word."""
        ok = self._word_ok
        if ok is None:
            return
        words = np.asarray(words, dtype=np.int64)
        todo = words[~ok[words]]
        if not todo.size:
            return
        b = self._base
        nb = b.n_blocks
        todo = np.unique(todo)
        if nb:
            starts, ends = b.offsets[todo * nb].tolist(), b.offsets[(todo + 1) * nb].tolist()
        else:
            starts = ends = [0] * todo.size
        expected = self._word_crc[todo].tolist()
        p, q = b.low.dtype.itemsize, self._payload
        low = np.ascontiguousarray(b.low).view(np.uint8).data
        codes = b.codes.reshape(-1).data
        for w, a, e, crc in zip(todo.tolist(), starts, ends, expected):
            if (zlib.crc32(codes[a * q : e * q], zlib.crc32(low[a * p : e * p])) if e > a else 0) != crc:
                raise IndexFormatError(f"{self._path}: checksum mismatch in the inverted file of visual word {w} "
                                       "(sections ivf_items / ivf_codes: the file is corrupt)")
        ok[todo] = True

    def _chunks_for(self, qwords) -> int:
        """Threads for one query: numba's thread count, or 1 when the posting lists of the
        query hold fewer than ``PARALLEL_MIN_ENTRIES`` entries."""
        threads = numba.get_num_threads()
        if threads == 1:
            return 1
        w = qwords.astype(np.int64)
        work = 0
        for seg in (self._base, self._delta):
            if seg.n_blocks:
                work += int(np.sum(seg.offsets[(w + 1) * seg.n_blocks] - seg.offsets[w * seg.n_blocks]))
        return threads if work >= PARALLEL_MIN_ENTRIES else 1

    # -- compaction and persistence ---------------------------------------------------------------
    def _plan(self, drop_dead: bool):
        """Images to keep and the old -> new item numbering (int64, -1 = dropped)."""
        n_images = self._n_images()
        keep = ~self._dead_all() if drop_dead else np.ones(n_images, dtype=np.bool_)
        starts = self._all_item_start()
        sizes = np.diff(starts)
        item_keep = np.repeat(keep, sizes)
        item_map = np.full(self.n_items, -1, dtype=np.int64)
        item_map[item_keep] = np.arange(int(np.count_nonzero(item_keep)), dtype=np.int64)
        return keep, item_keep, item_map

    def _directory(self, keep, item_keep):
        """The directory sections (everything but the inverted file) of the kept images."""
        kept = np.flatnonzero(keep)
        sizes = np.diff(self._all_item_start())[kept]
        item_start = np.zeros(kept.size + 1, dtype="<u8")
        np.cumsum(sizes, out=item_start[1:])
        item_words = self._all_item_words()[item_keep].astype("<u4")
        tomb = np.packbits(self._dead_all()[kept], bitorder="little")
        ids = [self._image_id(int(i)).encode("utf-8") for i in kept]
        metas = [(self._blob_text(self._b_meta, int(i), "metadata") if i < self._base_images
                  else self._d_meta[int(i) - self._base_images]).encode("utf-8") for i in kept]
        return {
            "image_item_start": item_start,
            "item_words": item_words,
            "tombstones": tomb,
            "id_offsets": _offsets_of(ids),
            "ids": np.frombuffer(b"".join(ids), dtype=np.uint8),
            "metadata_offsets": _offsets_of(metas),
            "metadata": np.frombuffer(b"".join(metas), dtype=np.uint8),
        }

    def _merged_chunks(self, item_map, n_blocks):
        """Yield (low uint16 [e], codes uint8 [e, P], counts int64 [(w1 - w0) * n_blocks], w0)
        word chunks of base + delta merged and renumbered through ``item_map`` (the base's
        words are crc-checked first where the file was opened without the full check)."""
        per_word = self._base.word_counts(self._k) + self._delta.word_counts(self._k)
        cum = np.concatenate([[0], np.cumsum(per_word)])
        w0 = 0
        while w0 < self._k:
            w1 = int(np.searchsorted(cum, cum[w0] + _MERGE_CHUNK_ENTRIES, side="right")) - 1
            w1 = min(max(w1, w0 + 1), self._k)
            cap = int(cum[w1] - cum[w0])
            low = np.empty(cap, dtype=np.uint16)
            codes = np.empty((cap, self._payload), dtype=np.uint8)
            counts = np.zeros((w1 - w0) * n_blocks, dtype=np.int64)
            self._check_words(np.arange(w0, w1))
            a, b = self._base, self._delta
            n = kernels.merge_ivf_words(w0, w1, a.offsets, a.n_blocks, a.shift, a.low, a.codes, b.offsets, b.n_blocks, b.shift,
                                        b.low, b.codes, item_map, n_blocks, BLOCK_SHIFT, low, codes, counts)
            if n < 0:
                raise self._inconsistent()
            yield low[:n], codes[:n], counts, w0
            w0 = w1

    def _inconsistent(self) -> IndexFormatError:
        return IndexFormatError(f"{self._name()}: the inverted file disagrees with the per-item word counts "
                                "(the file is corrupt; idx.verify() checks it fully)")

    def compact(self) -> None:
        """Drop tombstoned images for good, renumbering the rest (in memory).

        A memory-mapped index is read into memory by this; for a large file prefer
        ``idx.save(new_path, compact=True)`` (streams) and ``Index.open(new_path)``.
        """
        self._flush()
        keep, item_keep, item_map = self._plan(drop_dead=True)
        n_items = int(np.count_nonzero(item_keep))
        n_blocks = -(-n_items // (1 << BLOCK_SHIFT))
        parts = list(self._merged_chunks(item_map, n_blocks))
        low = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint16)
        codes = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, self._payload), np.uint8)
        counts = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(self._k * n_blocks + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        d = self._directory(keep, item_keep)
        self._load_base(_Postings(offsets, n_blocks, BLOCK_SHIFT, low, codes), d, keep_path=False)

    def _load_base(self, postings: _Postings, d: dict, keep_path: bool) -> None:
        path = self._path if keep_path else None
        self._setup(self._k, self._dim, self._kind, self._alpha, self._tau, self._normalize, self._checksum, path)
        self._base = postings
        self._b_item_start = d["image_item_start"].astype(np.int64)
        self._b_item_words = d["item_words"].astype(np.int64)
        n_images = self._b_item_start.shape[0] - 1
        self._base_images = n_images
        self._base_items = int(self._b_item_start[-1])
        self._pending_first_item = self._base_items
        self._b_ids = (d["id_offsets"].astype(np.int64), d["ids"])
        self._b_meta = (d["metadata_offsets"].astype(np.int64), d["metadata"])
        self._dead_base = np.unpackbits(d["tombstones"], count=n_images, bitorder="little").astype(np.bool_)
        self._n_dead = int(np.count_nonzero(self._dead_base))

    def save(self, path, compact: bool = False) -> None:
        """Write the whole index (base + delta) to ``path`` atomically (temporary file in the
        same folder, fsync, rename). Tombstones are kept unless ``compact=True``.

        The in-memory state is unchanged: a mapped index keeps using the file it was opened
        from (still valid after a rename over it on POSIX); open the new file to map it.

        ``path`` must be new, an empty file or a d2r index file: anything else (a folder, a
        symbolic link, another file) raises :class:`d2r.IndexFormatError` and is left as it
        is. Temporary files that an interrupted save of ``path`` left behind are removed.
        """
        path = Path(path)
        check_index_target(path)
        self._flush()
        keep, item_keep, item_map = self._plan(drop_dead=compact)
        n_items = int(np.count_nonzero(item_keep))
        n_blocks = -(-n_items // (1 << BLOCK_SHIFT))
        d = self._directory(keep, item_keep)
        n_entries = int(d["item_words"].astype(np.int64).sum())
        lengths = {name: d[name].nbytes for name in d}
        lengths["ivf_offsets"] = 8 * (self._k * n_blocks + 1)
        lengths["ivf_items"] = 2 * n_entries
        lengths["ivf_codes"] = self._payload * n_entries
        lengths["ivf_word_crc32"] = 4 * self._k
        header_size = _HEADER.size + _SECTION.size * len(_SECTIONS)
        pos = _align(header_size)
        offsets = {}
        for name in _SECTIONS:
            offsets[name] = pos
            pos = _align(pos + lengths[name])
        end = pos
        hashes = {}
        with atomic_file(path) as fh:
            fh.truncate(end + 32)
            for name in d:
                data = np.ascontiguousarray(d[name]).view(np.uint8)
                fh.seek(offsets[name])
                fh.write(data.data)
                hashes[name] = hashlib.sha256(data.data).digest()
            h_low, h_codes = hashlib.sha256(), hashlib.sha256()
            p_low, p_codes = offsets["ivf_items"], offsets["ivf_codes"]
            counts = []
            written = 0
            word_crc = np.zeros(self._k, dtype="<u4")
            for low, codes, c, w0 in self._merged_chunks(item_map, n_blocks):
                bl = low.astype("<u2").view(np.uint8).data
                bc = np.ascontiguousarray(codes).reshape(-1).data
                if n_blocks:
                    _word_crcs(bl, bc, c.reshape(-1, n_blocks).sum(axis=1), self._payload, word_crc[w0:])
                fh.seek(p_low)
                fh.write(bl)
                fh.seek(p_codes)
                fh.write(bc)
                h_low.update(bl)
                h_codes.update(bc)
                p_low += len(bl)
                p_codes += len(bc)
                written += low.shape[0]
                counts.append(c)
            if written != n_entries:
                raise self._inconsistent()
            ivf_offsets = np.zeros(self._k * n_blocks + 1, dtype="<u8")
            if counts:
                np.cumsum(np.concatenate(counts), out=ivf_offsets[1:])
            fh.seek(offsets["ivf_offsets"])
            fh.write(ivf_offsets.data.cast("B"))
            hashes["ivf_offsets"] = hashlib.sha256(ivf_offsets.data.cast("B")).digest()
            hashes["ivf_items"] = h_low.digest()
            hashes["ivf_codes"] = h_codes.digest()
            fh.seek(offsets["ivf_word_crc32"])
            fh.write(word_crc.data.cast("B"))
            hashes["ivf_word_crc32"] = hashlib.sha256(word_crc.data.cast("B")).digest()
            header = _HEADER.pack(MAGIC, VERSION, header_size, self._k, self._dim, _KIND_CODES[self._kind],
                                  _FLAG_NORMALIZE if self._normalize else 0, self._alpha, self._tau,
                                  bytes.fromhex(self._checksum), int(keep.sum()), n_items, n_entries, n_blocks,
                                  self._payload, len(_SECTIONS))
            header += b"".join(_SECTION.pack(offsets[n], lengths[n], hashes[n]) for n in _SECTIONS)
            fh.seek(0)
            fh.write(header)
            fh.seek(end)
            fh.write(hashlib.sha256(header).digest())

    @classmethod
    def open(cls, path, mmap: bool = True, codebook: Codebook | None = None, verify: bool | None = None) -> "Index":
        """Open a file written by :meth:`save`.

        mmap: map the file (numpy.memmap, shared between processes, nothing copied into RAM)
            instead of reading it. codebook: if given, its K, D and checksum must match the
            file's. verify: check the sha256 of the inverted file at open (True); None (default)
            does so for files up to ``VERIFY_AUTO_MAX_BYTES`` and, for larger ones, checks the
            crc32 of each visual word's entries the first time a search or a save reads them
            (version 1 files, which have no per-word crc32, get the full check); False checks
            neither (a trusted file: an unverified flipped code changes scores only,
            ``idx.verify()`` finds it). The header, the directory sections and every offset are
            always checked, so no corruption can make a search read out of bounds.

        Raises :class:`d2r.IndexFormatError` naming the file and the problem. Temporary files
        that an interrupted save of ``path`` left behind are removed.
        """
        path = Path(path)
        clean_stale(path)
        if codebook is not None and not isinstance(codebook, Codebook):
            raise InputError(f"codebook: expected a d2r.Codebook, got {type(codebook).__name__}")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise IndexFormatError(f"{path}: cannot read index file ({exc.strerror or exc})") from exc
        if size < _HEADER.size + 32:
            raise IndexFormatError(f"{path}: not a d2r index (file too short: {size} bytes)")
        try:
            if mmap:
                data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
            else:
                data = np.fromfile(path, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"{path}: cannot read index file ({exc})") from exc
        if data.shape[0] != size:
            raise IndexFormatError(f"{path}: file changed while opening it")
        head = _parse_header(path, data, codebook)
        idx = cls.__new__(cls)
        idx._setup(head["K"], head["D"], head["kind"], head["alpha"], head["tau"], head["normalize"], head["checksum"], path)
        sec = head["sections"]
        d = {
            "image_item_start": sec["image_item_start"].view("<u8"),
            "item_words": sec["item_words"].view("<u4"),
            "tombstones": sec["tombstones"],
            "id_offsets": sec["id_offsets"].view("<u8"),
            "ids": sec["ids"],
            "metadata_offsets": sec["metadata_offsets"].view("<u8"),
            "metadata": sec["metadata"],
        }
        postings = _Postings(sec["ivf_offsets"].view("<i8"), head["n_blocks"], BLOCK_SHIFT, sec["ivf_items"].view("<u2"),
                             sec["ivf_codes"].reshape(head["n_entries"], head["payload"]))
        idx._load_base(postings, d, keep_path=True)
        idx._mmap = data if mmap else None
        idx._sections = head["section_table"]
        idx._data = data
        crc = sec.get("ivf_word_crc32")
        if verify or (verify is None and (size <= VERIFY_AUTO_MAX_BYTES or crc is None)):
            idx.verify()
        elif verify is None and head["n_entries"]:
            idx._word_crc = crc.view("<u4")
            idx._word_ok = np.zeros(head["K"], dtype=np.bool_)
        return idx

    def verify(self) -> None:
        """Full check of the opened file: sha256 of the inverted file, and every entry in range,
        ascending, and counted in its item's word count. Raises :class:`d2r.IndexFormatError`.
        A no-op for an index built in memory."""
        table = getattr(self, "_sections", None)
        if table is None:
            return
        for name in _LAZY_SECTIONS:
            off, length, digest = table[name]
            h = hashlib.sha256()
            step = 1 << 26
            for a in range(off, off + length, step):
                h.update(memoryview(self._data[a : min(a + step, off + length)]))
            if h.digest() != digest:
                raise IndexFormatError(f"{self._path}: checksum mismatch in section {name} (the file is corrupt)")
        b = self._base
        err = kernels.ivf_check_entries(b.offsets, b.n_blocks, b.shift, b.low, self._base_items, self._b_item_words)
        if err:
            what = {1: "an entry names an item beyond the stored items", 2: "a posting list is not in ascending item order",
                    3: "posting lists disagree with the per-item word counts"}[int(err)]
            raise IndexFormatError(f"{self._path}: inconsistent inverted file: {what}")
        self._word_ok = None  # every word is checked now

    def get(self, image_id: str) -> list:
        """The stored items of a live image as :class:`d2r.Aggregation` objects, one per item
        (one for :meth:`add`, one per region for :meth:`add_regions`), in insertion order.

        Each is of the index's kind with ``n_regions=1`` (the region count is not stored);
        adding them to an index with the same codebook stores the same items. Scans the
        inverted file once per item: O(entries), meant for syncing changed images, not search.
        """
        ids = self._ids()
        if not isinstance(image_id, str) or image_id not in ids:
            raise InputError(f"image_id: {image_id!r} is not in the index")
        if self._closed:
            raise InputError(f"{self._name()}: the index is closed")
        self._flush()
        self._check_words(np.arange(self._k))
        start = self._all_item_start()
        img = ids[image_id]
        out = []
        for item in range(int(start[img]), int(start[img + 1])):
            seg = self._base if item < self._base_items else self._delta
            block, low = item >> seg.shift, item & ((1 << seg.shift) - 1)
            hits = np.flatnonzero(seg.low == low)
            # Entry e lies in run r = (word * n_blocks + block) with offsets[r] <= e < offsets[r + 1].
            runs = np.searchsorted(seg.offsets, hits, side="right") - 1
            n_blocks = max(seg.n_blocks, 1)
            mine = runs % n_blocks == block
            words = (runs[mine] // n_blocks).astype(np.uint32)
            codes = np.asarray(seg.codes[hits[mine]])
            if _family(self._kind) == "binary":
                out.append(Aggregation(self._kind, self._dim, words, codes=codes))
            else:
                out.append(Aggregation(self._kind, self._dim, words, vectors=codes.view("<f4").reshape(-1, self._dim)))
        return out


# -- helpers ------------------------------------------------------------------------------------
def _check_kind(kind) -> str:
    if kind in ("vlad", "rvlad"):
        raise InputError(f"kind: {kind!r} is a dense vector, not a set of visual words; an inverted file does not apply "
                         f"(use one of {', '.join(INDEX_KINDS)})")
    if kind not in INDEX_KINDS:
        raise InputError(f"kind: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    return kind


def _encode_metadata(metadata) -> str:
    if metadata is None:
        return ""
    try:
        return json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InputError(f"metadata: must be JSON-serialisable ({exc})") from None


def _word_crcs(low: memoryview, codes: memoryview, per_word: np.ndarray, payload: int, out: np.ndarray) -> None:
    """out[j] = crc32 of word j's item bytes (uint16 each) followed by its code bytes, for the
    consecutive words of one chunk with ``per_word`` entries each."""
    ends = np.cumsum(per_word).tolist()
    a = 0
    for j, e in enumerate(ends):
        if e > a:
            out[j] = zlib.crc32(codes[a * payload : e * payload], zlib.crc32(low[2 * a : 2 * e]))
        a = e


def check_index_target(path) -> None:
    """Refuse to replace what is not a d2r index: ``path`` may be missing, an empty file or an
    index file (magic ``D2RINDEX``). Raises :class:`d2r.IndexFormatError` naming it."""
    path = Path(path)
    if os.path.islink(path):
        raise IndexFormatError(f"{path}: is a symbolic link; d2r does not replace it by an index (save to the file it points to)")
    if not os.path.lexists(path):
        return
    if not path.is_file():
        raise IndexFormatError(f"{path}: exists and is not a file (a folder?); d2r does not replace it by an index")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError as exc:
        raise IndexFormatError(f"{path}: exists and cannot be read ({exc.strerror or exc}); not replacing it") from exc
    if head and head != MAGIC:
        raise IndexFormatError(f"{path}: exists and is not a d2r index; d2r does not overwrite it "
                               "(remove it or choose another name)")


def _offsets_of(chunks) -> np.ndarray:
    out = np.zeros(len(chunks) + 1, dtype="<u8")
    if chunks:
        np.cumsum([len(c) for c in chunks], out=out[1:])
    return out


def _parse_header(path, data: np.ndarray, codebook):
    """Eager checks of a mapped index file; returns its header fields and section views."""
    size = data.shape[0]

    def bad(msg):
        return IndexFormatError(f"{path}: {msg}")

    raw = data[: _HEADER.size].tobytes()
    (magic, version, header_size, k, dim, kind_code, flags, alpha, tau, cb_sha, n_images, n_items, n_entries, n_blocks,
     payload, n_sections) = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise bad(f"not a d2r index (bad magic {magic!r})")
    if version > VERSION:
        raise bad(f"index format version {version} is newer than this d2r supports ({VERSION}); upgrade d2r")
    if version < 1:
        raise bad(f"invalid index format version {version}")
    names = _SECTIONS if version >= 2 else _SECTIONS_V1
    if n_sections != len(names) or header_size != _HEADER.size + _SECTION.size * n_sections:
        raise bad(f"invalid header (size {header_size}, {n_sections} sections)")
    if header_size + 32 > size:
        raise bad(f"truncated index file ({size} bytes)")
    header = data[:header_size].tobytes()
    if hashlib.sha256(header).digest() != data[size - 32 :].tobytes():
        raise bad("header checksum mismatch at the end of the file (truncated or corrupt file)")
    if kind_code not in _CODE_KINDS:
        raise bad(f"unknown index kind code {kind_code}")
    kind = _CODE_KINDS[kind_code]
    if not (1 <= k <= 1 << 31 and 1 <= dim <= 1 << 16):
        raise bad(f"invalid codebook size or dimension in header (K = {k}, D = {dim})")
    if payload != _payload_bytes(kind, dim):
        raise bad(f"payload of {payload} bytes per entry does not match kind {kind} with D = {dim}")
    if not (math.isfinite(alpha) and math.isfinite(tau)):
        raise bad(f"alpha/tau not finite ({alpha}, {tau})")
    if n_items < n_images or n_blocks != -(-n_items // (1 << BLOCK_SHIFT)) or n_items >= 1 << 32:
        raise bad(f"inconsistent counts (images {n_images}, items {n_items}, blocks {n_blocks})")
    checksum = cb_sha.hex()
    if codebook is not None:
        if codebook.dim != dim:
            raise bad(f"built for descriptors of D = {dim}, the codebook given has D = {codebook.dim}")
        if codebook.size != k or codebook.checksum != checksum:
            raise bad(f"built with another codebook (K = {k}, sha256 {checksum[:12]}...), "
                      f"not the one given (K = {codebook.size}, sha256 {codebook.checksum[:12]}...)")
    expected = {
        "image_item_start": 8 * (n_images + 1),
        "item_words": 4 * n_items,
        "tombstones": (n_images + 7) // 8,
        "id_offsets": 8 * (n_images + 1),
        "metadata_offsets": 8 * (n_images + 1),
        "ivf_offsets": 8 * (k * n_blocks + 1),
        "ivf_items": 2 * n_entries,
        "ivf_codes": payload * n_entries,
        "ivf_word_crc32": 4 * k,
    }
    table = {}
    sections = {}
    pos = _align(header_size)
    gaps = [(header_size, pos)]
    for i, name in enumerate(names):
        off, length, digest = _SECTION.unpack_from(header, _HEADER.size + i * _SECTION.size)
        if off != pos or (name in expected and length != expected[name]) or off + length > size - 32:
            raise bad(f"section {name} at offset {off} with {length} bytes is out of place (truncated or corrupt file)")
        pos = _align(off + length)
        gaps.append((off + length, pos))
        table[name] = (off, length, digest)
        sections[name] = data[off : off + length]
    if pos + 32 != size:
        raise bad(f"file is {size} bytes, its sections say {pos + 32}")
    # Alignment padding is covered by no checksum: it must be zero.
    if any(data[a:b].any() for a, b in gaps):
        raise bad("non-zero bytes in the padding between sections (corrupt file)")
    for name in names:
        if name not in _LAZY_SECTIONS:
            if hashlib.sha256(sections[name].data).digest() != table[name][2]:
                raise bad(f"checksum mismatch in section {name} (the file is corrupt)")
    # Structure: every offset in range and monotone, so that no later access can go out of bounds.
    start = sections["image_item_start"].view("<u8")
    if start[0] != 0 or start[-1] != n_items or np.any(np.diff(start.astype(np.int64)) < 1 if n_images else False):
        raise bad("image item ranges are inconsistent (every image needs at least one item)")
    words = sections["item_words"].view("<u4")
    if n_items and (int(words.max()) > k or int(words.astype(np.int64).sum()) != n_entries):
        raise bad("per-item word counts are inconsistent with the inverted file")
    if n_items == 0 and n_entries != 0:
        raise bad("entries without items")
    for off_name, blob_name in (("id_offsets", "ids"), ("metadata_offsets", "metadata")):
        o = sections[off_name].view("<u8").astype(np.int64)
        if o[0] != 0 or o[-1] != sections[blob_name].shape[0] or np.any(np.diff(o) < 0):
            raise bad(f"{off_name} are inconsistent")
    if n_images and np.any(np.diff(sections["id_offsets"].view("<u8").astype(np.int64)) < 1):
        raise bad("an image id is empty")
    ivo = sections["ivf_offsets"].view("<u8")
    if ivo[0] != 0 or ivo[-1] != n_entries or np.any(ivo[1:] < ivo[:-1]):
        raise bad("inverted-file offsets are inconsistent")
    tomb = sections["tombstones"]
    if n_images % 8 and tomb[-1] >> (n_images % 8):
        raise bad("tombstone padding bits are set")
    return {
        "K": k, "D": dim, "kind": kind, "alpha": alpha, "tau": tau, "normalize": bool(flags & _FLAG_NORMALIZE),
        "checksum": checksum, "n_blocks": n_blocks, "n_entries": n_entries, "payload": payload,
        "sections": sections, "section_table": table, "version": version,
    }
