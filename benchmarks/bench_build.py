"""Seconds per photo of a single-machine build, before and after the cheaper build (issue 18),
split by stage, measured side by side in one process through the shipped Engine.

    before: regions="crop" (each box's crop upscaled to the whole canvas and extracted), and the
            index pass extracts every photo's whole-photo features again (two passes);
    after:  regions="pack" (four crops per model run, each in a quarter of the canvas) and
            d2r.memo.FeatureMemo (the index pass reuses the codebook pass's features).

"runs' worth" is the time per photo over the median time of one whole-photo extraction (one
full-canvas model run and its decoding) measured in the same run. k-means is reported apart:
it does not grow with the photos once the sample is full.

    PYTHONPATH=sdk python benchmarks/bench_build.py [--photos 24] [--rounds 2] [--folder DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "sdk"))

from d2r import EngineConfig  # noqa: E402
from d2r import engine as engine_module  # noqa: E402
from d2r.engine import Engine  # noqa: E402
from d2r.memo import FeatureMemo  # noqa: E402
from d2r.photos import list_images  # noqa: E402


class Clock:
    """Wall time per stage; nested stages are charged to the innermost one."""

    def __init__(self):
        self.t = defaultdict(float)
        self.n = defaultdict(int)
        self.stack = []

    def wrap(self, name, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            self.stack.append(name)
            try:
                return fn(*a, **k)
            finally:
                self.stack.pop()
                dt = time.perf_counter() - t0
                self.t[name] += dt
                self.n[name] += 1
                if self.stack:  # do not count it twice
                    self.t[self.stack[-1]] -= dt
        return timed


def build(photos, mode: str, memo_on: bool, threads: int, codebook_size: int, scratch) -> tuple[dict, dict, list]:
    config = replace(EngineConfig(), regions=mode, verification_features=1000)
    clock = Clock()
    whole_times = []
    with Engine.create(config, threads=threads) as engine:
        p = engine.pipeline
        ex = p.features.extractor
        model = ex.model
        run = model.run
        model.run = clock.wrap("model", run)
        fstage = p.features
        whole_call = fstage.extractor.extract

        def whole(img):
            t0 = time.perf_counter()
            out = clock.wrap("whole features (host)", whole_call)(img)
            whole_times.append(time.perf_counter() - t0)
            return out

        fstage.extractor.extract = whole
        p.regions.detect = clock.wrap("detector", p.regions.detect)
        p.regions.region_features = clock.wrap("crop features (host)", p.regions.region_features)
        orig_train = engine_module.train_codebook
        engine_module.train_codebook = clock.wrap("k-means", orig_train)
        memo = FeatureMemo(scratch) if memo_on else None
        try:
            t0 = time.perf_counter()
            engine.train_codebook(photos, size=codebook_size, progress=False, memo=memo)
            p.aggregation.database = clock.wrap("aggregation", p.aggregation.database)
            engine.add_images(photos, progress=False, memo=memo)
            total = time.perf_counter() - t0
        finally:
            engine_module.train_codebook = orig_train
            if memo is not None:
                memo.close()
    # model time inside each host stage: split the model's time by who called it
    return dict(clock.t), {"total": total, "model_runs": clock.n["model"], "kmeans": clock.t["k-means"]}, whole_times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=str(REPO.parent / "shared" / "data" / "roxford5k-mini" / "db"))
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2, help="before/after alternations (medians reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--codebook-size", type=int, default=256)
    ap.add_argument("--scratch", default=None)
    args = ap.parse_args()
    folder = Path(args.folder)
    if not folder.is_dir():
        folder = REPO / "tests" / "data" / "landmarks"
    photos = list_images(folder)
    step = max(1, len(photos) // args.photos)
    photos = photos[::step][: args.photos]
    n = len(photos)
    print(f"{n} photos from {folder}, {args.threads} thread(s), K={args.codebook_size}, load {os.getloadavg()[0]:.1f}", flush=True)
    runs = {"before": ("crop", False), "after": ("pack", True)}
    got = defaultdict(list)
    for r in range(args.rounds):
        for name, (mode, memo_on) in runs.items():
            stages, info, whole_times = build(photos, mode, memo_on, args.threads, args.codebook_size, args.scratch)
            got[name].append((stages, info, statistics.median(whole_times)))
            print(f"round {r + 1} {name}: {(info['total'] - info['kmeans']) / n:.3f} s/photo, {info['model_runs'] / n:.2f} model runs/photo",
                  flush=True)
    print()
    print(f"| stage (s per photo, median of {args.rounds}) | before | after |")
    print("|---|---|---|")
    names = ["model", "whole features (host)", "crop features (host)", "detector", "aggregation"]
    for s in names:
        row = [statistics.median(st.get(s, 0.0) for st, _, _ in got[k]) / n for k in runs]
        print(f"| {s} | {row[0]:.3f} | {row[1]:.3f} |")
    tot = {k: statistics.median((i["total"] - i["kmeans"]) / n for _, i, _ in got[k]) for k in runs}
    one = {k: statistics.median(w for _, _, w in got[k]) for k in runs}
    mr = {k: statistics.median(i["model_runs"] / n for _, i, _ in got[k]) for k in runs}
    km = {k: statistics.median(i["kmeans"] for _, i, _ in got[k]) for k in runs}
    print(f"| **total, without k-means** | **{tot['before']:.3f}** | **{tot['after']:.3f}** |")
    print(f"| model runs per photo (feature model) | {mr['before']:.2f} | {mr['after']:.2f} |")
    print(f"| one whole-photo extraction (median) | {one['before']:.3f} | {one['after']:.3f} |")
    print(f"| runs' worth per photo (total / one extraction) | {tot['before'] / one['before']:.2f} | {tot['after'] / one['after']:.2f} |")
    print(f"| k-means, whole build (s) | {km['before']:.1f} | {km['after']:.1f} |")
    print(f"\nafter / before: {tot['after'] / tot['before']:.2f}x the time per photo ({tot['before'] / tot['after']:.2f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
