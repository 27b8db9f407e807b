"""mAP of one feature setting for several kinds / region sources on shared codebooks, one per seed.

    PYTHONPATH=sdk .venv/bin/python benchmarks/bench_aliked_eval.py --dataset ../shared/data/roxford5k-mini \
        --cache /tmp/d2rcache2 --features aliked_n16 --precision fp16 --max-features 2000 --k 8192 --seeds 0,1,2 \
        --runs asmk_star:none,rasmk_star:detector:landmark@0.3,d2r_asmk_star:detector:landmark@0.3 \
        --codebooks /tmp/aliked-cb --results /tmp/aliked-eval.json [--table-only]

Each run goes through ``d2r_lab.evaluation.run`` (the code of ``d2r eval``) with its feature cache.
The codebook of a seed (K words trained on the database features, as ``d2r eval`` trains it)
is saved under --codebooks as ``{features}-{max_features}-K{k}-seed{s}.d2rc`` and reused by
every later run of that seed, also across invocations (a K = 8192 k-means costs tens of
minutes on one thread). Finished runs are appended to --results (resumable); the table gives
mean ± std over the seeds present.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_runs(text):
    out = []
    for item in text.split(","):
        kind, _, regions = item.partition(":")
        out.append((kind, regions or "none"))
    return out


def load(paths):
    """Rows of every file of a comma-separated list (parallel runs write one file each)."""
    rows = []
    for path in str(paths).split(","):
        p = Path(path)
        rows += json.loads(p.read_text()) if p.is_file() else []
    return rows


def save(paths, row):
    path = str(paths).split(",")[0]
    rows = load(path)
    rows.append(row)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def key(args, seed, kind, regions):
    return (args.features, args.backend, args.precision, args.max_features, args.k, seed, kind, regions_label(regions, args.max_regions))


def regions_label(regions, max_regions):
    """Runs with fewer than the 25 detector boxes per image are told apart as REGIONS/max N."""
    return regions if max_regions == 25 or not regions.startswith(("detector", "shuffled")) else f"{regions}/max{max_regions}"


def row_key(r):
    return (r["features"], r["backend"], r["precision"], r["max_features"], r["k"], r["seed"], r["kind"], r["regions"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(ROOT / ".." / "shared" / "data" / "roxford5k-mini"))
    ap.add_argument("--cache", default="/tmp/d2rcache2")
    ap.add_argument("--features", default="aliked_n16")
    ap.add_argument("--backend", default="tflite")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--max-features", type=int, default=2000)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="asmk_star:none", help="KIND:REGIONS,... (REGIONS as d2r eval --regions)")
    ap.add_argument("--codebooks", default="/tmp/aliked-cb")
    ap.add_argument("--results", default="/tmp/aliked-eval.json",
                    help="JSON list of finished runs (appended, resumable); several comma-separated files are all read, the first written")
    ap.add_argument("--max-regions", type=int, default=25, help="detector boxes kept per image (d2r eval --max-regions; the Engine keeps 8)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = parse_runs(args.runs)
    if not args.table_only:
        from d2r_lab.evaluation import run

        Path(args.codebooks).mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            cb_path = Path(args.codebooks) / f"{args.features}-{args.max_features}-K{args.k}-seed{seed}.d2rc"
            for kind, regions in runs:
                if any(row_key(r) == key(args, seed, kind, regions) for r in load(args.results)):
                    continue
                t0 = time.perf_counter()
                res = run(args.dataset, features=args.features, backend=args.backend, precision=args.precision,
                          codebook=str(cb_path) if cb_path.is_file() else None, codebook_size=args.k, kind=kind,
                          regions=regions, seed=seed, threads=1, cache_dir=args.cache, progress=False,
                          max_features=args.max_features, max_regions=args.max_regions)
                if not cb_path.is_file():
                    res["_codebook"].save(cb_path)
                row = {"features": args.features, "backend": args.backend, "precision": args.precision,
                       "max_features": args.max_features, "k": args.k, "seed": seed, "kind": kind, "regions": regions_label(regions, args.max_regions),
                       "medium": res["map"]["medium"], "hard": res["map"]["hard"], "easy": res["map"]["easy"],
                       "regions_per_image": res["regions_per_image"], "index_bytes_per_image": res["index_bytes_per_image"],
                       "timings": res["timings"], "wall_s": time.perf_counter() - t0,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                save(args.results, row)
                print(f"{args.features} seed {seed} K={args.k} {kind} {regions}: mAP M {row['medium']:.2f} H {row['hard']:.2f} "
                      f"({row['regions_per_image']:.2f} regions/image, {row['wall_s']:.0f} s)", flush=True)
    rows = load(args.results)
    print("| features | K | kind | regions | regions / image | mAP Medium | mAP Hard | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        groups.setdefault((r["features"], r["backend"], r["precision"], r["max_features"], r["k"], r["kind"], r["regions"]), []).append(r)
    for (feat, backend, prec, n, k, kind, regions), rr in sorted(groups.items()):
        ms, hs = [r["medium"] for r in rr], [r["hard"] for r in rr]
        fmt = lambda v: f"{np.mean(v):.2f} ± {np.std(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"  # noqa: E731
        print(f"| {feat} {backend} {prec} {n} | {k} | {kind} | {regions} | {np.mean([r['regions_per_image'] for r in rr]):.2f} | "
              f"{fmt(ms)} | {fmt(hs)} | {','.join(str(r['seed']) for r in sorted(rr, key=lambda r: r['seed']))} |")


if __name__ == "__main__":
    main()
