"""Device sync: fetch the latest bundle of a collection, verified with The Update Framework
(TUF, ``tuf.ngclient``) against the collection's provisioned root, and swap it in atomically.

    client = d2r.sync.SyncClient("https://10.0.0.2:8443", "museum", token, "/var/lib/d2r", "museum.root.json")
    result = client.sync()                  # SyncResult(version=7, previous=6, method="delta", ...)
    live = d2r.sync.LiveBundle("/var/lib/d2r")   # opens DEST/current with d2r.Engine.open
    live.query(photo)                       # reopens the bundle between queries after a swap
    live.freshness                          # {verified_at, expires, stale_seconds, expired}

One module per concept (docs/sync-protocol.md):

- :mod:`d2r.sync.client`: :class:`SyncClient` (TUF metadata, downloads, verification, install);
- :mod:`d2r.sync.destination`: the device folder (``DEST/current``, versions, lock, atomic
  activation by rename, :func:`freshness`);
- :mod:`d2r.sync.live`: :class:`LiveBundle`, an engine that follows ``DEST/current``;
- the bundle, archive and delta formats and the TUF names are :mod:`d2r.bundle`'s, the errors
  :mod:`d2r.errors`'s, the command ``d2r sync`` is :mod:`d2r.cli.sync`.

The names below are also importable from ``d2r.sync`` as before the split.
"""

from ..bundle.archive import ARCHIVE_MEDIA_TYPE, pack_bundle, unpack_bundle
from ..bundle.delta import DELTA_FORMAT, DELTA_VERSION, apply_delta, replay_index
from ..bundle.folder import MAX_VERSION, check_bundle_json, is_version, verify_bundle_folder
from ..bundle.keys import generate_keypair, load_private_key, load_public_key
from ..bundle.tuf import COLLECTION_NAME
from ..errors import ArchiveError, SignatureError, StaleMetadataError, SyncError
from .client import DEFAULT_MAX_BUNDLE_BYTES, SyncClient, SyncResult, plain_http_warning
from .destination import Destination, freshness
from .live import LiveBundle

# Command-line helpers that lived here before the command line became d2r.cli: the old
# import path keeps working, without importing the CLI layer with the library.
_CLI_HELPERS = ("parse_interval", "read_secret_file", "resolve_token", "backoff_delays")


def __getattr__(name):
    if name in _CLI_HELPERS:
        from ..cli import common

        return getattr(common, name)
    raise AttributeError(f"module 'd2r.sync' has no attribute {name!r}")


__all__ = [
    "ARCHIVE_MEDIA_TYPE",
    "COLLECTION_NAME",
    "DEFAULT_MAX_BUNDLE_BYTES",
    "DELTA_FORMAT",
    "DELTA_VERSION",
    "MAX_VERSION",
    "ArchiveError",
    "Destination",
    "LiveBundle",
    "SignatureError",
    "StaleMetadataError",
    "SyncClient",
    "SyncError",
    "SyncResult",
    "apply_delta",
    "check_bundle_json",
    "freshness",
    "generate_keypair",
    "is_version",
    "load_private_key",
    "load_public_key",
    "pack_bundle",
    "plain_http_warning",
    "replay_index",
    "unpack_bundle",
    "verify_bundle_folder",
]
