"""Local-feature study (issue 6): mAP (mean over codebook seeds) against extraction latency.

    PYTHONPATH=sdk .venv/bin/python benchmarks/bench_features.py --dataset ../shared/data/roxford5k-mini \
        --cache /tmp/d2rcache2 --results /tmp/featstudy.json [--settings NAME,...] [--seeds 0,1,2] \
        [--k 1024] [--regions rmac:2] [--latency] [--table-only]

For every feature setting and seed: one codebook of K words trained on the database (the
seed picks the k-means start and the descriptor sample), then ASMK* (no regions) and
R-ASMK* (R-MAC cells pooled from the whole-image features) with that same codebook, both
through ``d2r_lab.evaluation.run`` (the code behind ``d2r eval``) and its feature cache.
Each finished evaluation is appended to the --results JSON, so the sweep can be split over
several invocations and resumed; ``--table-only`` prints the table from that file.

Settings with ``derive`` take their features from the cache of a setting with more features
(the first N of the features sorted by score: exactly what the extractor keeps with
max_features N, because selection is a top-k by score over the same candidates); the cache
entries are written under the derived setting's own key.

``--latency``: extraction time per 640x480 photo (median and minimum of --runs runs after 3
warm-ups, 1 and 2 threads): XFeat in LiteRT (TFLite) with our keypoint decoding, SIFT in
OpenCV, ALIKED in torch or converted (LiteRT / ONNX Runtime + d2r.features.aliked); plus bytes per feature (float32 descriptor; int8 + (y, x) as in the
verification side file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name -> options of d2r_lab.evaluation.run (features, precision, max_features, scales,
# score_threshold, fit) and optionally derive: the setting whose cache holds a superset.
SETTINGS = {
    "xfeat-int8-1000": dict(features="xfeat", max_features=1000, derive="xfeat-int8-4096"),
    "xfeat-int8-2000": dict(features="xfeat", max_features=2000, derive="xfeat-int8-4096"),
    "xfeat-int8-4096": dict(features="xfeat", max_features=4096),
    "xfeat-fp32-4096": dict(features="xfeat", precision="fp32", max_features=4096),
    "xfeat-int8-th0.01-4096": dict(features="xfeat", max_features=4096, score_threshold=0.01),
    "xfeat-int8-th0.15-4096": dict(features="xfeat", max_features=4096, score_threshold=0.15),
    "xfeat-int8-ms4-4096": dict(features="xfeat", max_features=4096, scales="0.5,0.707,1,1.414"),
    "xfeat-int8-ms4-2000": dict(features="xfeat", max_features=2000, scales="0.5,0.707,1,1.414", derive="xfeat-int8-ms4-4096"),
    "xfeat-int8-ms4-8000": dict(features="xfeat", max_features=8000, scales="0.5,0.707,1,1.414"),
    "xfeat-int8-longest-4096": dict(features="xfeat", max_features=4096, fit="longest"),
    "xfeat-int8-longest-2000": dict(features="xfeat", max_features=2000, fit="longest", derive="xfeat-int8-longest-4096"),
    "xfeat-int8-longest-ms3-4096": dict(features="xfeat", max_features=4096, fit="longest", scales="0.707,1,1.414"),
    "rootsift-1000": dict(features="rootsift", max_features=1000),
    "rootsift-2000": dict(features="rootsift", max_features=2000),
    "rootsift-4096": dict(features="rootsift", max_features=4096),
    "aliked-1000": dict(features="aliked", max_features=1000, derive="aliked-2000"),
    "aliked-2000": dict(features="aliked", max_features=2000),
    # the converted ALIKED-n16 (d2r convert aliked): dense graph in LiteRT / ONNX Runtime, DKD + SDDH in d2r.features.aliked
    "aliked_n16-fp16-2000": dict(features="aliked_n16", precision="fp16", max_features=2000),
    "aliked_n16-fp16-1000": dict(features="aliked_n16", precision="fp16", max_features=1000, derive="aliked_n16-fp16-2000"),
    "aliked_n16-onnx-fp32-2000": dict(features="aliked_n16", backend="onnx", precision="fp32", max_features=2000),
    "aliked_t16-fp16-2000": dict(features="aliked_t16", precision="fp16", max_features=2000),
    "aliked_t16-onnx-fp32-2000": dict(features="aliked_t16", backend="onnx", precision="fp32", max_features=2000),
    "xfeat-onnx-int8-4096": dict(features="xfeat", backend="onnx", max_features=4096),
}


def run_options(name):
    o = dict(SETTINGS[name])
    o.pop("derive", None)
    return o


def extractor_of(name, threads=1):
    """(extractor, cache setting string, close) of a setting, as d2r_lab.evaluation.run builds them."""
    from d2r.engine import Engine
    from d2r_lab.evaluation import feature_setting, parse_scales
    from d2r_lab.feature_sources import SOURCES, make_extractor

    o = run_options(name)
    overrides = {k: o.get(k) for k in ("max_features", "scales", "score_threshold")}
    if overrides["scales"] is not None:
        overrides["scales"] = parse_scales(overrides["scales"])
    if o["features"] in SOURCES:
        ex = make_extractor(o["features"], threads=threads, **overrides)
        return ex, ex.setting, lambda: None
    engine = Engine.create(features=o["features"], detector=None, backend=o.get("backend", "tflite"),
                           precision=o.get("precision", "int8"), threads=threads,
                           feature_fit=o.get("fit", "canvas"), **{k: v for k, v in overrides.items() if v is not None})
    return engine.extractor, feature_setting(engine.feature_entry.sha256, engine.extractor), engine.close


def derive_cache(name, dataset, cache_root):
    """Write the cache entries of a derived setting from its superset's entries (run that first)."""
    from d2r_lab import evaluate
    from d2r_lab.evaluation import FeatureCache

    ex, setting, close = extractor_of(name)
    close()
    _, src_setting, close = extractor_of(SETTINGS[name]["derive"])
    close()
    n = ex.max_features
    dst = FeatureCache(cache_root, hashlib.sha256(setting.encode()).hexdigest()[:16])
    src = FeatureCache(cache_root, hashlib.sha256(src_setting.encode()).hexdigest()[:16])
    ds = evaluate.load_dataset(dataset)
    missing = 0
    for p in list(ds.image_paths) + list(ds.query_paths):
        if dst._path(p, "whole+shape").is_file():
            continue
        if not src._path(p, "whole+shape").is_file():
            missing += 1
            continue
        d = src.get(p, "whole+shape", None)
        dst.get(p, "whole+shape", lambda: {k: (v[:n] if k != "shape" else v) for k, v in d.items()})
    if missing:
        raise SystemExit(f"{name}: {missing} images lack features of {SETTINGS[name]['derive']}; run that setting first")


def load_results(paths):
    """Rows of every file in a comma-separated list (the first is the one written)."""
    rows = []
    for path in str(paths).split(","):
        p = Path(path)
        rows += json.loads(p.read_text()) if p.is_file() else []
    return rows


def save_result(paths, row):
    path = str(paths).split(",")[0]
    rows = load_results(path)
    rows.append(row)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def done(rows, name, seed, k, kind, regions):
    return any(r["setting"] == name and r["seed"] == seed and r["k"] == k and r["kind"] == kind and r["regions"] == regions for r in rows)


def sweep(args, names, seeds):
    from d2r_lab.evaluation import run

    for name in names:
        if "derive" in SETTINGS[name]:
            derive_cache(name, args.dataset, args.cache)
        o = run_options(name)
        for seed in seeds:
            rows = load_results(args.results)
            wanted = [("asmk_star", "none")] + ([("rasmk_star", args.regions)] if "rasmk_star" in args.kinds else [])
            todo = [(kind, reg) for kind, reg in wanted if not done(rows, name, seed, args.k, kind, reg)]
            if not todo:
                continue
            cb = None
            if todo[0][0] != "asmk_star":  # the codebook of this seed was trained in an earlier call: train again
                todo.insert(0, ("asmk_star", "none"))
            for kind, reg in todo:
                t0 = time.perf_counter()
                res = run(args.dataset, kind=kind, regions=reg, max_regions=25, codebook=cb, codebook_size=args.k, seed=seed, threads=1,
                          cache_dir=args.cache, progress=False, **o)
                cb = res["_codebook"]
                row = {"setting": name, "seed": seed, "k": args.k, "kind": kind, "regions": reg,
                       "medium": res["map"]["medium"], "hard": res["map"]["hard"], "easy": res["map"]["easy"],
                       "regions_per_image": res["regions_per_image"], "index_bytes_per_image": res["index_bytes_per_image"],
                       "timings": res["timings"], "wall_s": time.perf_counter() - t0}
                if not done(load_results(args.results), name, seed, args.k, kind, reg):
                    save_result(args.results, row)
                print(f"{name} seed {seed} K={args.k} {kind} {reg}: mAP M {row['medium']:.2f} H {row['hard']:.2f} "
                      f"({row['wall_s']:.0f} s)", flush=True)


def features_per_image(name, dataset, cache_root, limit=200):
    """Mean number of features per database image (first ``limit`` images) from the cache."""
    from d2r_lab import evaluate
    from d2r_lab.evaluation import FeatureCache

    ex, setting, close = extractor_of(name)
    close()
    cache = FeatureCache(cache_root, hashlib.sha256(setting.encode()).hexdigest()[:16])
    counts = []
    for p in evaluate.load_dataset(dataset).image_paths[:limit]:
        path = cache._path(p, "whole+shape")
        if path.is_file():
            with np.load(path) as z:
                counts.append(len(z["scores"]))
    return float(np.mean(counts)) if counts else float("nan")


def latency(names, runs, threads_list, dataset, baseline="xfeat-int8-4096"):
    """{(name, threads): (median ms, min ms, features, dim, median ratio to the baseline)}.

    Runs are interleaved round-robin over the settings, so that load changes on a shared
    machine hit every setting alike; the ratio is per round, against the baseline's run.
    """
    from PIL import Image

    photo = Path(dataset) / "db" / "all_souls_000000.jpg"
    with Image.open(photo) as im:
        rgb = np.asarray(im.convert("RGB").resize((640, 480), Image.BILINEAR))
    order = [baseline] + [n for n in names if n != baseline]
    out = {}
    for t in threads_list:
        exs = {}
        for name in order:
            exs[name] = extractor_of(name, threads=t)
            for _ in range(3):
                exs[name][0].extract(rgb)
        ts = {name: [] for name in order}
        for _ in range(runs):
            for name in order:
                t0 = time.perf_counter()
                exs[name][0].extract(rgb)
                ts[name].append((time.perf_counter() - t0) * 1e3)
        for name in order:
            n = len(exs[name][0].extract(rgb))
            exs[name][2]()
            ratio = float(np.median(np.array(ts[name]) / np.array(ts[baseline])))
            out[(name, t)] = (float(np.median(ts[name])), float(np.min(ts[name])), n, exs[name][0].dim, ratio)
            print(f"latency {name} {t} thr: median {out[(name, t)][0]:.1f} ms, min {out[(name, t)][1]:.1f} ms, "
                  f"x{ratio:.2f} of {baseline}, {n} features", file=sys.stderr, flush=True)
    return out


def table(rows, names, lat, fpi):
    ks = sorted({r["k"] for r in rows})
    regions = sorted({r["regions"] for r in rows if r["regions"] != "none"})
    print("| setting | D | features / image | bytes / feature (f32; int8+yx) | ms 1 thr (x XFeat 4096) | ms 2 thr (x XFeat 4096) | K | "
          + " | ".join(f"{lab} Medium | {lab} Hard" for lab in ["ASMK*"] + [f"R-ASMK* {r}" for r in regions]) + " | seeds |")
    print("|---" * (8 + 2 * (1 + len(regions))) + "|")
    for name in names:
        lat_cells = []
        d = None
        for t in (1, 2):
            if (name, t) in lat:
                med, _, _, d, ratio = lat[(name, t)]
                lat_cells.append(f"{med:.0f} (x{ratio:.2f})")
            else:
                lat_cells.append("-")
        dim = d or (128 if name.startswith(("rootsift", "aliked")) else 64)
        n_feat = fpi.get(name, float("nan"))
        head = f"| {name} | {dim} | {'-' if np.isnan(n_feat) else f'{n_feat:.0f}'} | {4 * dim}; {dim + 4} | {lat_cells[0]} | {lat_cells[1]} |"
        printed = False
        for k in ks:
            sel = [r for r in rows if r["setting"] == name and r["k"] == k]
            if not sel:
                continue
            cells = []
            seeds = set()
            for reg in ["none"] + regions:
                rr = [r for r in sel if r["regions"] == reg]
                seeds |= {r["seed"] for r in rr}
                for p in ("medium", "hard"):
                    v = [r[p] for r in rr]
                    cells.append(f"{np.mean(v):.1f} ± {np.std(v):.1f}" if len(v) > 1 else (f"{v[0]:.1f}" if v else "-"))
            print(f"{head} {k} | " + " | ".join(cells) + f" | {','.join(map(str, sorted(seeds)))} |")
            printed = True
        if not printed and lat_cells != ["-", "-"]:
            print(f"{head} - | " + " | ".join(["-"] * (2 + 2 * len(regions))) + " | - |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(ROOT / ".." / "shared" / "data" / "roxford5k-mini"))
    ap.add_argument("--cache", default="/tmp/d2rcache2")
    ap.add_argument("--results", default="/tmp/bench_features.json",
                    help="JSON list of finished evaluations (appended, resumable); several comma-separated files are all read, the first written")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from: {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--regions", default="rmac:2")
    ap.add_argument("--kinds", default="asmk_star,rasmk_star", help="asmk_star (always) and/or rasmk_star (with --regions)")
    ap.add_argument("--latency", action="store_true", help="also time extraction (1 and 2 threads)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--table-only", action="store_true", help="print the table from --results without evaluating")
    args = ap.parse_args()
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; known: {', '.join(SETTINGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()}, {platform.platform()}, {os.cpu_count()} cpus, load average {load:.1f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not args.table_only:
        sweep(args, names, seeds)
    lat = latency(names, args.runs, (1, 2), args.dataset) if args.latency else {}
    fpi = {n: features_per_image(n, args.dataset, args.cache) for n in names}
    table(load_results(args.results), names, lat, fpi)


if __name__ == "__main__":
    main()
