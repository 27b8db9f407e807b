"""``d2r sync``: fetch the latest bundle of a collection (verified with TUF) and swap it in,
once or every interval (:class:`d2r.sync.SyncClient`)."""

from __future__ import annotations

import sys
import time
import urllib.parse

from ..errors import D2RError, InputError, StaleMetadataError, SyncError
from ..sync.client import SyncClient
from ..sync.destination import Destination, freshness
from .common import backoff_delays, parse_interval, resolve_token


def _cli_sync(args) -> int:
    interval = parse_interval(args.every, "--every") if args.every else None
    token = resolve_token(args.token, args.token_file, "D2R_DEVICE_TOKEN", "device token")
    if not token and not args.mirror:
        raise InputError("a device token is required: --token-file FILE, the D2R_DEVICE_TOKEN environment variable, or --token T")
    if not args.server and not args.mirror:
        raise InputError("--server URL or --mirror URL is required")
    if not args.root and not Destination(args.dest).has_trusted_root():
        raise InputError(f"{args.dest}: no trusted TUF root yet: provision the collection's root with --root COLLECTION.root.json "
                         "(written by d2r collection create)")

    def log(msg):
        print(f"d2r sync: {msg}", file=sys.stderr, flush=True)

    if args.mirror and urllib.parse.urlsplit(args.mirror).scheme.lower() != "https":
        log(f"note: mirror {args.mirror} is plain HTTP; TUF still verifies everything it serves")
    client = SyncClient(args.server, args.collection, token, args.dest, args.root, timeout=args.timeout,
                        prefer_delta=not args.no_delta, log=log, mirror=args.mirror)
    delays = None
    while True:
        try:
            r = client.sync()
            if r.method == "none":
                print(f"{args.collection}: version {r.version} is current (metadata verified {r.verified_at})", flush=True)
            else:
                print(f"{args.collection}: version {r.version} active ({r.method}, {r.downloaded} bytes"
                      f"{', previous ' + str(r.previous) if r.previous else ''})", flush=True)
            delays = None
            wait = interval if interval is not None else 0.0  # without an interval the loop ends below
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - with --every, no error ends the loop (disk full, network, ...)
            if isinstance(exc, StaleMetadataError):
                stale = "never verified" if exc.stale_seconds is None else f"{exc.stale_seconds:.0f} s stale"
                print(f"{args.collection}: STALE: version {exc.version} kept, update metadata expired ({stale})", flush=True)
            else:  # e.g. the server is unreachable: say so if the metadata verified last has expired since
                fr = freshness(args.dest)
                cur = Destination(args.dest).current
                if fr["expired"] and cur is not None:
                    print(f"{args.collection}: STALE: version {cur.name} kept, update metadata expired "
                          f"({fr['stale_seconds']:.0f} s since last verified)", flush=True)
            if interval is None:
                if isinstance(exc, D2RError):
                    raise
                raise SyncError(f"sync failed: {type(exc).__name__}: {exc}") from exc
            delays = delays or backoff_delays(interval, args.retry_first)
            wait = next(delays)
            log(f"error: {type(exc).__name__}: {exc}; the active bundle is unchanged; retrying in {wait:g} s")
        if interval is None:
            return 0
        time.sleep(wait)


def register_cli(sub) -> None:
    p = sub.add_parser("sync", help="fetch the latest bundle of a collection (verified with TUF) and swap it in atomically")
    p.add_argument("--server", default=None, help="edge server URL, e.g. https://edge.local:8443 (sync reports go there)")
    p.add_argument("--mirror", default=None, help="URL of a static copy of the collection's TUF repository (its metadata/ "
                   "and targets/ folders) to download from instead of SERVER/tuf/COLLECTION; the token is not sent to it")
    p.add_argument("--collection", required=True)
    p.add_argument("--token-file", default=None, help="file holding the device token (mode 600; keeps it out of `ps`)")
    p.add_argument("--token", default=None, help="device token from `d2r device add` (visible in `ps`: prefer --token-file "
                   "or the D2R_DEVICE_TOKEN environment variable)")
    p.add_argument("--dest", required=True, help="destination folder (DEST/current is the active bundle)")
    p.add_argument("--root", default=None, help="the collection's TUF root metadata (COLLECTION.root.json from d2r collection "
                   "create), provisioned on the device: needed on the first sync, then kept (and rotated) in DEST/tuf")
    p.add_argument("--every", default=None, help="keep running, syncing at this interval (e.g. 15m); after an error "
                   "(network, disk full, ...) it retries with exponential backoff up to the interval and never exits")
    p.add_argument("--retry-first", type=float, default=5.0, help="with --every: first retry delay in seconds after an error (default 5)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation (default 30)")
    p.add_argument("--no-delta", action="store_true", help="always download the full bundle")
    p.set_defaults(func=_cli_sync)
