"""Visitor side: a photo of an exhibit -> its title and description, fully offline.

    python examples/museum_guide/guide.py PHOTO [PHOTO ...] [--bundle museum.d2r] [--json] [--accurate]

The photo may be cluttered (other things around the exhibit), partial (cropped) or tilted:
local features match whatever part of the exhibit is visible, and spatial verification (an
affine RANSAC between the photo and the best candidates) confirms the match. The guide names
an exhibit only when its best photo has at least ``--min-inliers`` geometrically consistent
matches *and* ``--margin`` times more than the best photo of any other exhibit; otherwise it
answers "not recognised" rather than a wrong exhibit.

Two settings, chosen by the bundle: an XFeat bundle (``build.py``) is verified with the
nearest-neighbour matcher, its 10 best candidates, a few ms each; an ALIKED-n16 bundle
(``build.py --accurate``) with LightGlue's matches (``verify="lightglue"``, the accurate
setting), its 5 best candidates, about 300 ms of CPU each. ``--accurate`` insists on the
accurate setting (an error for a bundle that cannot do it). Each setting has its own thresholds.
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
# The fast setting (XFeat, nearest-neighbour matches). On the sample collection (500
# verification features a photo): photos of an indexed exhibit mostly give 30-400 inliers (one
# weak photo 15) with the best other exhibit at 5-22; photos of objects that are not in the
# collection gave at most 20, with a runner-up close behind.
MIN_INLIERS = 25
MARGIN = 1.5
VERIFY_TOP = 10
# The accurate setting (ALIKED-n16, LightGlue's matches; build.py --accurate). LightGlue's
# shipped weights read ALIKED-n16's 128-D descriptors, so only such a bundle can use it.
ACCURATE_FEATURES = "aliked_n16"
# On the sample (benchmarks/bench_museum_guide.py, 512 verification features a photo, top 5
# verified): photos of an indexed exhibit, untouched, cropped, rotated or cut out among clutter,
# gave 31-332 inliers, the true one at least 2.85 times the best other exhibit (at most 29),
# except the toy box (at most 17) and a tight crop of the tin box whose photos ranked below the
# top 5 (0); 24 photos of 6 objects that are not in the collection gave at most 19 inliers with
# a runner-up at 5-12 (up to 3.2 times less: the minimum, not the margin, declines them).
# Hence 25, midway between 19 and 31, and 2.0, well under 2.85.
ACCURATE_MIN_INLIERS = 25
ACCURATE_MARGIN = 2.0
ACCURATE_VERIFY_TOP = 5  # LightGlue costs about 300 ms of CPU per verified candidate


@dataclass
class Answer:
    """What the guide says about one photo; ``title`` is None when nothing was recognised.

    ``image_id`` and ``inliers``: the best verified photo (also when declined); ``runner_up``:
    the inliers of the best photo of any other exhibit; ``matcher``: ``nn`` or ``lightglue``.
    """

    photo: str
    title: str | None
    description: str | None
    image_id: str | None
    inliers: int
    score: float
    ms: float
    runner_up: int = 0
    matcher: str = "nn"

    def to_json(self) -> dict:
        return dict(self.__dict__)


class Guide:
    """Answers photos against one bundle (open once, ask many times; use as a context manager).

    accurate: None (default) picks the setting from the bundle: LightGlue for an ALIKED-n16
    bundle (``build.py --accurate``), nearest neighbours otherwise; True insists on LightGlue
    (:class:`d2r.InputError` naming the bundle if it was not built for it); False always uses
    nearest neighbours. min_inliers, margin: None takes the chosen setting's calibrated values.
    """

    def __init__(self, bundle=DEFAULT_BUNDLE, min_inliers: int | None = None, margin: float | None = None, threads: int | None = 2,
                 accurate: bool | None = None):
        if accurate not in (None, True, False):
            raise d2r.InputError(f"accurate: expected None, True or False, got {accurate!r}")
        self.engine = d2r.Engine.open(bundle, threads=threads)
        try:
            features = self.engine.config.features
            if accurate and features != ACCURATE_FEATURES:
                raise d2r.InputError(f"{bundle}: the accurate setting (LightGlue) needs a bundle of {ACCURATE_FEATURES} features "
                                     f"(build it with build.py --accurate); this one has {features} features")
            self.accurate = features == ACCURATE_FEATURES if accurate is None else accurate
        except BaseException:
            self.engine.close()
            raise
        self.matcher = "lightglue" if self.accurate else "nn"
        self.verify_top = ACCURATE_VERIFY_TOP if self.accurate else VERIFY_TOP
        self.min_inliers = int((ACCURATE_MIN_INLIERS if self.accurate else MIN_INLIERS) if min_inliers is None else min_inliers)
        self.margin = float((ACCURATE_MARGIN if self.accurate else MARGIN) if margin is None else margin)

    def ask(self, photo) -> Answer:
        """Photo (path, bytes, array or PIL image) -> :class:`Answer`."""
        return self.answer(photo, self.query(photo))

    def query(self, photo) -> "d2r.QueryResult":
        """The verified ranking the guide decides on (top 10, the setting's matcher and top N verified)."""
        # No query expansion: the guide decides on the inliers of its verified top photos, and
        # its thresholds were set on the un-expanded top (in a collection of a few photos per
        # exhibit, the expanded query also brings other exhibits' photos into the verified set).
        # Un-normalised scores for the same reason: the thresholds were set on that ranking.
        return self.engine.query(photo, top_k=10, verify=self.matcher, verify_top=self.verify_top, expand=0, normalize=False)

    def answer(self, photo, res) -> Answer:
        """The guide's decision on a photo's :meth:`query` result."""
        ms = res.timings["total"]
        if not res.hits:
            return Answer(str(photo), None, None, None, 0, 0.0, ms, 0, self.matcher)
        # Hits come sorted by inliers; an exhibit has several photos, so the runner-up is the
        # best photo of a *different* exhibit.
        best = res.hits[0]
        meta = best.metadata or {}
        inliers = best.inliers or 0
        other = max((h.inliers or 0 for h in res.hits if (h.metadata or {}).get("title") != meta.get("title")), default=0)
        if inliers < self.min_inliers or inliers < self.margin * other:
            return Answer(str(photo), None, None, best.image_id, inliers, best.score, ms, other, self.matcher)
        return Answer(str(photo), meta.get("title"), meta.get("description"), best.image_id, inliers, best.score, ms, other, self.matcher)

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
    ap.add_argument("--min-inliers", type=int, default=None,
                    help=f"verified matches needed to name an exhibit (default {MIN_INLIERS}; accurate setting {ACCURATE_MIN_INLIERS})")
    ap.add_argument("--margin", type=float, default=None,
                    help=f"inliers over the best other exhibit's needed (default {MARGIN}; accurate setting {ACCURATE_MARGIN})")
    ap.add_argument("--accurate", action="store_true", default=None,
                    help="verify with LightGlue (needs a bundle from build.py --accurate; the default for such a bundle)")
    ap.add_argument("--json", action="store_true", help="one JSON object per photo")
    args = ap.parse_args(argv)
    try:
        with Guide(args.bundle, args.min_inliers, args.margin, accurate=args.accurate) as guide:
            for photo in args.photos:
                a = guide.ask(photo)
                if args.json:
                    print(json.dumps(a.to_json(), ensure_ascii=False))
                elif a.title is None:
                    print(f"{photo}: not recognised (best match {a.image_id}, {a.inliers} inliers)")
                else:
                    matcher = ", LightGlue" if a.matcher == "lightglue" else ""
                    print(f"{photo}: {a.title}\n    {a.description}\n    ({a.image_id}, {a.inliers} inliers{matcher}, {a.ms:.0f} ms)")
    except d2r.D2RError as exc:
        print(f"guide.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
