"""Build throughput: `d2r build` on one machine against `d2r build --ray` with 1 and 2 workers,
and the projection of the Ray build to 1M photos.

One process, the same photos (--photos, spread evenly over roxford5k-mini's db/ in
../shared/data, or the UKBench photos of tests/data with --source ukbench), the same
configuration (--features, the landmark detector with crops re-extracted, 1000 verification
features, models on 1 thread), a codebook trained on the photos (K = 16: the codebook's cost is
measured apart, below). Rows: one machine (`Engine.train_codebook` + `add_images`: the baseline
of the ratios), then the Ray build with each --workers count on a local cluster (`ray.init` on
loopback, started once; its start is printed apart; each build starts its workers, who load the
models, and that is in its time). Each Ray index is checked byte for byte against the
single-machine one. The Ray build's own clock splits it into steps: start (workers), features
and aggregation (on the workers: the parallel part), codebook sample and merge (on the driver:
the serial part).

Projection to 1M photos on C cores (one worker per core), a model, not a measurement:

    T(C) = 1M / (r1 * C * e)                          the workers: features + aggregation
         + 1M * (sample + merge seconds per photo)    the driver, linear in photos
         + k-means(500k x D -> K = 8192, 20 iterations)

r1: photos per second of one worker (features + aggregation steps, 1-worker build); e: the
efficiency measured from 1 to 2 workers (photos/s at 2 workers / (2 * r1)), assumed to hold at C
cores (it does only if the workers share nothing: here they share 2 cores with the driver and the
machine's other load, so e is pessimistic); the driver's per-photo costs: the merge's from the
1-worker build, the codebook sample's read as a 1M-photo build does it (one descriptor a photo,
ceil(CODEBOOK_SAMPLE / 1M)), timed on that build's feature shards (kept for it; the small builds
themselves read every descriptor of each photo and run their k-means in the same step, which
is why their codebook step is not projected); k-means from Lloyd iterations timed here on random unit vectors (the cost is the assignment GEMM,
N x K x D, whatever the data) at --kmeans-n x --kmeans-k and scaled by N x K to the 500k-descriptor
sample a 1M-photo build draws (pipeline.CODEBOOK_SAMPLE) and K = 8192 (random seeding above
K = 4096: no k-means++ pass).

    python benchmarks/bench_ray_build.py [--photos 120] [--source roxford|ukbench] [--features xfeat] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the local cluster on 127.0.0.1
TMP = Path(tempfile.mkdtemp(prefix="d2r-bench-ray-"))
os.environ["RAY_TMPDIR"] = str(TMP)  # Ray's files go there, not to /tmp/ray

import numpy as np  # noqa: E402

from d2r.config import EngineConfig  # noqa: E402
from d2r.engine import Engine  # noqa: E402
from d2r.photos import list_images  # noqa: E402
from d2r.pipeline import CODEBOOK_SAMPLE  # noqa: E402

from shared_data import shared_dir, ukbench_images  # noqa: E402

TARGET = 1_000_000
TARGET_K = 8192
KMEANS_ITERATIONS = 20


def photos_of(source: str, n: int) -> list[Path]:
    if source == "ukbench":
        return ukbench_images()[:n]
    shared = shared_dir()
    if shared is None:
        raise SystemExit("--source roxford needs ../shared/data/roxford5k-mini (or D2R_SHARED_DIR); --source ukbench uses tests/data")
    every = list_images(shared / "data" / "roxford5k-mini" / "db")
    step = max(len(every) // n, 1)
    return every[::step][:n]


def single(photos, out, config, threads) -> float:
    t = time.perf_counter()
    with Engine.create(config, threads=threads) as engine:
        engine.train_codebook(photos, size=16, progress=False)
        engine.add_images(photos, progress=False)
        engine.save(out)
    return time.perf_counter() - t


def on_ray(photos, out, config, workers, keep_shards=None):
    """(seconds, report) of a Ray build; keep_shards: a folder that receives the build's feature
    shards instead of their removal (for the driver's sample timing below)."""
    from d2r_build import build, shards

    remove = shards.ShardFolder.remove
    if keep_shards is not None:
        shards.ShardFolder.remove = lambda self: os.replace(self.root, keep_shards)
    t = time.perf_counter()
    try:
        report = build(photos, out, config, workers=workers, codebook_size=16, batch_size=4, threads=1, progress=False)
    finally:
        shards.ShardFolder.remove = remove
    return time.perf_counter() - t, report


def sample_seconds_per_photo(folder: Path, n_photos: int, rounds: int = 5) -> float:
    """The driver's codebook-sample read per photo as a build of ``n_photos`` photos does it
    (ceil(CODEBOOK_SAMPLE / n_photos) descriptors a photo: 1 at 1M), over the kept feature
    shards: the fastest of ``rounds`` passes, divided by the photos read."""
    from d2r.pipeline import DescriptorSample
    from d2r_build.shards import ShardFolder

    sf = ShardFolder(folder)
    batches = sorted(sf.done("features"))
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        seen, _ = sf.sample_into(DescriptorSample(n_photos, CODEBOOK_SAMPLE, 0), batches)
        best = min(best, time.perf_counter() - t)
    return best / seen


def kmeans_seconds_per_iteration(n: int, k: int, dim: int, iterations: int = 3) -> float:
    """Median seconds of one Lloyd iteration at N = n, K = k (random seeding, random unit vectors)."""
    from d2r.codebook import Codebook

    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    stamps = [time.perf_counter()]
    Codebook.train(x, size=k, iterations=iterations, seed=0, seeding="random", progress=lambda it, total, moved: stamps.append(time.perf_counter()))
    return statistics.median(np.diff(stamps[1:])) if len(stamps) > 2 else stamps[-1] - stamps[0]


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=120)
    ap.add_argument("--source", choices=["roxford", "ukbench"], default="roxford")
    ap.add_argument("--features", default="xfeat")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--kmeans-n", type=int, default=100_000)
    ap.add_argument("--kmeans-k", type=int, default=2048)
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if workers[0] != 1 or len(workers) < 2:
        raise SystemExit("--workers: start with 1 and give at least one more count (the efficiency is measured from 1 worker)")

    import ray

    photos = photos_of(args.source, args.photos)
    config = EngineConfig(features=args.features, detector="ssd_mobilenetv2_landmark", verification_features=1000).check()
    tmp = TMP
    load = os.getloadavg()
    print(f"# d2r build throughput, {len(photos)} {args.source} photos, {args.features} + landmark detector (crop), one run each; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"ray {ray.__version__}")
    t0 = time.perf_counter()
    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20,
             _temp_dir=str(tmp / "ray"))
    print(f"local Ray cluster started in {time.perf_counter() - t0:.1f} s (not in the times below)")
    try:
        ref = tmp / "single.d2r"
        base = single(photos, ref, config, 1)
        from d2r.codebook import Codebook

        dim = Codebook.load(ref / "codebook.d2rcb").dim
        rows = [("one machine, 1 thread", base, None)]
        reports = {}
        kept = tmp / "kept.shards"
        for w in workers:
            out = tmp / f"ray-{w}.d2r"
            seconds, report = on_ray(photos, out, config, w, keep_shards=kept if w == 1 else None)
            if (out / "index.d2ri").read_bytes() != (ref / "index.d2ri").read_bytes():
                raise SystemExit(f"{out}: index.d2ri differs from the single-machine build's")
            shutil.rmtree(out)
            reports[w] = report
            rows.append((f"ray, {w} worker{'s' if w > 1 else ''}", seconds, report))
        end_load = os.getloadavg()
        n = len(photos)
        print(f"\n{'build':<22} {'seconds':>8} {'photos/s':>9} {'vs one machine':>15}   steps (s): start, features, "
              "codebook (sample read + k-means), aggregation, merge")
        for name, seconds, report in rows:
            steps = ""
            if report is not None:
                p = report.phases
                steps = "   " + ", ".join(f"{p.get(k, 0.0):.1f}" for k in ("start", "features", "codebook")) + \
                    f" ({p.get('codebook sample', 0.0):.1f} + {p.get('k-means', 0.0):.1f}), " + \
                    ", ".join(f"{p.get(k, 0.0):.1f}" for k in ("aggregated", "merge"))
            print(f"{name:<22} {seconds:8.1f} {n / seconds:9.2f} {base / seconds:14.2f}x{steps}")

        def parallel(report):
            return report.phases["features"] + report.phases["aggregated"]

        r1 = n / parallel(reports[1])
        print("\nworker throughput (features + aggregation steps): " +
              ", ".join(f"{w} worker(s) {n / parallel(reports[w]):.2f} photos/s" for w in workers))
        w2 = workers[1]
        eff = (n / parallel(reports[w2])) / (w2 * r1)
        # The driver's serial part per photo, as a 1M-photo build has it: the sample read with one
        # descriptor a photo (timed on the kept shards), and the merge (its per-photo time here).
        # The codebook step of these small builds also holds their k-means and every descriptor of
        # each photo (the sample is not full yet): projecting it to 1M would count both 1M times.
        sample_1m = sample_seconds_per_photo(kept, TARGET)
        sample_here = reports[1].phases["codebook sample"] / n
        driver = sample_1m + reports[1].phases["merge"] / n
        print(f"driver per photo: codebook sample read {sample_here * 1e3:.2f} ms in this build "
              f"({-(-CODEBOOK_SAMPLE // n)} descriptors a photo), {sample_1m * 1e3:.3f} ms at 1M photos (1 a photo); "
              f"merge {reports[1].phases['merge'] / n * 1e3:.2f} ms")
        it = kmeans_seconds_per_iteration(args.kmeans_n, args.kmeans_k, dim)
        kmeans = it * (CODEBOOK_SAMPLE * TARGET_K) / (args.kmeans_n * args.kmeans_k) * KMEANS_ITERATIONS
        print(f"efficiency 1 -> {w2} workers: e = {eff:.2f}; driver (codebook sample at 1M + merge): {driver * 1e3:.2f} ms per photo; "
              f"k-means: {it:.2f} s per iteration at {args.kmeans_n} x {args.kmeans_k} (D = {dim}) -> {kmeans / 60:.1f} min "
              f"for {CODEBOOK_SAMPLE} x {TARGET_K}, {KMEANS_ITERATIONS} iterations")
        print(f"load average at the end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
        print(f"\nprojection to {TARGET:,} photos (T = 1M / (r1 C e) + 1M x driver + k-means; r1 = {r1:.2f} photos/s, e = {eff:.2f}):")
        print(f"{'cores':>6} {'workers':>10} {'driver':>10} {'k-means':>10} {'total':>10}")
        for cores in (8, 64, 512):
            par = TARGET / (r1 * cores * eff)
            drv = TARGET * driver
            print(f"{cores:>6} {hours(par):>10} {hours(drv):>10} {hours(kmeans):>10} {hours(par + drv + kmeans):>10}")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
