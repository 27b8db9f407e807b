"""The photos the tests read.

Small real photos ship with the repository under ``tests/data/`` (see its NOTICE.md), so a fresh
clone runs the whole suite with nothing beside it:

- ``tests/data/ukbench-56/``: the first 56 UKBench photos (14 objects x 4), ``groups.json``;
- ``tests/data/landmarks/``: 13 Oxford landmark photos of roxford5k-mini (640 px).

The full benchmark sets (roxford5k-mini with its ground truth) live in ``../shared/data`` beside
the repository (override with ``D2R_SHARED_DIR``, the folder that holds ``data/``). Tests that
need them call :func:`require_roxford` and skip with a reason that says how to get them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

GET_ROXFORD = ("needs the roxford5k-mini benchmark set: put the project's shared/ folder beside the "
               "repository or set D2R_SHARED_DIR, or make it with `d2r datasets download roxford5k "
               "--dest DIR` and `d2r datasets mini`")


def shared_dir() -> Path | None:
    """The shared folder (``$D2R_SHARED_DIR`` or ``../shared``) if it holds ``data/``, else None."""
    env = os.environ.get("D2R_SHARED_DIR")
    path = Path(env) if env else REPO.parent / "shared"
    return path if (path / "data").is_dir() else None


def require_roxford() -> Path:
    """The full roxford5k-mini folder (db/, queries/, gnd.json), or skip the test saying how to get it."""
    shared = shared_dir()
    root = shared / "data" / "roxford5k-mini" if shared else None
    if root is None or not (root / "gnd.json").is_file():
        pytest.skip(GET_ROXFORD)
    return root


def ukbench_dir() -> Path:
    return DATA / "ukbench-56"


def ukbench_images() -> list[Path]:
    return [ukbench_dir() / "images" / name for name in ukbench_groups()["images"]]


def ukbench_groups() -> dict:
    return json.loads((ukbench_dir() / "groups.json").read_text())


def landmarks_dir() -> Path:
    return DATA / "landmarks"


def landmark_photos() -> list[Path]:
    """The shipped landmark photos, sorted by name."""
    return sorted(landmarks_dir().glob("*.jpg"))


def landmark_photo(name: str) -> Path:
    path = landmarks_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not one of the shipped landmark photos")
    return path


def photo_sets(n_calibration: int, n_evaluation: int) -> tuple[list[Path], list[Path]]:
    """Disjoint (calibration, evaluation) photo sets for the converters, from the shipped photos."""
    from d2r_convert._tools import default_photo_sets

    return default_photo_sets(n_calibration, n_evaluation, oxford=landmark_photos(), ukbench=ukbench_images())


def ukbench_retrieval_dataset(root: Path, groups: int | None = None) -> Path:
    """A folder in the roxford5k-mini layout made of UKBench objects (symlinks, no copies):
    the first photo of each object is a query, the other three its database images, two
    "easy" and one "hard" positive (enough to exercise all three protocols)."""
    root = Path(root)
    (root / "db").mkdir(parents=True)
    (root / "queries").mkdir()
    paths = {p.name: p for p in ukbench_images()}
    imlist, qimlist, gnd = [], [], []
    for group in ukbench_groups()["groups"][:groups]:
        q, *rest = group
        (root / "queries" / q).symlink_to(paths[q])
        qimlist.append(q)
        first = len(imlist)
        for name in rest:
            (root / "db" / name).symlink_to(paths[name])
            imlist.append(name)
        gnd.append({"easy": [first, first + 1], "hard": [first + 2], "junk": []})
    (root / "gnd.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return root
