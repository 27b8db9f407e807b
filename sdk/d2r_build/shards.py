"""The shard folder of a distributed build (``OUT.d2r.shards/`` by default), on a file system
that every node of the cluster sees.

    plan.json              what is being built: the photos, the configuration, the batch size,
                           the codebook's origin (a resumed build must match it exactly)
    features/000012/       batch 12's features and regions (``photos.json`` and one .npy per
                           field of :class:`d2r.features.Features`, every region concatenated)
    codebook.d2rcb         the codebook (trained on the driver from the feature shards, or given)
    models/                adding to a bundle: a copy of the bundle's models (manifest.json and
                           the files it lists), which the workers load
    aggregated/000012.pkl  batch 12's aggregations and packed verification features (and the
                           errors of the photos left out)

A build given its codebook writes no feature shards: its workers aggregate each photo as soon
as its regions are extracted.

Every shard is written under a temporary name and renamed into place, so a shard that exists is
complete: a killed build resumes from the shards it finds (``--resume``), and a batch that a
restarted worker computes twice is written once. The folder is created by the build and removed
by it after the bundle is saved; a folder without our ``plan.json`` is never used nor removed.
No module here imports ray: the workers and the driver both use it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2r.errors import InputError
from d2r.features import Features
from d2r.pipeline import Regions

PLAN = "plan.json"
FORMAT = "d2r-build-shards"
VERSION = 1
_FIELDS = ("locations", "descriptors", "scores", "scales")


def default_folder(output) -> Path:
    """``OUT.d2r.shards`` beside the bundle ``OUT.d2r``."""
    output = Path(output)
    return output.with_name(output.name + ".shards")


def batch_name(batch: int) -> str:
    return f"{batch:06d}"


@dataclass
class PhotoShard:
    """One photo of a feature shard: its id, the error that left it out (None when read), and
    its regions (region 0 is the whole photo)."""

    name: str
    error: str | None
    regions: Regions | None


class ShardFolder:
    """The shard folder of one build (see the module's docstring)."""

    def __init__(self, root):
        self.root = Path(root)

    # -- the plan -------------------------------------------------------------------------------
    @property
    def plan_path(self) -> Path:
        return self.root / PLAN

    def is_ours(self) -> bool:
        try:
            return json.loads(self.plan_path.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    def start(self, plan: dict, resume: bool) -> int:
        """Create the folder with ``plan`` (a new build), or check a resumed build's plan against
        the one on disk. Returns the number of shards already there (0 for a new build)."""
        plan = {"format": FORMAT, "version": VERSION, **plan}
        if self.root.exists() or self.root.is_symlink():
            if not self.is_ours():
                raise InputError(f"shards: {self.root} exists and is not the shard folder of a d2r build; "
                                 "choose another folder (it is left as it is)")
            if not resume:
                raise InputError(f"shards: {self.root} holds the shards of an earlier build that did not finish: "
                                 "resume it (resume=True) or remove the folder")
            old = json.loads(self.plan_path.read_text())
            for key in sorted(set(plan) | set(old)):
                if old.get(key) != plan.get(key):
                    raise InputError(f"shards: {self.root} was written for another build ({key!r} differs: "
                                     f"{_short(old.get(key))} there, {_short(plan.get(key))} now); remove it or build with the same photos and options")
            return len(self.done("features")) + len(self.done("aggregated"))
        self.root.mkdir(parents=True)
        _write_atomic(self.plan_path, (json.dumps(plan, indent=1) + "\n").encode())
        (self.root / "features").mkdir()
        (self.root / "aggregated").mkdir()
        return 0

    def done(self, kind: str) -> set[int]:
        """Batches whose ``kind`` shard (``features`` or ``aggregated``) is complete."""
        out = set()
        for p in (self.root / kind).iterdir():
            stem = p.name.split(".")[0]
            if not p.name.startswith(".") and stem.isdigit() and (p.is_dir() or p.suffix == ".pkl"):
                out.add(int(stem))
        return out

    def remove(self) -> None:
        """Remove the folder (only ours: it holds our plan.json)."""
        if self.is_ours():
            shutil.rmtree(self.root)

    @property
    def codebook_path(self) -> Path:
        return self.root / "codebook.d2rcb"

    @property
    def models_manifest(self) -> Path:
        return self.root / "models" / "manifest.json"

    def copy_models(self, source) -> None:
        """Copy a bundle's ``models/`` folder here (once: a resumed add keeps the first copy),
        so that the workers load the bundle's own models from the shared shard folder."""
        final = self.root / "models"
        if final.is_dir():
            return
        tmp = self.root / f".models.{uuid.uuid4().hex}.tmp"
        try:
            shutil.copytree(source, tmp)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    # -- feature shards ---------------------------------------------------------------------------
    def write_features(self, batch: int, photos: list[PhotoShard]) -> None:
        final = self.root / "features" / batch_name(batch)
        if final.exists():
            return
        tmp = self.root / "features" / f".{batch_name(batch)}.{uuid.uuid4().hex}.tmp"
        tmp.mkdir()
        try:
            items: list[dict] = []
            feats: list = []
            boxes: list = []
            for p in photos:
                regions = p.regions
                items.append({"name": p.name, "error": p.error, "sizes": regions.sizes if regions else []})
                if regions is not None:
                    feats.extend(regions.features)
                    boxes.extend(np.asarray(b, np.float32).reshape(4) for b in regions.boxes)
            dim = feats[0].descriptors.shape[1] if feats else 0
            for field in _FIELDS:
                parts = [np.asarray(getattr(f, field), np.float32) for f in feats]
                empty = np.zeros((0, 2) if field == "locations" else (0, dim) if field == "descriptors" else (0,), np.float32)
                np.save(tmp / f"{field}.npy", np.concatenate(parts) if parts else empty)
            np.save(tmp / "boxes.npy", np.stack(boxes) if boxes else np.zeros((0, 4), np.float32))
            (tmp / "photos.json").write_text(json.dumps(items))
            try:
                os.rename(tmp, final)
            except OSError:  # the same batch finished twice (a retried task): the first one stays
                if not final.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def photos(self, batch: int) -> list[dict]:
        """The ``photos.json`` of a feature shard: name, error, sizes (features per region)."""
        return json.loads((self.root / "features" / batch_name(batch) / "photos.json").read_text())

    def whole_descriptors(self, batch: int):
        """(photos, memory-mapped descriptors, first row of each photo): region 0 of photo i is
        ``descriptors[first[i] : first[i] + sizes[0]]``; nothing else is read."""
        folder = self.root / "features" / batch_name(batch)
        items = self.photos(batch)
        desc = np.load(folder / "descriptors.npy", mmap_mode="r")
        first, row = [], 0
        for item in items:
            first.append(row)
            row += sum(item["sizes"])
        return items, desc, first

    def sample_into(self, sample, batches) -> tuple[int, int]:
        """Add the whole-photo descriptors of every read photo of ``batches`` (in order) to
        ``sample`` (a :class:`d2r.pipeline.DescriptorSample`), as a single-machine build adds
        them; only the rows it keeps are read. Returns (photos seen, descriptor dimension or 0
        when no photo of them was read)."""
        n, dim = 0, 0
        for b in batches:
            items, desc, first = self.whole_descriptors(b)
            dim = desc.shape[1] or dim
            for item, row in zip(items, first):
                if item["error"] is None:
                    sample.add(desc[row : row + item["sizes"][0]])
            n += len(items)
        return n, dim

    def read_features(self, batch: int) -> list[PhotoShard]:
        folder = self.root / "features" / batch_name(batch)
        items = self.photos(batch)
        arrays = {field: np.load(folder / f"{field}.npy") for field in _FIELDS}
        boxes = np.load(folder / "boxes.npy")
        out, row, region = [], 0, 0
        for item in items:
            if item["error"] is not None:
                out.append(PhotoShard(item["name"], item["error"], None))
                continue
            feats, bxs = [], []
            for n in item["sizes"]:
                feats.append(Features(*(arrays[f][row : row + n] for f in _FIELDS)))
                bxs.append(boxes[region])
                row += n
                region += 1
            out.append(PhotoShard(item["name"], None, Regions(feats, bxs)))
        return out

    # -- aggregation shards -----------------------------------------------------------------------
    def write_aggregated(self, batch: int, records: list) -> None:
        """``records``: (name, error or None, aggregated or None, packed verification features or
        None) per photo."""
        final = self.root / "aggregated" / f"{batch_name(batch)}.pkl"
        if not final.exists():
            _write_atomic(final, pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))

    def read_aggregated(self, batch: int) -> list:
        # Our own file, written by write_aggregated in a folder this build created (plan.json).
        return pickle.loads((self.root / "aggregated" / f"{batch_name(batch)}.pkl").read_bytes())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
