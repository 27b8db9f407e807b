"""The first query of a fresh install against a warm one (issue "Field-ready", point 4).

    .venv/bin/python benchmarks/bench_first_query.py [--rounds 6]

Builds a bundle of the sample collection with the default features and verification, then
runs each scenario in a new process with its own empty Numba cache (``NUMBA_CACHE_DIR``), as a
fresh install has:

- ``fresh install``: open the bundle, then verified queries; the first compiles the kernels;
- ``after d2r warmup``: ``d2r warmup`` ran first (what ``make demo`` and the README's install
  step do), then the same process as above;
- ``next process``: the cache of the previous scenario is already there;
- ``+ open(warm_up=True)``: after ``d2r warmup``, the engine also runs one synthetic query while
  it opens (``Engine.open(warm_up=True)``, what the kiosk and the museum guide do).

Prints, per scenario, the first query's time, the median of the following ones (the warm
query, measured in the same process) and their ratio. Machines here are shared and noisy:
compare the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sdk"))

CHILD = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import d2r
engine = d2r.Engine.open(sys.argv[1], warm_up=WARM)
opened = time.perf_counter() - t0
photos = sys.argv[2:]
times = []
for i in range(int(RUNS)):
    t = time.perf_counter()
    engine.query(photos[i % len(photos)], top_k=5, verify=True)
    times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"open_s": opened, "first_ms": times[0], "warm_ms": statistics.median(times[1:])}))
"""


def child(bundle: Path, photos: list, cache: str, runs: int, warm: bool = False) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT / "sdk"))
    code = CHILD.replace("RUNS", str(runs)).replace("WARM", str(warm))
    out = subprocess.run([sys.executable, "-c", code, str(bundle), *map(str, photos)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="verified queries per process (the first is the cold one)")
    args = ap.parse_args()
    import d2r

    collection = sorted((ROOT / "examples" / "sample" / "collection").glob("*.jpg"))
    visitors = sorted((ROOT / "examples" / "sample" / "visitors").glob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="d2r-first-query-") as tmp:
        tmp = Path(tmp)
        bundle = tmp / "sample.d2r"
        with d2r.Engine.create(detector=None, verification_features=1000) as engine:
            engine.train_codebook(collection, progress=False)
            engine.add_images(collection, progress=False)
            engine.save(bundle)
        rows = []
        fresh = str(tmp / "cache-fresh")
        rows.append(("fresh install", None, child(bundle, visitors, fresh, args.rounds)))
        rows.append(("next process", None, child(bundle, visitors, fresh, args.rounds)))
        warmed = str(tmp / "cache-warmup")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "d2r.cli", "warmup"], check=True, capture_output=True,
                       env=dict(os.environ, NUMBA_CACHE_DIR=warmed, PYTHONPATH=str(ROOT / "sdk")))
        rows.append(("after d2r warmup", time.perf_counter() - t0, child(bundle, visitors, warmed, args.rounds)))
        rows.append(("+ open(warm_up=True)", None, child(bundle, visitors, warmed, args.rounds, warm=True)))
    print(f"default pipeline ({d2r.engine.DEFAULT_FEATURES}), verified queries of the sample visitors, one process each")
    print(f"{'scenario':<22} {'warm-up s':>9} {'open s':>7} {'first ms':>9} {'warm ms':>8} {'first/warm':>10}")
    for name, warm, r in rows:
        w = f"{warm:.1f}" if warm is not None else "-"
        print(f"{name:<22} {w:>9} {r['open_s']:>7.2f} {r['first_ms']:>9.0f} {r['warm_ms']:>8.0f} {r['first_ms'] / r['warm_ms']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
