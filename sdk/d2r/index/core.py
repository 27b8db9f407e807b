"""``Index``: the user-facing class, composed of the in-memory store (:mod:`.builder`), the
search (:mod:`.search`) and, for an index opened from a file, the file (:mod:`.format`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._checks import positive_int, real_number
from ..aggregate import Aggregation
from ..codebook import Codebook
from ..errors import InputError
from ..results import Hit
from . import format as fmt
from .builder import IndexStore, encode_metadata, item_arrays
from .postings import BLOCK_SHIFT, IndexParams, check_kind
from .search import POOLINGS, Searcher, query_words

_IN_MEMORY = "in-memory index"
# Query expansion merges at most this many top images into the query.
MAX_EXPAND = 100


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
        params = IndexParams(int(codebook.size), int(codebook.dim), check_kind(kind), real_number(alpha, "alpha"),
                             real_number(tau, "tau"), bool(normalize), codebook.checksum)
        self._init(params, None)

    def _init(self, params: IndexParams, file: fmt.IndexFile | None) -> None:
        self._params = params
        self._file = file  # the file the base was read from, None for an index built in memory
        self._path: Path | None = file.path if file is not None else None
        self._store = IndexStore(params, self._name())
        self._searcher = Searcher(params)
        self._closed = False

    # -- properties -----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._params.kind

    @property
    def dim(self) -> int:
        return self._params.dim

    @property
    def codebook_size(self) -> int:
        return self._params.k

    @property
    def codebook_checksum(self) -> str:
        """sha256 hex of the codebook (:attr:`d2r.Codebook.checksum`) the index was built with."""
        return self._params.checksum

    @property
    def alpha(self) -> float:
        return self._params.alpha

    @property
    def tau(self) -> float:
        return self._params.tau

    @property
    def normalize(self) -> bool:
        """The default of :meth:`search`'s ``normalize`` (stored in the file's header)."""
        return self._params.normalize

    @property
    def path(self) -> Path | None:
        """The file the base was read from, or None for an index built in memory."""
        return self._path

    @property
    def n_items(self) -> int:
        """Stored items (images and regions), tombstoned ones included until compaction."""
        return self._store.n_items

    @property
    def n_entries(self) -> int:
        """Stored (item, visual word) entries, tombstoned ones included."""
        return self._store.n_entries

    def _name(self) -> str:
        return str(self._path) if self._path is not None else _IN_MEMORY

    def __len__(self) -> int:
        return self._store.n_images - self._store.n_dead

    def __contains__(self, image_id) -> bool:
        return isinstance(image_id, str) and image_id in self._store.ids()

    def __repr__(self) -> str:
        return (f"Index(kind={self.kind!r}, K={self.codebook_size}, D={self.dim}, images={len(self)}, items={self.n_items}, "
                f"path={self._name()!r})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Release the memory map (the index is unusable afterwards if it was mapped)."""
        self._store.close()
        if self._file is not None:
            self._file.close()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"{self._name()}: the index is closed")

    # -- adding and removing ----------------------------------------------------------------------
    def add(self, image_id: str, agg: Aggregation, metadata=None) -> None:
        """Add one image as one item. ``metadata``: anything JSON can encode (returned in hits)."""
        self.add_regions(image_id, [agg], metadata=metadata)

    def add_regions(self, image_id: str, aggs, metadata=None) -> None:
        """Add one image as several items, e.g. [whole image, box 1, box 2, ...] (D2R-ASMK*).

        The image score of a search is the max or the mean (``pooling``) over its items.
        """
        image_id = self._store.check_new_id(image_id)
        if isinstance(aggs, Aggregation):
            raise InputError("aggs: expected a list of d2r.Aggregation (one per region), got a single Aggregation")
        try:
            aggs = list(aggs)
        except TypeError:
            raise InputError(f"aggs: expected a list of d2r.Aggregation, got {type(aggs).__name__}") from None
        if not aggs:
            raise InputError("aggs: expected at least one aggregation (region 0 is usually the whole image)")
        items = [item_arrays(self._params, a, f"aggs[{i}]") for i, a in enumerate(aggs)]
        meta = encode_metadata(metadata)
        # Validation is over: mutate.
        self._store.add(image_id, items, meta)

    def remove(self, image_id: str) -> None:
        """Tombstone an image (its entries stay stored until :meth:`compact` or a compacting save)."""
        self._store.remove(image_id)

    # -- lookup -----------------------------------------------------------------------------------
    def image_ids(self) -> list[str]:
        """Ids of the live images in insertion order."""
        return self._store.image_ids()

    def get_metadata(self, image_id: str):
        """The metadata stored with ``image_id`` (a fresh copy)."""
        ids = self._store.ids()
        if not isinstance(image_id, str) or image_id not in ids:
            raise InputError(f"image_id: {image_id!r} is not in the index")
        return self._store.metadata(ids[image_id])

    def get(self, image_id: str) -> list:
        """The stored items of a live image as :class:`d2r.Aggregation` objects, one per item
        (one for :meth:`add`, one per region for :meth:`add_regions`), in insertion order.

        Each is of the index's kind with ``n_regions=1`` (the region count is not stored);
        adding them to an index with the same codebook stores the same items. Scans the
        inverted file once per item: O(entries), meant for syncing changed images, not search.
        """
        ids = self._store.ids()
        if not isinstance(image_id, str) or image_id not in ids:
            raise InputError(f"image_id: {image_id!r} is not in the index")
        self._check_open()
        p = self._params
        out = []
        for words, codes in self._store.item_entries(ids[image_id]):
            if p.family == "binary":
                out.append(Aggregation(p.kind, p.dim, words, codes=codes))
            else:
                out.append(Aggregation(p.kind, p.dim, words, vectors=codes.view("<f4").reshape(-1, p.dim)))
        return out

    # -- search -----------------------------------------------------------------------------------
    def search(self, query: Aggregation, top_k: int = 100, normalize: bool | None = None, pooling: str = "max",
               expand: int = 0, expand_alpha: float = 3.0) -> list[Hit]:
        """The ``top_k`` best live images for ``query``, best first.

        The score of an item is ``d2r.similarity(query, item, alpha, tau, normalize)`` exactly
        (-1 if either has no visual word); an image's score is the max (``pooling="max"``) or
        the mean (``"avg"``: sequential sum over its items in insertion order, divided by their
        number) over its items. Ties rank the image added first first. ``normalize=None`` uses
        the index's default.

        Query expansion (off with ``expand=0``, the default): search once, merge the query
        with the best item of each of its ``expand`` best images (a vote per visual word, hit
        i weighted ``(s_i / s_1) ** expand_alpha`` by its normalised similarity s_i, the query
        by 1: ``Searcher.expanded``), and rank with the merged query. It costs two searches
        and a lookup of the hits' entries (binary searches, no scan of the file). docs/algorithm.md
        section 4; benchmarks/RESULTS.md measures it.

        Threads: queries whose posting lists hold at least ``d2r.index.search.PARALLEL_MIN_ENTRIES``
        entries are split over numba's threads (``numba.set_num_threads``); where other work
        shares the cores, ``numba.set_num_threads(1)`` gives steadier latency.
        """
        qwords = query_words(self._params, self._name(), query)
        top_k = positive_int(top_k, "top_k")
        if pooling not in POOLINGS:
            raise InputError(f"pooling: expected 'max' or 'avg', got {pooling!r}")
        normalize = self._params.normalize if normalize is None else bool(normalize)
        if isinstance(expand, bool) or not isinstance(expand, (int, np.integer)) or not 0 <= int(expand) <= MAX_EXPAND:
            raise InputError(f"expand: expected an integer from 0 (off) to {MAX_EXPAND} (images merged into the query), got {expand!r}")
        expand_alpha = real_number(expand_alpha, "expand_alpha")
        if not 0.0 <= expand_alpha <= 100.0:
            raise InputError(f"expand_alpha: expected a weight exponent in [0, 100], got {expand_alpha!r}")
        self._check_open()
        return self._searcher.top_k(self._store, query, qwords, top_k, normalize, pooling, int(expand), expand_alpha)

    # -- compaction and persistence ---------------------------------------------------------------
    def compact(self) -> None:
        """Drop tombstoned images for good, renumbering the rest (in memory).

        A memory-mapped index is read into memory by this; for a large file prefer
        ``idx.save(new_path, compact=True)`` (streams) and ``Index.open(new_path)``.
        """
        self._store.compact(_IN_MEMORY)
        self._file = None
        self._path = None
        self._closed = False

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
        fmt.check_index_target(path)
        store = self._store
        store.flush()
        keep, item_keep, item_map = store.plan(drop_dead=compact)
        n_items = int(np.count_nonzero(item_keep))
        n_blocks = -(-n_items // (1 << BLOCK_SHIFT))
        d = store.directory(keep, item_keep)
        n_entries = int(d["item_words"].astype(np.int64).sum())
        fmt.write(path, self._params, d, int(keep.sum()), n_items, n_entries, n_blocks,
                  store.merged_chunks(item_map, n_blocks, expected=n_entries))

    @classmethod
    def open(cls, path, mmap: bool = True, codebook: Codebook | None = None, verify: bool | None = None) -> Index:
        """Open a file written by :meth:`save`.

        mmap: map the file (numpy.memmap, shared between processes, nothing copied into RAM)
            instead of reading it. codebook: if given, its K, D and checksum must match the
            file's. verify: check the sha256 of the inverted file at open (True); None (default)
            does so for files up to ``d2r.index.format.VERIFY_AUTO_MAX_BYTES`` and, for larger
            ones, checks the crc32 of each visual word's entries the first time a search or a
            save reads them (version 1 files, which have no per-word crc32, get the full check);
            False checks neither (a trusted file: an unverified flipped code changes scores
            only, ``idx.verify()`` finds it). The header, the directory sections and every
            offset are always checked, so no corruption can make a search read out of bounds.

        Raises :class:`d2r.IndexFormatError` naming the file and the problem. Temporary files
        that an interrupted save of ``path`` left behind are removed.
        """
        file = fmt.read(path, mmap=mmap, codebook=codebook)
        idx = cls.__new__(cls)
        idx._init(file.params, file)
        idx._store.load_base(file.postings, file.directory, idx._name())
        check = file.check_at_open(verify)
        if check == "full":
            idx.verify()
        elif check == "lazy":
            idx._store.word_check = file.word_check()
        return idx

    def verify(self) -> None:
        """Full check of the opened file: sha256 of the inverted file, and every entry in range,
        ascending, and counted in its item's word count. Raises :class:`d2r.IndexFormatError`.
        A no-op for an index built in memory."""
        if self._file is None:
            return
        self._check_open()
        self._file.verify()
        self._store.word_check = None  # every word is checked now
