"""Whole-photo features kept between the two passes of a build.

A build reads every photo twice: the codebook pass needs each photo's whole-photo descriptors
(its share of the k-means sample), the index pass needs them again with the photo's regions.
:class:`FeatureMemo` keeps the first pass's features on disk, in a temporary folder of its own
(removed by :meth:`close`), so the index pass does not run the model on the whole photo again:
exact float32 arrays, so the bundle is byte for byte the one a build without it writes. It
holds at most ``max_bytes``; photos past that are simply extracted again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError
from .features import Features

#: default disk budget of a build's memo (about 2000 photos at 2000 ALIKED features each)
MEMO_BYTES = 2 << 30


class FeatureMemo:
    """Features of photos given by path, on disk in a folder this object creates (in
    ``scratch``, default the system's temporary folder) and removes on :meth:`close`."""

    def __init__(self, scratch=None, max_bytes: int = MEMO_BYTES):
        self.max_bytes = int(max_bytes)
        self.used = 0
        try:
            self.dir: Path | None = Path(tempfile.mkdtemp(prefix="d2r-build-", dir=scratch))
        except OSError as exc:
            raise InputError(f"scratch: cannot make a temporary folder in {scratch} ({exc.strerror or exc})") from exc
        self._files: dict[str, Path] = {}

    @staticmethod
    def key(item) -> str | None:
        """A path's key (resolved path, size, mtime: a photo changed between the passes is read
        again); None for an in-memory image, which is not kept."""
        if not isinstance(item, (str, os.PathLike)):
            return None
        try:
            st = os.stat(item)
        except OSError:
            return None
        return f"{Path(item).resolve()}|{st.st_size}|{st.st_mtime_ns}"

    def put(self, item, features: Features) -> bool:
        key = self.key(item)
        if key is None or self.dir is None:
            return False
        size = sum(a.nbytes for a in (features.locations, features.descriptors, features.scores, features.scales))
        if self.used + size > self.max_bytes:
            return False
        path = self.dir / f"{len(self._files)}.npz"
        np.savez(path, locations=features.locations, descriptors=features.descriptors, scores=features.scores, scales=features.scales)
        self._files[key] = path
        self.used += size
        return True

    def get(self, item) -> Features | None:
        key = self.key(item)
        path = self._files.get(key) if key is not None else None
        if path is None:
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return Features(z["locations"], z["descriptors"], z["scores"], z["scales"])
        except (OSError, ValueError, KeyError):
            return None  # lost or damaged: the photo is extracted again

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)  # our own folder, made by mkdtemp
            self.dir = None
            self._files.clear()

    def __enter__(self) -> "FeatureMemo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
