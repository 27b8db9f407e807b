"""Latency of the shipped models (models/manifest.json) in LiteRT and ONNX Runtime, 1 and 2 threads.

    .venv/bin/python benchmarks/bench_convert.py [--runs 30] [--threads 1,2] [--models DIR]

Prints one row per model file: size, median and minimum milliseconds per inference on a real
photo (stretched to the model's input size). On a shared machine the minimum is the figure
least disturbed by other jobs; the median shows what a busy device gives. Conversion parity lives in models/reports/*.json,
written by `d2r convert`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from d2r.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def photo(shape):
    from PIL import Image

    shared = Path(os.environ.get("D2R_SHARED_DIR", ROOT / ".." / "shared"))
    path = shared / "data" / "roxford5k-mini" / "db" / "all_souls_000000.jpg"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((shape[2], shape[1]), Image.BILINEAR), dtype=np.float32)[None]


def runner(entry, threads):
    if entry.format == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        run = Interpreter(model_path=str(entry.path), num_threads=threads).get_signature_runner()
        return lambda x: run(image=x)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(entry.path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {entry.input.name: x})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default=str(ROOT / "models"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    manifest = load_manifest(Path(args.models) / "manifest.json")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()}, {platform.platform()}, {os.cpu_count()} cpus, load average {load:.1f}, runs={args.runs}")
    head = f"{'file':36s} {'MB':>6s}" + "".join(f" {f'{t} thr med':>10s} {f'{t} thr min':>10s}" for t in threads)
    print(head)
    for entry in manifest.models:
        x = photo(entry.input.shape)
        cells = []
        for t in threads:
            run = runner(entry, t)
            for _ in range(3):
                run(x)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                run(x)
                times.append((time.perf_counter() - t0) * 1e3)
            cells.append(f" {np.median(times):10.1f} {np.min(times):10.1f}")
        print(f"{entry.file:36s} {entry.size_bytes / 1e6:6.2f}" + "".join(cells))


if __name__ == "__main__":
    main()
