"""The index's items in memory: a base segment, a delta of the images added since, tombstones.

The *base* is read from a file (possibly memory-mapped, never modified) or left by a
compaction; images added since go to the *delta*: their items wait in a pending list and are
folded into the delta's own inverted file (one block, uint32 item numbers) before a search.
Removing an image sets its tombstone bit; :meth:`IndexStore.compact` drops tombstoned images
for good, renumbering the rest, and :meth:`IndexStore.merged_chunks` streams base + delta
merged (and optionally compacted) word by word for a save.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import kernels
from ..aggregate import Aggregation
from ..errors import IndexFormatError, InputError
from .postings import BLOCK_SHIFT, DELTA_SHIFT, INDEX_KINDS, IndexParams, Postings, family

# Entries per chunk when merging inverted files (bounds the temporary memory of save/compact).
_MERGE_CHUNK_ENTRIES = 1 << 22

_EMPTY_BLOBS = (np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))


def item_arrays(params: IndexParams, agg, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 words [n], uint8 codes [n, payload]) of one aggregation, checked against the index."""
    if not isinstance(agg, Aggregation):
        raise InputError(f"{name}: expected a d2r.Aggregation, got {type(agg).__name__}")
    if agg.kind not in INDEX_KINDS or family(agg.kind) != params.family:
        raise InputError(f"{name}: an index of kind {params.kind!r} cannot store an aggregation of kind {agg.kind!r}")
    if agg.dim != params.dim:
        raise InputError(f"{name}: descriptor dimension D = {agg.dim} differs from the index's D = {params.dim}")
    words = np.asarray(agg.words, dtype=np.uint32)
    if words.size and int(words[-1]) >= params.k:
        raise InputError(f"{name}: visual word {int(words[-1])} is outside the codebook (K = {params.k})")
    if params.family == "binary":
        codes = np.ascontiguousarray(agg.codes, dtype=np.uint8)
    else:
        codes = np.ascontiguousarray(agg.vectors, dtype="<f4").view(np.uint8).reshape(words.shape[0], params.payload)
    return words, codes


def encode_metadata(metadata) -> str:
    if metadata is None:
        return ""
    try:
        return json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InputError(f"metadata: must be JSON-serialisable ({exc})") from None


def _offsets_of(chunks) -> np.ndarray:
    out = np.zeros(len(chunks) + 1, dtype="<u8")
    if chunks:
        np.cumsum([len(c) for c in chunks], out=out[1:])
    return out


class IndexStore:
    """Images, their items and the inverted files of one index: base + delta, with tombstones.

    Images are numbered in insertion order (base images first), items likewise; ``name``
    names the index in error messages. ``word_check``: the lazy crc32 check of a base read from
    a file (:class:`d2r.index.format.WordCheck`), or None when there is nothing left to check.
    """

    def __init__(self, params: IndexParams, name: str):
        self.params = params
        self.word_check: Any = None
        self.load_base(Postings.empty(params.payload), {
            "image_item_start": np.zeros(1, dtype=np.int64),
            "item_words": np.zeros(0, dtype=np.int64),
            "tombstones": np.zeros(0, dtype=np.uint8),
            "id_offsets": _EMPTY_BLOBS[0],
            "ids": _EMPTY_BLOBS[1],
            "metadata_offsets": _EMPTY_BLOBS[0],
            "metadata": _EMPTY_BLOBS[1],
        }, name)

    def load_base(self, postings: Postings, d: dict, name: str) -> None:
        """Make ``postings`` and the directory arrays ``d`` (see :data:`d2r.index.format.DIRECTORY_SECTIONS`)
        the base, with an empty delta."""
        self.name = name
        self.word_check = None
        self.base = postings
        self.b_item_start = d["image_item_start"].astype(np.int64)
        self.b_item_words = d["item_words"].astype(np.int64)
        n_images = self.b_item_start.shape[0] - 1
        self.base_images = n_images
        self.base_items = int(self.b_item_start[-1])
        self.b_ids = (d["id_offsets"].astype(np.int64), d["ids"])
        self.b_meta = (d["metadata_offsets"].astype(np.int64), d["metadata"])
        self.dead_base = np.unpackbits(d["tombstones"], count=n_images, bitorder="little").astype(np.bool_)
        self.n_dead = int(np.count_nonzero(self.dead_base))
        self.dead_delta = bytearray()
        # Delta: images added since the base, and their items not yet in the delta postings.
        self.d_ids: list[str] = []
        self.d_meta: list[str] = []
        self.d_item_start: list[int] = []  # first item of each delta image (global numbering)
        self.d_item_words: list[int] = []
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # (words, codes) per item
        self.pending_first_item = self.base_items
        self.delta = Postings.empty(self.params.payload, DELTA_SHIFT)
        self.id_map: dict[str, int] | None = None
        self.cache: dict[str, Any] = {}

    def close(self) -> None:
        """Drop the references to the base's arrays (views of a mapped file)."""
        self.base = Postings.empty(self.params.payload)
        self.b_ids = self.b_meta = _EMPTY_BLOBS

    # -- counts ---------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return self.base_items + len(self.d_item_words)

    @property
    def n_entries(self) -> int:
        return self.base.n_entries + self.delta.n_entries + sum(w.shape[0] for w, _ in self.pending)

    @property
    def n_images(self) -> int:
        return self.base_images + len(self.d_ids)

    # -- adding and removing ----------------------------------------------------------------------
    def check_new_id(self, image_id) -> str:
        if not isinstance(image_id, str) or not image_id:
            raise InputError(f"image_id: expected a non-empty string, got {image_id!r}")
        try:
            image_id.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"image_id: {image_id!r} is not valid unicode") from None
        if image_id in self.ids():
            raise InputError(f"image_id: {image_id!r} is already in the index (remove it first to replace it)")
        return image_id

    def add(self, image_id: str, items: list[tuple[np.ndarray, np.ndarray]], meta: str) -> None:
        """Add a checked new image with its items ((words, codes) each) and metadata text."""
        self.d_ids.append(image_id)
        self.d_meta.append(meta)
        self.d_item_start.append(self.n_items)
        for words, codes in items:
            self.d_item_words.append(int(words.shape[0]))
            self.pending.append((words, codes))
        self.dead_delta.append(0)
        if self.id_map is not None:
            self.id_map[image_id] = self.n_images - 1
        self.cache.clear()

    def remove(self, image_id: str) -> None:
        ids = self.ids()
        if not isinstance(image_id, str) or image_id not in ids:
            raise InputError(f"image_id: {image_id!r} is not in the index")
        img = ids.pop(image_id)
        if img < self.base_images:
            self.dead_base[img] = True
        else:
            self.dead_delta[img - self.base_images] = 1
        self.n_dead += 1
        self.cache.clear()

    # -- lookup -----------------------------------------------------------------------------------
    def ids(self) -> dict[str, int]:
        """id -> image number of live images (built on first use: decoding 1M ids takes a while)."""
        if self.id_map is None:
            m = {}
            dead = self.dead_all()
            offsets, blob = self.b_ids
            raw = blob.tobytes()
            o = offsets.tolist()
            for img in range(self.base_images):
                if not dead[img]:
                    try:
                        key = raw[o[img] : o[img + 1]].decode("utf-8")
                    except UnicodeDecodeError:
                        raise IndexFormatError(f"{self.name}: id of image {img} is not valid UTF-8") from None
                    if key in m:
                        raise IndexFormatError(f"{self.name}: image id {key!r} appears twice")
                    m[key] = img
            for j, key in enumerate(self.d_ids):
                img = self.base_images + j
                if not dead[img]:
                    m[key] = img
            self.id_map = m
        return self.id_map

    def _blob_text(self, table, img, what):
        offsets, blob = table
        a, b = int(offsets[img]), int(offsets[img + 1])
        try:
            return blob[a:b].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise IndexFormatError(f"{self.name}: {what} of image {img} is not valid UTF-8") from None

    def image_id(self, img: int) -> str:
        if img < self.base_images:
            return self._blob_text(self.b_ids, img, "id")
        return self.d_ids[img - self.base_images]

    def metadata_text(self, img: int) -> str:
        if img < self.base_images:
            return self._blob_text(self.b_meta, img, "metadata")
        return self.d_meta[img - self.base_images]

    def metadata(self, img: int):
        text = self.metadata_text(img)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise IndexFormatError(f"{self.name}: metadata of image {img} is not valid JSON") from None

    def image_ids(self) -> list[str]:
        dead = self.dead_all()
        return [self.image_id(i) for i in range(self.n_images) if not dead[i]]

    def dead_all(self) -> np.ndarray:
        """bool [M] tombstones of all images."""
        c = self.cache.get("dead")
        if c is None:
            c = np.concatenate([self.dead_base, np.frombuffer(bytes(self.dead_delta), dtype=np.bool_)])
            self.cache["dead"] = c
        return c

    def all_item_words(self) -> np.ndarray:
        c = self.cache.get("item_words")
        if c is None:
            c = np.concatenate([self.b_item_words.astype(np.int64), np.asarray(self.d_item_words, dtype=np.int64)])
            self.cache["item_words"] = c
        return c

    def all_item_start(self) -> np.ndarray:
        c = self.cache.get("item_start")
        if c is None:
            c = np.concatenate([self.b_item_start[:-1], np.asarray(self.d_item_start + [self.n_items], dtype=np.int64)])
            self.cache["item_start"] = c
        return c

    def check_words(self, words) -> None:
        """The lazy crc32 check of the base's entries of ``words`` (a no-op when nothing is left to check)."""
        if self.word_check is not None:
            self.word_check.check(words)

    def item_entries(self, img: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(uint32 words, uint8 codes [n, payload]) of each item of image ``img``, in order: one
        scan of the inverted file per item."""
        self.flush()
        self.check_words(np.arange(self.params.k))
        start = self.all_item_start()
        out = []
        for item in range(int(start[img]), int(start[img + 1])):
            seg = self.base if item < self.base_items else self.delta
            block, low = item >> seg.shift, item & ((1 << seg.shift) - 1)
            hits = np.flatnonzero(seg.low == low)
            # Entry e lies in run r = (word * n_blocks + block) with offsets[r] <= e < offsets[r + 1].
            runs = np.searchsorted(seg.offsets, hits, side="right") - 1
            n_blocks = max(seg.n_blocks, 1)
            mine = runs % n_blocks == block
            out.append(((runs[mine] // n_blocks).astype(np.uint32), np.asarray(seg.codes[hits[mine]])))
        return out

    # -- the delta's postings ---------------------------------------------------------------------
    def flush(self) -> None:
        """Fold pending items into the delta's inverted file."""
        if not self.pending:
            return
        first = self.pending_first_item
        words = np.concatenate([w for w, _ in self.pending])
        codes = np.concatenate([c for _, c in self.pending]) if words.size else np.zeros((0, self.params.payload), np.uint8)
        items = np.repeat(np.arange(first, first + len(self.pending), dtype=np.uint32),
                          [w.shape[0] for w, _ in self.pending])
        offsets, order = kernels.group_by_word(words, self.params.k)
        new = Postings(offsets, 1, DELTA_SHIFT, items[order], codes[order])
        old = self.delta
        if old.n_entries:
            new = self._merge_in_memory(old, new, DELTA_SHIFT, 1)
        self.delta = new
        self.pending = []
        self.pending_first_item = self.n_items

    def _merge_in_memory(self, a: Postings, b: Postings, shift, n_blocks) -> Postings:
        k, payload = self.params.k, self.params.payload
        item_map = np.arange(self.n_items, dtype=np.int64)
        expected = a.n_entries + b.n_entries
        low = np.empty(expected, dtype=np.uint16 if shift == BLOCK_SHIFT else np.uint32)
        codes = np.empty((expected, payload), dtype=np.uint8)
        counts = np.zeros(k * n_blocks, dtype=np.int64)
        n = kernels.merge_ivf_words(0, k, a.offsets, a.n_blocks, a.shift, a.low, a.codes, b.offsets, b.n_blocks,
                                    b.shift, b.low, b.codes, item_map, n_blocks, shift, low, codes, counts)
        if n != expected:
            raise self.inconsistent()
        offsets = np.zeros(k * n_blocks + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return Postings(offsets, n_blocks, shift, low, codes)

    def inconsistent(self) -> IndexFormatError:
        return IndexFormatError(f"{self.name}: the inverted file disagrees with the per-item word counts "
                                "(the file is corrupt; idx.verify() checks it fully)")

    # -- compaction and the stream a save writes --------------------------------------------------
    def plan(self, drop_dead: bool):
        """Images to keep and the old -> new item numbering (int64, -1 = dropped)."""
        keep = ~self.dead_all() if drop_dead else np.ones(self.n_images, dtype=np.bool_)
        sizes = np.diff(self.all_item_start())
        item_keep = np.repeat(keep, sizes)
        item_map = np.full(self.n_items, -1, dtype=np.int64)
        item_map[item_keep] = np.arange(int(np.count_nonzero(item_keep)), dtype=np.int64)
        return keep, item_keep, item_map

    def directory(self, keep, item_keep) -> dict:
        """The directory sections (everything but the inverted file) of the kept images."""
        kept = np.flatnonzero(keep)
        sizes = np.diff(self.all_item_start())[kept]
        item_start = np.zeros(kept.size + 1, dtype="<u8")
        np.cumsum(sizes, out=item_start[1:])
        item_words = self.all_item_words()[item_keep].astype("<u4")
        tomb = np.packbits(self.dead_all()[kept], bitorder="little")
        ids = [self.image_id(int(i)).encode("utf-8") for i in kept]
        metas = [self.metadata_text(int(i)).encode("utf-8") for i in kept]
        return {
            "image_item_start": item_start,
            "item_words": item_words,
            "tombstones": tomb,
            "id_offsets": _offsets_of(ids),
            "ids": np.frombuffer(b"".join(ids), dtype=np.uint8),
            "metadata_offsets": _offsets_of(metas),
            "metadata": np.frombuffer(b"".join(metas), dtype=np.uint8),
        }

    def merged_chunks(self, item_map, n_blocks, expected: int | None = None) -> Iterator:
        """Yield (low uint16 [e], codes uint8 [e, P], counts int64 [(w1 - w0) * n_blocks], w0)
        word chunks of base + delta merged and renumbered through ``item_map`` (the base's
        words are crc-checked first where the file was opened without the full check).
        ``expected``: the number of entries in all; raises if the chunks hold another."""
        k, payload = self.params.k, self.params.payload
        per_word = self.base.word_counts(k) + self.delta.word_counts(k)
        cum = np.concatenate([[0], np.cumsum(per_word)])
        written = 0
        w0 = 0
        while w0 < k:
            w1 = int(np.searchsorted(cum, cum[w0] + _MERGE_CHUNK_ENTRIES, side="right")) - 1
            w1 = min(max(w1, w0 + 1), k)
            cap = int(cum[w1] - cum[w0])
            low = np.empty(cap, dtype=np.uint16)
            codes = np.empty((cap, payload), dtype=np.uint8)
            counts = np.zeros((w1 - w0) * n_blocks, dtype=np.int64)
            self.check_words(np.arange(w0, w1))
            a, b = self.base, self.delta
            n = kernels.merge_ivf_words(w0, w1, a.offsets, a.n_blocks, a.shift, a.low, a.codes, b.offsets, b.n_blocks, b.shift,
                                        b.low, b.codes, item_map, n_blocks, BLOCK_SHIFT, low, codes, counts)
            if n < 0:
                raise self.inconsistent()
            written += n
            yield low[:n], codes[:n], counts, w0
            w0 = w1
        if expected is not None and written != expected:
            raise self.inconsistent()

    def compact(self, name: str) -> None:
        """Drop tombstoned images for good, renumbering the rest: the result becomes the base
        (in memory), named ``name``."""
        self.flush()
        keep, item_keep, item_map = self.plan(drop_dead=True)
        n_items = int(np.count_nonzero(item_keep))
        n_blocks = -(-n_items // (1 << BLOCK_SHIFT))
        parts = list(self.merged_chunks(item_map, n_blocks))
        low = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint16)
        codes = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, self.params.payload), np.uint8)
        counts = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
        offsets = np.zeros(self.params.k * n_blocks + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        d = self.directory(keep, item_keep)
        self.load_base(Postings(offsets, n_blocks, BLOCK_SHIFT, low, codes), d, name)
