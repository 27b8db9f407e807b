"""Engine latency breakdown for one 640x480 query against a 100k-image index.

Stages: load image, features, aggregation (assignment + ASMK*), search, total; median and p95
over repeated queries, for the default features (ALIKED-t16) and XFeat as the baseline, each on
its own codebook and index, on TFLite and ONNX Runtime (each backend's fastest file, then fp32),
at 1 and 2 threads.
The index holds the 56 real UKBench images plus synthetic R-ASMK* entries up to --images
(random words and codes with Zipf-like word popularity: their content does not matter for
latency, only their number and posting-list lengths). Also the detector latency (database
side) and peak RSS.

    python benchmarks/bench_engine.py [--images 100000] [--queries 20] [--codebook-size 8192] [--features aliked_t16,xfeat]
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import d2r  # noqa: E402
from d2r.engine import Engine  # noqa: E402
from d2r.manifest import DEFAULT_FEATURES  # noqa: E402

from shared_data import ukbench_images  # noqa: E402


def synthetic_index(engine: Engine, n_images: int, words_per_image: int = 400, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    k = engine.codebook.size
    dim = engine.codebook.dim
    popularity = 1.0 / np.arange(1, k + 1) ** 0.8
    popularity /= popularity.sum()
    perm = rng.permutation(k)
    nbytes = (dim + 7) // 8
    for i in range(n_images):
        n = min(k, rng.poisson(words_per_image))
        words = np.unique(perm[rng.choice(k, size=n, p=popularity)])
        codes = rng.integers(0, 256, (len(words), nbytes), dtype=np.uint8)
        engine.index.add(f"synthetic_{i:07d}", d2r.Aggregation("rasmk_star", dim, words, codes=codes))


def stats(values):
    v = np.asarray(values)
    return float(np.median(v)), float(np.percentile(v, 95))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--codebook-size", type=int, default=8192)
    ap.add_argument("--features", default=f"{DEFAULT_FEATURES},xfeat",
                    help="comma-separated feature models, each timed in the same process (default: the SDK default, then XFeat as the baseline)")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    photos = ukbench_images()
    rows = []
    det_rows = []
    builds = {}
    for features in args.features.split(","):
        base = Engine.create(features=features, detector=None, kind="rasmk_star", backend="tflite", precision="int8", threads=2)
        base.train_codebook(photos, size=args.codebook_size, progress=False)
        base.add_images(photos, progress=False)
        t0 = time.perf_counter()
        synthetic_index(base, max(0, args.images - len(photos)))
        builds[features] = time.perf_counter() - t0
        index = base.index
        # The fastest file of each backend ("int8" falls back to fp16/fp32 where there is no int8 file), then fp32.
        for backend, precision in (("tflite", "int8"), ("tflite", "fp32"), ("onnx", "int8"), ("onnx", "fp32")):
            for threads in (int(t) for t in args.threads.split(",")):
                eng = Engine.create(features=features, detector="landmark", codebook=base.codebook, kind="rasmk_star",
                                    backend=backend, precision=precision, threads=threads)
                file_precision = eng.feature_entry.precision
                if any(r[:4] == (features, backend, file_precision, threads) for r in rows):
                    continue  # the fallback picked a file already timed
                eng.index = index
                for p in photos[:3]:
                    eng.query(p)  # warm-up: JIT, allocations, page cache
                timings = [eng.query(photos[i % len(photos)], top_k=10).timings for i in range(args.queries)]
                rows.append((features, backend, file_precision, threads, {k: stats([t[k] for t in timings]) for k in timings[0]}))
                if features == args.features.split(",")[0]:
                    det = []
                    for i in range(min(args.queries, 10)):
                        t1 = time.perf_counter()
                        eng.detector.detect(photos[i])
                        det.append((time.perf_counter() - t1) * 1e3)
                    det_rows.append((backend, eng.detector_entry.precision, threads, stats(det)))
        base.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# bench_engine: {platform.machine()}, d2r {d2r.__version__}; index: {args.images} images "
          f"({len(photos)} real UKBench + synthetic R-ASMK*, ~400 words each, K={args.codebook_size}, built in "
          + ", ".join(f"{b:.0f} s ({f})" for f, b in builds.items()) + ")")
    print("# query: 640x480 photo, ASMK* query vs R-ASMK* database, top 10; ms median / p95; x = total / the last")
    print("# features' total at the same backend and threads")
    print()
    stages = ["load_image", "features", "aggregation", "search", "total"]
    last = args.features.split(",")[-1]
    print("| features | backend | precision | threads | " + " | ".join(stages) + " | x baseline |")
    print("|---|---|---|---|" + "---|" * len(stages) + "---|")
    for features, backend, precision, threads, st in rows:
        ref = [r[4]["total"][0] for r in rows if r[0] == last and r[1] == backend and r[3] == threads]
        ratio = f"x{st['total'][0] / min(ref):.1f}" if ref else "-"
        print(f"| {features} | {backend} | {precision} | {threads} | " + " | ".join(f"{st[s][0]:.1f} / {st[s][1]:.1f}" for s in stages) + f" | {ratio} |")
    print()
    print("| detector (database side) | precision | threads | ms median / p95 |")
    print("|---|---|---|---|")
    for backend, precision, threads, (med, p95) in det_rows:
        print(f"| landmark SSD {backend} | {precision} | {threads} | {med:.1f} / {p95:.1f} |")
    print()
    print(f"peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
