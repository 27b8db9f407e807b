"""Operator commands: ``d2r serve``, ``d2r keygen``, ``d2r collection create|rotate``, ``d2r publish``,
``d2r version list|delete``, ``d2r device add|list|revoke``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2r.errors import InputError

ADMIN_TOKEN_ENV = "D2R_ADMIN_TOKEN"


def _admin_token(args, required: bool = True) -> str:
    """The admin token from --admin-token-file/--token-file (warned if group/world-readable), the
    D2R_ADMIN_TOKEN environment variable, or --token (visible in `ps`: warned)."""
    from d2r.cli.common import resolve_token

    path = getattr(args, "admin_token_file", None) or getattr(args, "token_file", None)
    token = resolve_token(getattr(args, "token", None), path, ADMIN_TOKEN_ENV, "admin token")
    if required and not token:
        raise InputError(f"the admin token is required: --token-file FILE (mode 600), the {ADMIN_TOKEN_ENV} environment "
                         "variable, or --token T")
    if token is not None and len(token) < 16:
        raise InputError(f"{path or ADMIN_TOKEN_ENV}: the admin token must be at least 16 characters")
    return token


def _cli_serve(args) -> int:
    import threading

    import waitress

    from d2r.cli.common import parse_interval

    from .app import create_app
    from .serving import waitress_options

    if args.public_key:
        raise InputError("--public-key is gone: each collection's TUF root names its publisher keys (d2r collection create); "
                         "every publish is verified against them")
    if args.keep is not None and args.keep < 1:
        raise InputError(f"--keep: expected a number of versions >= 1, got {args.keep}")
    ts = parse_interval(args.timestamp_expiry, "--timestamp-expiry")
    config = {"DATA_DIR": args.data, "ADMIN_TOKEN": _admin_token(args),
              "MAX_BUNDLE_BYTES": int(args.max_bundle_mb * 1024 * 1024), "KEEP_VERSIONS": args.keep,
              "TIMESTAMP_EXPIRY": ts, "SNAPSHOT_EXPIRY": max(7 * 86400, 2 * ts), "DELTAS_EXPIRY": max(7 * 86400, 2 * ts)}
    try:
        app = create_app(config)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    options = waitress_options(config["MAX_BUNDLE_BYTES"], threads=args.threads, connection_limit=args.connection_limit,
                               idle_timeout=args.idle_timeout)
    storage, repos = app.extensions["d2r_storage"], app.extensions["d2r_repos"]

    def refresher():  # keep timestamp.json fresh on disk too (mirrors copy the folder)
        while True:
            for c in storage.collections():
                try:
                    with storage.publish_lock:
                        repos(c["name"]).refresh_if_needed()
                except Exception as exc:  # noqa: BLE001 - logged, retried next round
                    print(f"d2r serve: cannot refresh the metadata of {c['name']}: {exc}", file=sys.stderr, flush=True)
            threading.Event().wait(max(1.0, min(ts / 4, 600.0)))

    threading.Thread(target=refresher, name="d2r-tuf-refresh", daemon=True).start()
    limits = (f"up to {options['connection_limit']} connections, idle ones closed after {options['channel_timeout']} s; "
              f"TUF timestamps valid {ts:g} s")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert and --tls-key go together (PEM certificate chain and its private key)")
    if args.tls_cert:
        from .serving import TLSFront

        # waitress on a loopback port of its own; the TLS front on the public address.
        inner = waitress.create_server(app, host="127.0.0.1", port=0, url_scheme="https", **options)
        try:
            front = TLSFront(args.host, args.port, args.tls_cert, args.tls_key, inner.effective_port,
                             options["connection_limit"], args.idle_timeout)
        except InputError as exc:
            raise InputError(f"--tls-cert / --tls-key: {exc}") from None
        front.serve_forever_in_thread()
        print(f"d2r serve: data {args.data}, listening on https://{args.host}:{args.port} ({limits})",
              file=sys.stderr, flush=True)
        inner.run()
        return 0
    print(f"d2r serve: data {args.data}, listening on http://{args.host}:{args.port} ({limits})", file=sys.stderr, flush=True)
    proxy = {}
    if args.trusted_proxy:  # TLS terminated by a reverse proxy in front (docs/sync-protocol.md)
        proxy = {"trusted_proxy": args.trusted_proxy, "trusted_proxy_headers": {"x-forwarded-proto", "x-forwarded-for"}}
    waitress.serve(app, host=args.host, port=args.port, **options, **proxy)
    return 0


def _cli_keygen(args) -> int:
    from d2r.bundle.keys import generate_keypair

    priv, pub = generate_keypair(args.output)
    print(f"private key: {priv} (keep it secret: a root key offline, a targets key with the publisher)\n"
          f"public key:  {pub}")
    return 0


def _cli_collection(args) -> int:
    from .client import AdminClient

    client = AdminClient(args.server, _admin_token(args))
    out = Path(args.out or f"{args.name}.root.json")
    if out.exists() and not args.force:
        raise InputError(f"{out}: exists already; not overwriting (--force, or another --out)")
    if args.action == "create":
        if not args.root_key or not args.targets_key:
            raise InputError("collection create: --root-key KEY (repeatable) and --targets-key KEY (private keys) required")
        client.create_collection(args.name, args.root_key, args.targets_key, root_threshold=args.root_threshold, out=out)
        print(f"collection {args.name} created; provision devices with {out} (d2r sync --root {out})")
    else:
        if not args.root_key:
            raise InputError("collection rotate: --root-key KEY (the current root keys, to sign the new root) required")
        raw = client.rotate_root(args.name, args.root_key, args.new_root_key or None, args.root_threshold_new,
                                 args.new_targets_key, out=out)
        import json

        print(f"collection {args.name}: root version {json.loads(raw)['signed']['version']} in force (devices follow it "
              f"by TUF's rules); written to {out}")
    return 0


def _cli_publish(args) -> int:
    from .client import AdminClient

    rec = AdminClient(args.server, _admin_token(args)).publish(args.bundle, args.collection, args.signing_key, keep=args.keep)
    print(f"{rec['collection']}: version {rec['version']} published ({rec['archive_size']} bytes, "
          f"{rec['n_images']} images, sha256 {rec['archive_sha256'][:16]}...)")
    return 0


def _cli_device(args) -> int:
    from .client import AdminClient

    client = AdminClient(args.server, _admin_token(args))
    if args.action == "add":
        rec = client.add_device(args.collection, name=args.name)
        print(rec["token"])
        print(f"device {rec['id']} ({rec['name']}) may sync {', '.join(rec['collections'])}; the token is shown once",
              file=sys.stderr)
    elif args.action == "list":
        for d in client.devices():
            state = f"revoked {d['revoked']}" if d["revoked"] else "active"
            print(f"{d['id']}  {d['name']}  {','.join(d['collections'])}  {state}  last sync {d['last_sync'] or 'never'}"
                  f"{' v' + str(d['last_version']) if d['last_version'] else ''}")
    else:
        if not args.id:
            raise InputError("device revoke: --id DEVICE_ID required (see d2r device list)")
        client.revoke_device(args.id)
        print(f"device {args.id} revoked")
    return 0


def _cli_version(args) -> int:
    from .client import AdminClient

    client = AdminClient(args.server, _admin_token(args))
    if args.action == "list":
        for v in client.versions(args.collection):
            print(f"{v['version']}  {v['n_images']} images  {v['archive_size']} bytes  {v['created']}")
        return 0
    if args.version is None or not args.signing_key:
        raise InputError("version delete: --version N and --signing-key TARGETS.key required (see d2r version list)")
    rec = client.delete_version(args.collection, args.version, args.signing_key)
    print(f"{args.collection}: version {rec['deleted']} deleted; latest is now "
          f"{rec['latest'] if rec['latest'] is not None else 'none'}")
    return 0


def _admin_token_args(p) -> None:
    p.add_argument("--token-file", default=None, help="file holding the admin token (mode 600)")
    p.add_argument("--token", default=None, help=f"admin token (visible in `ps`: prefer --token-file or {ADMIN_TOKEN_ENV})")


def register_cli(sub) -> None:
    p = sub.add_parser("serve", help="run the edge server (waitress) on a data folder")
    p.add_argument("--data", required=True, help="data folder (created): bundles and the SQLite database")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--admin-token-file", default=None,
                   help=f"file holding the admin token (>= 16 characters, mode 600); or set {ADMIN_TOKEN_ENV}")
    p.add_argument("--public-key", action="append", default=[], help=argparse.SUPPRESS)  # gone: an error says why
    p.add_argument("--keep", type=int, default=None,
                   help="at most N versions per collection: a publish whose signed targets list more is refused "
                        "(d2r publish --keep N drops the oldest; their files are deleted)")
    p.add_argument("--timestamp-expiry", default="24h",
                   help="lifetime of the TUF timestamp the server signs (default 24h; re-signed at half-life): how soon "
                        "devices notice a frozen server or mirror")
    p.add_argument("--idle-timeout", type=float, default=20.0, help="seconds before an idle connection is closed (default 20)")
    p.add_argument("--connection-limit", type=int, default=1000, help="simultaneous connections (default 1000)")
    p.add_argument("--max-bundle-mb", type=float, default=2048.0, help="publish size limit in MiB (default 2048)")
    p.add_argument("--threads", type=int, default=16, help="worker threads (default 16)")
    p.add_argument("--trusted-proxy", default=None, help="address of a TLS-terminating reverse proxy to trust")
    p.add_argument("--tls-cert", default=None, help="serve HTTPS: PEM certificate (chain) file")
    p.add_argument("--tls-key", default=None, help="serve HTTPS: PEM private key of --tls-cert")
    p.set_defaults(func=_cli_serve)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair (KEYFILE, KEYFILE.pub) for a TUF role (root, targets)")
    p.add_argument("-o", "--output", required=True, help="private key file; the public key goes to OUTPUT.pub")
    p.set_defaults(func=_cli_keygen)

    p = sub.add_parser("collection", help="create a collection (its TUF root) or rotate its keys")
    p.add_argument("action", choices=["create", "rotate"])
    p.add_argument("name")
    p.add_argument("--server", required=True)
    _admin_token_args(p)
    p.add_argument("--root-key", action="append", default=[],
                   help="root private key (repeatable): create: the new root's keys; rotate: the current ones, which sign")
    p.add_argument("--root-threshold", type=int, default=1, help="create: how many root keys must sign (default 1)")
    p.add_argument("--targets-key", default=None, help="create: the targets private key (the publisher's, d2r publish --signing-key)")
    p.add_argument("--new-root-key", action="append", default=[], help="rotate: the new root private keys (repeatable)")
    p.add_argument("--root-threshold-new", type=int, default=None, help="rotate: the new root threshold")
    p.add_argument("--new-targets-key", default=None, help="rotate: the new targets private key (the targets in force are re-signed)")
    p.add_argument("--out", default=None, help="where to write the root metadata for devices (default NAME.root.json)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=_cli_collection)

    p = sub.add_parser("publish", help="publish a bundle as a new version of a collection (signed TUF targets)")
    p.add_argument("bundle", help="bundle folder (NAME.d2r)")
    p.add_argument("--server", required=True)
    p.add_argument("--collection", required=True)
    _admin_token_args(p)
    p.add_argument("--signing-key", required=True, help="the collection's targets private key (d2r keygen)")
    p.add_argument("--keep", type=int, default=None, help="keep the newest N versions in the signed targets; older ones are deleted")
    p.set_defaults(func=_cli_publish)

    p = sub.add_parser("device", help="register (add), list or revoke devices")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("--server", required=True)
    _admin_token_args(p)
    p.add_argument("--collection", action="append", default=[], help="collection the device may sync (repeatable)")
    p.add_argument("--name", default="device", help="a name for the status page")
    p.add_argument("--id", default=None, help="device id (revoke)")
    p.set_defaults(func=_cli_device)

    p = sub.add_parser("version", help="list the versions of a collection, or delete (yank) one")
    p.add_argument("action", choices=["list", "delete"])
    p.add_argument("--server", required=True)
    p.add_argument("--collection", required=True)
    p.add_argument("--version", type=int, default=None, help="version number (delete)")
    p.add_argument("--signing-key", default=None, help="delete: the collection's targets private key")
    _admin_token_args(p)
    p.set_defaults(func=_cli_version)
