"""What a detector gives region-based aggregation, read from `d2r eval`'s feature cache.

    .venv/bin/python benchmarks/bench_regions.py --detector landmark --thresholds 0.7,0.5,0.3,0.1 \
        --cache /tmp/d2rcache2 [--dataset ../shared/data/roxford5k-mini]

Run it after `d2r eval --regions detector:NAME@T --cache DIR` for the same thresholds (it reads
the detector boxes and the per-crop XFeat features that eval stored; nothing is recomputed, and
thresholds that eval has not run show 0 images). Per threshold: the fraction of database
images with at least one box, boxes per image, median box area (fraction of the image),
median features per region and per whole image, and the median ratio (features of all regions
of an image) / (features of its whole image).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np

from d2r.engine import Engine
from d2r_lab import evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="landmark")
    ap.add_argument("--thresholds", default="0.7,0.5,0.3,0.1")
    ap.add_argument("--cache", required=True, help="the --cache folder given to d2r eval")
    ap.add_argument("--dataset", default=str(Path(os.environ.get("D2R_SHARED_DIR", ROOT / ".." / "shared")) / "data" / "roxford5k-mini"))
    args = ap.parse_args()
    ds = evaluate.load_dataset(args.dataset)
    print(f"{'detector':10s} {'T':>4s} {'images':>6s} {'with box':>8s} {'boxes/img':>9s} {'med area':>8s} "
          f"{'feats/region':>12s} {'feats/whole':>11s} {'regions/whole feats':>19s}")
    for t in (float(v) for v in args.thresholds.split(",")):
        eng = Engine.create(features="xfeat", detector=args.detector, kind="asmk_star", backend="tflite", precision="int8",
                            detector_threshold=t, max_regions=25)
        ex = eng.extractor
        # The key d2r_lab.evaluation.run gives this setting's cache folder.
        setting = f"{eng.feature_entry.sha256}|{ex.scales}|{ex.max_features}|{ex.score_threshold}|{eng.detector_entry.sha256}|{t}"
        folder = Path(args.cache) / hashlib.sha256(setting.encode()).hexdigest()[:16]
        eng.close()
        nb, areas, per_region, per_whole, ratio = [], [], [], [], []
        for p in ds.image_paths:
            st = p.stat()

            def entry(tag):
                return folder / (hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tag}".encode()).hexdigest()[:24] + ".npz")

            if not entry("detector").is_file() or not entry("whole+shape").is_file():
                continue
            with np.load(entry("detector")) as z, np.load(entry("whole+shape")) as w:
                keep = [i for i in range(int(z["n"][0])) if z["scores"][i] >= t]
                b = z["boxes"][keep]
                counts = [len(z[f"r{i}_descriptors"]) for i in keep]
                whole = len(w["descriptors"])
            nb.append(len(keep))
            areas += ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).tolist()
            per_region += counts
            per_whole.append(whole)
            if keep:
                ratio.append(sum(counts) / max(whole, 1))
        med = lambda v: float(np.median(v)) if len(v) else float("nan")  # noqa: E731
        print(f"{args.detector:10s} {t:4.1f} {len(nb):6d} {np.mean(np.array(nb) > 0) if nb else float('nan'):8.2f} "
              f"{np.mean(nb) if nb else float('nan'):9.2f} {med(areas):8.2f} {med(per_region):12.0f} {med(per_whole):11.0f} {med(ratio):19.2f}")


if __name__ == "__main__":
    main()
