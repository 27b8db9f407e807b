"""Operator commands: ``d2r serve``, ``d2r keygen``, ``d2r publish``, ``d2r device add|list|revoke``."""

from __future__ import annotations

import sys
from pathlib import Path

from d2r.errors import InputError


def _read_token_file(path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the admin token file ({exc.strerror or exc})") from None
    if len(token) < 16:
        raise InputError(f"{path}: the admin token must be at least 16 characters")
    return token


def _cli_serve(args) -> int:
    import waitress

    from .app import create_app

    config = {"DATA_DIR": args.data, "ADMIN_TOKEN": _read_token_file(args.admin_token_file),
              "MAX_BUNDLE_BYTES": int(args.max_bundle_mb * 1024 * 1024), "PUBLISHER_PUBLIC_KEY": args.public_key}
    app = create_app(config)
    print(f"d2r serve: data {args.data}, listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    # waitress refuses bodies over max_request_body_size itself (413) before the app sees them.
    proxy = {}
    if args.trusted_proxy:  # TLS terminated by a reverse proxy in front (docs/sync-protocol.md)
        proxy = {"trusted_proxy": args.trusted_proxy, "trusted_proxy_headers": {"x-forwarded-proto", "x-forwarded-for"}}
    waitress.serve(app, host=args.host, port=args.port, threads=args.threads, ident="d2r",
                   max_request_body_size=config["MAX_BUNDLE_BYTES"] + (1 << 20), **proxy)
    return 0


def _cli_keygen(args) -> int:
    from d2r.sync import generate_keypair

    priv, pub = generate_keypair(args.output)
    print(f"private key: {priv} (keep it secret; it signs bundles)\npublic key:  {pub} (pin it on devices)")
    return 0


def _cli_publish(args) -> int:
    from .client import AdminClient

    rec = AdminClient(args.server, args.token).publish(args.bundle, args.collection, args.signing_key)
    print(f"{rec['collection']}: version {rec['version']} published ({rec['archive_size']} bytes, "
          f"{rec['n_images']} images, sha256 {rec['archive_sha256'][:16]}...)")
    return 0


def _cli_device(args) -> int:
    from .client import AdminClient

    client = AdminClient(args.server, args.token)
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


def register_cli(sub) -> None:
    p = sub.add_parser("serve", help="run the edge server (waitress) on a data folder")
    p.add_argument("--data", required=True, help="data folder (created): bundles and the SQLite database")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--admin-token-file", required=True, help="file holding the admin token (>= 16 characters)")
    p.add_argument("--public-key", default=None, help="publisher public key: also verify signatures at publish time")
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
    p.add_argument("--token", required=True, help="admin token")
    p.add_argument("--signing-key", required=True, help="private key from d2r keygen")
    p.set_defaults(func=_cli_publish)

    p = sub.add_parser("device", help="register (add), list or revoke devices")
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("--server", required=True)
    p.add_argument("--token", required=True, help="admin token")
    p.add_argument("--collection", action="append", default=[], help="collection the device may sync (repeatable)")
    p.add_argument("--name", default="device", help="a name for the status page")
    p.add_argument("--id", default=None, help="device id (revoke)")
    p.set_defaults(func=_cli_device)
