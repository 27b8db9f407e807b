"""``d2r build PHOTOS -o BUNDLE``: a bundle (codebook, regions, index) from a folder of photos."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..config import BUILD_VERIFICATION_FEATURES, EngineConfig
from ..errors import InputError
from ..manifest import ALIASES, DEFAULT_FEATURES
from ._types import add_ray_arguments, codebook_size, detector_spec, non_negative_int


def config_from_args(args) -> EngineConfig:
    """The pipeline configuration the flags describe (checked once, here)."""
    name, threshold = args.detector
    fields = {}
    if threshold is not None:
        fields["detector_threshold"] = threshold
    if args.regions:
        fields["regions"] = args.regions
    return EngineConfig(features=args.features, detector=ALIASES.get(name, name) if name else None, kind=args.kind, backend=args.backend,
                        precision=args.precision, verification_features=args.verification_features, **fields).check()


def run(args) -> int:
    from ..codebook import Codebook
    from ..engine import Engine, check_bundle_target
    from ..memo import FeatureMemo
    from ..photos import check_metadata, list_images, read_metadata_csv

    config = config_from_args(args)
    images = list_images(args.images)
    check_bundle_target(args.output, protect=[args.images])  # before hours of work, not after
    codebook = Codebook.load(args.codebook) if args.codebook else None
    metadata = read_metadata_csv(args.metadata) if args.metadata else None
    if metadata is not None:
        for line in check_metadata(metadata, images):
            print(f"d2r build: warning: {args.metadata}: {line}", file=sys.stderr)
    on_error = "raise" if args.strict else "skip"
    t0 = time.perf_counter()
    if args.ray:
        return _run_on_ray(args, config, images, codebook, metadata, on_error, t0)
    if args.resume or args.shards or args.ray_workers:
        flag = "--resume" if args.resume else "--shards" if args.shards else "--ray-workers"
        raise InputError(f"{flag}: only with --ray (a distributed build)")
    with Engine.create(config, codebook=codebook, threads=args.threads) as engine, FeatureMemo(args.scratch) as memo:
        if codebook is None:  # the codebook pass keeps each photo's features for the index pass
            engine.train_codebook(images, size=args.codebook_size, seed=args.seed, on_error=on_error, memo=memo)
        engine.add_images(images, metadata=metadata, on_error=on_error, memo=memo)
        engine.save(args.output, protect=[args.images])
        n = len(engine.index) if engine.index is not None else 0
        skipped = dict(engine.skipped)
    _report(args, config, n, skipped, time.perf_counter() - t0)
    return 0


def _run_on_ray(args, config, images, codebook, metadata, on_error, t0) -> int:
    """The same build on a Ray cluster (the d2r_build package, imported only here: the device
    runtime never imports Ray)."""
    import importlib

    try:
        ray_build = importlib.import_module("d2r_build.ray_build")
        importlib.import_module("ray")
    except ImportError as exc:
        raise InputError(f"--ray: a distributed build needs the 'ray' extra: pip install 'd2r[ray]' ({exc})") from None
    report = ray_build.build(images, args.output, config, address=args.ray, workers=args.ray_workers, codebook=codebook,
                             codebook_size=args.codebook_size, seed=args.seed, metadata=metadata, on_error=on_error, resume=args.resume,
                             shards=args.shards, threads=args.threads or 1, protect=[args.images])
    reused = sum(report.reused.values())
    if reused:
        print(f"resumed: {reused} shard(s) of the interrupted build reused, {sum(report.computed.values())} computed")
    print(f"{report.workers} Ray worker(s), {report.photos_per_second:.2f} photos/s")
    _report(args, config, report.n_images, report.skipped, time.perf_counter() - t0)
    return 0


def _report(args, config, n: int, skipped: dict, seconds: float) -> None:
    print(f"wrote {args.output}: {n} images, kind {config.kind}, in {seconds:.1f} s")
    if skipped:
        print(f"skipped {len(skipped)} photo(s) that could not be read (listed in {Path(args.output) / 'bundle.json'}, 'skipped'):",
              file=sys.stderr)
        for name, why in skipped.items():
            print(f"  {name}: {why}", file=sys.stderr)


def register(sub) -> None:
    b = sub.add_parser("build", help="build a bundle (codebook, regions, index) from a folder of photos")
    b.add_argument("images", help="folder of images (jpg, png, ...)")
    b.add_argument("-o", "--output", required=True, help="bundle folder to write (e.g. museum.d2r)")
    b.add_argument("--features", default=DEFAULT_FEATURES,
                   help=f"local feature model name from models/manifest.json (default {DEFAULT_FEATURES}; xfeat: 7x faster, lower mAP)")
    b.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"],
                   help="model files to prefer (default int8; a model without that file, like ALIKED, runs the nearest: fp16, then fp32)")
    b.add_argument("--backend", default="tflite", choices=["tflite", "onnx"])
    b.add_argument("--detector", default="landmark@0.1", type=detector_spec,
                   help="NAME@THRESHOLD or 'none' (default landmark@0.1: the fine-tuned landmark SSD; ssd = the OIDv4 SSD)")
    b.add_argument("--regions", choices=["crop", "pack", "pool"],
                   help="features of each box: re-extracted on the crop (crop), on crops packed four to a model run (pack) "
                        "or the whole photo's features in the box (pool)")
    b.add_argument("--kind", default="rasmk_star", choices=["asmk_star", "rasmk_star", "d2r_asmk_star"])
    g = b.add_mutually_exclusive_group()
    g.add_argument("--codebook-size", type=codebook_size, default="auto",
                   help="train a codebook of K words on the folder (default auto: 8192, fewer when the folder gives under 39 descriptors per word)")
    g.add_argument("--codebook", help="use a codebook file trained elsewhere")
    b.add_argument("--metadata", help="CSV with an image_id (or file) column and any metadata columns")
    b.add_argument("--verification-features", type=non_negative_int, default=BUILD_VERIFICATION_FEATURES,
                   help=f"whole-image features kept per image for `d2r query --verify` (default {BUILD_VERIFICATION_FEATURES}, about 68 KB "
                        "per image with 64-D features (ALIKED-t16, XFeat); 0 to leave out)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int)
    b.add_argument("--scratch", help="folder for the features kept between the codebook pass and the index pass "
                                     "(a temporary folder of d2r's own inside it, removed at the end; default: the system's temporary folder)")
    b.add_argument("--strict", action="store_true",
                   help="stop at the first photo that cannot be read (default: skip it, list it at the end and in bundle.json)")
    add_ray_arguments(b, "build", "distributed build", "the features, regions and aggregations of the workers")
    b.set_defaults(func=run)
