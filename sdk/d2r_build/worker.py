"""A worker of the distributed build: one Ray actor per CPU, holding one loaded
:class:`d2r.pipeline.Pipeline` for its whole life (models load once, not per photo).

The class itself is plain Python (the driver wraps it with ``ray.remote``), so it runs and is
tested the same without a cluster. Each method takes one batch of photos and writes its shard
(:mod:`d2r_build.shards`); a batch done twice (a task retried after a worker died) writes once.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from d2r.codebook import Codebook
from d2r.config import EngineConfig
from d2r.errors import ImageError
from d2r.pipeline import Pipeline

from .shards import PhotoShard, ShardFolder


class PhotoWorker:
    """Features and regions of batches of photos, then their aggregations."""

    def __init__(self, config: dict, threads: int | None = 1, models: str | None = None):
        """models: the manifest.json of the models to load (a bundle's own, when adding to it);
        None: the models installed with d2r."""
        self.config = EngineConfig(**config).check()
        self.pipeline = Pipeline.load(self.config, models, threads=threads)
        self._codebook_key: tuple | None = None

    def pid(self) -> int:
        return os.getpid()

    def features(self, shards: str, batch: int, photos: list[tuple[str, str, str]]) -> dict:
        """Features and regions of ``photos`` ((image id, absolute path, path as the user gave
        it) each) into feature shard ``batch``. A photo that cannot be read is recorded with its
        error, naming the path as given (the words ``Engine.add_images`` records when it skips it)."""
        t0 = time.perf_counter()
        out = [self._regions(name, path, shown) for name, path, shown in photos]
        ShardFolder(shards).write_features(batch, out)
        return {"batch": batch, "pid": os.getpid(), "photos": len(photos), "seconds": time.perf_counter() - t0}

    def aggregate(self, shards: str, batch: int) -> dict:
        """Aggregations (and packed verification features) of feature shard ``batch`` with the
        build's codebook, into aggregation shard ``batch``."""
        t0 = time.perf_counter()
        folder = ShardFolder(shards)
        self._use_codebook(folder)
        records = [self._aggregate(photo) for photo in folder.read_features(batch)]
        folder.write_aggregated(batch, records)
        return {"batch": batch, "pid": os.getpid(), "photos": len(records), "seconds": time.perf_counter() - t0}

    def build(self, shards: str, batch: int, photos: list[tuple[str, str, str]]) -> dict:
        """:meth:`features` and :meth:`aggregate` in one go, for a build whose codebook is given:
        only the aggregation shard is written (the features are never stored)."""
        t0 = time.perf_counter()
        folder = ShardFolder(shards)
        self._use_codebook(folder)
        records = [self._aggregate(self._regions(name, path, shown)) for name, path, shown in photos]
        folder.write_aggregated(batch, records)
        return {"batch": batch, "pid": os.getpid(), "photos": len(records), "seconds": time.perf_counter() - t0}

    def _regions(self, name: str, path: str, shown: str) -> PhotoShard:
        try:
            _, regions = self.pipeline.database_regions(path)
        except ImageError as exc:
            why = str(exc)
            return PhotoShard(name, shown + why[len(path):] if why.startswith(path) else why, None)
        return PhotoShard(name, None, regions)

    def _aggregate(self, photo: PhotoShard) -> tuple:
        """(name, error, aggregated, packed verification features) of one photo."""
        if photo.regions is None:
            return (photo.name, photo.error, None, None)
        stage = self.pipeline.require_aggregation()
        packed = None
        if self.config.verification_features:
            from d2r.verify import pack_features

            packed = pack_features(self.pipeline.verification.database_features(photo.regions.features[0], stage.codebook))
        return (photo.name, None, stage.database(photo.regions), packed)

    def _use_codebook(self, folder: ShardFolder) -> None:
        st = folder.codebook_path.stat()
        key = (str(folder.codebook_path), st.st_mtime_ns, st.st_size)
        if key != self._codebook_key:
            self.pipeline.set_codebook(Codebook.load(folder.codebook_path))
            self._codebook_key = key

    def close(self) -> None:
        self.pipeline.close()


def config_dict(config: EngineConfig) -> dict:
    return asdict(config)
