"""Scoring choices and query expansion (issue 19), measured through the shipped pipeline.

    PYTHONPATH=sdk python benchmarks/bench_scoring.py --dataset ../shared/data/roxford5k-mini \
        --cache /work/evalcache --results /tmp/scoring.json [--preset default] [--seeds 0,1,2] \
        [--kinds rasmk_star,asmk_star] [--codebook-size auto] [--regions centred:landmark@0.1] [--max-features N] [--table-only] [--markdown]

Per seed, one codebook is trained on the database (``d2r eval``'s k-means, the seed picks the
sample and the start) and saved beside --results, then reused by every kind. Per seed and kind,
``d2r_lab.evaluation.run`` (the code behind ``d2r eval``: the stage objects of ``d2r.pipeline``,
features from the --cache) aggregates the database once and ranks every query under each
scoring variant (``d2r_lab.evaluation.Scoring``): the selectivity exponent alpha and threshold
tau (the inverted file is rebuilt from the same aggregations: they enter only the similarity),
``search(normalize=...)`` and query expansion (``Index.search(expand=n, expand_alpha=a)``).
Each finished (seed, kind) is appended to the --results JSON, so a sweep can be split and
resumed; ``--table-only`` prints the table from that file.

Query time: the median over queries of the query's aggregation (timed once per query) plus the
variant's search, on one process here; the features' extraction is not included (it is the
same for every row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_ALPHAS = (2.0, 3.0, 4.0)
DEFAULT_TAUS = (0.0, 0.1, 0.2)
DEFAULT_EXPAND = ((3, 3.0), (5, 0.0), (5, 3.0), (10, 0.0), (10, 3.0), (20, 3.0))


def variants(alphas, taus, expand):
    from d2r_lab.evaluation import Scoring

    out = [Scoring(alpha=a, tau=t, normalize=nm, expand=0) for nm in (False, True) for a in alphas for t in taus]
    out += [Scoring(normalize=False, expand=n, expand_alpha=ea) for n, ea in expand]
    out += [Scoring(normalize=True, expand=n, expand_alpha=ea) for n, ea in expand if n in (3, 10)]
    return out


def load(path: Path) -> list:
    return json.loads(path.read_text()) if path.is_file() else []


def run_sweep(args) -> None:
    from d2r_lab.evaluation import run

    results_path = Path(args.results)
    done = {(r["seed"], r["kind"]) for r in load(results_path)}
    vs = variants(args.alphas, args.taus, args.expand)
    for seed in args.seeds:
        cb_path = results_path.with_name(f"{results_path.stem}.seed{seed}.d2rcb")
        for kind in args.kinds:
            if (seed, kind) in done:
                continue
            codebook = str(cb_path) if cb_path.is_file() else None
            t0 = time.perf_counter()
            res = run(args.dataset, args.preset, cache_dir=args.cache, threads=args.threads, progress=not args.quiet, variants=vs,
                      kind=kind, seed=seed, codebook=codebook, codebook_size=None if codebook else args.codebook_size,
                      regions=args.regions, max_features=args.max_features)
            if codebook is None:
                res["_codebook"].save(cb_path)
            row = {
                "seed": seed, "kind": kind, "preset": args.preset, "codebook": res["options"]["codebook"],
                "codebook_size": res["options"]["codebook_size"], "features": res["options"]["features"],
                "max_features": res["options"]["max_features"],
                "regions": res["options"]["regions"], "max_regions": res["options"]["max_regions"],
                "regions_per_image": res["regions_per_image"], "index_bytes_per_image": res["index_bytes_per_image"],
                "n_queries": res["n_queries"], "n_images": res["n_images"], "timings": res["timings"],
                "wall_s": time.perf_counter() - t0, "variants": res["variants"],
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
            rows = load(results_path) + [row]
            tmp = results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, results_path)
            d = row["variants"][0]
            print(f"seed {seed} {kind}: {len(vs)} variants in {row['wall_s']:.0f} s (codebook {res['timings']['codebook_s']:.0f} s, "
                  f"index {res['timings']['index_s']:.0f} s); first variant M {d['map']['medium']:.2f} H {d['map']['hard']:.2f}",
                  file=sys.stderr, flush=True)


def _key(v) -> tuple:
    return (v["alpha"], v["tau"], v["normalize"], v["expand"], v["expand_alpha"])


def _label(key) -> str:
    a, t, nm, n, ea = key
    out = f"alpha {a:g}, tau {t:g}" + (", normalised" if nm else "")
    return out + (f", QE n = {n}, weights^{ea:g}" if n else "")


def _group(r) -> tuple:
    return (r["kind"], r.get("regions"), r.get("max_features"))


def table(rows: list, markdown: bool = False, summary: bool = False) -> str:
    """One line per (kind, regions, features, variant) with every seed: mean +- std of mAP
    Medium / Hard. summary: only alpha 3, tau 0 with or without normalisation and QE n = 3."""
    groups = list(dict.fromkeys(_group(r) for r in rows))
    # name the regions and features only where the rows differ in them
    show_regions = len({g[1] for g in groups}) > 1
    show_features = len({g[2] for g in groups}) > 1
    lines = []
    head = ("kind", "scoring", "seeds", "Medium", "Hard", "regions/img", "KiB/img", "query ms")
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(f"{head[0]:<12} {head[1]:<46} {head[2]:>5} {head[3]:>12} {head[4]:>12} {head[5]:>11} {head[6]:>8} {head[7]:>8}")
    for group in groups:
        kind, regions, features = group
        name = kind + (f", {regions}" if show_regions else "") + (f", {features} features" if show_features else "")
        mine = [r for r in rows if _group(r) == group]
        keys = list(dict.fromkeys(_key(v) for r in mine for v in r["variants"]))
        if summary:
            keys = [k for k in keys if k[0] == 3.0 and k[1] == 0.0 and k[3] in (0, 3) and k[4] == 3.0]
        for key in keys:
            # one value per seed: a variant that two files both hold (a rerun) counts once
            vals = list({r["seed"]: (v, r) for r in reversed(mine) for v in r["variants"] if _key(v) == key}.values())
            med = np.array([v["map"]["medium"] for v, _ in vals])
            hard = np.array([v["map"]["hard"] for v, _ in vals])
            rpi = np.mean([r["regions_per_image"] for _, r in vals])
            kib = np.mean([r["index_bytes_per_image"] for _, r in vals]) / 1024
            qms = np.mean([v["query_ms_median"] for v, _ in vals])
            m = f"{med.mean():.2f} ± {med.std():.2f}"
            h = f"{hard.mean():.2f} ± {hard.std():.2f}"
            if markdown:
                lines.append(f"| {name} | {_label(key)} | {len(vals)} | {m} | {h} | {rpi:.1f} | {kib:.1f} | {qms:.1f} |")
            else:
                lines.append(f"{name:<12} {_label(key):<46} {len(vals):>5} {m:>12} {h:>12} {rpi:>11.1f} {kib:>8.1f} {qms:>8.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "roxford5k-mini"))
    ap.add_argument("--cache", help="d2r eval's feature cache folder")
    ap.add_argument("--results", required=True,
                    help="JSON file of finished (seed, kind) runs; appended to. With --table-only: several, comma-separated")
    ap.add_argument("--preset", default="default", help="d2r eval preset the runs start from (default: what d2r build ships)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default="rasmk_star,asmk_star")
    ap.add_argument("--codebook-size", default="auto")
    ap.add_argument("--alphas", default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS))
    ap.add_argument("--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS))
    ap.add_argument("--expand", default=",".join(f"{n}@{a:g}" for n, a in DEFAULT_EXPAND),
                    help="query-expansion settings N@ALPHA, comma-separated")
    ap.add_argument("--regions", help="d2r eval --regions (e.g. the zoom control centred, or shuffled); default: the preset's")
    ap.add_argument("--max-features", type=int, help="features per photo (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--summary", action="store_true", help="table: only alpha 3, tau 0, normalised or not, QE n = 3 or none")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.kinds = args.kinds.split(",")
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.taus = [float(t) for t in args.taus.split(",")]
    args.expand = [(int(n), float(a)) for n, a in (e.split("@") for e in args.expand.split(",") if e)]
    if args.codebook_size != "auto":
        args.codebook_size = int(args.codebook_size)
    if not args.table_only:
        if "," in args.results:
            ap.error("--results: one file for a sweep (several only with --table-only)")
        run_sweep(args)
    rows = [r for f in args.results.split(",") for r in load(Path(f))]
    if rows:
        feats = f" (up to {rows[0]['max_features']} features)" if rows[0].get("max_features") else ""
        print(f"# {rows[0]['features']}{feats}, regions {rows[0]['regions']}, K = {rows[0]['codebook_size']}, "
              f"{rows[0]['n_queries']} queries, {rows[0]['n_images']} images; {rows[-1]['machine']}, {rows[-1]['date']}")
        print(table(rows, args.markdown, args.summary))


if __name__ == "__main__":
    main()
