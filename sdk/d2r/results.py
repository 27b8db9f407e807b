"""Typed results of a search and of a query."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One search result: the image id, its score, its metadata (a fresh copy) and, when the
    query was verified (``Engine.query(verify=True)``) and this hit was among the verified,
    its RANSAC inlier count."""

    image_id: str
    score: float
    metadata: Any = None
    inliers: int | None = None

    def __iter__(self):
        """Unpacks as ``image_id, score, metadata``."""
        return iter((self.image_id, self.score, self.metadata))


@dataclass
class QueryResult:
    """Ranked :class:`d2r.Hit` list and the time spent in each stage (milliseconds).

    Each verified hit carries its inliers (:attr:`Hit.inliers`); :attr:`inliers` maps image
    id -> inliers for them, as earlier versions returned.
    """

    hits: list
    timings: dict = field(default_factory=dict)
    n_features: int = 0

    @property
    def inliers(self) -> dict:
        return {h.image_id: h.inliers for h in self.hits if h.inliers is not None}

    def to_json(self) -> dict:
        hits = []
        for h in self.hits:
            item = {"image_id": h.image_id, "score": h.score, "metadata": h.metadata}
            if h.inliers is not None:
                item["inliers"] = h.inliers
            hits.append(item)
        return {"hits": hits, "timings_ms": self.timings, "n_features": self.n_features}
