"""Curator side: a folder of exhibit photos plus a CSV of titles and descriptions -> a bundle.

    python examples/museum_guide/build.py [--photos DIR] [--csv exhibits.csv] [-o museum.d2r] [--accurate]

The CSV has a header with an ``image_id`` column (the photo's file name) and any other
columns (here ``title`` and ``description``); they are stored as each image's metadata in the
index, so the guide needs nothing but the bundle. Several photos of one exhibit (different
angles, lighting) make it easier to recognise. Runs offline with the models in models/.

``--accurate`` builds the bundle for the guide's accurate setting (LightGlue re-ranking): the
same SSD regions and R-ASMK* index, but ALIKED-n16 features (the 128-D descriptors LightGlue's
shipped weights read) and the 512 verification features a photo that LightGlue matches.
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


# The fast setting: XFeat, 500 verification features a photo for the nearest-neighbour matcher.
# The accurate setting: ALIKED-n16, 512 verification features a photo: LightGlue's converted
# files match the first 512 keypoints of each image (models/manifest.json,
# lightglue_aliked_n512_*), so more would never be used. Both ask for int8 models: the SSD
# detector is the same int8 file; ALIKED-n16 has no int8 file and runs its fp16 TFLite.
FAST = dict(features="xfeat", verification_features=500)
ACCURATE = dict(features="aliked_n16", verification_features=512)


def build(photos, csv_path, out, codebook_size: int = 128, threads: int | None = 2, accurate: bool = False) -> Path:
    """Index every photo of ``photos`` listed in ``csv_path``; write the bundle ``out``.

    accurate: ALIKED-n16 features for the guide's LightGlue verification (``guide.py``
    answers such a bundle with ``verify="lightglue"``); False: XFeat and the nearest-neighbour
    matcher.
    """
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
    setting = ACCURATE if accurate else FAST
    with d2r.Engine.create(detector="ssd", kind="rasmk_star", threads=threads, **setting) as engine:
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
    ap.add_argument("--accurate", action="store_true",
                    help="ALIKED-n16 features, for the guide's LightGlue verification (slower to build and to answer)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        bundle = build(args.photos, args.csv, args.output, args.codebook_size, args.threads, accurate=args.accurate)
    except d2r.D2RError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 2
    info = read_bundle_info(bundle)
    print(f"wrote {bundle}: {info['n_images']} photos, {info['config']['features']} features, in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
