"""Operator commands: ``d2r serve``, ``d2r keygen``, ``d2r publish``, ``d2r device add|list|revoke``."""

from __future__ import annotations

import sys
from pathlib import Path

from d2r.errors import InputError


ADMIN_TOKEN_ENV = "D2R_ADMIN_TOKEN"


def _admin_token(args, required: bool = True) -> str:
    """The admin token from --admin-token-file/--token-file (warned if group/world-readable), the
    D2R_ADMIN_TOKEN environment variable, or --token (visible in `ps`: warned)."""
    from d2r.sync import resolve_token

    path = getattr(args, "admin_token_file", None) or getattr(args, "token_file", None)
    token = resolve_token(getattr(args, "token", None), path, ADMIN_TOKEN_ENV, "admin token")
    if required and not token:
        raise InputError(f"the admin token is required: --token-file FILE (mode 600), the {ADMIN_TOKEN_ENV} environment "
                         "variable, or --token T")
    if token is not None and len(token) < 16:
        raise InputError(f"{path or ADMIN_TOKEN_ENV}: the admin token must be at least 16 characters")
    return token


def _cli_serve(args) -> int:
    import waitress

    from .app import create_app
    from .serving import waitress_options

    if not args.public_key:
        raise InputError("--public-key KEYFILE.pub is required: the server verifies every publish against the "
                         "publisher's key (make one with d2r keygen); it does not start without one")
    if args.keep is not None and args.keep < 1:
        raise InputError(f"--keep: expected a number of versions >= 1, got {args.keep}")
    config = {"DATA_DIR": args.data, "ADMIN_TOKEN": _admin_token(args),
              "MAX_BUNDLE_BYTES": int(args.max_bundle_mb * 1024 * 1024), "PUBLISHER_PUBLIC_KEY": args.public_key,
              "KEEP_VERSIONS": args.keep}
    try:
        app = create_app(config)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if args.keep:  # versions published before --keep was given
        storage = app.extensions["d2r_storage"]
        for c in storage.collections():
            storage.keep_latest(c["name"], args.keep)
    options = waitress_options(config["MAX_BUNDLE_BYTES"], threads=args.threads, connection_limit=args.connection_limit,
                               idle_timeout=args.idle_timeout)
    print(f"d2r serve: data {args.data}, listening on http://{args.host}:{args.port} "
          f"(up to {options['connection_limit']} connections, idle ones closed after {options['channel_timeout']} s)",
          file=sys.stderr, flush=True)
    proxy = {}
    if args.trusted_proxy:  # TLS terminated by a reverse proxy in front (docs/sync-protocol.md)
        proxy = {"trusted_proxy": args.trusted_proxy, "trusted_proxy_headers": {"x-forwarded-proto", "x-forwarded-for"}}
    waitress.serve(app, host=args.host, port=args.port, **options, **proxy)
    return 0


def _cli_keygen(args) -> int:
    from d2r.sync import generate_keypair

    priv, pub = generate_keypair(args.output)
    print(f"private key: {priv} (keep it secret; it signs bundles)\npublic key:  {pub} (pin it on devices)")
    return 0


def _cli_publish(args) -> int:
    from .client import AdminClient

    rec = AdminClient(args.server, _admin_token(args)).publish(args.bundle, args.collection, args.signing_key)
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
    if args.version is None:
        raise InputError("version delete: --version N required (see d2r version list)")
    rec = client.delete_version(args.collection, args.version)
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
    p.add_argument("--public-key", action="append", default=[],
                   help="publisher public key (KEYFILE.pub from d2r keygen; repeatable): every publish must verify with one")
    p.add_argument("--keep", type=int, default=None, help="keep the newest N versions of each collection, delete the others")
    p.add_argument("--idle-timeout", type=float, default=20.0, help="seconds before an idle connection is closed (default 20)")
    p.add_argument("--connection-limit", type=int, default=1000, help="simultaneous connections (default 1000)")
    p.add_argument("--max-bundle-mb", type=float, default=2048.0, help="publish size limit in MiB (default 2048)")
    p.add_argument("--threads", type=int, default=16, help="worker threads (default 16)")
    p.add_argument("--trusted-proxy", default=None, help="address of a TLS-terminating reverse proxy to trust")
    p.set_defaults(func=_cli_serve)

    p = sub.add_parser("keygen", help="make an Ed25519 signing key pair (KEYFILE, KEYFILE.pub)")
    p.add_argument("-o", "--output", required=True, help="private key file; the public key goes to OUTPUT.pub")
    p.set_defaults(func=_cli_keygen)

    p = sub.add_parser("publish", help="sign a bundle and publish it as a new version of a collection")
    p.add_argument("bundle", help="bundle folder (NAME.d2r)")
    p.add_argument("--server", required=True)
    p.add_argument("--collection", required=True)
    _admin_token_args(p)
    p.add_argument("--signing-key", required=True, help="private key from d2r keygen")
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
    _admin_token_args(p)
    p.set_defaults(func=_cli_version)
