"""The bundle: the one format that the engine, the sync client and the edge server share.

A bundle is a folder holding everything a device needs, with one ``bundle.json`` that lists
the pipeline configuration, every file with its sha256 and size, and a checksum of itself::

    museum.d2r/bundle.json       configuration, files, version, checksum
    museum.d2r/index.d2ri        the R-ASMK* (or ASMK*) index (memory-mapped on open)
    museum.d2r/codebook.d2rcb    the visual words
    museum.d2r/models/           the model files used and their manifest entries

Modules, one per concept:

- :mod:`d2r.bundle.folder`: the folder format: read and check bundle.json
  (:func:`read_bundle_info`), write it (:func:`write_bundle_json`) and swap a new folder in
  atomically (:func:`writing`), never replacing what is not a bundle (:func:`check_bundle_target`);
- :mod:`d2r.bundle.archive`: the transport form, an uncompressed tar (:func:`pack_bundle`,
  :func:`unpack_bundle`);
- :mod:`d2r.bundle.delta`: deltas between two versions (:func:`make_delta`, :func:`apply_delta`);
- :mod:`d2r.bundle.tuf` and :mod:`d2r.bundle.keys`: what publisher, server and devices agree on
  about The Update Framework (collection and target names, expiries, signers, Ed25519 key files).

The edge server imports from ``d2r`` only this package and :mod:`d2r.errors`
(tests/test_server_imports.py).
"""

from .archive import ARCHIVE_MEDIA_TYPE, pack_bundle, unpack_bundle
from .delta import DELTA_FORMAT, DELTA_VERSION, apply_delta, make_delta, replay_index
from .folder import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    MAX_VERSION,
    canonical,
    check_bundle_target,
    check_files,
    config_from,
    is_version,
    read_bundle_info,
    read_strict_info,
    verify_bundle_folder,
    write_bundle_json,
    writing,
)

__all__ = [
    "ARCHIVE_MEDIA_TYPE",
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "DELTA_FORMAT",
    "DELTA_VERSION",
    "MAX_VERSION",
    "apply_delta",
    "canonical",
    "check_bundle_target",
    "check_files",
    "config_from",
    "is_version",
    "make_delta",
    "pack_bundle",
    "read_bundle_info",
    "read_strict_info",
    "replay_index",
    "unpack_bundle",
    "verify_bundle_folder",
    "write_bundle_json",
    "writing",
]
