"""LightGlue for ALIKED (d2r.verify.lightglue): milliseconds per image pair, one thread, by file
format and precision, with and without early exit (adaptive depth + point pruning).

    PYTHONPATH=sdk:converters nice -n 10 .venv/bin/python benchmarks/bench_lightglue.py [--models DIR ...] [--repeats 3]

--models: folders with a manifest.json listing ``lightglue_aliked`` pieces (default: models/; a
folder written by ``d2r convert lightglue --keep all -o DIR`` adds TFLite fp32 and ONNX fp32).
Pairs: scikit-image's stereo pair and roxford5k-mini queries 0, 4, 8, 12, 16 (cropped) with their
first easy positive, ALIKED-n16 features of the shipped TFLite model (the best N by score, N of
the LightGlue files). Each pair is matched ``--repeats`` times after one warm-up; the table gives
the median over all runs (wall clock and the process's CPU time, which a
shared machine inflates less), the mean number of layers run and of matches, and the CPU-time
ratio to the first row (same process). For comparison, the nearest-neighbour matcher
(d2r.verify.match, int8) on the same features.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import d2r
from d2r import verify
from d2r.image import load_image
from d2r.manifest import load_manifest
from d2r.verify.lightglue import NAME, LightGlue

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data" / "roxford5k-mini"


def pairs(engine, queries=(0, 4, 8, 12, 16)):
    from skimage import data

    out = []
    left, right, _ = data.stereo_motorcycle()
    out.append(("stereo", left, right))
    gnd = json.loads((DATA / "gnd.json").read_text())
    for qi in queries:
        g = gnd["gnd"][qi]
        pos = (g["easy"] or g["hard"])[0]
        out.append((gnd["qimlist"][qi], DATA / "queries" / f"{gnd['qimlist'][qi]}.jpg", DATA / "db" / f"{gnd['imlist'][pos]}.jpg"))
    feats = []
    for name, a, b in out:
        fa, fb = engine.extract(a), engine.extract(b)
        sa, sb = (load_image(x).shape[1::-1] for x in (a, b))
        feats.append((name, fa, sa, fb, sb))
    return feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=[str(ROOT / "models")])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = d2r.Engine.create(features="aliked_n16", detector=None, kind="asmk_star", backend="tflite", precision="fp16", threads=1)
    feats = pairs(engine)
    engine.close()
    rows = []
    for folder in args.models:
        man = load_manifest(Path(folder) / "manifest.json")
        combos = sorted({(m.format, m.precision) for m in man.models if m.name == NAME})
        for fmt, prec in combos:
            for ee in (True, False):
                with LightGlue.load(man, backend=fmt, precision=prec, threads=1, early_exit=ee) as lg:
                    n = lg.keypoints
                    times, cpu, layers, matches = [], [], [], []
                    for _, fa, sa, fb, sb in feats:
                        a = (fa.locations[:, ::-1], fa.descriptors, fb.locations[:, ::-1], fb.descriptors, sa, sb)
                        lg.match(*a)
                        for _ in range(args.repeats):
                            t, c = time.perf_counter(), time.process_time()
                            out = lg.match(*a)
                            times.append((time.perf_counter() - t) * 1e3)
                            cpu.append((time.process_time() - c) * 1e3)
                        layers.append(out.layers)
                        matches.append(len(out.matches))
                rows.append((f"{fmt} {prec}", "on" if ee else "off", n, float(np.median(times)), float(np.median(cpu)),
                             float(np.mean(layers)), float(np.mean(matches))))
    nn_times, nn_matches = [], []
    for _, fa, _, fb, _ in feats:
        q, c = verify.LocalFeatures(fa.locations[:n], fa.descriptors[:n]), verify.LocalFeatures(fb.locations[:n], fb.descriptors[:n])
        verify.verify_pair(q, c, max_distance=float(np.sqrt(2 - 2 * 0.6)))
        for _ in range(args.repeats):
            t = time.perf_counter()
            m = verify.match(q.descriptors, c.descriptors, max_distance=float(np.sqrt(2 - 2 * 0.6)), precision="int8")
            nn_times.append((time.perf_counter() - t) * 1e3)
        nn_matches.append(len(m))
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    print(f"LightGlue-ALIKED, {len(feats)} pairs x {args.repeats} runs, 1 thread; {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs, load average {' '.join(load)}")
    print(f"{'file':14s} {'early exit':>10s} {'N':>5s} {'ms/pair':>9s} {'CPU ms':>8s} {'x first':>8s} {'layers':>7s} {'matches':>8s}")
    base = rows[0][4] if rows else float("nan")
    for name, ee, n_, ms, cms, lay, mat in rows:
        print(f"{name:14s} {ee:>10s} {n_:5d} {ms:9.1f} {cms:8.1f} {cms / base:8.2f} {lay:7.1f} {mat:8.1f}")
    print(f"{'nn int8 match':14s} {'-':>10s} {n:5d} {np.median(nn_times):9.1f} {'-':>8s} {'-':>8s} {'-':>7s} "
          f"{np.mean(nn_matches):8.1f}  (putative matches before RANSAC, cosine > 0.6)")
    print("ms/pair: wall-clock median; CPU ms: this process's CPU time (one thread), median; x first: CPU ms over the first row's")


if __name__ == "__main__":
    main()
