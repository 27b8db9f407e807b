"""``d2r query BUNDLE PHOTO...``: the ranked collection photos for each query photo."""

from __future__ import annotations

import json
import sys

from ..config import QUERY_EXPAND
from ._types import non_negative_int, positive_int


def run(args) -> int:
    from ..engine import Engine
    from ..errors import ImageError

    results, failed = {}, {}
    with Engine.open(args.bundle, threads=args.threads) as engine:
        for image in args.images:
            try:
                res = engine.query(image, top_k=args.top_k, verify=args.verify or False, verify_top=args.verify_top, expand=args.expand)
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


def register(sub) -> None:
    q = sub.add_parser("query", help="query a bundle with photos")
    q.add_argument("bundle", help="bundle folder written by d2r build")
    q.add_argument("images", nargs="+", help="query images")
    q.add_argument("--top-k", type=positive_int, default=10, help="results per photo (default 10)")
    q.add_argument("--verify", nargs="?", const="nn", choices=("nn", "lightglue"),
                   help="re-rank the top hits by spatial verification (RANSAC inliers) with putative matches by nearest "
                        "neighbours (nn, the default) or by LightGlue (lightglue: ALIKED-n16 bundles, about 1 s per verified photo)")
    q.add_argument("--verify-top", type=positive_int, default=100, help="hits re-ranked by --verify (default 100)")
    q.add_argument("--expand", type=non_negative_int, default=QUERY_EXPAND,
                   help=f"query expansion: merge the query with its N best photos and search again (default {QUERY_EXPAND}; 0: off)")
    q.add_argument("--json", action="store_true", help="print results as JSON")
    q.add_argument("--threads", type=int)
    q.set_defaults(func=run)
