"""Where the time of a converted-ALIKED extraction goes: graph, keypoints (DKD), descriptor head (SDDH).

    PYTHONPATH=sdk .venv/bin/python benchmarks/bench_aliked_latency.py [--runs 15] [--threads 1,2] \
        [--settings aliked_n16:tflite:fp16,aliked_n16:onnx:fp32,aliked_t16:tflite:fp16]

One 640x480 photo (``all_souls_000000.jpg`` resized, exactly the 480x640 canvas), up to 2000
features. Per setting and round: the model run, ``d2r.features.aliked.detect`` and ``.describe``
timed apart, then a whole ``LocalFeatureExtractor.extract`` (resize, canvas, model, decoding,
sorting). XFeat int8 (TFLite, up to 4096 features, the default) runs in the same rounds as the
baseline; "x" is the median per-round ratio of the whole extraction to XFeat's. Median ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(ROOT / ".." / "shared" / "data" / "roxford5k-mini"))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--max-features", type=int, default=2000)
    ap.add_argument("--settings", default="aliked_n16:tflite:fp16,aliked_n16:onnx:fp32,aliked_t16:tflite:fp16,aliked_t16:onnx:fp32")
    args = ap.parse_args()
    from PIL import Image

    import d2r
    from d2r.features import aliked

    with Image.open(Path(args.dataset) / "db" / "all_souls_000000.jpg") as im:
        rgb = np.asarray(im.convert("RGB").resize((640, 480), Image.BILINEAR))
    settings = [tuple(s.split(":")) for s in args.settings.split(",") if s]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.machine()}, {os.cpu_count()} cpus, load average {load:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| setting | threads | features | graph ms | DKD ms | SDDH ms | whole extraction ms | x XFeat int8 | XFeat int8 ms (same rounds) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        base = d2r.Engine.create(features="xfeat", detector=None, backend="tflite", precision="int8", threads=threads)
        engines = {s: d2r.Engine.create(features=s[0], detector=None, backend=s[1], precision=s[2], threads=threads,
                                        max_features=args.max_features) for s in settings}
        for e in [base, *engines.values()]:
            for _ in range(3):
                e.extractor.extract(rgb)
        t = {s: {"graph": [], "dkd": [], "sddh": [], "whole": [], "ratio": []} for s in settings}
        tb = []
        counts = {}
        for _ in range(args.runs):
            t0 = time.perf_counter()
            base.extractor.extract(rgb)
            b = time.perf_counter() - t0
            tb.append(b)
            for s, e in engines.items():
                ex = e.extractor
                x = ex._canvas(rgb)
                t0 = time.perf_counter()
                outs = ex.model.run(x)
                t1 = time.perf_counter()
                named = {n: outs[i] for n, i in ex.decoder.outputs.items()}
                f = [np.ascontiguousarray(named[f"feature_map_{i}"][0], dtype=np.float32) for i in (1, 2, 3, 4)]
                kx, ky, _ = aliked.detect(named["score_map"][0, :, :, 0], ex.score_threshold, ex.max_features)
                t2 = time.perf_counter()
                aliked.describe(ex.decoder.head, *f, kx, ky)
                t3 = time.perf_counter()
                feats = ex.extract(rgb)
                t4 = time.perf_counter()
                counts[s] = len(feats)
                for k, v in (("graph", t1 - t0), ("dkd", t2 - t1), ("sddh", t3 - t2), ("whole", t4 - t3), ("ratio", (t4 - t3) / b)):
                    t[s][k].append(v)
        for s in settings:
            med = {k: float(np.median(v)) for k, v in t[s].items()}
            print(f"| {':'.join(s)} | {threads} | {counts[s]} | {1e3 * med['graph']:.0f} | {1e3 * med['dkd']:.0f} | {1e3 * med['sddh']:.0f} | "
                  f"{1e3 * med['whole']:.0f} | x{med['ratio']:.1f} | {1e3 * float(np.median(tb)):.0f} |", flush=True)
        for e in [base, *engines.values()]:
            e.close()


if __name__ == "__main__":
    main()
