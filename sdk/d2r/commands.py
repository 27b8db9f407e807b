"""``d2r build`` and ``d2r query``: bundles from a folder of photos, and queries against them."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from .config import BUILD_VERIFICATION_FEATURES
from .errors import InputError
from .manifest import DEFAULT_FEATURES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def read_metadata_csv(path) -> dict:
    """CSV with a header; column ``image_id`` (or ``file``) names the image, the rest is metadata."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"{path}: cannot read metadata CSV ({exc.strerror or exc})") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid UTF-8 CSV file ({exc})") from exc
    if not rows:
        return {}
    key = "image_id" if "image_id" in rows[0] else "file" if "file" in rows[0] else None
    if key is None:
        raise InputError(f"{path}: the CSV needs an 'image_id' or 'file' column, found {list(rows[0])}")
    out = {}
    for n, row in enumerate(rows, start=2):
        image_id = (row.get(key) or "").strip()
        if not image_id:
            raise InputError(f"{path}: line {n} has an empty {key!r}")
        out[image_id] = {k: v for k, v in row.items() if k != key and k is not None}
    return out


def _parse_detector(value: str):
    if value in ("none", ""):
        return None, None
    name, _, thresh = value.partition("@")
    if not thresh:
        return name, None
    try:
        t = float(thresh)
    except ValueError:
        raise InputError(f"--detector: expected NAME@THRESHOLD (e.g. ssd@0.1), got {value!r}") from None
    return name, t


def check_metadata(metadata: dict, images) -> list[str]:
    """Warnings for a metadata CSV that does not match the photos: rows naming no photo, and
    photos without a row (each list shortened to its first 10 names)."""
    names = {Path(p).name for p in images}
    unmatched = sorted(set(metadata) - names)
    missing = sorted(names - set(metadata))
    out = []
    for what, items in (("metadata rows that match no photo", unmatched), ("photos without a metadata row", missing)):
        if items:
            shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
            out.append(f"{len(items)} {what}: {shown}")
    return out


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {n}")
    return n


def _codebook_size(value: str):
    if value == "auto":
        return value
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of words (>= 1) or 'auto', got {value!r}") from None


def cmd_build(args) -> int:
    from .codebook import Codebook
    from .engine import Engine, check_bundle_target

    images = list_images(args.images)
    check_bundle_target(args.output, protect=[args.images])  # before hours of work, not after
    name, thresh = _parse_detector(args.detector)
    options = {}
    if thresh is not None:
        options["detector_threshold"] = thresh
    if args.regions:
        options["regions"] = args.regions
    options["verification_features"] = args.verification_features
    codebook = Codebook.load(args.codebook) if args.codebook else None
    metadata = read_metadata_csv(args.metadata) if args.metadata else None
    if metadata is not None:
        for line in check_metadata(metadata, images):
            print(f"d2r build: warning: {args.metadata}: {line}", file=sys.stderr)
    on_error = "raise" if args.strict else "skip"
    t0 = time.perf_counter()
    engine = Engine.create(features=args.features, detector=name, codebook=codebook, kind=args.kind,
                           backend=args.backend, precision=args.precision, threads=args.threads, **options)
    with engine:
        if codebook is None:
            engine.train_codebook(images, size=args.codebook_size, seed=args.seed, on_error=on_error)
        engine.add_images(images, metadata=metadata, on_error=on_error)
        engine.save(args.output, protect=[args.images])
        n = len(engine.index) if engine.index is not None else 0
        skipped = dict(engine.skipped)
    print(f"wrote {args.output}: {n} images, kind {args.kind}, in {time.perf_counter() - t0:.1f} s")
    if skipped:
        print(f"skipped {len(skipped)} photo(s) that could not be read (listed in {Path(args.output) / 'bundle.json'}, 'skipped'):",
              file=sys.stderr)
        for name, why in skipped.items():
            print(f"  {name}: {why}", file=sys.stderr)
    return 0


def cmd_query(args) -> int:
    from .engine import Engine
    from .errors import ImageError

    results, failed = {}, {}
    with Engine.open(args.bundle, threads=args.threads) as engine:
        for image in args.images:
            try:
                res = engine.query(image, top_k=args.top_k, verify=args.verify)
            except ImageError as exc:  # one bad photo: say so, answer the others
                failed[str(image)] = str(exc)
                print(f"d2r query: error: {exc}", file=sys.stderr)
                continue
            results[str(image)] = res
            if not args.json:
                print(f"{image}  ({res.timings['total']:.0f} ms: features {res.timings['features']:.0f}, search {res.timings['search']:.1f})")
                for rank, hit in enumerate(res.hits, start=1):
                    meta = f"  {json.dumps(hit.metadata, ensure_ascii=False)}" if hit.metadata else ""
                    inl = f"  inliers {hit.inliers}" if hit.inliers is not None else ""
                    print(f"  {rank:3d}. {hit.image_id}  {hit.score:.4f}{inl}{meta}")
    if args.json:
        out = {k: v.to_json() for k, v in results.items()}
        out.update({k: {"error": v} for k, v in failed.items()})
        json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
        print()
    if failed:
        print(f"d2r query: {len(failed)} of {len(args.images)} photo(s) failed", file=sys.stderr)
        return 1
    return 0


def register_cli(sub) -> None:
    b = sub.add_parser("build", help="build a bundle (codebook, regions, index) from a folder of photos")
    b.add_argument("images", help="folder of images (jpg, png, ...)")
    b.add_argument("-o", "--output", required=True, help="bundle folder to write (e.g. museum.d2r)")
    b.add_argument("--features", default=DEFAULT_FEATURES,
                   help=f"local feature model name from models/manifest.json (default {DEFAULT_FEATURES}; xfeat: 7x faster, lower mAP)")
    b.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"],
                   help="model files to prefer (default int8; a model without that file, like ALIKED, runs the nearest: fp16, then fp32)")
    b.add_argument("--backend", default="tflite", choices=["tflite", "onnx"])
    b.add_argument("--detector", default="landmark@0.1",
                   help="NAME@THRESHOLD or 'none' (default landmark@0.1: the fine-tuned landmark SSD; ssd = the OIDv4 SSD)")
    b.add_argument("--regions", choices=["crop", "pool"], help="re-extract features on each box (crop, default) or pool whole-image features (pool)")
    b.add_argument("--kind", default="rasmk_star", choices=["asmk_star", "rasmk_star", "d2r_asmk_star"])
    g = b.add_mutually_exclusive_group()
    g.add_argument("--codebook-size", type=_codebook_size, default="auto",
                   help="train a codebook of K words on the folder (default auto: 8192, fewer when the folder gives under 39 descriptors per word)")
    g.add_argument("--codebook", help="use a codebook file trained elsewhere")
    b.add_argument("--metadata", help="CSV with an image_id (or file) column and any metadata columns")
    b.add_argument("--verification-features", type=int, default=BUILD_VERIFICATION_FEATURES,
                   help="whole-image features kept per image for `d2r query --verify` "
                        "(default 1000, about 68 KB per image with 64-D features (ALIKED-t16, XFeat); 0 to leave out)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int)
    b.add_argument("--strict", action="store_true",
                   help="stop at the first photo that cannot be read (default: skip it, list it at the end and in bundle.json)")
    b.set_defaults(func=cmd_build)

    q = sub.add_parser("query", help="query a bundle with photos")
    q.add_argument("bundle", help="bundle folder written by d2r build")
    q.add_argument("images", nargs="+", help="query images")
    q.add_argument("--top-k", type=_positive_int, default=10, help="results per photo (default 10)")
    q.add_argument("--verify", action="store_true", help="re-rank the top 100 by spatial verification (RANSAC inliers)")
    q.add_argument("--json", action="store_true", help="print results as JSON")
    q.add_argument("--threads", type=int)
    q.set_defaults(func=cmd_query)
