"""The main job on bundled sample data: build a bundle from a small collection, query it with
held-back photos, print the ranked results with timings, and draw them into one picture.

    python examples/demo.py [--out examples/out]

Uses the default models shipped in models/ (ALIKED-t16 fp16 and the MobileNet-V2 SSD, TFLite).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

import d2r

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "sample"


def read_titles(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["image_id"]: {"title": row["title"]} for row in csv.DictReader(fh)}


def thumbnail(path: Path, size=(160, 120), border=None) -> Image.Image:
    img = Image.open(path).convert("RGB").resize(size)
    if border:
        ImageDraw.Draw(img).rectangle([0, 0, size[0] - 1, size[1] - 1], outline=border, width=5)
    return img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "out"), help="folder for the bundle and the result picture")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--objects", type=int, default=None, metavar="N",
                    help="index and query only the first N of the 8 objects (for slow, emulated runs)")
    args = ap.parse_args(argv)
    collection = sorted((SAMPLE / "collection").glob("*.jpg"))
    visitors = sorted((SAMPLE / "visitors").glob("*.jpg"))
    if args.objects is not None:
        objects = sorted({_object(p.name) for p in collection})
        if not 1 <= args.objects <= len(objects):
            ap.error(f"--objects must be between 1 and {len(objects)}, got {args.objects}")
        keep = set(objects[:args.objects])
        collection = [p for p in collection if _object(p.name) in keep]
        visitors = [p for p in visitors if _object(p.name) in keep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    indexed = {p.name for p in collection}
    titles = {k: v for k, v in read_titles(SAMPLE / "collection.csv").items() if k in indexed}

    t0 = time.perf_counter()
    print(f"building a bundle from {len(collection)} photos of {len(set(m['title'] for m in titles.values()))} objects ...")
    # The default features (ALIKED-t16) and R-ASMK*; the OIDv4 SSD finds the objects (the
    # landmark detector is for buildings). The codebook size is chosen from the photos (auto).
    with d2r.Engine.create(detector="ssd", kind="rasmk_star", threads=2, verification_features=500) as engine:
        engine.train_codebook(collection, progress=False)
        engine.add_images(collection, metadata=titles, progress=False)
        bundle = engine.save(out / "sample.d2r")
    print(f"  wrote {bundle} in {time.perf_counter() - t0:.1f} s")

    rows = []
    correct = 0
    with d2r.Engine.open(bundle, threads=2) as engine:
        engine.query(visitors[0])  # first call compiles kernels and warms the models
        for photo in visitors:
            res = engine.query(photo, top_k=args.top_k, verify=True, verify_top=10)
            truth = next(m["title"] for i, m in titles.items() if _same_object(i, photo.name))
            best = res.hits[0].metadata["title"] if res.hits else None
            correct += best == truth
            t = res.timings
            print(f"\n{photo.name} (really: {truth})  {t['total']:.0f} ms "
                  f"[features {t['features']:.0f}, aggregation {t['aggregation']:.1f}, search {t['search']:.1f}, verify {t['verify']:.0f}]")
            for rank, hit in enumerate(res.hits, start=1):
                mark = "ok" if hit.metadata["title"] == truth else "  "
                print(f"  {mark} {rank}. {hit.metadata['title']:<22s} {hit.image_id}  score {hit.score:.3f}  inliers {hit.inliers or 0}")
            rows.append((photo, [(SAMPLE / "collection" / h.image_id, h.metadata["title"] == truth) for h in res.hits]))
    print(f"\n{correct}/{len(visitors)} visitor photos recognised (top-1)")

    # One picture: each row is a visitor photo, then its top results (green: right object).
    w, h = 160, 120
    sheet = Image.new("RGB", ((args.top_k + 1) * (w + 8) + 8, len(rows) * (h + 8) + 8), "white")
    for r, (photo, hits) in enumerate(rows):
        y = 8 + r * (h + 8)
        sheet.paste(thumbnail(photo, border=(40, 40, 40)), (8, y))
        for c, (path, ok) in enumerate(hits, start=1):
            sheet.paste(thumbnail(path, border=(30, 170, 60) if ok else (210, 40, 40)), (8 + c * (w + 8), y))
    picture = out / "results.png"
    sheet.save(picture)
    print(f"result picture: {picture}")
    return 0 if correct >= len(visitors) - 1 else 1


def _object(name: str) -> int:
    """UKBench numbers its photos in groups of 4: photos 4k..4k+3 show object k."""
    return int(name[7:12]) // 4


def _same_object(collection_name: str, visitor_name: str) -> bool:
    return _object(collection_name) == _object(visitor_name)


if __name__ == "__main__":
    sys.exit(main())
