"""A recognition kiosk for a Raspberry Pi or a Jetson: camera frames in, exhibit announcements out.

    python examples/kiosk/kiosk.py --bundle museum.d2r --source 0            # camera 0 (OpenCV)
    python examples/kiosk/kiosk.py --bundle museum.d2r --source frames/      # a folder of images
    python examples/kiosk/kiosk.py --bundle museum.d2r --source walk.mp4     # a video file (OpenCV)
    python examples/kiosk/kiosk.py --dest /var/lib/d2r --source 0 \\
        --server http://edge:8080 --collection museum --token-file device.token \\
        --root museum.root.json --sync-every 15m                             # + sync, hot reload

Each frame is queried with spatial verification. A frame *recognises* an exhibit when the best
photo has at least ``--min-inliers`` consistent matches and ``--margin`` times more than the best
photo of another exhibit; otherwise the frame says "nothing". The kiosk *announces* an exhibit
once it has been recognised in ``--frames`` consecutive frames, and not again until something
else (another exhibit, or nothing) has been stable for as long: a visitor holding a phone still
in front of one painting gets one announcement, not thirty a second.

With ``--server`` the kiosk runs ``d2r sync`` (:class:`d2r.sync.SyncClient`) once at start and
then every ``--sync-every`` in a background thread; the bundle is used through
:class:`d2r.sync.LiveBundle`, which reopens the new version between two frames after a swap.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import d2r

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MIN_INLIERS = 25
MARGIN = 1.5
STABLE_FRAMES = 3
CAMERA_RETRIES = 50  # 0.1 s apart


# -- frames ------------------------------------------------------------------------------------------
def _opencv():
    try:
        import cv2
    except ImportError:
        raise d2r.InputError("cameras and video files need OpenCV: pip install opencv-python-headless "
                             "(or the distribution's python3-opencv); a folder of images works without it") from None
    return cv2


class BadFrames:
    """Counts frames that could not be read or queried and says so once, at the first one: a
    kiosk must keep running through a corrupt file or a garbled camera frame."""

    def __init__(self, log=None):
        self.log = log or (lambda msg: print(f"kiosk: {msg}", file=sys.stderr, flush=True))
        self.count = 0

    def skip(self, name: str, exc: Exception) -> None:
        self.count += 1
        if self.count == 1:
            self.log(f"skipping unreadable frame {name} ({exc}); further bad frames are skipped silently and counted")


def frames(source, every: int = 1, max_frames: int | None = None, bad: BadFrames | None = None):
    """Yield (name, RGB uint8 [H, W, 3]) frames from a camera index ("0"), a video file or a
    folder of images (sorted by name); every n-th frame only, at most ``max_frames``. An image
    of the folder that cannot be decoded is skipped and reported to ``bad``."""
    source = str(source)
    bad = bad if bad is not None else BadFrames()
    n = 0
    for i, (name, frame) in enumerate(_raw_frames(source, bad)):
        if i % max(int(every), 1):
            continue
        yield name, frame
        n += 1
        if max_frames is not None and n >= max_frames:
            return


def _raw_frames(source: str, bad: BadFrames):
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise d2r.InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        for p in files:
            try:
                rgb = d2r.load_image(p)
            except d2r.ImageError as exc:
                bad.skip(p.name, exc)
                continue
            yield p.name, rgb
        return
    cv2 = _opencv()
    is_camera = source.isdigit()
    if not is_camera and not path.is_file():
        raise d2r.InputError(f"{source}: not a camera index, a video file or a folder of images")
    cap = cv2.VideoCapture(int(source) if is_camera else str(path))
    if not cap.isOpened():
        raise d2r.InputError(f"{source}: OpenCV cannot open this {'camera' if is_camera else 'video'}")
    try:
        i = misses = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                # A camera hiccup: try again for a few seconds rather than stop the kiosk; a
                # camera gone for longer is an error the service manager should see (and restart).
                misses += 1
                if is_camera and misses < CAMERA_RETRIES:
                    time.sleep(0.1)
                    continue
                if is_camera:
                    raise d2r.InputError(f"camera {source}: no frame for {CAMERA_RETRIES * 0.1:.0f} s")
                return
            misses = 0
            yield f"frame{i:06d}", bgr[:, :, ::-1].copy()
            i += 1
    finally:
        cap.release()


# -- recognition and debouncing ------------------------------------------------------------------
def label_of(hit) -> str:
    """What the kiosk announces for a hit: its metadata title, else its image id."""
    meta = hit.metadata if isinstance(hit.metadata, dict) else {}
    return meta.get("title") or hit.image_id


def recognise(result, min_inliers: int = MIN_INLIERS, margin: float = MARGIN):
    """The label of a verified :class:`d2r.QueryResult`, or None (not confident)."""
    if not result.hits:
        return None
    best = label_of(result.hits[0])
    inliers = result.inliers.get(result.hits[0].image_id, 0)
    other = max((result.inliers.get(h.image_id, 0) for h in result.hits if label_of(h) != best), default=0)
    return best if inliers >= min_inliers and inliers >= margin * other else None


class Debouncer:
    """Turns per-frame labels (None = nothing) into announcements.

    A value becomes *stable* after ``frames`` consecutive equal labels; :meth:`update` returns
    the label when a new non-None value becomes stable, else None. A stable None (the visitor
    left) re-arms the announcement of the same exhibit.
    """

    def __init__(self, frames: int = STABLE_FRAMES):
        if int(frames) < 1:
            raise d2r.InputError(f"frames: expected >= 1, got {frames}")
        self.frames = int(frames)
        self.stable = None
        self._last = None
        self._run = 0

    def update(self, label):
        self._run = self._run + 1 if label == self._last else 1
        self._last = label
        if self._run == self.frames and label != self.stable:
            self.stable = label
            return label
        return None


# -- sync --------------------------------------------------------------------------------------------
class Syncer:
    """Runs ``client.sync()`` every ``every`` seconds in a daemon thread; errors are logged and
    retried at the next interval (the active bundle stays in use)."""

    def __init__(self, client, every: float, log=print):
        self.client = client
        self.every = float(every)
        self.log = log
        self._stop = threading.Event()
        self._thread = None

    def sync_once(self):
        try:
            r = self.client.sync()
        except d2r.D2RError as exc:
            self.log(f"sync failed, keeping the active bundle: {exc}")
            return None
        if r.method != "none":
            self.log(f"synced version {r.version} ({r.method}, {r.downloaded} bytes)")
        return r

    def start(self):
        def loop():
            while not self._stop.wait(self.every):
                self.sync_once()

        self._thread = threading.Thread(target=loop, name="d2r-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.client.timeout + 5 if hasattr(self.client, "timeout") else 35)


@dataclass
class Announcement:
    frame: str
    label: str
    image_id: str
    inliers: int
    description: str | None = None
    bundle_version: str | None = None


class Kiosk:
    """The loop: ``engine`` answers queries (a :class:`d2r.Engine` or a
    :class:`d2r.sync.LiveBundle`); :meth:`step` takes one frame, :meth:`run` a stream of them."""

    def __init__(self, engine, min_inliers: int = MIN_INLIERS, margin: float = MARGIN, stable_frames: int = STABLE_FRAMES, verify_top: int = 5,
                 bad: BadFrames | None = None):
        self.engine = engine
        self.bad = bad if bad is not None else BadFrames()
        self.min_inliers = int(min_inliers)
        self.margin = float(margin)
        self.debouncer = Debouncer(stable_frames)
        self.verify_top = int(verify_top)

    def step(self, name: str, frame):
        """Recognise one frame; returns an :class:`Announcement` or None."""
        # expand=0, normalize=False: decided on the verified top's inliers, as the museum guide (see its query()).
        res = self.engine.query(frame, top_k=self.verify_top, verify=True, verify_top=self.verify_top, expand=0, normalize=False)
        label = recognise(res, self.min_inliers, self.margin)
        said = self.debouncer.update(label)
        if said is None:
            return None
        hit = res.hits[0]
        meta = hit.metadata if isinstance(hit.metadata, dict) else {}
        version = getattr(self.engine, "version_path", None)
        return Announcement(name, said, hit.image_id, hit.inliers or 0, meta.get("description"),
                            version.name if version is not None else None)

    def run(self, stream, on_announce=None) -> list:
        """Run over ``stream`` of (name, frame); returns the announcements made."""
        said = []
        for name, frame in stream:
            try:
                a = self.step(name, frame)
            except d2r.ImageError as exc:  # an unusable frame (empty, wrong shape): skip it
                self.bad.skip(name, exc)
                continue
            if a is not None:
                said.append(a)
                if on_announce is not None:
                    on_announce(a)
        return said


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", help="a bundle folder (d2r build / examples/museum_guide/build.py)")
    where.add_argument("--dest", help="a sync destination (DEST/current is the active bundle); hot reload")
    ap.add_argument("--source", default="0", help="camera index, video file or folder of images (default camera 0)")
    ap.add_argument("--every", type=int, default=1, help="query every n-th frame (a Pi 4 does about 3 queries a second)")
    ap.add_argument("--max-frames", type=int, help="stop after this many queried frames")
    ap.add_argument("--frames", type=int, default=STABLE_FRAMES, help=f"consecutive agreeing frames before announcing (default {STABLE_FRAMES})")
    ap.add_argument("--min-inliers", type=int, default=MIN_INLIERS)
    ap.add_argument("--margin", type=float, default=MARGIN)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="one JSON object per announcement")
    s = ap.add_argument_group("sync (with --dest)")
    s.add_argument("--server", help="edge server URL")
    s.add_argument("--collection")
    s.add_argument("--token-file", help="file holding the device token (d2r device add)")
    s.add_argument("--root", help="the collection's TUF root (COLLECTION.root.json from d2r collection create), provisioned")
    s.add_argument("--sync-every", default="15m", help="sync interval (30s, 15m, 2h; default 15m)")
    args = ap.parse_args(argv)

    def log(msg):
        print(f"kiosk: {msg}", file=sys.stderr, flush=True)

    def announce(a):
        if args.json:
            print(json.dumps(a.__dict__, ensure_ascii=False), flush=True)
        else:
            print(f"[{a.frame}] {a.label}" + (f": {a.description}" if a.description else "") + f"  ({a.inliers} inliers)", flush=True)

    syncer = None
    try:
        if args.bundle:
            engine = d2r.Engine.open(args.bundle, threads=args.threads, warm_up=True)
        else:
            from d2r.cli.common import parse_interval
            from d2r.sync import LiveBundle, SyncClient

            if args.server:
                if not (args.collection and args.token_file and args.root):
                    raise d2r.InputError("--server needs --collection, --token-file and --root")
                token = Path(args.token_file).read_text().strip()
                client = SyncClient(args.server, args.collection, token, args.dest, args.root, log=log)
                syncer = Syncer(client, parse_interval(args.sync_every, "--sync-every"), log)
                syncer.sync_once()  # before the first frame: a fresh kiosk has no bundle yet
                syncer.start()
            engine = LiveBundle(args.dest, opener=lambda p: d2r.Engine.open(p, threads=args.threads, warm_up=True))
        bad = BadFrames(log)
        with engine:
            Kiosk(engine, args.min_inliers, args.margin, args.frames, bad=bad).run(frames(args.source, args.every, args.max_frames, bad), announce)
        if bad.count:
            log(f"{bad.count} unreadable frame(s) skipped")
    except KeyboardInterrupt:
        pass
    except (d2r.D2RError, OSError) as exc:
        print(f"kiosk: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if syncer is not None:
            syncer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
