"""Seconds per photo of a single-machine build, before and after the cheaper build (issue 18),
split by stage, measured side by side in one process through the shipped Engine.

    before:       regions="crop" (each box's crop upscaled to the whole canvas and extracted),
                  and the index pass extracts every photo's whole-photo features again;
    crop + memo:  the same, with d2r.memo.FeatureMemo (the index pass reuses the codebook
                  pass's whole-photo features: the same bundle, byte for byte): `d2r build`;
    pack + memo:  regions="pack" (four crops per model run, each in a quarter of the canvas);
    crop + memo, N regions (``--max-regions N ...``): `d2r build --max-regions N`, the best N
                  boxes of each photo re-extracted instead of 8.

"runs' worth" is the time per photo over the median time of one whole-photo extraction (one
full-canvas model run and its decoding) measured in the same run. k-means is reported apart:
it does not grow with the photos once the sample is full.

    PYTHONPATH=sdk python benchmarks/bench_build.py [--photos 24] [--rounds 2] [--folder DIR]
        [--max-regions 2 3 4]
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
        timed.__wrapped__ = fn
        return timed


def build(photos, mode: str, memo_on: bool, threads: int, codebook_size: int, scratch, max_regions: int | None = None
          ) -> tuple[dict, dict, list]:
    config = replace(EngineConfig(), regions=mode, verification_features=1000)
    if max_regions is not None:
        config = replace(config, max_regions=max_regions)
    clock = Clock()
    whole_times = []
    with Engine.create(config, threads=threads) as engine:
        p = engine.pipeline
        ex = p.features.extractor
        model = ex.model
        run = model.run
        in_crops = "crop features (host)"
        timed_run = {k: clock.wrap(k, run) for k in ("model (whole photo)", "model (crops)")}

        def model_run(*a, **k):
            return timed_run["model (crops)" if in_crops in clock.stack else "model (whole photo)"](*a, **k)

        model.run = model_run
        whole_call = clock.wrap("whole features (host)", ex.extract)

        def extract(img):
            if in_crops in clock.stack:  # a crop on its own canvas (regions="crop")
                return whole_call.__wrapped__(img)
            t0 = time.perf_counter()
            out = whole_call(img)
            whole_times.append(time.perf_counter() - t0)
            return out

        ex.extract = extract
        p.regions.detect = clock.wrap("detector", p.regions.detect)
        p.regions.region_features = clock.wrap(in_crops, p.regions.region_features)
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
    runs = clock.n["model (whole photo)"] + clock.n["model (crops)"]
    return dict(clock.t), {"total": total, "model_runs": runs, "kmeans": clock.t["k-means"]}, whole_times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=str(REPO.parent / "shared" / "data" / "roxford5k-mini" / "db"))
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2, help="before/after alternations (medians reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--codebook-size", type=int, default=256)
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--max-regions", type=int, nargs="*", default=[],
                    help="also build crop + memo with the best N boxes per photo, for each N")
    args = ap.parse_args()
    folder = Path(args.folder)
    if not folder.is_dir():
        folder = REPO / "tests" / "data" / "landmarks"
    photos = list_images(folder)
    step = max(1, len(photos) // args.photos)
    photos = photos[::step][: args.photos]
    n = len(photos)
    print(f"{n} photos from {folder}, {args.threads} thread(s), K={args.codebook_size}, load {os.getloadavg()[0]:.1f}", flush=True)
    runs = {"before": ("crop", False, None), "crop + memo": ("crop", True, None), "pack + memo": ("pack", True, None)}
    runs.update({f"crop + memo, {m} regions": ("crop", True, m) for m in args.max_regions})
    got = defaultdict(list)
    for r in range(args.rounds):
        for name, (mode, memo_on, max_regions) in runs.items():
            stages, info, whole_times = build(photos, mode, memo_on, args.threads, args.codebook_size, args.scratch, max_regions)
            got[name].append((stages, info, statistics.median(whole_times)))
            print(f"round {r + 1} {name}: {(info['total'] - info['kmeans']) / n:.3f} s/photo, {info['model_runs'] / n:.2f} model runs/photo",
                  flush=True)
    print()
    keys = list(runs)
    print(f"| stage (s per photo, median of {args.rounds}) | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")

    def row(label, values, fmt="{:.3f}"):
        print(f"| {label} | " + " | ".join(fmt.format(v) for v in values) + " |")

    def med(k, f):
        return statistics.median(f(*g) for g in got[k])

    names = ["model (whole photo)", "whole features (host)", "model (crops)", "crop features (host)", "detector", "aggregation"]
    for s in names:
        row(s, [med(k, lambda st, i, w: st.get(s, 0.0) / n) for k in keys])
    tot = {k: med(k, lambda st, i, w: (i["total"] - i["kmeans"]) / n) for k in keys}
    one = {k: med(k, lambda st, i, w: w) for k in keys}
    row("**total, without k-means**", [tot[k] for k in keys], "**{:.3f}**")
    row("feature model runs per photo", [med(k, lambda st, i, w: i["model_runs"] / n) for k in keys], "{:.2f}")
    row("one whole-photo extraction (median)", [one[k] for k in keys])
    row("runs' worth per photo (total / one extraction)", [tot[k] / one[k] for k in keys], "{:.2f}")
    row("k-means, whole build (s)", [med(k, lambda st, i, w: i["kmeans"]) for k in keys], "{:.1f}")
    print()
    for k in keys[1:]:
        print(f"{k} / before: {tot[k] / tot['before']:.2f}x the time per photo ({tot['before'] / tot[k]:.2f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
