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
              pooling: str) -> list[Hit]:
        """The ``top_k`` best live images, best first (see ``Index.search``)."""
        store.flush()
        scores = self.item_scores(store, query, qwords, normalize)
        dead = store.dead_all()
        images, values = kernels.pool_top_k(scores, store.all_item_start(), dead, pooling == "avg", min(top_k, len(dead) or 1))
        return [Hit(store.image_id(int(i)), float(s), store.metadata(int(i))) for i, s in zip(images, values)]

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
