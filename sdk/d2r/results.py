"""Typed results of a search and of a query."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One search result: the image id, its score and its metadata (a fresh copy)."""

    image_id: str
    score: float
    metadata: Any = None

    def __iter__(self):
        """Unpacks as ``image_id, score, metadata``."""
        return iter((self.image_id, self.score, self.metadata))


@dataclass
class QueryResult:
    """Ranked :class:`d2r.Hit` list and the time spent in each stage (milliseconds).

    inliers: with ``verify=True``, image_id -> RANSAC inlier count of the verified hits.
    """

    hits: list
    timings: dict = field(default_factory=dict)
    n_features: int = 0
    inliers: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        hits = []
        for h in self.hits:
            item = {"image_id": h.image_id, "score": h.score, "metadata": h.metadata}
            if h.image_id in self.inliers:
                item["inliers"] = self.inliers[h.image_id]
            hits.append(item)
        return {"hits": hits, "timings_ms": self.timings, "n_features": self.n_features}
