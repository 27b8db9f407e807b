"""Visitor side: a photo of an exhibit -> its title and description, fully offline.

    python examples/museum_guide/guide.py PHOTO [PHOTO ...] [--bundle museum.d2r] [--json]

The photo may be cluttered (other things around the exhibit), partial (cropped) or tilted:
local features match whatever part of the exhibit is visible, and spatial verification (an
affine RANSAC between the photo and the best candidates) confirms the match. The guide names
an exhibit only when its best photo has at least ``--min-inliers`` geometrically consistent
matches *and* ``--margin`` times more than the best photo of any other exhibit; otherwise it
answers "not recognised" rather than a wrong exhibit.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import d2r

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = HERE.parent / "out" / "museum.d2r"
# On the sample collection (500 verification features a photo): photos of an indexed exhibit
# mostly give 30-400 inliers (one weak photo 15) with the best other exhibit at 5-22; photos of
# objects that are not in the collection gave at most 20, with a runner-up close behind.
MIN_INLIERS = 25
MARGIN = 1.5


@dataclass
class Answer:
    """What the guide says about one photo; ``title`` is None when nothing was recognised."""

    photo: str
    title: str | None
    description: str | None
    image_id: str | None
    inliers: int
    score: float
    ms: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Guide:
    """Answers photos against one bundle (open once, ask many times; use as a context manager)."""

    def __init__(self, bundle=DEFAULT_BUNDLE, min_inliers: int = MIN_INLIERS, margin: float = MARGIN, threads: int | None = 2):
        self.engine = d2r.Engine.open(bundle, threads=threads)
        self.min_inliers = int(min_inliers)
        self.margin = float(margin)

    def ask(self, photo) -> Answer:
        """Photo (path, bytes, array or PIL image) -> :class:`Answer`."""
        res = self.engine.query(photo, top_k=10, verify=True, verify_top=10)
        ms = res.timings["total"]
        if not res.hits:
            return Answer(str(photo), None, None, None, 0, 0.0, ms)
        # Hits come sorted by inliers; an exhibit has several photos, so the runner-up is the
        # best photo of a *different* exhibit.
        best = res.hits[0]
        meta = best.metadata or {}
        inliers = best.inliers or 0
        other = max((h.inliers or 0 for h in res.hits if (h.metadata or {}).get("title") != meta.get("title")), default=0)
        if inliers < self.min_inliers or inliers < self.margin * other:
            return Answer(str(photo), None, None, best.image_id, inliers, best.score, ms)
        return Answer(str(photo), meta.get("title"), meta.get("description"), best.image_id, inliers, best.score, ms)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", nargs="+", help="visitor photos")
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle written by build.py")
    ap.add_argument("--min-inliers", type=int, default=MIN_INLIERS, help=f"verified matches needed to name an exhibit (default {MIN_INLIERS})")
    ap.add_argument("--margin", type=float, default=MARGIN, help=f"inliers over the best other exhibit's needed (default {MARGIN})")
    ap.add_argument("--json", action="store_true", help="one JSON object per photo")
    args = ap.parse_args(argv)
    try:
        with Guide(args.bundle, args.min_inliers, args.margin) as guide:
            for photo in args.photos:
                a = guide.ask(photo)
                if args.json:
                    print(json.dumps(a.to_json(), ensure_ascii=False))
                elif a.title is None:
                    print(f"{photo}: not recognised (best match {a.image_id}, {a.inliers} inliers)")
                else:
                    print(f"{photo}: {a.title}\n    {a.description}\n    ({a.image_id}, {a.inliers} inliers, {a.ms:.0f} ms)")
    except d2r.D2RError as exc:
        print(f"guide.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
