"""Landmark detection quality of the shipped detectors: AP@0.5 (one class) before and after fine-tuning.

    .venv/bin/python benchmarks/bench_detector.py [--models DIR] [--format tflite] [--precision int8]

Two test sets, neither used for training:
* held-out: the validation images of the fine-tuned model (split by image, seeded) against
  their *mined* boxes (from models/reports/NAME_training.json; mined boxes, not ground truth);
* queries: the 13 roxford5k-mini queries that have an uncropped image in full/, against the
  ground-truth query boxes of gnd.json (``bbx`` [x1, y1, x2, y2] in full/ pixels).

"before" is the OIDv4 SSD with any class counting as a landmark (score = max over its 23
classes); "after" the fine-tuned one-class model; "whole image IoU>=.5" is the fraction of
reference boxes that the whole image itself overlaps at IoU >= 0.5 (a trivial detector whose
AP, with one tied score, would be that fraction squared). Then, per detector and score threshold, what region
selection sees: boxes per image, median box area (fraction of the image), recall of the
reference boxes at IoU >= 0.5, and the mean of the best IoU per reference box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "converters"))

from d2r import load_model  # noqa: E402
from d2r.detect import Detector, iou_matrix  # noqa: E402
from d2r.manifest import load_manifest  # noqa: E402
from d2r_convert.finetune import average_precision  # noqa: E402


def shared() -> Path:
    return Path(os.environ.get("D2R_SHARED_DIR", ROOT / ".." / "shared"))


def query_set():
    """[(full image path, [ymin, xmin, ymax, xmax] normalised)] of the queries cut from full/ images."""
    from PIL import Image

    data = shared() / "data" / "roxford5k-mini"
    gnd = json.loads((data / "gnd.json").read_text())
    out = []
    for name, src, g in zip(gnd["qimlist"], gnd["query_source"], gnd["gnd"]):
        if src != "cropped_from_full":
            continue
        path = data / "full" / f"{name}.jpg"
        with Image.open(path) as im:
            w, h = im.size
        x1, y1, x2, y2 = g["bbx"]
        out.append((path, [y1 / h, x1 / w, y2 / h, x2 / w]))
    return out


def heldout_set(report_path: Path, images: Path):
    rep = json.loads(report_path.read_text())
    boxes = rep.get("validation_boxes") or {}
    return [(images / p, b) for p, b in sorted(boxes.items()) if b is not None], rep


def run_detector(name, manifest, fmt, precision, items, threads):
    entry = manifest.find(name, format=fmt, precision=precision)
    model = load_model(entry.path, threads=threads)
    det = Detector(model, threshold=0.01, max_boxes=100, entry=entry)
    out = []
    for path, _ in items:
        d = det.detect(path)
        out.append((d.boxes, d.scores))
    model.close()
    return out


def stats(dets, items, threshold):
    n, areas, hits, best = [], [], [], []
    for (boxes, scores), (_, gt) in zip(dets, items):
        keep = scores >= threshold
        b = boxes[keep]
        n.append(len(b))
        areas.extend(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).tolist())
        iou = iou_matrix(np.asarray([gt], np.float32), b)[0] if len(b) else np.zeros(0)
        best.append(float(iou.max()) if len(iou) else 0.0)
        hits.append(best[-1] >= 0.5)
    return float(np.mean(n)), float(np.median(areas)) if areas else float("nan"), float(np.mean(hits)), float(np.mean(best))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"), help="folder of manifest.json with the fine-tuned model")
    ap.add_argument("--before-models", default=str(ROOT / "models"), help="folder of manifest.json with the OIDv4 model")
    ap.add_argument("--before", default="ssd_mobilenetv2_oidv4")
    ap.add_argument("--after", default="ssd_mobilenetv2_landmark")
    ap.add_argument("--format", default="tflite", choices=["tflite", "onnx"])
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--images", default=str(shared() / "data" / "roxford5k-mini" / "db"), help="folder of the held-out images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--thresholds", default="0.7,0.5,0.3,0.1")
    args = ap.parse_args()
    manifest = load_manifest(Path(args.models) / "manifest.json")
    before_manifest = load_manifest(Path(args.before_models) / "manifest.json")
    report_path = Path(args.models) / "reports" / f"{args.after}_training.json"
    heldout, rep = heldout_set(report_path, Path(args.images))
    queries = query_set()
    load = os.getloadavg()[0]
    print(f"# {platform.machine()}, {os.cpu_count()} cpus, load average {load:.1f}; {args.format} {args.precision}, {args.threads} thread(s)")
    secs = rep.get("seconds", {})
    print(f"# fine-tuning ({rep.get('date', '?')}): {rep.get('with_box')} of {rep.get('images')} images with a mined box, "
          f"{len(rep.get('train_images', []))} train / {len(rep.get('validation_images', []))} held out, "
          f"{rep.get('training_views')} views, kept epoch {rep.get('kept_epoch')} of {rep.get('epochs')}; "
          f"time: features {secs.get('features', float('nan')):.0f} s + heads {secs.get('heads', float('nan')):.0f} s "
          f"(+ export {secs.get('export', float('nan')):.0f} s), {rep.get('threads')} thread(s)")
    sets = {"held-out (mined boxes)": heldout, "queries (GT boxes)": queries}
    dets = {}
    for label, items in sets.items():
        dets[(label, "before")] = run_detector(args.before, before_manifest, args.format, args.precision, items, args.threads)
        dets[(label, "after")] = run_detector(args.after, manifest, args.format, args.precision, items, args.threads)
        dets[(label, "whole image")] = [(np.array([[0, 0, 1, 1]], np.float32), np.array([1.0], np.float32)) for _ in items]
    print()
    print(f"{'AP@0.5, one class':28s} {'images':>6s} {'before (OIDv4)':>15s} {'after (fine-tuned)':>19s} {'whole image IoU>=.5':>20s}")
    for label, items in sets.items():
        truths = [[gt] for _, gt in items]
        aps = [average_precision(dets[(label, k)], truths) for k in ("before", "after")]
        whole = stats(dets[(label, "whole image")], items, 0.5)[2]
        print(f"{label:28s} {len(items):6d} {aps[0]:15.3f} {aps[1]:19.3f} {whole:20.2f}")
    print()
    print(f"{'set':24s} {'detector':10s} {'T':>4s} {'boxes/img':>9s} {'med area':>8s} {'recall@.5':>9s} {'mean best IoU':>13s}")
    for label, items in sets.items():
        for k in ("before", "after"):
            for t in (float(v) for v in args.thresholds.split(",")):
                n, area, rec, best = stats(dets[(label, k)], items, t)
                print(f"{label.split(' ')[0]:24s} {k:10s} {t:4.1f} {n:9.2f} {area:8.2f} {rec:9.2f} {best:13.2f}")
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for items in sets.values() for _, b in items]
    print(f"\nreference box area (fraction of the image): held-out median "
          f"{np.median([(b[2] - b[0]) * (b[3] - b[1]) for _, b in heldout]) if heldout else float('nan'):.2f}, "
          f"queries median {np.median([(b[2] - b[0]) * (b[3] - b[1]) for _, b in queries]):.2f} (all {np.median(areas):.2f})")


if __name__ == "__main__":
    main()
