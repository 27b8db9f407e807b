"""Curator side: a folder of exhibit photos plus a CSV of titles and descriptions -> a bundle.

    python examples/museum_guide/build.py [--photos DIR] [--csv exhibits.csv] [-o museum.d2r]

The CSV has a header with an ``image_id`` column (the photo's file name) and any other
columns (here ``title`` and ``description``); they are stored as each image's metadata in the
index, so the guide needs nothing but the bundle. Several photos of one exhibit (different
angles, lighting) make it easier to recognise. Runs offline with the models in models/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import d2r
from d2r.engine import read_bundle_info
from d2r.photos import list_images, read_metadata_csv

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "sample"


def build(photos, csv_path, out, codebook_size: int = 128, threads: int | None = 2) -> Path:
    """Index every photo of ``photos`` listed in ``csv_path``; write the bundle ``out``."""
    images = list_images(photos)
    metadata = read_metadata_csv(csv_path)
    missing = [p.name for p in images if p.name not in metadata]
    if missing:
        raise d2r.InputError(f"{csv_path}: no row for {len(missing)} photo(s), e.g. {missing[0]!r}")
    for image_id, meta in metadata.items():
        if not meta.get("title"):
            raise d2r.InputError(f"{csv_path}: {image_id!r} has no title")
    # Verification features let the guide check the geometry of a match (inliers), which is
    # what tells an exhibit from a photo of something that is not in the collection.
    with d2r.Engine.create(features="xfeat", detector="ssd", kind="rasmk_star", threads=threads, verification_features=500) as engine:
        engine.train_codebook(images, size=codebook_size, progress=False)
        engine.add_images(images, metadata=metadata, progress=False)
        return engine.save(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", default=str(SAMPLE / "collection"), help="folder of exhibit photos")
    ap.add_argument("--csv", default=str(HERE / "exhibits.csv"), help="CSV: image_id,title,description[,...]")
    ap.add_argument("-o", "--output", default=str(HERE.parent / "out" / "museum.d2r"), help="bundle folder to write")
    ap.add_argument("--codebook-size", type=int, default=128, help="visual words (128 for a few dozen photos; 1024+ for thousands)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        bundle = build(args.photos, args.csv, args.output, args.codebook_size, args.threads)
    except d2r.D2RError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 2
    info = read_bundle_info(bundle)
    print(f"wrote {bundle}: {info['n_images']} photos in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
