"""``d2r add BUNDLE PHOTOS``: add a folder of photos to a bundle, with its own codebook and
configuration (no retraining), on this machine or a Ray cluster (``--ray``); the rules are
those of :mod:`d2r.adding`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import InputError
from ._types import add_ray_arguments


def run(args) -> int:
    from ..adding import ExistingPhotosError, add_to_bundle
    from ..photos import check_metadata, list_images, read_metadata_csv

    images = list_images(args.images)
    metadata = read_metadata_csv(args.metadata) if args.metadata else None
    if metadata is not None:
        for line in check_metadata(metadata, images):
            print(f"d2r add: warning: {args.metadata}: {line}", file=sys.stderr)
    on_error = "raise" if args.strict else "skip"
    existing = "skip" if args.skip_existing else "refuse"
    if not args.ray and (args.resume or args.shards or args.ray_workers):
        flag = "--resume" if args.resume else "--shards" if args.shards else "--ray-workers"
        raise InputError(f"{flag}: only with --ray (adding on a Ray cluster)")
    t0 = time.perf_counter()
    try:
        if args.ray:
            report = _add_on_ray(args, images, metadata, existing, on_error)
        else:
            report = add_to_bundle(args.bundle, images, metadata=metadata, existing=existing, on_error=on_error, threads=args.threads,
                                   protect=[args.images])
    except ExistingPhotosError as exc:
        shown = ", ".join(exc.ids[:10]) + (f", ... ({len(exc.ids) - 10} more)" if len(exc.ids) > 10 else "")
        raise InputError(f"{len(exc.ids)} photo(s) of {args.images} are already in {args.bundle}: {shown}; nothing was changed "
                         "(--skip-existing adds the others)") from None
    seconds = time.perf_counter() - t0
    if report.existing:
        print(f"left out {len(report.existing)} photo(s) already in the bundle (--skip-existing)")
    if report.workers:
        print(f"{report.workers} Ray worker(s), {report.photos_per_second:.2f} photos/s")
    if report.added:
        print(f"wrote {args.bundle} version {report.version}: {report.n_images} images ({len(report.added)} added) in {seconds:.1f} s")
    else:
        print(f"{args.bundle} left as it was (version {report.version}, {report.n_images} images): no photo added")
    if report.skipped:
        where = f" (listed in {Path(args.bundle) / 'bundle.json'}, 'skipped')" if report.added else ""
        print(f"skipped {len(report.skipped)} photo(s) that could not be read{where}:", file=sys.stderr)
        for name, why in report.skipped.items():
            print(f"  {name}: {why}", file=sys.stderr)
    return 0


def _add_on_ray(args, images, metadata, existing, on_error):
    """The same add on a Ray cluster (d2r_build, imported only here: the runtime never imports Ray)."""
    import importlib

    try:
        ray_build = importlib.import_module("d2r_build.ray_build")
        importlib.import_module("ray")
    except ImportError as exc:
        raise InputError(f"--ray: adding on a cluster needs the 'ray' extra: pip install 'd2r[ray]' ({exc})") from None
    return ray_build.add(args.bundle, images, address=args.ray, workers=args.ray_workers, metadata=metadata, existing=existing,
                         on_error=on_error, resume=args.resume, shards=args.shards, threads=args.threads or 1, protect=[args.images])


def register(sub) -> None:
    a = sub.add_parser("add", help="add photos to a bundle with its own codebook and configuration (no retraining)",
                       description="Add a folder of photos to a bundle: extracted with the bundle's own models, aggregated with its "
                                   "codebook, appended to its index (the index a build of all the photos with that codebook writes). "
                                   "The bundle is replaced atomically by a new version; a photo already in it is refused "
                                   "(--skip-existing leaves it out); a photo that cannot be read is skipped and listed.")
    a.add_argument("bundle", help="bundle folder to add to (e.g. museum.d2r)")
    a.add_argument("images", help="folder of photos to add (jpg, png, ...); the file name is the image id")
    a.add_argument("--metadata", help="CSV with an image_id (or file) column and any metadata columns")
    a.add_argument("--skip-existing", action="store_true",
                   help="leave out photos whose id (file name) is already in the bundle (default: refuse them all, change nothing)")
    a.add_argument("--threads", type=int)
    a.add_argument("--strict", action="store_true",
                   help="stop at the first photo that cannot be read, the bundle unchanged (default: skip it, list it at the end "
                        "and in bundle.json)")
    add_ray_arguments(a, "add", "on a Ray cluster", "the workers' aggregations and a copy of the bundle's models")
    a.set_defaults(func=run)
