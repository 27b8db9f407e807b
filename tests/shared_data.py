"""Where the shared benchmark photos are: ``../shared/data`` beside the repository.

Override with the D2R_SHARED_DIR environment variable (the folder that holds ``data/``).
Tests read the photos from there and never copy them into the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    env = os.environ.get("D2R_SHARED_DIR")
    path = Path(env) if env else REPO.parent / "shared"
    if not (path / "data").is_dir():
        raise FileNotFoundError(f"shared data not found at {path}/data (set D2R_SHARED_DIR)")
    return path


def ukbench_dir() -> Path:
    return shared_dir() / "data" / "ukbench-56"


def ukbench_images() -> list[Path]:
    return [ukbench_dir() / "images" / name for name in ukbench_groups()["images"]]


def ukbench_groups() -> dict:
    return json.loads((ukbench_dir() / "groups.json").read_text())


def roxford_dir() -> Path:
    return shared_dir() / "data" / "roxford5k-mini"


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
