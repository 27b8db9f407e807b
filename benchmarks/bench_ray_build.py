"""Build throughput: `d2r build` on one machine against `d2r build --ray` with 1 and 2 workers.

Photos per second (median over --repeats) of the whole build, in one process, on the same photos
(the first --photos UKBench photos of tests/data; models on 1 thread, and 2 for the second
single-machine row) and configuration (--features, the landmark
detector with crops re-extracted, 1000 verification features), two ways:

- trained: the codebook is trained on the photos (what `d2r build` does; a single-machine build
  extracts each photo's whole-photo features twice, once for the codebook and once for the
  index; the Ray build extracts once and reads the codebook's sample from its shards);
- given: a codebook trained beforehand (`--codebook`): features, regions, aggregation, index.

The Ray cluster is local (`ray.init`, on loopback), started once before the Ray builds; its start
time is printed apart. Every Ray build starts its workers (each loads the models) and they are in
the time. The Ray index is checked byte for byte against the single-machine one. The projection
to 1M photos assumes that throughput grows linearly with workers (one per core), as the builds
share nothing but the shard folder; it is an extrapolation, not a measurement.

    python benchmarks/bench_ray_build.py [--photos 16] [--repeats 3] [--features xfeat] [--workers 1,2]
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

from d2r.config import EngineConfig  # noqa: E402
from d2r.engine import Engine  # noqa: E402

from shared_data import ukbench_images  # noqa: E402


def single(photos, out, config, codebook, threads):
    with Engine.create(config, codebook=codebook, threads=threads) as engine:
        if codebook is None:
            engine.train_codebook(photos, size=16, progress=False)
        engine.add_images(photos, progress=False)
        engine.save(out)


def on_ray(photos, out, config, codebook, workers):
    from d2r_build import build

    return build(photos, out, config, workers=workers, codebook=codebook, codebook_size=16, batch_size=4, threads=1, progress=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--features", default="xfeat")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    import ray

    photos = ukbench_images()[: args.photos]
    config = EngineConfig(features=args.features, detector="ssd_mobilenetv2_landmark", verification_features=1000).check()
    tmp = TMP
    print(f"# d2r build throughput, {len(photos)} UKBench photos, {args.features} + landmark detector (crop), "
          f"median of {args.repeats}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, ray {ray.__version__}")
    t0 = time.perf_counter()
    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20,
             _temp_dir=str(tmp / "ray"))
    print(f"local Ray cluster started in {time.perf_counter() - t0:.1f} s (not in the times below)")
    try:
        with Engine.create(config, threads=1) as engine:
            given = engine.train_codebook(photos, size=16, progress=False)
        rows = []
        for mode, codebook in (("trained", None), ("given", given)):
            times: dict[str, list] = {"single machine": [], "single, 2 threads": []}
            times.update({f"ray, {w} worker{'s' if w > 1 else ''}": [] for w in workers})
            for r in range(args.repeats):
                ref = tmp / f"single-{mode}-{r}.d2r"
                t = time.perf_counter()
                single(photos, ref, config, codebook, 1)
                times["single machine"].append(time.perf_counter() - t)
                t = time.perf_counter()
                single(photos, tmp / "two-threads.d2r", config, codebook, 2)
                times["single, 2 threads"].append(time.perf_counter() - t)
                shutil.rmtree(tmp / "two-threads.d2r")
                for w in workers:
                    out = tmp / f"ray-{mode}-{w}-{r}.d2r"
                    t = time.perf_counter()
                    on_ray(photos, out, config, codebook, w)
                    times[f"ray, {w} worker{'s' if w > 1 else ''}"].append(time.perf_counter() - t)
                    if (out / "index.d2ri").read_bytes() != (ref / "index.d2ri").read_bytes():
                        raise SystemExit(f"{out}: index.d2ri differs from the single-machine build's")
                    shutil.rmtree(out)
                shutil.rmtree(ref)
            base = statistics.median(times["single machine"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append((mode, name, med, len(photos) / med, base / med))
        print(f"\n{'codebook':<9} {'build':<18} {'seconds':>8} {'photos/s':>9} {'vs single':>10}")
        for mode, name, med, rate, ratio in rows:
            print(f"{mode:<9} {name:<18} {med:8.2f} {rate:9.2f} {ratio:9.2f}x")
        one = next(rate for mode, name, _, rate, _ in rows if mode == "trained" and name == "ray, 1 worker")
        print(f"\nprojection to 1M photos (trained codebook, {one:.2f} photos/s per worker, linear in workers; extrapolated):")
        for cores in (8, 64, 512):
            hours = 1e6 / (one * cores) / 3600
            print(f"  {cores:>3} cores: {hours:8.1f} h")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
