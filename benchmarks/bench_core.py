"""Core benchmark: assignment + ASMK* / R-ASMK* aggregation per image, and k-means training.

Prints a table: ms per image (median over images) for 1000 descriptors of D = 128 at
K = 1024 and K = 65536, for d2r (exact and approximate assignment), a plain numpy version and
the `asmk` package (faiss IndexFlatL2 assignment + its Python/Cython aggregation), all in one
process on the same data; the machine's sgemm floor for the assignment FLOPs; and k-means on
200k descriptors to K = 1024.

    python benchmarks/bench_core.py [--images 10] [--skip-kmeans] [--threads N]

Needs the `bench` extra for the comparison (`pip install -e ".[bench]"`: asmk, faiss-cpu);
without it the asmk column is left out. Data are random unit vectors (the speed of these
kernels does not depend on the data distribution, except the approximate mode's agreement,
which is also measured on descriptors drawn around the codewords).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import d2r  # noqa: E402

try:
    import faiss
    from asmk.codebook import Codebook as AsmkCodebook
    from asmk.index import FaissL2Index
    from asmk.kernel import ASMKKernel
except ImportError:  # the bench extra is optional
    faiss = None

D = 128
N_DESC = 1000
REGIONS = [200, 200, 200, 200, 200]


def unit(rng, n, d=D):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -- plain numpy version: GEMM assignment, sort-based residual sums ---------------------------
def numpy_assign(x, c, cn):
    out = np.empty(x.shape[0], np.int64)
    for r in range(0, x.shape[0], 512):
        for_block = cn[None, :] - 2.0 * (x[r : r + 512] @ c.T)
        out[r : r + 512] = for_block.argmin(1)
    return out


def numpy_asmk_star(x, c, words, region_sizes=None):
    sizes = region_sizes or [x.shape[0]]
    total = {}
    start = 0
    for size in sizes:
        xs, ws = x[start : start + size], words[start : start + size]
        start += size
        order = np.argsort(ws, kind="stable")
        uw, first = np.unique(ws[order], return_index=True)
        sums = np.add.reduceat((xs[order] - c[ws[order]]).astype(np.float64), first, axis=0) if len(uw) else np.zeros((0, x.shape[1]))
        if region_sizes is not None:
            sums /= np.sqrt(max(float((sums * sums).sum()), 1e-12))
        for w, s in zip(uw, sums):
            total[w] = total.get(w, 0.0) + s
    ws = np.array(sorted(total), dtype=np.int64)
    v = np.array([total[w] for w in ws]).reshape(len(ws), x.shape[1])
    norms = np.linalg.norm(v, axis=1)
    keep = norms > 1e-6
    return ws[keep].astype(np.uint32), np.packbits(v[keep] > 0, axis=1)


def sgemm_floor_ms(x, c, reps):
    return median_ms(lambda: x @ c.T, reps)


def bench_codebook(k, n_images, rng, rows):
    c = unit(rng, k)
    cb = d2r.Codebook(c)
    cn = (c * c).sum(1)
    images = [unit(rng, N_DESC) for _ in range(n_images)]
    reps = n_images
    it = iter(range(10**9))

    def next_img():
        return images[next(it) % n_images]

    # Warm up JIT and caches.
    d2r.aggregate(images[0], cb, kind="rasmk_star", region_sizes=REGIONS)
    flops = 2.0 * N_DESC * k * D
    floor = sgemm_floor_ms(images[0], c, reps)
    t_assign = median_ms(lambda: cb.assign(next_img()), reps)
    t_np_assign = median_ms(lambda: numpy_assign(next_img(), c, cn), reps)
    rows.append((k, "sgemm floor (numpy x @ C.T)", floor, f"{flops / floor / 1e6:.1f} GFLOP/s"))
    rows.append((k, "assign exact, d2r", t_assign, f"{t_assign / floor:.2f}x floor"))
    rows.append((k, "assign, plain numpy", t_np_assign, f"{t_np_assign / floor:.2f}x floor"))
    if faiss is not None:
        acb = AsmkCodebook(FaissL2Index(), size=k)
        acb.index(c)
        t_faiss = median_ms(lambda: acb.quantize(next_img(), multiple_assignment=1), reps)
        rows.append((k, "assign, asmk (faiss IndexFlatL2)", t_faiss, f"{t_faiss / floor:.2f}x floor"))

    # Approximate assignment: speed and agreement with exact.
    t0 = time.perf_counter()
    cb.build_coarse()
    t_build = time.perf_counter() - t0
    cb.assign(images[0], approximate=True)
    t_approx = median_ms(lambda: cb.assign(next_img(), approximate=True), reps)
    near = c[rng.integers(0, k, N_DESC * 4)] + 0.05 * rng.standard_normal((N_DESC * 4, D)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    agree_near = float((cb.assign(near, approximate=True) == cb.assign(near)).mean())
    agree_rand = float(np.mean([(cb.assign(x, approximate=True) == cb.assign(x)).mean() for x in images[:3]]))
    rows.append(
        (
            k,
            "assign approximate (2-level, 8 probes), d2r",
            t_approx,
            f"{t_assign / t_approx:.1f}x faster; same word {agree_near:.1%} (near codewords) / {agree_rand:.1%} (random); coarse build {t_build:.1f} s",
        )
    )

    # Aggregation after assignment (residuals, normalisation, packing).
    assigned = [cb.assign(x) for x in images]
    j = iter(range(10**9))

    def pair():
        i = next(j) % n_images
        return images[i], assigned[i]

    for label, sizes, kind in (("ASMK*", None, "asmk_star"), ("R-ASMK* (5 regions)", REGIONS, "rasmk_star")):
        def ours():
            x, a = pair()
            d2r.aggregate(x, cb, kind=kind, region_sizes=sizes, assignments=a)

        def plain():
            x, a = pair()
            numpy_asmk_star(x, c, a, sizes)

        t_ours = median_ms(ours, reps * 3)
        t_np = median_ms(plain, reps * 3)
        extra = f"numpy {t_np / t_ours:.1f}x slower"
        if faiss is not None and sizes is None:
            kern = ASMKKernel(acb, binary=True)

            def theirs():
                x, a = pair()
                kern.aggregate_image(x, a[:, None])

            t_asmk = median_ms(theirs, reps * 3)
            rows.append((k, f"{label} aggregation only, asmk", t_asmk, ""))
            extra += f"; asmk {t_asmk / t_ours:.1f}x slower"
        rows.append((k, f"{label} aggregation only, plain numpy", t_np, ""))
        rows.append((k, f"{label} aggregation only, d2r", t_ours, extra))
        t_total = median_ms(lambda: d2r.aggregate(next_img(), cb, kind=kind, region_sizes=sizes), reps)
        rows.append((k, f"assign + {label}, d2r exact", t_total, ""))
        t_total_a = median_ms(lambda: d2r.aggregate(next_img(), cb, kind=kind, region_sizes=sizes, approximate=True), reps)
        rows.append((k, f"assign + {label}, d2r approximate", t_total_a, ""))


def bench_kmeans(rows, n=200_000, k=1024, iterations=20):
    rng = np.random.default_rng(1)
    # Clustered data (centres + noise) so that k-means has structure to find.
    centres = unit(rng, 4096)
    x = centres[rng.integers(0, 4096, n)] + 0.3 * rng.standard_normal((n, D)).astype(np.float32) / np.sqrt(D)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d2r.Codebook.train(x[:5000], size=16, iterations=2, backend="d2r")  # JIT warm-up
    t0 = time.perf_counter()
    # Our own k-means, named: backend="auto" would take faiss's assignment where it is installed
    # (benchmarks/bench_kmeans.py compares the backends at K = 1024 and 8192).
    d2r.Codebook.train(x, size=k, iterations=iterations, seed=0, backend="d2r")
    t_ours = time.perf_counter() - t0
    rows.append((k, f"k-means {n // 1000}k x {D} -> K={k}, {iterations} it, d2r", t_ours * 1e3, "k-means++ seeding"))
    if faiss is not None:
        t0 = time.perf_counter()
        clus = faiss.Clustering(D, k)
        clus.niter = iterations
        clus.max_points_per_centroid = n  # no subsampling: same work as ours
        clus.seed = 0
        clus.train(x, faiss.IndexFlatL2(D))
        t_faiss = time.perf_counter() - t0
        rows.append((k, f"k-means {n // 1000}k x {D} -> K={k}, {iterations} it, faiss (asmk's trainer)", t_faiss * 1e3, f"d2r/faiss {t_ours / t_faiss:.2f}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10, help="images per setting (median over them)")
    ap.add_argument("--skip-kmeans", action="store_true")
    ap.add_argument("--skip-64k", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    bench_codebook(1024, max(args.images, 20), rng, rows)
    if not args.skip_64k:
        bench_codebook(65536, args.images, rng, rows)
    if not args.skip_kmeans:
        bench_kmeans(rows)
    print(f"# bench_core: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, d2r {d2r.__version__}")
    print(f"# {N_DESC} descriptors of D = {D} per image; R-ASMK* regions {REGIONS}; medians")
    print()
    print("| K | what | ms | note |")
    print("|---|---|---|---|")
    for k, what, ms, note in rows:
        print(f"| {k} | {what} | {ms:.2f} | {note} |")


if __name__ == "__main__":
    main()
