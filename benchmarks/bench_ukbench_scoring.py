"""UKBench-56 top-4 score of the shipped Engine under each scoring: plain, query expansion,
normalised, normalised + expansion; one engine per kind (every other setting the default).

    PYTHONPATH=sdk nice -n 10 .venv/bin/python benchmarks/bench_ukbench_scoring.py [--kinds rasmk_star,asmk_star,d2r_asmk_star]

The 56 photos (14 objects x 4) ship under tests/data/ukbench-56. Each photo queries the index of
all 56; its score is how many of its top 4 are photos of its object (4 is perfect: itself and
the 3 others). Prints a markdown table (mean over the 56 photos).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from d2r.engine import Engine  # noqa: E402

from shared_data import ukbench_groups, ukbench_images  # noqa: E402

SCORINGS = (("plain", False, 0), ("QE n = 3", False, 3), ("normalised", True, 0), ("normalised + QE n = 3", True, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="rasmk_star,asmk_star,d2r_asmk_star")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    images = ukbench_images()
    group_of = {name: i for i, g in enumerate(ukbench_groups()["groups"]) for name in g}
    print("| kind | K | " + " | ".join(name for name, _, _ in SCORINGS) + " |")
    print("|---|---|" + "---|" * len(SCORINGS))
    for kind in args.kinds.split(","):
        extra = {"detector": None} if kind == "asmk_star" else {}
        with Engine.create(threads=args.threads, kind=kind, **extra) as engine:
            engine.train_codebook(images, progress=False)
            engine.add_images(images, progress=False)
            cells = []
            for _, normalize, expand in SCORINGS:
                per = [sum(group_of[h.image_id] == group_of[p.name] for h in engine.query(p, top_k=4, normalize=normalize, expand=expand).hits)
                       for p in images]
                cells.append(f"{np.mean(per):.3f}")
            print(f"| {kind} | {engine.codebook.size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
