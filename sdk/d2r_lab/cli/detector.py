"""``d2r detector``: a landmark detector from a photo collection, without annotation.

    d2r detector mine-boxes IMAGES -o boxes.json     # boxes by retrieval + spatial verification
    d2r detector finetune --images DIR --boxes boxes.json -o ...   # needs the [convert] extra

``mine-boxes`` is :func:`d2r_lab.mining.mine_boxes` (core install). ``finetune`` comes from
``d2r_convert.finetune`` (TensorFlow); without it the command says which extra to install.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from d2r.errors import InputError

FINETUNE_MISSING = "this command needs the converters and TensorFlow: install them with pip install -e '.[convert]' ({})"


def _cmd_mine(args) -> int:
    from .. import mining

    paths, root = mining.list_images(args.images)
    queries: list = []
    if args.queries:
        queries, _ = mining.list_images(args.queries)
    out = Path(args.output)
    if out.is_dir():
        raise InputError(f"-o {out}: is a folder, expected a .json file path")
    if not out.parent.is_dir() and str(out.parent):
        raise InputError(f"-o {out}: folder {out.parent} does not exist")
    doc = mining.mine_boxes(
        paths, queries, root=root, min_inliers=args.min_inliers, min_support=args.min_support, max_support=args.max_support, percentile=args.percentile,
        margin=args.margin, vote_fraction=args.vote_fraction, features=args.features, precision=args.precision,
        backend=args.backend, codebook=args.codebook, codebook_size=args.codebook_size, top_k=args.k,
        verify_features=args.verify_features, ratio=args.ratio, mutual=args.mutual, cache_dir=args.cache, seed=args.seed, threads=args.threads,
        progress=not args.quiet,
    )
    mining.write_boxes(doc, out)
    n_box = sum(e["box"] is not None for e in doc["images"])
    t = doc["timings"]
    print(f"{out}: boxes for {n_box} of {len(doc['images'])} images"
          + (f", {sum(e['box'] is not None for e in doc.get('queries', []))} of {len(queries)} query images" if queries else "")
          + f" ({sum(t.values()):.0f} s: features {t['features_s']:.0f}, codebook {t['codebook_s']:.0f}, "
            f"index {t['index_s']:.0f}, verification {t['verification_s']:.0f})")
    return 0


def _finetune_module():
    try:
        from d2r_convert import finetune
    except ImportError as exc:
        return None, str(exc)
    return finetune, None


def _cmd_finetune(finetune):
    def run(args) -> int:
        # TensorFlow is imported inside the training code; check for it first so that a core
        # install gets the message below rather than an ImportError deep in a run.
        if importlib.util.find_spec("tensorflow") is None:
            return _cmd_finetune_missing("TensorFlow is not installed")(args)
        return int(finetune.cmd_finetune(args) or 0)

    return run


def _cmd_finetune_missing(reason):
    def run(args) -> int:
        print(f"d2r detector finetune: error: {FINETUNE_MISSING.format(reason)}", file=sys.stderr)
        return 1

    return run


def register_cli(sub) -> None:
    d = sub.add_parser("detector", help="landmark detector from a photo collection: mine boxes, fine-tune the SSD")
    dsub = d.add_subparsers(dest="detector_command", metavar="COMMAND")
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])

    m = dsub.add_parser("mine-boxes", help="one box per image: what it shares with its verified neighbours (ASMK* + affine RANSAC)")
    m.add_argument("images", metavar="IMAGES", help="folder of images (recursive) or a list file (one path a line)")
    m.add_argument("-o", "--output", required=True, help="boxes.json to write (atomically)")
    m.add_argument("--queries", help="folder or list of images outside the collection: boxes mined against it (in 'queries')")
    m.add_argument("-k", type=int, default=20, help="neighbours retrieved and verified per image (default 20)")
    m.add_argument("--min-inliers", type=int, default=25, help="inliers for a neighbour to support a box (default 25)")
    m.add_argument("--min-support", type=int, default=1, help="no box unless this many neighbours support it (default 1)")
    m.add_argument("--max-support", type=int, default=10, help="vote with the best-verified N supporting neighbours (default 10)")
    m.add_argument("--percentile", type=float, default=2.0, help="robust inlier extent: percentiles p and 100-p (default 2)")
    m.add_argument("--margin", type=float, default=0.05, help="grow each extent by this fraction of its side (default 0.05)")
    m.add_argument("--vote-fraction", type=float, default=0.3, help="box = cells covered by this fraction of the votes (default 0.3)")
    m.add_argument("--features", default="xfeat", help="local feature model of models/manifest.json (default xfeat)")
    m.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"])
    m.add_argument("--backend", default="tflite", choices=["tflite", "onnx"])
    g = m.add_mutually_exclusive_group()
    g.add_argument("--codebook", help="codebook file trained elsewhere")
    g.add_argument("--codebook-size", type=int, default=1024, help="train a codebook of K words on the collection (default 1024)")
    m.add_argument("--ratio", type=float, help="Lowe's ratio test on putative matches (default: off)")
    m.add_argument("--no-mutual", dest="mutual", action="store_false", help="allow many-to-one putative matches (default: mutual nearest neighbours)")
    m.add_argument("--verify-features", type=int, default=1000, help="strongest features per image used for verification (default 1000)")
    m.add_argument("--cache", help="feature cache folder, shared with d2r eval (default ~/.cache/d2r/eval)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int)
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=_cmd_mine)

    finetune, reason = _finetune_module()
    help_text = "fine-tune the MobileNet-V2 SSD on mined boxes (needs the [convert] extra)"
    if finetune is None:
        # Accept any arguments (no option prefix: "--images" is just a word here) so that the
        # user sees which extra to install rather than an argparse complaint.
        f = dsub.add_parser("finetune", help=help_text, prefix_chars="\x01", add_help=False)
        f.add_argument("rest", nargs="*")
        f.set_defaults(func=_cmd_finetune_missing(reason))
    else:
        f = dsub.add_parser("finetune", help=help_text)
        finetune.add_finetune_arguments(f)
        f.set_defaults(func=_cmd_finetune(finetune))
