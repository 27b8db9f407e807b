"""Adding photos to a saved bundle with its own codebook and configuration (``d2r add``).

    report = add_to_bundle("museum.d2r", ["new/a.jpg", "new/b.jpg"], metadata={...})

No retraining: the photos are extracted with the bundle's own models (its ``models/``), aggregated
with its codebook and appended to its index in the order given, so the index is byte for byte
the one a build of all the photos with that codebook writes (base photos first). The rules:

- **ids already in the bundle** (file names) are refused before any work, naming them, and the
  bundle is left as it was; ``existing="skip"`` leaves those photos out and adds the others;
- **photos that cannot be read** are skipped and listed (``on_error="skip"``, as a build does);
  ``bundle.json``'s ``skipped`` gains them, and loses a photo skipped earlier that is added now;
- **the bundle is written atomically** as a new version (one more than the bundle's): a new
  folder beside it, swapped in by renames (:func:`d2r.bundle.folder.writing`), so a failed or
  killed add leaves the old bundle whole; nothing is written when no photo was added;
- **a bundle changed meanwhile** (another add or build saved it while this one ran) is refused
  at the end rather than overwritten (:class:`d2r.errors.BundleError`; the photos added are lost
  and the other writer's bundle is kept).

``d2r_build.add`` runs the same on a Ray cluster and writes the same bundle.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .bundle.folder import check_bundle_target, read_bundle_info
from .errors import BundleError, InputError

EXISTING = ("refuse", "skip")


class ExistingPhotosError(InputError):
    """Photos whose ids are already in the bundle (``ids``); nothing was changed."""

    def __init__(self, message: str, ids: list):
        super().__init__(message)
        self.ids = list(ids)


@dataclass
class AddReport:
    """What an add did."""

    bundle: Path
    #: the bundle's version now (unchanged when nothing was added)
    version: int
    #: images in the bundle now
    n_images: int
    #: ids added, in order
    added: list = field(default_factory=list)
    #: photos of this add that could not be read: id -> reason
    skipped: dict = field(default_factory=dict)
    #: photos left out because their id is in the bundle already (``existing="skip"``)
    existing: list = field(default_factory=list)
    seconds: float = 0.0
    #: Ray workers (0 on one machine)
    workers: int = 0

    @property
    def photos_per_second(self) -> float:
        n = len(self.added) + len(self.skipped)
        return n / self.seconds if self.seconds > 0 else 0.0


def shorten(ids, n: int = 10) -> str:
    ids = list(ids)
    return ", ".join(ids[:n]) + (f", ... ({len(ids) - n} more)" if len(ids) > n else "")


def split_existing(bundle, index, images, existing: str = "refuse") -> tuple[list, list]:
    """(photos to add, ids already in ``index``) of ``images`` (paths; the id is the file name).

    existing: ``"refuse"`` raises :class:`ExistingPhotosError` naming the ids in the bundle
    already; ``"skip"`` leaves them out. Two photos with the same file name are refused."""
    if existing not in EXISTING:
        raise InputError(f"existing: expected 'refuse' or 'skip', got {existing!r}")
    images = [Path(p) for p in images]
    ids = [p.name for p in images]
    if len(set(ids)) != len(ids):
        twice = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise InputError(f"images: two photos have the same file name (the image id): {shorten(twice)}")
    present = [i for i in ids if i in index]
    if present and existing == "refuse":
        raise ExistingPhotosError(f"images: {len(present)} photo(s) already in {bundle}: {shorten(present)}; nothing was added "
                                  "(existing='skip' adds the others; remove an image first to replace it)", present)
    have = set(present)
    return [p for p in images if p.name not in have], present


def check_unchanged(bundle, checksum: str) -> None:
    """Refuse to replace ``bundle`` when its bundle.json is no longer the one read at the start."""
    try:
        now = read_bundle_info(bundle)["checksum"]
    except BundleError as exc:
        raise BundleError(f"{bundle}: changed while photos were being added ({exc}); it is left as it is, nothing was added") from None
    if now != checksum:
        raise BundleError(f"{bundle}: was saved by another writer while photos were being added; it is left as it is "
                          "(nothing was added: run the add again)")


def add_to_bundle(bundle, images, *, metadata=None, existing: str = "refuse", on_error: str = "skip", threads: int | None = None,
                  progress=True, protect=()) -> AddReport:
    """Add ``images`` (paths) to the bundle folder ``bundle`` on this machine (see the module's
    docstring for the rules). metadata: image id -> dict. protect: folders that must survive
    (the photos' folder: the bundle may not be it nor hold it). Returns an :class:`AddReport`."""
    from .engine import Engine

    t0 = time.perf_counter()
    bundle = Path(bundle)
    images = [Path(p) for p in images]
    if not images:
        raise InputError("images: no photos to add")
    check_bundle_target(bundle, protect)  # a bundle holding only its own files: it will be replaced whole
    checksum = read_bundle_info(bundle)["checksum"]
    with Engine.open(bundle, threads=threads) as engine:
        assert engine.index is not None
        todo, present = split_existing(bundle, engine.index, images, existing)
        added = engine.add_images(todo, metadata=metadata, progress=progress, on_error=on_error) if todo else []
        done = set(added)
        skipped = {p.name: engine.skipped[p.name] for p in todo if p.name not in done and p.name in engine.skipped}
        if added:
            check_unchanged(bundle, checksum)
            engine.save(bundle, protect=protect)
        return AddReport(bundle, engine.bundle_version, len(engine.index), list(added), skipped, present, time.perf_counter() - t0)
