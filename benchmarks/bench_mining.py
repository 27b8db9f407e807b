"""Mined landmark boxes against ground truth (issue 7): ROxford-mini db/ as the collection.

    .venv/bin/python benchmarks/bench_mining.py --cache /tmp/d2rcache2 [--png /tmp/mining-png] [--boxes out.json]

Mines a box for every db/ image (retrieval + verification among db/ images) and for each of
the 13 uncropped query photos in full/ (searched and verified against db/; they are not in
it), then scores the full/ boxes against gnd.json's query boxes (``bbx`` = x1, y1, x2, y2 in
full/ pixels): mean IoU and the fraction with IoU >= 0.5, beside trivial baselines (the whole
image; a centred box of the ground truth's mean size, which peeks at the ground truth).

Caveats printed with the table: 13 boxes are a small sample; a query box marks the part of
the landmark the query is about (a tower, a window), not necessarily all that the photo
shares with the collection; rows other than the default are settings tried on these same 13
boxes, so picking the best of them is optimistic.

A second diagnostic needs no boxes: db/ file names carry the landmark the photo was found
under (all_souls_000054, ...). A supporting neighbour under another landmark's name (neither
named "oxford_") is most likely a false verification; the table gives that rate.

With --png, draws the full/ boxes (green: ground truth, red: mined, dots: inliers of the best
neighbours) and a random sample of db/ boxes to PNG sheets for inspection.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np

from d2r_lab import mining

ROOT = Path(__file__).resolve().parents[1]

# (label, BoxParams fields); the first row is the default of d2r detector mine-boxes.
SETTINGS = [
    ("default", {}),
    ("min_inliers 15", {"min_inliers": 15}),
    ("min_inliers 40", {"min_inliers": 40}),
    ("min_support 2", {"min_support": 2}),
    ("vote_fraction 0.5", {"vote_fraction": 0.5}),
    ("vote_fraction 0.7", {"vote_fraction": 0.7}),
    ("max_support 3", {"max_support": 3}),
    ("margin 0.15", {"margin": 0.15}),
    ("weighting sqrt", {"weighting": "sqrt"}),
]


def iou(a, b) -> float:
    y0, x0, y1, x1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, y1 - y0) * max(0.0, x1 - x0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def landmark(path: Path) -> str:
    return re.sub(r"_\d+$", "", path.stem)


def cross_rate(evidence, paths, params) -> tuple[float, int]:
    """Of the supporting neighbours between two named landmarks, the fraction whose names differ."""
    n = cross = 0
    for i, ev in enumerate(evidence["images"]):
        a = landmark(paths[i])
        if a == "oxford":
            continue
        for s in mining.box_from_evidence(ev, params)["used"]:
            b = landmark(paths[s.neighbour])
            if b != "oxford":
                n += 1
                cross += a != b
    return cross / max(n, 1), n


def draw(items, out: Path, params, size=400, cols=4) -> None:
    from PIL import Image, ImageDraw

    from d2r.image import load_image

    colours = [(255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 128, 0), (128, 0, 255)]
    tiles = []
    for path, ev, truth in items:
        img = Image.fromarray(load_image(path))
        d = ImageDraw.Draw(img)
        h, w = ev.shape
        b = mining.box_from_evidence(ev, params)
        for k, s in enumerate(b["used"][:5]):
            for y, x in s.points:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[k])
        if truth is not None:
            d.rectangle([truth[1] * w, truth[0] * h, truth[3] * w, truth[2] * h], outline=(0, 255, 0), width=4)
        if b["box"] is not None:
            y0, x0, y1, x1 = b["box"]
            d.rectangle([x0 * w, y0 * h, x1 * w, y1 * h], outline=(255, 0, 0), width=4)
        d.rectangle([0, 0, w, 16], fill=(0, 0, 0))
        d.text((4, 2), f"{path.name}  support {b['support']}  inliers {b['inliers']}", fill=(255, 255, 255))
        img.thumbnail((size, size))
        tiles.append(img)
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * size, rows * size), (40, 40, 40))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * size, (i // cols) * size))
    sheet.save(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "roxford5k-mini"))
    ap.add_argument("--cache", help="feature cache (shared with d2r eval)")
    ap.add_argument("-k", type=int, default=20)
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--verify-features", type=int, default=1000)
    ap.add_argument("--ratio", type=float, help="Lowe's ratio test in verification (default: none)")
    ap.add_argument("--no-mutual", dest="mutual", action="store_false", help="allow many-to-one putative matches")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", help="folder for PNG sheets of mined boxes")
    ap.add_argument("--boxes", help="write the default setting's boxes.json (db/ images) here")
    args = ap.parse_args()

    root = Path(args.dataset)
    gnd = json.loads((root / "gnd.json").read_text())
    truth_px = {q: g["bbx"] for q, g in zip(gnd["qimlist"], gnd["gnd"])}
    paths, _ = mining.list_images(root / "db")
    full = sorted(p for p in (root / "full").iterdir() if p.stem in truth_px)
    t0 = time.perf_counter()
    ev = mining.collect_evidence(paths, full, codebook_size=args.codebook_size, top_k=args.k, verify_features=args.verify_features,
                                 ratio=args.ratio, mutual=args.mutual, cache_dir=args.cache, threads=args.threads)
    elapsed = time.perf_counter() - t0
    truths = []
    for p, e in zip(full, ev["queries"]):
        x1, y1, x2, y2 = truth_px[p.stem]
        h, w = e.shape
        truths.append([y1 / h, x1 / w, y2 / h, x2 / w])

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    s = ev["settings"]
    print(f"# collection {root / 'db'}: {len(paths)} images; {len(full)} full/ queries with ground truth; "
          f"{s['features']} {s['precision']}, K={s['codebook_size']}, k={s['top_k']}, {s['verify_features']} features verified, "
          f"ratio {s['match_ratio']}, mutual {s['match_mutual']}")
    t = ev["timings"]
    print(f"# {elapsed:.0f} s: features {t['features_s']:.0f} (cached), codebook {t['codebook_s']:.0f}, index {t['index_s']:.0f}, "
          f"verification {t['verification_s']:.0f} ({1e3 * t['verification_s'] / (len(paths) + len(full)) / args.k:.1f} ms per pair)")
    print()
    print("| boxes | db images boxed | cross-landmark supports | full/: boxed | mean IoU | IoU >= 0.5 |")
    print("|---|---:|---:|---:|---:|---:|")
    mean_size = np.mean([[b[2] - b[0], b[3] - b[1]] for b in truths], axis=0)
    centred = [0.5 - mean_size[0] / 2, 0.5 - mean_size[1] / 2, 0.5 + mean_size[0] / 2, 0.5 + mean_size[1] / 2]
    for label, box in (("whole image (baseline)", [0.0, 0.0, 1.0, 1.0]), ("centred box of the GT's mean size (baseline, peeks)", centred)):
        ious = np.array([iou(box, t) for t in truths])
        print(f"| {label} | - | - | {len(truths)}/{len(truths)} | {ious.mean():.3f} | {int((ious >= 0.5).sum())}/{len(truths)} |")
    for label, kw in SETTINGS:
        params = mining.BoxParams(**kw)
        boxes = [mining.box_from_evidence(e, params)["box"] for e in ev["queries"]]
        ious = np.array([iou(b, t) if b is not None else 0.0 for b, t in zip(boxes, truths)])
        n_db = sum(mining.box_from_evidence(e, params)["box"] is not None for e in ev["images"])
        rate, n = cross_rate(ev, paths, params)
        print(f"| mined, {label} | {n_db}/{len(paths)} | {100 * rate:.1f}% of {n} | {sum(b is not None for b in boxes)}/{len(boxes)} | "
              f"{ious.mean():.3f} | {int((ious >= 0.5).sum())}/{len(truths)} |")
    print()
    params = mining.BoxParams()
    print("per query (default):", ", ".join(
        f"{p.stem} {iou(b, t) if b else 0:.2f}" for p, t, b in
        zip(full, truths, [mining.box_from_evidence(e, params)["box"] for e in ev["queries"]])))
    print("(a missing box counts as IoU 0; the 13 boxes are small and the settings rows were tried on them: optimistic)")

    if args.boxes:
        mining.write_boxes(mining.document(ev, paths, full, root=root / "db", params=params), args.boxes)
        print(f"boxes: {args.boxes}")
    if args.png:
        out = Path(args.png)
        out.mkdir(parents=True, exist_ok=True)
        draw([(p, e, t) for p, e, t in zip(full, ev["queries"], truths)], out / "full.png", params)
        rng = np.random.default_rng(0)
        for k in range(3):
            idx = rng.choice(len(paths), 16, replace=False)
            draw([(paths[i], ev["images"][i], None) for i in idx], out / f"db_sample{k}.png", params)
        print(f"PNG sheets: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
