"""The external peer: the `asmk` package's ASMK* next to ours on the same descriptors and codebook.

Both sides get the same XFeat int8 features of roxford5k-mini (from `d2r eval`'s feature cache,
the whole-image features of the database and of the cropped queries) and the same centroids
(a d2r codebook file, fed to asmk's Codebook.index). Each side assigns, aggregates and indexes
on its own; then every query is aggregated and searched, one thread, and both rankings are
scored with d2r_lab.evaluate (Revisited protocol).

    python benchmarks/bench_peer.py --dataset ../shared/data/roxford5k-mini --cache /tmp/d2rcache2 \\
        --codebook /tmp/bench6/cb/K1024-seed0.d2rc [--codebook ...]

asmk's ASMK* (asmk 0.1.1, params as in its examples minus idf): binary kernel, alpha 3,
similarity threshold 0 (s >= 0; ours s > 0: the same sum, since 0^3 = 0), exact faiss
assignment, one word per descriptor, no idf, scores normalised by sqrt(n_words(q) n_words(x)).
Ours is run twice: normalised like asmk (`Index(normalize=True)`) and un-normalised (the sum of
docs/algorithm.md section 4, which `d2r eval` uses).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
             "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from d2r.aggregate import aggregate  # noqa: E402
from d2r.codebook import Codebook  # noqa: E402
from d2r.index import Index  # noqa: E402
from d2r_lab import evaluate  # noqa: E402
from d2r_lab.evaluation import FeatureCache  # noqa: E402


def cached_features(dataset, cache_dir, features="xfeat", precision="int8", backend="tflite", max_features=None):
    """Whole-image descriptors of the database and the queries from d2r eval's cache (the same
    key as evaluation.run without regions; features missing from the cache are an error)."""
    from d2r.engine import Engine

    extra = {"max_features": max_features} if max_features else {}
    engine = Engine.create(features=features, detector=None, kind="asmk_star", backend=backend, precision=precision,
                           threads=1, detector_threshold=0.1, max_regions=25, **extra)
    ex = engine.extractor
    setting = f"{engine.feature_entry.sha256}|{ex.scales}|{ex.max_features}|{ex.score_threshold}"
    engine.close()
    cache = FeatureCache(Path(cache_dir), hashlib.sha256(setting.encode()).hexdigest()[:16])
    ds = evaluate.load_dataset(dataset)

    def load(p):
        def missing():
            raise SystemExit(f"{p}: not in the feature cache {cache.dir}; run `d2r eval --cache {cache_dir}` once first")

        return cache.get(p, "whole+shape", missing)["descriptors"].astype(np.float32)

    return ds, [load(p) for p in ds.image_paths], [load(p) for p in ds.query_paths]


def run_asmk(centroids, db, queries, n_images):
    import faiss
    from asmk import asmk_method

    faiss.omp_set_num_threads(1)
    params = {
        "index": {"gpu_id": None},
        "train_codebook": {"codebook": {"size": int(centroids.shape[0])}},
        "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": False},
                      "quantize": {"multiple_assignment": 1}, "aggregate": {}},
        "query_ivf": {"quantize": {"multiple_assignment": 1}, "aggregate": {},
                      "search": {"topk": None}, "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}},
    }
    from asmk import codebook as cdb_pkg
    from asmk import index as idx_pkg

    cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=int(centroids.shape[0]))
    cdb.index(np.ascontiguousarray(centroids, dtype=np.float32))
    method = asmk_method.ASMKMethod(params, {}, codebook=cdb)
    t = time.perf_counter()
    vecs = np.concatenate(db)
    imids = np.concatenate([np.full(len(d), i) for i, d in enumerate(db)])
    method = method.build_ivf(vecs, imids)
    build_s = time.perf_counter() - t
    del vecs
    ranks, times = [], []
    params_q = params["query_ivf"]
    kern, ivf = method.kernel, method.inverted_file
    sim = lambda *x: kern.similarity(*x, **params_q["similarity"])  # noqa: E731
    for q in queries:
        tq = time.perf_counter()
        quantized = cdb.quantize(q, **params_q["quantize"])
        agg = kern.aggregate_image(*quantized, **params_q["aggregate"])
        r, _ = ivf.search(*agg, similarity_func=sim, topk=n_images)
        times.append((time.perf_counter() - tq) * 1e3)
        ranks.append(np.asarray(r, dtype=np.int64))
    return ranks, times, build_s


def run_ours(cb, db, queries, n_images, normalize, approximate=False):
    t = time.perf_counter()
    index = Index(cb, kind="asmk_star", normalize=normalize)
    for i, d in enumerate(db):
        index.add(str(i), aggregate(d, cb, kind="asmk_star", approximate=approximate))
    build_s = time.perf_counter() - t
    ranks, times = [], []
    for q in queries:
        tq = time.perf_counter()
        hits = index.search(aggregate(q, cb, kind="asmk_star", approximate=approximate), top_k=n_images)
        times.append((time.perf_counter() - tq) * 1e3)
        order = [int(h.image_id) for h in hits]
        seen = set(order)
        ranks.append(np.array(order + [i for i in range(n_images) if i not in seen], dtype=np.int64))
    return ranks, times, build_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="../shared/data/roxford5k-mini")
    p.add_argument("--cache", default="/tmp/d2rcache2")
    p.add_argument("--codebook", nargs="+", required=True, help="d2r codebook files (one row each)")
    p.add_argument("--features", default="xfeat", help="a feature model of the manifest whose whole-image features d2r eval cached")
    p.add_argument("--precision", default="int8")
    p.add_argument("--max-features", type=int, help="as given to d2r eval (default: the model's)")
    p.add_argument("--approximate", action="store_true",
                   help="also run ours with the two-level approximate assignment (8 probes; the coarse level is built with the index)")
    args = p.parse_args(argv)
    import numba

    numba.set_num_threads(1)
    ds, db, queries = cached_features(args.dataset, args.cache, features=args.features, precision=args.precision,
                                      max_features=args.max_features)
    n = ds.n_images
    print(f"{len(db)} images, {len(queries)} queries, {sum(map(len, db)) / len(db):.0f} descriptors per image", flush=True)
    rows = []
    for path in args.codebook:
        cb = Codebook.load(path)
        runs = [("asmk 0.1.1 ASMK* (normalised)", lambda: run_asmk(cb.centroids, db, queries, n)),
                ("d2r ASMK* (normalised)", lambda: run_ours(cb, db, queries, n, True)),
                ("d2r ASMK* (un-normalised, d2r eval)", lambda: run_ours(cb, db, queries, n, False))]
        if args.approximate:
            runs.append(("d2r ASMK* (normalised, approximate assignment)", lambda: run_ours(cb, db, queries, n, True, approximate=True)))
        for name, fn in runs:
            ranks, times, build_s = fn()
            res = evaluate.compute_map(ranks, ds.gnd).to_dict()
            rows.append((Path(path).name, cb.size, name, res["map"]["medium"], res["map"]["hard"], float(np.median(times)), build_s))
            print(f"{rows[-1][0]} {name}: mAP M {rows[-1][3]:.2f} H {rows[-1][4]:.2f}, query {rows[-1][5]:.1f} ms "
                  f"(median of {len(times)}), index build {build_s:.0f} s", flush=True)
    print("\n| codebook | K | method | mAP Medium | mAP Hard | query ms (median) | index build s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
