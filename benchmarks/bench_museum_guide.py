"""The museum guide's two settings on the sample: inliers (to calibrate the thresholds) and time per photo.

    PYTHONPATH=sdk nice -n 10 .venv/bin/python benchmarks/bench_museum_guide.py [--bundles DIR] [--out R.json]

Builds (or reuses, in ``--bundles``) the sample collection's bundle for each setting with
examples/museum_guide/build.py: fast (XFeat, nearest-neighbour matches, top 10 verified) and
accurate (``--accurate``: ALIKED-n16, LightGlue's matches, top 5 verified), then asks each
setting's guide (examples/museum_guide/guide.py, default thresholds, 2 threads) about:

- exhibits: the 8 held-back visitor photos untouched, cropped to their central 60 % (``crop``),
  rotated 25 degrees (``rotate``), and as the tests' hard photo (tests/example_photos.py: part of
  the exhibit, tilted 12 degrees, pasted among clutter; two seeds: ``clutter``, ``clutter2``);
- others: the 24 photos of UKBench objects 8-13 (tests/data/ukbench-56, ``ukbench``, not in
  the collection) and the tests' two images of nothing (tests/example_photos.py: blobs, noise).

Per group, the table gives the inliers of the best photo of the *true* exhibit (exhibits) or of
the best photo (others), the runner-up (best photo of another exhibit), and what the guide said
with its thresholds (right / declined / wrong). The time table gives the median over the photos
of the query's wall time (Engine timings ``total``) and of the process's CPU time (both threads;
the machine is shared, so CPU time is the steadier estimate), with the medians of the feature
extraction and verification stages, and its CPU-time ratio to the fast setting in the same
process. The first query of each setting (it loads the models; LightGlue's ten files on the
first ``verify="lightglue"``) is timed apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from example_photos import hard_photo, load_script, nothing_images  # noqa: E402

EXAMPLES = ROOT / "examples"
SAMPLE = EXAMPLES / "sample"
UKBENCH = ROOT / "tests" / "data" / "ukbench-56" / "images"
OTHERS = [f"ukbench{n:05d}.jpg" for n in range(32, 56)]


def photos():
    """(group, name, image, true title or None)."""
    titles = {r["image_id"]: r["title"] for r in csv.DictReader(open(EXAMPLES / "museum_guide" / "exhibits.csv", encoding="utf-8"))}
    out = []
    for i, src in enumerate(sorted((SAMPLE / "visitors").glob("*.jpg"))):
        n = int(src.stem[-5:])
        title = titles[f"ukbench{n - 1:05d}.jpg"]  # a visitor photo is the 4th photo of its object
        img = Image.open(src).convert("RGB")
        w, h = img.size
        out += [("untouched", src.name, img, title),
                ("crop", src.name, img.crop((int(w * 0.2), int(h * 0.2), int(w * 0.8), int(h * 0.8))), title),
                ("rotate", src.name, img.rotate(25, expand=True, resample=Image.BILINEAR, fillcolor=(200, 200, 190)), title),
                ("clutter", src.name, hard_photo(src, i), title),
                ("clutter2", src.name, hard_photo(src, i + 8), title)]
    out += [("ukbench", name, Image.open(UKBENCH / name).convert("RGB"), None) for name in OTHERS]
    out += [("synthetic", name, img, None) for name, img in nothing_images()]
    return out


def run_setting(guide_mod, bundle, items):
    rows = []
    with guide_mod.Guide(bundle) as guide:
        first = None
        for group, name, img, truth in items:
            c0 = time.process_time()
            res = guide.query(np.asarray(img))
            cpu = (time.process_time() - c0) * 1e3
            answer = guide.answer(name, res)
            by_title: dict[str, int] = {}
            for h in res.hits:
                t = (h.metadata or {}).get("title")
                by_title[t] = max(by_title.get(t, 0), h.inliers or 0)
            if truth is not None:
                true_inl = by_title.get(truth, 0)
                other = max((v for t, v in by_title.items() if t != truth), default=0)
            else:
                true_inl = max(by_title.values(), default=0)
                other = sorted(by_title.values(), reverse=True)[1] if len(by_title) > 1 else 0
            said = "declined" if answer.title is None else ("right" if answer.title == truth else "wrong")
            row = dict(group=group, photo=name, truth=truth, inliers=true_inl, runner_up=other, said=said, named=answer.title,
                       answer_inliers=answer.inliers, ms=res.timings["total"], cpu_ms=cpu,
                       features_ms=res.timings["features"], verify_ms=res.timings["verify"])
            if first is None:
                first = row
            else:
                rows.append(row)
        return guide, first, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", default="/tmp/d2r_museum_bench", help="folder for the two bundles (reused when present)")
    ap.add_argument("--settings", default="fast,accurate")
    ap.add_argument("--out", help="write every photo's row as JSON here")
    args = ap.parse_args()
    build = load_script(EXAMPLES / "museum_guide" / "build.py", "museum_build")
    guide_mod = load_script(EXAMPLES / "museum_guide" / "guide.py", "museum_guide")
    items = photos()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {__import__('os').cpu_count()} cores, "
          f"load average {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")
    results = {}
    for setting in args.settings.split(","):
        bundle = Path(args.bundles) / f"museum_{setting}.d2r"
        if not (bundle / "bundle.json").is_file():
            t0 = time.perf_counter()
            build.build(SAMPLE / "collection", EXAMPLES / "museum_guide" / "exhibits.csv", bundle, accurate=setting == "accurate")
            print(f"# built {bundle} in {time.perf_counter() - t0:.0f} s")
        guide, first, rows = run_setting(guide_mod, bundle, items)
        results[setting] = dict(matcher=guide.matcher, verify_top=guide.verify_top, min_inliers=guide.min_inliers, margin=guide.margin,
                                first=first, rows=rows)

    print("\n| setting | group | photos | true-exhibit / best inliers min-median-max | runner-up max | right | declined | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for setting, r in results.items():
        rows = [r["first"]] + r["rows"]
        for group in dict.fromkeys(x["group"] for x in rows):
            g = [x for x in rows if x["group"] == group]
            inl = sorted(x["inliers"] for x in g)
            n = {k: sum(x["said"] == k for x in g) for k in ("right", "declined", "wrong")}
            print(f"| {setting} ({r['matcher']}, top {r['verify_top']}, >= {r['min_inliers']}, x{r['margin']}) | {group} | {len(g)} | "
                  f"{inl[0]} / {statistics.median(inl):.0f} / {inl[-1]} | {max(x['runner_up'] for x in g)} | "
                  f"{n['right']} | {n['declined']} | {n['wrong']} |")
    print("\n| setting | photos | first query ms | median ms/photo (wall) | of which features | of which verification | median CPU ms/photo | CPU x fast |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for setting, r in results.items():
        cpu = statistics.median(x["cpu_ms"] for x in r["rows"])
        base = base or cpu
        med = {k: statistics.median(x[k] for x in r["rows"]) for k in ("ms", "features_ms", "verify_ms")}
        print(f"| {setting} | {len(r['rows'])} | {r['first']['ms']:.0f} | {med['ms']:.0f} | {med['features_ms']:.0f} | {med['verify_ms']:.0f} | "
              f"{cpu:.0f} | {cpu / base:.2f} |")
    print("\nlow exhibits (true-exhibit inliers < 40) and high others (best > 10):")
    for setting, r in results.items():
        for x in [r["first"]] + r["rows"]:
            if (x["truth"] and x["inliers"] < 40) or (not x["truth"] and x["inliers"] > 10):
                print(f"  {setting} {x['group']} {x['photo']}: {x['inliers']} (runner-up {x['runner_up']}) -> {x['said']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
