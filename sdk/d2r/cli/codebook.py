"""``d2r codebook train DESCRIPTORS.npy -o CODEBOOK``: k-means visual words from descriptors."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ._types import positive_int


def train(args) -> int:
    import numpy as np

    from ..codebook import Codebook
    from ..errors import InputError

    path = Path(args.descriptors)
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read descriptors (.npy float32 [N, D]): {exc}") from exc

    def report(it, total, moved):
        print(f"iteration {it}/{total}: {moved:.2%} of descriptors changed word", file=sys.stderr)

    t0 = time.perf_counter()
    cb = Codebook.train(x, size=args.size, iterations=args.iterations, seed=args.seed, progress=report)
    if args.coarse:
        cb.build_coarse()
    cb.save(args.output)
    print(f"wrote {args.output}: K={cb.size} D={cb.dim} in {time.perf_counter() - t0:.1f} s, sha256 {cb.checksum}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("codebook", help="train visual-word codebooks")
    csub = p.add_subparsers(dest="codebook_command", metavar="ACTION", required=True)
    t = csub.add_parser("train", help="k-means codebook from a .npy file of float32 [N, D] descriptors")
    t.add_argument("descriptors", help=".npy file with float32 [N, D] local descriptors")
    t.add_argument("--size", type=positive_int, default=1024, help="number of visual words K (default 1024)")
    t.add_argument("--iterations", type=positive_int, default=20)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--coarse", action="store_true", help="also build the two-level structure for approximate assignment")
    t.add_argument("-o", "--output", required=True, help="codebook file to write")
    t.set_defaults(func=train)
