"""Ed25519 key files (PEM) of a collection's TUF roles: ``d2r keygen`` writes them, the
publisher and the server sign with them (see :mod:`d2r.bundle.tuf`). Needs ``cryptography``,
imported on use."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, SyncError


def _ed25519():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - depends on the installation
        raise SyncError("keys and TUF signatures need the 'cryptography' package: pip install cryptography") from None
    return ed25519, serialization


def generate_keypair(path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``path`` (PEM, mode 0600) and its public key to
    ``path.pub`` (PEM). Refuses to overwrite an existing key."""
    ed25519, serialization = _ed25519()
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise InputError(f"{p}: exists already; not overwriting a key")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    pub.write_bytes(public_pem)
    return path, pub


def load_private_key(path):
    """The Ed25519 private key in PEM file ``path``; :class:`InputError` naming the file."""
    ed25519, serialization = _ed25519()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{path}: not an Ed25519 private key (made by `d2r keygen`)")
    return key


def load_public_key(path):
    """The Ed25519 public key in PEM file ``path``; :class:`InputError` naming the file."""
    ed25519, serialization = _ed25519()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(f"{path}: not an Ed25519 public key (KEYFILE.pub made by `d2r keygen`)")
    return key
