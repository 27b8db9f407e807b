"""Search of the index: the query's checks, item scores from the posting lists, pooling, top k.

Scores equal the brute-force :func:`d2r.similarity` of the query with every item, bit for bit
(see :mod:`d2r.kernels.similarity`); an item without visual words, or an empty query, scores
-1. An image's score is the max or the mean over its items; ranking is by score descending,
ties broken by insertion order (the image added first ranks first).
"""

from __future__ import annotations

import numba
import numpy as np

from .. import kernels
from ..aggregate import Aggregation
from ..errors import IndexFormatError, InputError
from ..results import Hit
from .builder import IndexStore
from .postings import INDEX_KINDS, IndexParams, family

# A query scans its posting lists with all of numba's threads only when they hold at least
# this many entries (~1 ms of work); below that, waking the threads costs more than it saves.
PARALLEL_MIN_ENTRIES = 1 << 18
# Items per chunk: a chunk's float64 scores (512 KiB) stay in the core's L2 cache while every
# query word's run of the chunk is scanned; one stored block (2**16 items), so that no run needs
# a binary search. Split finer (chunks that are powers of two stay on block edges) when there
# are too few chunks to share between threads, but not below MIN_SPLIT_ITEMS.
CHUNK_ITEMS = 1 << 16
MIN_SPLIT_ITEMS = 1 << 12

POOLINGS = ("max", "avg")


def query_words(params: IndexParams, name: str, query) -> np.ndarray:
    """The query's visual words (uint32), after checking that this index can answer it."""
    if not isinstance(query, Aggregation):
        raise InputError(f"query: expected a d2r.Aggregation, got {type(query).__name__}")
    if query.kind not in INDEX_KINDS or family(query.kind) != params.family:
        raise IndexFormatError(f"{name}: an index of kind {params.kind!r} cannot answer a query of kind {query.kind!r}")
    if query.dim != params.dim:
        raise IndexFormatError(f"{name}: index has descriptor dimension D = {params.dim}, the query has D = {query.dim}")
    qwords = np.ascontiguousarray(query.words, dtype=np.uint32)
    if qwords.size and int(qwords[-1]) >= params.k:
        raise IndexFormatError(f"{name}: query visual word {int(qwords[-1])} does not exist in the index's codebook "
                               f"(K = {params.k}); was the query aggregated with another codebook?")
    return qwords


class Searcher:
    """Scores a checked query against an :class:`~d2r.index.builder.IndexStore`."""

    def __init__(self, params: IndexParams):
        self.params = params
        self._table = None  # selectivity_table of the index's D, alpha, tau (binary kinds)
        self._no_codes = np.zeros((0, 1), np.uint64)
        self._no_vecs = np.zeros((0, 1), np.float32)

    def top_k(self, store: IndexStore, query: Aggregation, qwords: np.ndarray, top_k: int, normalize: bool,
              pooling: str) -> list[Hit]:
        """The ``top_k`` best live images, best first (see ``Index.search``)."""
        images, values = self.top_k_images(store, query, qwords, top_k, normalize, pooling)
        return [Hit(store.image_id(int(i)), float(s), store.metadata(int(i))) for i, s in zip(images, values)]

    def top_k_images(self, store: IndexStore, query: Aggregation, qwords: np.ndarray, top_k: int, normalize: bool,
                     pooling: str, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image numbers int64, scores float64) of the ``top_k`` best live images, best first.

        threads: parts to split the work into (default: ``numba.get_num_threads()`` when the
        query's posting lists hold at least ``PARALLEL_MIN_ENTRIES`` entries, else 1); the
        result does not depend on it.
        """
        p = self.params
        store.flush()
        n_items = store.n_items
        dead = store.dead_all()
        k = min(top_k, len(dead) or 1)
        if not n_items:
            return np.zeros(0, np.int64), np.zeros(0)
        if qwords.size:
            store.check_words(qwords)
        binary = p.family == "binary"
        qcodes, qvecs, table = self._no_codes, self._no_vecs, np.zeros(1)
        if binary:
            if self._table is None:
                self._table = kernels.selectivity_table(p.dim, p.alpha, p.tau)
            table = self._table
            qcodes = np.ascontiguousarray(query.codes, dtype=np.uint8)
            if p.payload % 8 == 0:
                qcodes = qcodes.view(np.uint64)
        else:
            qvecs = np.ascontiguousarray(query.vectors, dtype=np.float32)
        if threads is None:
            threads = self._threads_for(store, qwords)
        item_start, item_words = store.all_item_start(), store.all_item_words()
        use_mean = pooling == "avg"
        found_i, found_s = [], []
        for seg, lo, hi in ((store.base, 0, store.base_items), (store.delta, store.base_items, n_items)):
            if hi <= lo:
                continue
            if binary:
                codes = seg.codes.view(np.uint64) if p.payload % 8 == 0 else seg.codes
                vecs = self._no_vecs
            else:
                codes, vecs = self._no_codes, seg.codes.view("<f4")
            chunk = chunk_items(hi - lo, threads)
            parts = min(threads, -(-(hi - lo) // chunk))
            args = (binary, qwords, qcodes, qvecs, seg.offsets, seg.n_blocks, seg.shift, seg.low, codes, vecs, table,
                    p.alpha, p.tau, lo, hi, chunk, item_start, item_words, dead, normalize, use_mean, k)
            if parts > 1:
                ok, images, values = kernels.ivf_top_k_parallel(*args, parts)
            else:
                ok, images, values = kernels.ivf_top_k(*args)
            if not ok:
                raise IndexFormatError(f"{store.name}: the inverted file names an item beyond the {store.base_items} "
                                       "stored items (the file is corrupt; idx.verify() checks it fully)")
            found_i.append(images)
            found_s.append(values)
        if len(found_i) == 1:
            return found_i[0], found_s[0]
        images, values = np.concatenate(found_i), np.concatenate(found_s)
        order = np.lexsort((images, -values))[:k]  # score descending, then the image added first
        return images[order], values[order]

    @staticmethod
    def _threads_for(store: IndexStore, qwords: np.ndarray) -> int:
        """Threads for one query: numba's thread count, or 1 when the posting lists of the
        query hold fewer than ``PARALLEL_MIN_ENTRIES`` entries."""
        threads = numba.get_num_threads()
        if threads == 1 or not qwords.size:
            return 1
        w = qwords.astype(np.int64)
        work = store.base.run_entries(w) + store.delta.run_entries(w)
        return threads if work >= PARALLEL_MIN_ENTRIES else 1


def chunk_items(n_items: int, threads: int) -> int:
    """Items per chunk of a segment of ``n_items``: ``CHUNK_ITEMS``, halved (down to
    ``MIN_SPLIT_ITEMS``) while there are fewer than 3 chunks per thread."""
    chunk = CHUNK_ITEMS
    while threads > 1 and chunk // 2 >= MIN_SPLIT_ITEMS and -(-n_items // chunk) < 3 * threads:
        chunk //= 2
    return chunk
