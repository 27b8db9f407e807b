"""What d2r's publisher, edge server and devices agree on about The Update Framework (TUF,
``pip install tuf``, the reference implementation python-tuf): collection names, target names,
the ``custom`` fields of a bundle target, signers of key files, expiry periods.
docs/sync-protocol.md explains the roles. ``tuf`` is imported on use (:func:`tuf_modules`).

Targets of a collection's repository::

    bundles/<N>.tar          the bundle archive of version N (custom: {"d2r": {version, bundle_checksum, n_images}})
    deltas/<A>-<B>.tar       a delta from version A to version B (role "deltas", online key)

Keys are the Ed25519 PEM files of ``d2r keygen``; TUF sees them as securesystemslib keys.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from ..errors import D2RError, InputError
from .folder import MAX_VERSION

# A collection name: \A...\Z, not ^...$ ("$" also matches before a final newline: "museum\n" is not a name).
COLLECTION_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
BUNDLE_TARGET = re.compile(r"\Abundles/([1-9][0-9]{0,18})\.tar\Z")
DELTA_TARGET = re.compile(r"\Adeltas/([1-9][0-9]{0,18})-([1-9][0-9]{0,18})\.tar\Z")
DELTAS_ROLE = "deltas"
SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")

# Default lifetimes (seconds). Offline roles are long-lived; online ones short, so that a server
# or mirror that stops updating (a freeze) is noticed within a day.
ROOT_EXPIRY = 365 * 86400
TARGETS_EXPIRY = 90 * 86400
SNAPSHOT_EXPIRY = 7 * 86400
DELTAS_EXPIRY = 7 * 86400
TIMESTAMP_EXPIRY = 86400


def tuf_modules():
    """(tuf.api.metadata, securesystemslib.signer) or a clear error when tuf is missing."""
    try:
        import securesystemslib.signer as signer
        import tuf.api.metadata as metadata
    except ImportError:  # pragma: no cover - depends on the installation
        raise D2RError("secure updates need The Update Framework: pip install tuf cryptography") from None
    return metadata, signer


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def expiry(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=float(seconds))


def bundle_target(version: int) -> str:
    return f"bundles/{int(version)}.tar"


def delta_target(from_version: int, to_version: int) -> str:
    return f"deltas/{int(from_version)}-{int(to_version)}.tar"


def public_key(path):
    """The securesystemslib key of an Ed25519 public (KEYFILE.pub) or private key file."""
    from .keys import load_private_key, load_public_key

    _, signer = tuf_modules()
    path = Path(path)
    head = path.read_bytes()[:64] if path.is_file() else b""
    key = load_private_key(path).public_key() if b"PRIVATE" in head else load_public_key(path)
    return signer.SSlibKey.from_crypto(key)


def private_signer(path):
    """A securesystemslib signer for an Ed25519 private key file (``d2r keygen``)."""
    from .keys import load_private_key

    _, signer = tuf_modules()
    return signer.CryptoSigner(load_private_key(path))


def bundle_info_of(target) -> dict:
    """The d2r fields of a bundle target (``custom.d2r``), checked strictly; InputError if bad."""
    m = BUNDLE_TARGET.match(getattr(target, "path", "") or "")
    custom = (getattr(target, "custom", None) or {}).get("d2r") if isinstance(getattr(target, "custom", None), dict) else None
    if m is None or not isinstance(custom, dict):
        raise InputError(f"target {getattr(target, 'path', None)!r}: not a d2r bundle target (bundles/N.tar with custom.d2r)")
    version, checksum, n = custom.get("version"), custom.get("bundle_checksum"), custom.get("n_images")
    if (not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_VERSION
            or version != int(m.group(1))):
        raise InputError(f"target {target.path}: custom.d2r.version must be the integer of its path")
    if not isinstance(checksum, str) or not SHA256_HEX.match(checksum):
        raise InputError(f"target {target.path}: custom.d2r.bundle_checksum must be 64 hex digits")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise InputError(f"target {target.path}: custom.d2r.n_images must be an integer >= 0")
    sha = target.hashes.get("sha256") if isinstance(target.hashes, dict) else None
    if not isinstance(sha, str) or not SHA256_HEX.match(sha) or not 0 < target.length <= MAX_VERSION:
        raise InputError(f"target {target.path}: needs a sha256 hash and a positive length")
    return {"version": version, "bundle_checksum": checksum, "n_images": n, "sha256": sha, "length": target.length}


def target_url(base: str, path: str, sha256: str) -> str:
    """URL of a target in a consistent-snapshot repository: ``base/<dir>/<sha256>.<name>``."""
    folder, _, name = path.rpartition("/")
    return f"{base.rstrip('/')}/{folder + '/' if folder else ''}{sha256}.{name}"
