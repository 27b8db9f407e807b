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
              pooling: str, expand: int = 0, expand_alpha: float = 3.0) -> list[Hit]:
        """The ``top_k`` best live images, best first (see ``Index.search``)."""
        if expand:
            query = self.expanded(store, query, qwords, normalize, pooling, expand, expand_alpha)
            qwords = np.ascontiguousarray(query.words, dtype=np.uint32)
        images, values = self.top_k_images(store, query, qwords, top_k, normalize, pooling)
        return [Hit(store.image_id(int(i)), float(s), store.metadata(int(i))) for i, s in zip(images, values)]

    def expanded(self, store: IndexStore, query: Aggregation, qwords: np.ndarray, normalize: bool, pooling: str, n: int,
                 alpha: float) -> Aggregation:
        """Query expansion (``Index.search(expand=n)``): the query merged with the best item of
        each of its ``n`` best live images.

        Per visual word of the query or of a hit, a weighted vote: the query counts 1, hit i
        counts ``(s_i / s_1) ** alpha``, where s_i is the normalised similarity
        (:func:`d2r.similarity`) of the query with the hit's best item and s_1 that of the first
        hit (hits with s_i <= 0 do not vote). Binary codes vote with their signs (+-1) and the
        expanded code is the sign of the sum (a zero sum keeps the first voter's bit); float
        residuals are summed and re-normalised (words whose sum has norm <= 1e-6 are dropped).
        The sums run in a fixed order (query, then hits best first): the same on every CPU.
        """
        from ..aggregate import similarity

        p = self.params
        if not qwords.size or not store.n_items:
            return query
        images, _ = self.top_k_images(store, query, qwords, int(n), normalize, pooling)
        if not len(images):
            return query
        item_start = store.all_item_start()
        chosen, sims = [], []
        for img in images:
            a, b = int(item_start[img]), int(item_start[img + 1])
            items = self._items(store, np.arange(a, b, dtype=np.int64))
            scores = [similarity(query, self._aggregation(query.kind, w, v), alpha=p.alpha, tau=p.tau, normalize=True) if len(w) else -1.0
                      for w, v in items]
            best = int(np.argmax(scores))  # the first of equal items
            if scores[best] > 0.0:
                chosen.append(items[best])
                sims.append(float(scores[best]))
        if not chosen:
            return query
        weights = [1.0] + [(s / sims[0]) ** float(alpha) for s in sims]
        voters = [(np.asarray(query.words, dtype=np.int64), self._signed(query)), *chosen]
        words = np.unique(np.concatenate([w for w, _ in voters]))
        acc = np.zeros((words.shape[0], p.dim))
        first = np.zeros((words.shape[0], p.dim))
        seen = np.zeros(words.shape[0], dtype=np.bool_)
        for (w, v), weight in zip(voters, weights):
            pos = np.searchsorted(words, w)
            acc[pos] += weight * v
            new = pos[~seen[pos]]
            first[new] = v[~seen[pos]]
            seen[pos] = True
        if p.family == "binary":
            signs = np.where(acc == 0.0, first, acc)
            return Aggregation(query.kind, p.dim, words.astype(np.uint32), codes=np.packbits(signs > 0.0, axis=1))
        norms = np.sqrt(np.einsum("ij,ij->i", acc, acc))
        keep = norms > 1e-6
        vecs = (acc[keep] / norms[keep, None]).astype(np.float32)
        return Aggregation(query.kind, p.dim, words[keep].astype(np.uint32), vectors=vecs)

    def _aggregation(self, kind: str, words: np.ndarray, values: np.ndarray) -> Aggregation:
        """A stored item as an :class:`Aggregation` (from :meth:`_items`' words and signs or residuals)."""
        w = words.astype(np.uint32)
        if self.params.family == "binary":
            return Aggregation(kind, self.params.dim, w, codes=np.packbits(values > 0.0, axis=1))
        return Aggregation(kind, self.params.dim, w, vectors=values.astype(np.float32))

    def _signed(self, agg: Aggregation) -> np.ndarray:
        """float64 [n, D]: +-1 per bit of binary codes, or the float residuals."""
        if self.params.family == "binary":
            bits = np.unpackbits(np.asarray(agg.codes, dtype=np.uint8), axis=1, count=self.params.dim)
            return bits.astype(np.float64) * 2.0 - 1.0
        return np.asarray(agg.vectors, dtype=np.float64)

    def _items(self, store: IndexStore, items: np.ndarray) -> list:
        """(int64 words, float64 [n, D] signs or residuals) of each stored item, in the order given."""
        p = self.params
        store.check_words(np.arange(p.k, dtype=np.uint32))
        out = []
        for item in items:
            seg, num = (store.base, item) if item < store.base_items else (store.delta, item)
            entries = kernels.ivf_item_entries(seg.offsets, seg.n_blocks, seg.shift, seg.low, np.array([num], np.int64), p.k)[:, 0]
            words = np.flatnonzero(entries >= 0)
            codes = np.asarray(seg.codes[entries[words]])
            if p.family == "binary":
                v = np.unpackbits(codes, axis=1, count=p.dim).astype(np.float64) * 2.0 - 1.0
            else:
                v = codes.view("<f4").reshape(-1, p.dim).astype(np.float64)
            out.append((words.astype(np.int64), v))
        return out

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
            table = self._table if self._table is not None else kernels.selectivity_table(p.dim, p.alpha, p.tau)
            self._table = table
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
