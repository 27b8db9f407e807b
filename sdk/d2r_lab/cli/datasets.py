"""``d2r datasets download | mini``: Revisited Oxford / Paris, and the 640 px subset we evaluate on."""

from __future__ import annotations

from ..datasets import DATASETS, download, make_mini, read_sha256sums


def cmd_download(args) -> int:
    checksums = read_sha256sums(args.checksums) if args.checksums else None
    download(args.dataset, args.dest, mirror=args.mirror, checksums=checksums,
             delete_archives=args.delete_archives, retries=args.retries)
    return 0


def cmd_mini(args) -> int:
    queries = args.queries
    if queries not in ("auto", "all", "roxford5k-mini"):
        queries = [q.strip() for q in queries.split(",") if q.strip()]
    make_mini(args.src, args.dest, size=args.size, step=args.step, negatives=args.negatives, queries=queries)
    return 0


def register(sub) -> None:
    p = sub.add_parser("datasets", help="download Revisited Oxford / Paris and make the 640 px subset (lab tool)")
    dsub = p.add_subparsers(dest="datasets_command", metavar="ACTION", required=True)
    d = dsub.add_parser("download", help="download roxford5k or rparis6k into the layout d2r eval --dataset reads")
    d.add_argument("dataset", choices=sorted(DATASETS))
    d.add_argument("--dest", required=True, help="folder to fill (created; other files in it are left alone)")
    d.add_argument("--mirror", metavar="URL", help="fetch every file as URL/<file name> instead of the official sites")
    d.add_argument("--checksums", metavar="FILE", help="expected sha256 of the files, sha256sum format (HASH  NAME)")
    d.add_argument("--delete-archives", action="store_true", help="remove DEST/downloads once converted (saves about the dataset's size)")
    d.add_argument("--retries", type=int, default=5, help="attempts to resume a dropped connection before giving up (default 5)")
    d.set_defaults(func=cmd_download)
    m = dsub.add_parser("mini", help="make the subset we evaluate on (longest side 640 px) from a downloaded dataset")
    m.add_argument("src", help="a dataset folder written by d2r datasets download")
    m.add_argument("--dest", required=True, help="new folder (must not exist or be empty)")
    m.add_argument("--size", type=int, default=640, help="longest side in pixels (default 640)")
    m.add_argument("--step", type=int, default=5, help="keep every STEP-th database image (default 5)")
    m.add_argument("--negatives", type=int, default=5, help="hard negatives added per query (default 5)")
    m.add_argument("--queries", default="auto",
                   help="all | roxford5k-mini (the 21 queries of our subset) | comma-separated names (default auto: roxford5k-mini if present, else all)")
    m.set_defaults(func=cmd_mini)
