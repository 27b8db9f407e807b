"""The index: an inverted file over ASMK* / R-ASMK* aggregations, in memory or memory-mapped.

Every database *item* is one aggregation: an image added with :meth:`Index.add`, or one region
of an image added with :meth:`Index.add_regions` (Detect-to-Retrieve regional search, where the
image score is the max or the mean over its regions). For every visual word the inverted file
lists the items that contain it with their codes, so a query touches only the posting lists of
its own words; the Numba kernels of :mod:`d2r.kernels.similarity` score them.

Scores equal the brute-force :func:`d2r.similarity` of the query with every item, bit for bit;
an item without visual words, or an empty query, scores -1. Ranking is by score descending,
ties broken by insertion order (the image added first ranks first).

Storage: an index is a *base* segment (read from a file, possibly memory-mapped, never
modified) plus an in-memory *delta* of the images added since; removals set a tombstone bit.
:meth:`Index.save` writes base + delta into one new file atomically; :meth:`Index.compact`
drops tombstoned images.

One module per concept:

- :mod:`.core`: :class:`Index`, the user-facing class, composed of the three below;
- :mod:`.builder`: the items in memory (base + delta segments, tombstones, compaction);
- :mod:`.search`: the query's checks, scoring from the posting lists, pooling, top k;
- :mod:`.format`: the ``.d2ri`` file (docs/index-format.md): writer, reader, integrity checks;
- :mod:`.postings`: what they share (the index's parameters, one inverted file).
"""

from ..results import Hit
from .core import Index
from .format import MAGIC, VERSION, check_index_target
from .postings import INDEX_KINDS

__all__ = ["Hit", "INDEX_KINDS", "Index", "MAGIC", "VERSION", "check_index_target"]
