"""``d2r show BUNDLE PHOTO -o OUT.png``: the picture of one query (boxes, results, inlier matches)."""

from __future__ import annotations

from pathlib import Path

from d2r.cli._types import positive_int
from d2r.errors import InputError

from ..visualize import draw_query


def cmd_show(args) -> int:
    from d2r.engine import Engine

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InputError(f"-o/--output: the picture is a PNG file; give a name ending in .png, got {args.output!r}")
    with Engine.open(args.bundle, threads=args.threads) as engine:
        res = engine.query(args.image, top_k=args.top_k, verify=args.verify)
        draw_query(engine, args.image, res, out, images_dir=args.images_dir)
    for rank, hit in enumerate(res.hits, start=1):
        inl = f"  inliers {hit.inliers}" if hit.inliers is not None else ""
        print(f"  {rank:3d}. {hit.image_id}  {hit.score:.4f}{inl}")
    print(f"picture: {out}")
    return 0


def register(sub) -> None:
    s = sub.add_parser("show", help="draw one query: its detected boxes, the results and (with --verify) the inlier matches (lab tool)")
    s.add_argument("bundle", help="bundle folder written by d2r build")
    s.add_argument("image", help="query photo")
    s.add_argument("-o", "--output", required=True, metavar="OUT.png", help="picture to write (PNG)")
    s.add_argument("--top-k", type=positive_int, default=5, help="results drawn (default 5)")
    s.add_argument("--verify", action="store_true", help="re-rank by spatial verification and draw the inlier matches")
    s.add_argument("--images-dir", metavar="DIR", help="the folder of the database photos (the bundle does not hold them)")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_show)
