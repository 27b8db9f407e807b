"""k-means benchmark (issue 18): our k-means before and after, and faiss's, to K = 1024 and 8192.

Prints a table: for N = 100k and 1M synthetic 64-D descriptors, the seconds of seeding, the
seconds per Lloyd iteration (median over the iterations of a run, then over runs) and in all
for 20 iterations, and the quantisation error (mean exact squared distance of a descriptor to
its nearest centroid; on a fixed 100k subset when N = 1M), for:

- ``old d2r``: ``Codebook.train`` as of 55703dc (benchmarks/kmeans_baseline.py, the same
  process); where it runs fewer iterations (``--old-iterations``) its total is projected as
  seeding + 20 x the median iteration, and marked so;
- ``d2r, full assignment``: ours before the bounded assignment (every descriptor against every
  centroid on every iteration; the Lloyd loop of ``d2r.kmeans`` with ``nearest_centroid``);
- ``d2r``: ``Codebook.train(backend="d2r")``, ours now (the bounded assignment: the same
  codebook, bit for bit);
- ``d2r + faiss``: ``Codebook.train(backend="faiss")``: faiss's assignment, the rest ours;
- ``faiss.Kmeans``: faiss's own k-means (random seeding, 20 iterations, no subsampling).

    python benchmarks/bench_kmeans.py [--cases 100k:1024,100k:8192,1M:1024,1M:8192] [--runs 3]
        [--big-runs 1] [--old-iterations 3] [--threads N]

Data: a mixture of 20,000 Gaussian components with Dirichlet(0.5) weights and per-component
spreads, L2-normalised like local descriptors (not uniform noise). Needs the `kmeans` extra
(faiss-cpu) for the faiss rows; without it they are left out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kmeans_baseline  # noqa: E402

import d2r  # noqa: E402
from d2r import kmeans  # noqa: E402

try:
    import faiss
except ImportError:  # the kmeans extra is optional
    faiss = None

D = 64
ITERATIONS = 20
ERROR_SAMPLE = 100_000


def descriptors(n, seed=0, components=20_000):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((components, D)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(components, 0.5))
    spread = np.exp(rng.uniform(np.log(0.15), np.log(0.6), components)).astype(np.float32)
    comp = rng.choice(components, n, p=weights)
    x = means[comp] + (spread[comp, None] / np.sqrt(D)) * rng.standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def timed(train):
    """Run ``train(progress)``; (centroids, seconds before the first iteration, per-iteration
    seconds, total seconds). Iteration times are the gaps between progress calls."""
    stamps = []
    t0 = time.perf_counter()
    c = train(lambda *a: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    gaps = np.diff([t0, *stamps])
    per_it = float(np.median(gaps[1:])) if len(gaps) > 1 else float(gaps[0])
    seeding = max(float(gaps[0]) - per_it, 0.0)
    return c, seeding, per_it, total, len(stamps)


def faiss_kmeans(x, k, seed, threads):
    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(D, k, niter=ITERATIONS, seed=seed, max_points_per_centroid=x.shape[0], min_points_per_centroid=1, verbose=False)
    t0 = time.perf_counter()
    km.train(x)
    total = time.perf_counter() - t0
    cum = np.array([s["time"] for s in km.iteration_stats])
    per_it = float(np.median(np.diff(cum))) if len(cum) > 1 else float(cum[0])
    return np.ascontiguousarray(km.centroids), max(total - cum[-1], 0.0), per_it, total, len(cum)


def quantisation_error(x, c, threads, pool):
    _, d = kmeans.nearest_centroid(x, c, threads, pool)
    return float(d.mean())


def run_case(n, k, args, rows):
    x = descriptors(n)
    ex = x[np.random.default_rng(1).choice(n, ERROR_SAMPLE, replace=False)] if n > ERROR_SAMPLE else x
    runs = args.runs if n <= 100_000 else args.big_runs
    old_its = ITERATIONS if n <= 100_000 else min(args.old_iterations, ITERATIONS)
    pool = ThreadPoolExecutor(args.threads)
    def full_assignment(p):
        """Our k-means before the bounded assignment: every descriptor against every centroid
        (each iteration costs the same, so above 100k it runs --old-iterations and is projected)."""
        init = kmeans.seed_centroids(x, k, np.random.default_rng(0), "auto")
        with ThreadPoolExecutor(args.threads) as tp, kmeans._one_thread_blas():
            return kmeans._lloyd(x, init, old_its, p, lambda c: kmeans.nearest_centroid(x, c, args.threads, tp))

    impls = [
        ("old d2r (55703dc)", lambda p: kmeans_baseline.train(x, k, old_its, 0, progress=p), old_its),
        ("d2r, full assignment (b3da7c7)", full_assignment, old_its),
        ("d2r", lambda p: d2r.Codebook.train(x, size=k, iterations=ITERATIONS, seed=0, backend="d2r", threads=args.threads, progress=p).centroids,
         ITERATIONS),
    ]
    if faiss is not None and not args.skip_faiss_assign:
        impls.append(("d2r + faiss", lambda p: d2r.Codebook.train(x, size=k, iterations=ITERATIONS, seed=0, backend="faiss", threads=args.threads,
                                                                    progress=p).centroids, ITERATIONS))
    results = {}
    for name, train, _its in impls:
        if (name.startswith("old") and args.skip_old) or (name.startswith("d2r, full") and args.skip_full):
            continue
        reps = [timed(train) for _ in range(1 if name.startswith("old") else runs)]
        results[name] = reps
        print(f"  {n} {k} {name}: {[round(r[3], 1) for r in reps]} s", file=sys.stderr, flush=True)
    if faiss is not None and not args.skip_faiss_kmeans:
        results["faiss.Kmeans"] = [faiss_kmeans(x, k, 0, args.threads) for _ in range(runs)]
        print(f"  {n} {k} faiss.Kmeans: {[round(r[3], 1) for r in results['faiss.Kmeans']]} s", file=sys.stderr, flush=True)
    ours = results["d2r"][0][0]
    base_total = None
    for name, reps in results.items():
        seeding = statistics.median(r[1] for r in reps)
        per_it = statistics.median(r[2] for r in reps)
        its = reps[0][4]
        cut = name.startswith(("old", "d2r, full")) and old_its < ITERATIONS  # stopped by --old-iterations, not converged
        if cut:
            total, note = seeding + ITERATIONS * per_it, f"projected from {its} iterations"
        else:
            # Fewer than 20 iterations: converged (no descriptor changed word), an early stop.
            total, note = statistics.median(r[3] for r in reps), f"converged after {its} iterations" if its != ITERATIONS else ""
        if name.startswith("old"):
            base_total = total
            err = "(not run to the end)" if cut else f"{quantisation_error(ex, reps[0][0], args.threads, pool):.5f}"
            if not cut:
                note = (note + "; " if note else "") + ("same codebook as d2r" if np.array_equal(reps[0][0], ours) else "codebook differs from d2r")
        else:
            err = "(not run to the end)" if cut else f"{quantisation_error(ex, reps[0][0], args.threads, pool):.5f}"
            if name.startswith("d2r, full"):
                base_total = total if base_total is None else base_total  # the baseline when old is skipped
                if not cut:
                    note = (note + "; " if note else "") + ("same codebook as d2r" if np.array_equal(reps[0][0], ours) else "codebook differs from d2r")
        speedup = f"{base_total / total:.1f}x" if base_total else ""
        rows.append((n, k, name, seeding, per_it, total, err, speedup, len(reps), note))
    pool.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="100k:1024,100k:8192,1M:1024,1M:8192", help="N:K pairs (N with k/M suffixes)")
    ap.add_argument("--runs", type=int, default=3, help="runs per implementation at N <= 100k (medians)")
    ap.add_argument("--big-runs", type=int, default=1, help="runs per implementation above 100k")
    ap.add_argument("--old-iterations", type=int, default=3, help="iterations of the old k-means above 100k (its total is projected)")
    ap.add_argument("--threads", type=int, default=kmeans.default_threads())
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--skip-full", action="store_true", help="leave out ours with the full assignment")
    ap.add_argument("--skip-faiss-assign", action="store_true", help="leave out d2r + faiss")
    ap.add_argument("--skip-faiss-kmeans", action="store_true")
    args = ap.parse_args()
    rows = []
    t_start = time.time()
    load_before = os.getloadavg()
    # Compile the Numba kernels (ours and the baseline's) before timing.
    warm = descriptors(5000, seed=9)
    kmeans_baseline.train(warm, 32, 2)
    d2r.Codebook.train(warm, size=32, iterations=2, backend="d2r")
    for case in args.cases.split(","):
        n_s, k_s = case.split(":")
        n = int(float(n_s.lower().replace("k", "e3").replace("m", "e6")))
        run_case(n, int(k_s), args, rows)
    load_after = os.getloadavg()
    print(f"# bench_kmeans: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, numpy {np.__version__}, "
          f"faiss {getattr(faiss, '__version__', 'absent')}, d2r {d2r.__version__}")
    print(f"# load average (1, 5, 15 min) before {tuple(round(v, 2) for v in load_before)}, after {tuple(round(v, 2) for v in load_after)}; "
          f"{(time.time() - t_start) / 60:.1f} min in all")
    print(f"# D = {D} mixture descriptors; {ITERATIONS} Lloyd iterations, seed 0; seconds; medians of the runs column; "
          f"error on {ERROR_SAMPLE // 1000}k descriptors when N > {ERROR_SAMPLE // 1000}k")
    print()
    print("| N | K | k-means | seeding s | s / iteration | total s (20 it) | quantisation error | speed-up vs the first row | runs | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, k, name, seeding, per_it, total, err, speedup, runs, note in rows:
        n_txt = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"
        print(f"| {n_txt} | {k} | {name} | {seeding:.2f} | {per_it:.3f} | {total:.1f} | {err} | {speedup} | {runs} | {note} |")


if __name__ == "__main__":
    main()
