"""The bundle folder: ``bundle.json`` and the files it lists, written atomically, read strictly.

    museum.d2r/bundle.json       format, version, configuration, files {path: {sha256, size}}, checksum
    museum.d2r/index.d2ri        ... every other file is listed in bundle.json with its sha256 and size

``bundle.json`` carries a ``checksum``: the sha256 of its own canonical JSON (sorted keys, no
spaces) without that field. A folder (not one archive) so that the index is memory-mapped in
place and a sync swaps a whole version by one rename. :func:`writing` builds a new folder
beside the target and swaps it in, so a reader never sees a half-written bundle; it replaces
only a d2r bundle (or an empty folder): see :func:`check_bundle_target`.

Which files a bundle must hold (index, codebook, models) is the engine's business
(:meth:`d2r.Engine.open`); this module knows the format, not the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeGuard

from .._files import clean_stale, fsync_dir, temp_path
from .._files import sha256_file as _sha256_file
from ..config import EngineConfig
from ..errors import ArchiveError, BundleError, InputError

BUNDLE_FORMAT = "d2r-bundle"
BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"
# Versions are SQLite INTEGERs on the server (signed 64-bit): 1 .. 2**63 - 1.
MAX_VERSION = 2**63 - 1
# bundle.json and delta.json are small; refuse a giant one from the network before parsing it.
MAX_JSON_BYTES = 64 * 1024 * 1024

_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHA256_HEX = re.compile(r"\A[0-9a-f]{64}\Z")
# Files that macOS Finder and Windows Explorer drop into folders a user looks at.
_BROWSER_CACHES = frozenset({".DS_Store", "Thumbs.db"})


def canonical(obj) -> bytes:
    """The canonical JSON bytes that a bundle.json ``checksum`` is the sha256 of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def is_version(value) -> TypeGuard[int]:
    """True for a bundle version number: an int (not a bool) in 1 .. 2**63 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VERSION


# -- writing ---------------------------------------------------------------------------------------------
def list_files(folder) -> dict:
    """``files`` of bundle.json for ``folder``: every regular file below it (bundle.json
    excepted), sorted, with its sha256 and size."""
    folder = Path(folder)
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel != BUNDLE_JSON:
            files[rel] = {"sha256": _sha256_file(f), "size": f.stat().st_size}
    return files


def write_bundle_json(folder, body: dict) -> dict:
    """Write ``folder/bundle.json``: ``body`` (format, format_version, version, config, ...)
    with ``files`` (:func:`list_files`) and ``checksum`` added, flushed to disk. Returns it."""
    folder = Path(folder)
    body = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, **body, "files": list_files(folder)}
    body.pop("checksum", None)
    body["checksum"] = hashlib.sha256(canonical(body)).hexdigest()
    with open(folder / BUNDLE_JSON, "w") as fh:
        fh.write(json.dumps(body, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return body


@contextmanager
def writing(path, protect=()) -> Iterator[Path]:
    """Build the bundle folder ``path`` atomically: yields a new empty folder beside it to fill
    (ending with :func:`write_bundle_json`); on success it replaces ``path`` by renames only
    (:func:`swap_in`), on any error it is removed and ``path`` is left as it was.

    ``path`` must be new, an empty folder or a d2r bundle holding nothing but its own files
    (:func:`check_bundle_target`, checked before anything is written; ``protect``: folders
    that must survive). Temporaries of an interrupted write of ``path`` are removed first."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    check_bundle_target(path, protect)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / BUNDLE_JSON).is_file():
            raise BundleError(f"{path}: no bundle.json was written; the bundle is left as it was")
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, path: Path) -> None:
    """Replace folder ``path`` by ``tmp`` with renames only (old version removed afterwards).

    A crash between the two renames leaves ``path`` missing and the old version beside it
    under a ``.d2r-old-`` name: the next save or open of ``path`` renames it back."""
    parent = path.parent if str(path.parent) else Path(".")
    if os.path.lexists(path):
        old = temp_path(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
        fsync_dir(parent)


def check_bundle_target(path, protect=()) -> None:
    """Refuse a bundle target that is not ours to replace; :class:`BundleError` naming it.

    ``path`` may be missing, an empty folder, or a d2r bundle (``bundle.json`` of format
    ``d2r-bundle``) that holds nothing but bundle.json and the files it lists (and the folder
    caches ``.DS_Store`` / ``Thumbs.db`` that file browsers leave): saving replaces the whole
    folder, so a file of the user's inside it would be lost. Refused as well: a
    symbolic link, a file, and a folder that is, or holds, one of ``protect`` (the source
    photos). Nothing is changed.
    """
    path = Path(path)
    real = Path(os.path.abspath(path)).resolve()
    for src in protect or ():
        s = Path(os.path.abspath(src)).resolve()
        if real == s:
            raise BundleError(f"{path}: is the source folder {src}; d2r does not replace it by a bundle (choose another output folder)")
        if real in s.parents:
            raise BundleError(f"{path}: holds the source folder {src}; d2r does not replace it by a bundle (choose another output folder)")
    if os.path.islink(path):
        raise BundleError(f"{path}: is a symbolic link; d2r does not replace it by a bundle (save to the folder it points to)")
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise BundleError(f"{path}: exists and is not a folder; d2r does not replace it by a bundle (choose another name)")
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise BundleError(f"{path}: exists and cannot be listed ({exc.strerror or exc}); not replacing it") from exc
    if not names:
        return
    if BUNDLE_JSON not in names:
        raise BundleError(f"{path}: exists, is not empty and is not a d2r bundle (no bundle.json); d2r does not replace it "
                          "(choose a new or empty folder)")
    try:
        info = json.loads((path / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: its bundle.json is unreadable ({exc}), so it is not recognisably a d2r bundle; "
                          "d2r does not replace it") from exc
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT or not isinstance(files, dict):
        raise BundleError(f"{path}: its bundle.json is not a d2r bundle's; d2r does not replace the folder")
    listed = {BUNDLE_JSON} | {k for k in files if isinstance(k, str)}
    parents = {p.as_posix() for rel in listed for p in Path(rel).parents if str(p) != "."}
    extra = []
    for root, dirs, fnames in os.walk(path):
        rel_root = Path(root).relative_to(path)
        for d in list(dirs):
            rel = (rel_root / d).as_posix()
            if rel not in parents or os.path.islink(os.path.join(root, d)):
                extra.append(rel + "/")
                dirs.remove(d)
        for f in fnames:
            rel = (rel_root / f).as_posix()
            if f in _BROWSER_CACHES and not os.path.islink(os.path.join(root, f)):
                continue
            if rel not in listed or os.path.islink(os.path.join(root, f)):
                extra.append(rel)
    if extra:
        extra.sort()
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise BundleError(f"{path}: holds files that are not part of the d2r bundle ({', '.join(extra[:5])}{more}); "
                          "d2r does not delete them (move them out or choose another folder)")


# -- reading ---------------------------------------------------------------------------------------------
def _json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(v), type(v).__name__)


def _is_int(v) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_bundle_info(path) -> dict:
    """Parse and check ``bundle.json`` of a bundle folder; :class:`BundleError` if it is bad
    (the message names the field). The types of every field are checked, config included."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    try:
        info = json.loads((path / BUNDLE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: not a d2r bundle (no bundle.json)") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: bundle.json is unreadable ({exc})") from exc

    def bad(field, problem):
        return BundleError(f"{path}: bundle.json: {field}: {problem}")

    if not isinstance(info, dict):
        raise BundleError(f"{path}: not a d2r bundle (bundle.json holds {_json_type(info)}, not an object)")
    if info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a d2r bundle (bundle.json format {info.get('format')!r}, expected {BUNDLE_FORMAT!r})")
    fv = info.get("format_version")
    if not _is_int(fv) or fv < 1:
        raise bad("format_version", f"expected a positive integer, got {fv!r}")
    if fv > BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle format version {fv!r} (bundle.json format_version) is newer than this d2r reads "
                          f"({BUNDLE_VERSION}); upgrade d2r")
    claimed = info.pop("checksum", None)
    if not isinstance(claimed, str) or claimed != hashlib.sha256(canonical(info)).hexdigest():
        raise BundleError(f"{path}: bundle.json checksum mismatch (field checksum: edited or corrupt)")
    info["checksum"] = claimed
    for key in ("version", "config", "files", "codebook_sha256"):
        if key not in info:
            raise bad(key, "missing")
    if not _is_int(info["version"]) or info["version"] < 0:
        raise bad("version", f"expected an integer >= 0, got {info['version']!r}")
    for key in ("created", "d2r_version"):
        if key in info and not isinstance(info[key], str):
            raise bad(key, f"expected a string, got {_json_type(info[key])}")
    if "n_images" in info and (not _is_int(info["n_images"]) or info["n_images"] < 0):
        raise bad("n_images", f"expected an integer >= 0, got {info['n_images']!r}")
    if "skipped" in info and (not isinstance(info["skipped"], dict)
                              or not all(isinstance(v, str) for v in info["skipped"].values())):
        raise bad("skipped", f"expected an object of photo name -> reason, got {_json_type(info['skipped'])}")
    if not isinstance(info["codebook_sha256"], str) or not _HEX64.fullmatch(info["codebook_sha256"]):
        raise bad("codebook_sha256", f"expected 64 hex digits, got {info['codebook_sha256']!r}")
    if "models" in info:
        models = info["models"]
        if not isinstance(models, dict):
            raise bad("models", f"expected an object, got {_json_type(models)}")
        for key, v in models.items():
            if v is not None and not isinstance(v, str):
                raise bad(f"models.{key}", f"expected a file name or null, got {_json_type(v)}")
    files = info["files"]
    if not isinstance(files, dict):
        raise bad("files", f"expected an object, got {_json_type(files)}")
    for rel, meta in files.items():
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in parts):
            raise BundleError(f"{path}: bundle.json names a file outside the bundle or with an unsafe path (files.{rel!r})")
        if not isinstance(meta, dict):
            raise bad(f"files.{rel}", f"expected an object with sha256 and size, got {_json_type(meta)}")
        if not isinstance(meta.get("sha256"), str) or not _HEX64.fullmatch(meta["sha256"]):
            raise bad(f"files.{rel}.sha256", f"expected 64 hex digits, got {meta.get('sha256')!r}")
        if not _is_int(meta.get("size")) or meta["size"] < 0:
            raise bad(f"files.{rel}.size", f"expected an integer >= 0, got {meta.get('size')!r}")
    config_from(path, info["config"])
    return info


def _config_types() -> dict:
    """EngineConfig field -> accepted JSON types, from the dataclass's annotations."""
    out = {}
    for name, f in EngineConfig.__dataclass_fields__.items():
        out[name] = {t.strip() for t in str(f.type).split("|")}
    return out


def config_from(path, cfg) -> EngineConfig:
    """The :class:`EngineConfig` of bundle.json's ``config``, every field's type and value
    checked (missing fields take their defaults: bundles of older d2r versions). ``path``
    names the bundle in errors."""

    def bad(field, problem):
        return BundleError(f"{path}: bundle.json: {field}: {problem}")

    if not isinstance(cfg, dict):
        raise bad("config", f"expected an object, got {_json_type(cfg)}")
    types = _config_types()
    for key, v in cfg.items():
        if key not in types:
            raise bad(f"config.{key}", "unknown field (a bundle of a newer d2r?)")
        want = types[key]
        ok = ((v is None and "None" in want) or (isinstance(v, bool) and "bool" in want)
              or (_is_int(v) and ("int" in want or "float" in want)) or (isinstance(v, float) and "float" in want and math.isfinite(v))
              or (isinstance(v, str) and "str" in want)
              or (isinstance(v, list) and "list" in want and all(_is_number(x) for x in v))
              or (isinstance(v, dict) and "dict" in want)
              or not want & {"None", "bool", "int", "float", "str", "list", "dict"})
        if not ok:
            raise bad(f"config.{key}", f"expected {' or '.join(sorted(want))}, got {_json_type(v)} {v!r}"[:300])
    try:
        return EngineConfig(**cfg).check()
    except InputError as exc:  # its message starts with the field's name
        raise BundleError(f"{path}: bundle.json: config.{exc}") from exc
    except (TypeError, ValueError) as exc:
        raise bad("config", str(exc)) from exc


def check_files(folder, info: dict, hashes: bool = True, links: bool = True) -> None:
    """Check every file ``info`` (bundle.json) lists against ``folder``: present, of its size
    and, with ``hashes``, of its sha256. ``links=False`` refuses a listed file that is a
    symbolic link (a folder from the network). :class:`BundleError` naming the file."""
    folder = Path(folder)
    for rel, meta in info["files"].items():
        f = folder / rel
        if not f.is_file() or (not links and f.is_symlink()):
            raise BundleError(f"{folder}: file {rel} listed in bundle.json is missing")
        if f.stat().st_size != meta["size"]:
            raise BundleError(f"{folder}: file {rel} has {f.stat().st_size} bytes, bundle.json (files.{rel}.size) says {meta['size']}")
        if hashes and _sha256_file(f) != meta["sha256"]:
            raise BundleError(f"{folder}: file {rel} was altered (sha256 differs from bundle.json's files.{rel}.sha256)")


# -- a bundle from the network ---------------------------------------------------------------------------
def check_bundle_json(body, where: str) -> None:
    """Strict types and ranges of the bundle.json fields sync relies on (a bundle from the
    network is hostile until proven otherwise). Raises :class:`ArchiveError` naming the field."""
    if not isinstance(body, dict):
        raise ArchiveError(f"{where}: bundle.json is not a JSON object")
    if not is_version(body.get("version")):
        raise ArchiveError(f"{where}: bundle.json 'version' must be an integer from 1 to {MAX_VERSION}, "
                           f"got {body.get('version')!r:.40}")
    files = body.get("files")
    if not isinstance(files, dict) or not files:
        raise ArchiveError(f"{where}: bundle.json 'files' must be an object {{path: {{sha256, size}}}}")
    for rel, meta in files.items():
        if not isinstance(rel, str) or not rel or len(rel) > 1024:
            raise ArchiveError(f"{where}: bundle.json 'files' has a bad path {rel!r:.60}")
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not _SHA256_HEX.match(meta["sha256"])
                or not isinstance(meta.get("size"), int) or isinstance(meta.get("size"), bool) or not 0 <= meta["size"] <= MAX_VERSION):
            raise ArchiveError(f"{where}: bundle.json 'files' entry {rel!r:.60} must be {{sha256: 64 hex digits, size: integer >= 0}}")
    n = body.get("n_images")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_VERSION):
        raise ArchiveError(f"{where}: bundle.json 'n_images' must be an integer >= 0")
    if not isinstance(body.get("checksum"), str) or not _SHA256_HEX.match(body["checksum"]):
        raise ArchiveError(f"{where}: bundle.json 'checksum' must be 64 hex digits")


def read_strict_info(folder) -> dict:
    """bundle.json of a folder that came over the network: bounded in size
    (``MAX_JSON_BYTES``), the fields sync relies on checked strictly (:func:`check_bundle_json`,
    :class:`ArchiveError`), then everything :func:`read_bundle_info` checks."""
    folder = Path(folder)
    try:
        f = folder / BUNDLE_JSON
        raw = f.read_bytes() if f.stat().st_size <= MAX_JSON_BYTES else None
        body = json.loads(raw) if raw is not None else None
    except (OSError, ValueError):
        body = False  # read_bundle_info names the problem
    if body is None:
        raise ArchiveError(f"{folder}: bundle.json is over {MAX_JSON_BYTES} bytes")
    if body is not False:
        check_bundle_json(body, str(folder))
    return read_bundle_info(folder)


def verify_bundle_folder(folder) -> dict:
    """bundle.json of ``folder`` (:func:`read_strict_info`) after checking every listed file's
    size and sha256 (links refused)."""
    info = read_strict_info(folder)
    check_files(folder, info, hashes=True, links=False)
    return info
