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

    def top_k(self, store: IndexStore, query: Aggregation, qwords: np.ndarray, top_k: int, normalize: bool,
              pooling: str, expand: int = 0, expand_alpha: float = 3.0) -> list[Hit]:
        """The ``top_k`` best live images, best first (see ``Index.search``)."""
        store.flush()
        scores = self.item_scores(store, query, qwords, normalize)
        dead = store.dead_all()
        if expand:
            query = self.expanded(store, query, qwords, scores, normalize, pooling, expand, expand_alpha)
            qwords = np.ascontiguousarray(query.words, dtype=np.uint32)
            scores = self.item_scores(store, query, qwords, normalize)
        images, values = kernels.pool_top_k(scores, store.all_item_start(), dead, pooling == "avg", min(top_k, len(dead) or 1))
        return [Hit(store.image_id(int(i)), float(s), store.metadata(int(i))) for i, s in zip(images, values)]

    def expanded(self, store: IndexStore, query: Aggregation, qwords: np.ndarray, scores: np.ndarray, normalize: bool,
                 pooling: str, n: int, alpha: float) -> Aggregation:
        """Query expansion (``Index.search(expand=n)``): the query merged with the best item of
        each of its ``n`` best live images (ranked by ``scores``, the query's item scores).

        Per visual word of the query or of a hit, a weighted vote: the query counts 1, hit i
        counts ``(s_i / s_1) ** alpha``, where s_i is the normalised similarity of the query
        with the hit's best item and s_1 that of the first hit (hits with s_i <= 0 do not
        vote). Binary codes vote with their signs (+-1) and the expanded code is the sign of
        the sum (a zero sum keeps the first voter's bit); float residuals are summed and
        re-normalised (words whose sum has norm <= 1e-6 are dropped). The sums run in a fixed
        order (query, then hits best first), so the result is the same on every CPU.
        """
        p = self.params
        if not qwords.size or not store.n_items:
            return query
        item_start = store.all_item_start()
        item_words = store.all_item_words()
        dead = store.dead_all()
        n_live = int(dead.shape[0] - np.count_nonzero(dead))
        if n_live == 0:
            return query
        images, _ = kernels.pool_top_k(scores, item_start, dead, pooling == "avg", min(int(n), n_live))
        # Normalised item scores: the weights do not depend on search(normalize=...).
        if normalize:
            norm = scores
        else:
            norm = np.full(scores.shape[0], -1.0)
            has = item_words > 0
            norm[has] = scores[has] / np.sqrt(float(qwords.size) * item_words[has].astype(np.float64))
        chosen, sims = [], []
        for img in images:
            a, b = int(item_start[img]), int(item_start[img + 1])
            best = a + int(np.argmax(norm[a:b]))  # the first of equal items
            if norm[best] > 0.0:
                chosen.append(best)
                sims.append(float(norm[best]))
        if not chosen:
            return query
        weights = [1.0] + [(s / sims[0]) ** float(alpha) for s in sims]
        voters = [(np.asarray(query.words, dtype=np.int64), self._signed(query))]
        voters += self._items(store, np.array(chosen, dtype=np.int64))
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

    def item_scores(self, store: IndexStore, query: Aggregation, qwords: np.ndarray, normalize: bool) -> np.ndarray:
        """float64 [n_items]: the similarity of the query with every item (tombstoned ones too)."""
        p = self.params
        n_items = store.n_items
        scores = np.zeros(n_items)
        if qwords.size and n_items:
            store.check_words(qwords)
            n_chunks = self._chunks_for(store, qwords)
            segments = ((store.base, 0, store.base_items), (store.delta, store.base_items, n_items))
            ok = True
            if p.family == "binary":
                if self._table is None:
                    self._table = kernels.selectivity_table(p.dim, p.alpha, p.tau)
                table = self._table
                qcodes = np.ascontiguousarray(query.codes, dtype=np.uint8)
                if p.payload % 8 == 0:
                    qcodes = qcodes.view(np.uint64)
                for seg, lo, hi in segments:
                    if hi > lo and seg.n_entries:
                        codes = seg.codes.view(np.uint64) if p.payload % 8 == 0 else seg.codes
                        if n_chunks == 1:  # no parallel launch: waking idle threads costs more than small jobs
                            ok &= kernels.ivf_binary_range(qwords, qcodes, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                            codes, table, lo, hi, hi, scores)
                        else:
                            ok &= kernels.ivf_score_binary(qwords, qcodes, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                           codes, table, lo, hi, hi, n_chunks, scores)
            else:
                qvecs = np.ascontiguousarray(query.vectors, dtype=np.float32)
                for seg, lo, hi in segments:
                    if hi > lo and seg.n_entries:
                        vecs = seg.codes.view("<f4")
                        if n_chunks == 1:
                            ok &= kernels.ivf_float_range(qwords, qvecs, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                           vecs, p.alpha, p.tau, lo, hi, hi, scores)
                        else:
                            ok &= kernels.ivf_score_float(qwords, qvecs, seg.offsets, seg.n_blocks, seg.shift, seg.low,
                                                          vecs, p.alpha, p.tau, lo, hi, hi, n_chunks, scores)
            if not ok:
                raise IndexFormatError(f"{store.name}: the inverted file names an item beyond the {store.base_items} "
                                       "stored items (the file is corrupt; idx.verify() checks it fully)")
        kernels.finish_item_scores(scores, store.all_item_words(), int(qwords.size), normalize)
        return scores

    @staticmethod
    def _chunks_for(store: IndexStore, qwords: np.ndarray) -> int:
        """Threads for one query: numba's thread count, or 1 when the posting lists of the
        query hold fewer than ``PARALLEL_MIN_ENTRIES`` entries."""
        threads = numba.get_num_threads()
        if threads == 1:
            return 1
        w = qwords.astype(np.int64)
        work = store.base.run_entries(w) + store.delta.run_entries(w)
        return threads if work >= PARALLEL_MIN_ENTRIES else 1
