"""roxford5k-mini mAP with LightGlue re-ranking (verify="lightglue") against today's nearest-neighbour
matcher, for N = 10, 20, 50, 100 verified photos, through the shipped stages.

    PYTHONPATH=sdk:converters nice -n 10 .venv/bin/python benchmarks/bench_lightglue_map.py \\
        [--dataset ../shared/data/roxford5k-mini] [--cache /work/evalcache] [--tops 10,20,50,100] [--seeds 0,1,2] [--out FILE.json]

Initial ranking: ALIKED-n16 (TFLite fp16, 2000 features), no detector, ASMK* (the "asmk" preset
with features=aliked_n16; K = 8192 ("auto") trained on the dataset by the evaluation, one per seed;
the default query expansion, n = 3). Verification
features: the top 1000 whole-photo features of each photo (what `d2r build` keeps). Re-ranking, per
protocol after removing junk: the top N by (RANSAC inliers, initial rank), affine RANSAC 10 px;
"nn": d2r.verify.rerank (nearest neighbour, cosine > 0.6, int8; the pipeline's VerificationStage);
"lightglue": LightGlue's matches (early exit on, N = 512 keypoints, TFLite fp16, 1 thread) under the
same RANSAC. LightGlue's inliers per (query, photo) are computed once and reused for every N.
Prints mAP Medium / Hard per N and matcher, and ms per verified photo (median).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from d2r.pipeline import Pipeline
from d2r.verify.lightglue import LightGlue
from d2r_lab import evaluate, evaluation

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=str(ROOT / ".." / "shared" / "data" / "roxford5k-mini"))
    ap.add_argument("--cache", default=None, help="evaluation feature cache (default: d2r eval's)")
    ap.add_argument("--tops", default="10,20,50,100")
    ap.add_argument("--seeds", default="0,1,2", help="codebook seeds of the initial ranking")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args()
    tops = [int(t) for t in args.tops.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    ds = evaluate.load_dataset(args.dataset)
    q_paths, db_paths = ds.query_paths, ds.image_paths
    gnd = ds.gnd[: len(q_paths)]
    # LightGlue sees keypoints and descriptors only (no visual words): its inliers per
    # (query, photo) do not depend on the codebook, so every seed reuses them.
    lg_inliers: dict = {}
    lg_ms: list = []
    rows, initial = [], {}
    with LightGlue.load(threads=1) as lg:
        for seed in seeds:
            exp = evaluation.experiment("asmk", features="aliked_n16", precision="fp16", seed=seed)
            res = evaluation.run(args.dataset, exp, cache_dir=args.cache, threads=1, progress=False)
            initial[seed] = {k: res["map"][k] for k in ("easy", "medium", "hard")}
            print(f"seed {seed} initial ranking: {res['table']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            pipeline = Pipeline.load(exp.pipeline, threads=1)
            ex = pipeline.features.extractor
            cache = evaluation.open_cache(args.cache, evaluation._cache_setting(pipeline, ex, None))
            cb = res["_codebook"]
            vstage = pipeline.verification
            feats: dict = {}

            def vf(path):
                if path not in feats:
                    feats[path] = vstage.database_features(evaluation.cached_whole(cache, ex, path)[0], cb)
                return feats[path]

            qvs = [vstage.query_features(evaluation.cached_whole(cache, ex, q)[0], cb) for q in q_paths]
            ranks = res["_rankings"]
            for top in tops:
                out = {}
                for matcher in ("nn", "lightglue"):
                    per_protocol = {}
                    for protocol in evaluate.PROTOCOLS:
                        _, junk = evaluate.protocol_lists(gnd, protocol)
                        lists = []
                        for qi, r in enumerate(ranks):
                            clean = [int(c) for c in evaluate.remove_junk(r, junk[qi])]
                            qv = qvs[qi]
                            if matcher == "nn":
                                cands = [(c, float(-k), vf(db_paths[c]) if k < top else None) for k, c in enumerate(clean)]
                                lists.append(np.array([x.id for x in vstage.rerank(qv, cands, top)], dtype=np.int64))
                                continue
                            for c in clean[:top]:
                                if (qi, c) not in lg_inliers:
                                    t = time.perf_counter()
                                    lg_inliers[(qi, c)] = lg.verify_pair(qv, vf(db_paths[c])).inliers
                                    lg_ms.append((time.perf_counter() - t) * 1e3)
                            head = sorted(range(min(top, len(clean))), key=lambda k: (-lg_inliers[(qi, clean[k])], k))
                            lists.append(np.array([clean[k] for k in head] + clean[top:], dtype=np.int64))
                        per_protocol[protocol] = lists
                    m = evaluate.compute_map(per_protocol, gnd).to_dict()
                    out[matcher] = {"medium": m["map"]["medium"], "hard": m["map"]["hard"], "easy": m["map"]["easy"]}
                row = {"seed": seed, "top": top, **out, "lightglue_ms_per_pair_median": float(np.median(lg_ms)) if lg_ms else None,
                       "pairs_so_far": len(lg_inliers), "elapsed_s": time.perf_counter() - t0}
                rows.append(row)
                print(f"seed {seed} N={top:3d}  nn M {out['nn']['medium']:.2f} H {out['nn']['hard']:.2f}   lightglue M {out['lightglue']['medium']:.2f} "
                      f"H {out['lightglue']['hard']:.2f}   LightGlue {row['lightglue_ms_per_pair_median']:.0f} ms/pair "
                      f"({len(lg_inliers)} pairs, {row['elapsed_s']:.0f} s)", flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps({"initial": initial, "rows": rows}, indent=1) + "\n")
            pipeline.close()
    print(summary(initial, rows))


def summary(initial: dict, rows: list) -> str:
    """mean +- std over seeds of mAP Medium / Hard: the initial ranking, then per N each matcher."""

    def ms(vals):
        a = np.array(vals)
        return f"{a.mean():.2f} ± {a.std():.2f}"

    lines = ["| re-ranking | N | seeds | Medium | Hard |", "|---|---|---|---|---|",
             f"| none (ASMK*) | - | {len(initial)} | {ms([v['medium'] for v in initial.values()])} | {ms([v['hard'] for v in initial.values()])} |"]
    for top in dict.fromkeys(r["top"] for r in rows):
        for matcher in ("nn", "lightglue"):
            mine = [r[matcher] for r in rows if r["top"] == top]
            lines.append(f"| {matcher} | {top} | {len(mine)} | {ms([v['medium'] for v in mine])} | {ms([v['hard'] for v in mine])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
