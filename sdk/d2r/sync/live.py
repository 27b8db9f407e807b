"""A running engine that follows the active bundle of a destination folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import SyncError
from .destination import Destination, freshness


class LiveBundle:
    """The object opened from ``DEST/current`` (a :class:`d2r.Engine` by default), reopened
    between calls when a sync has swapped the active version. Old versions stay on disk until
    the next-but-one sync, so a query running during a swap finishes on the bundle it started.

        live = LiveBundle("/var/lib/d2r")
        live.query(photo)          # d2r.Engine.query on the active bundle
    """

    def __init__(self, dest, opener=None, close=True):
        self.dest = Destination(dest)
        if opener is None:
            from ..engine import Engine

            opener = Engine.open
        self._opener = opener
        self._close = close
        self._target = None
        self._obj = None

    def get(self):
        """The opened active bundle (reopened if ``current`` changed since the last call)."""
        target = self.dest.current
        if target is None:
            raise SyncError(f"{self.dest.root}: no active bundle yet (run d2r sync)")
        target = target.resolve()
        if target != self._target:
            new = self._opener(target)
            old, self._obj, self._target = self._obj, new, target
            if old is not None and self._close and hasattr(old, "close"):
                old.close()
        return self._obj

    @property
    def version_path(self) -> Path | None:
        return self._target

    @property
    def freshness(self) -> dict:
        """:func:`freshness` of the destination: when the device last verified fresh TUF
        metadata (``verified_at``), ``stale_seconds`` since, and whether that metadata has
        ``expired`` since (the bundle keeps serving; the update channel is stale or frozen)."""
        return freshness(self.dest.root)

    @property
    def stale_seconds(self) -> float | None:
        """Seconds since the device last verified fresh TUF metadata (None: never)."""
        return self.freshness["stale_seconds"]

    def query(self, *args, **kwargs):
        return self.get().query(*args, **kwargs)

    def close(self) -> None:
        if self._obj is not None and self._close and hasattr(self._obj, "close"):
            self._obj.close()
        self._obj = self._target = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
