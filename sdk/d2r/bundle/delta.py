"""Deltas between two versions of a bundle: the images added to and removed from its index.

A delta archive is an uncompressed tar (docs/sync-protocol.md)::

    delta.json      the recipe: format, from/to {version, checksum}, index {file, remove, add, compact}, files
    bundle.json     of the new version
    words.bin       uint32 LE visual words of the added items
    payload.bin     their codes (binary kinds) or float32 LE vectors, item after item
    files/REL       changed files other than the index

The server writes one (:func:`make_delta`) only if replaying it (:func:`replay_index`: open
the old index, remove ids, add images, save) reproduces the new ``index.d2ri`` byte for byte;
the device builds the new folder from its verified old one (:func:`apply_delta`), hard-linking
unchanged files, and verifies every file against the new bundle.json.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

from .._files import sha256_file as _sha256_file
from ..errors import ArchiveError, D2RError
from .archive import open_member, safe_member, tarinfo, write_member
from .folder import BUNDLE_JSON, MAX_JSON_BYTES, read_bundle_info, read_strict_info, verify_bundle_folder

DELTA_FORMAT = "d2r-delta"
DELTA_VERSION = 1
INDEX_FILE = "index.d2ri"


def replay_index(old_index, remove, add, compact: bool, out) -> None:
    """The delta's index recipe: open ``old_index``, tombstone the ids ``remove``, add the images
    ``add`` (id, metadata, list of Aggregation), save to ``out`` (compacted if ``compact``).
    The server keeps a delta only if this reproduces the new index byte for byte."""
    from ..index import Index

    idx = Index.open(old_index, mmap=True, verify=False)
    try:
        for image_id in remove:
            idx.remove(image_id)
        for image_id, metadata, aggs in add:
            idx.add_regions(image_id, aggs, metadata=metadata)
        idx.save(out, compact=compact)
    finally:
        idx.close()


# -- writing (the server) --------------------------------------------------------------------------------
def _split(old_ids: list, new_ids: list):
    """(removed ids, added ids): the longest prefix of ``new_ids`` that appears in ``old_ids``
    in the same order is kept, the rest of ``new_ids`` is added."""
    pos = {i: n for n, i in enumerate(old_ids)}
    p, last = 0, -1
    while p < len(new_ids) and pos.get(new_ids[p], -1) > last:
        last = pos[new_ids[p]]
        p += 1
    kept = set(new_ids[:p])
    return [i for i in old_ids if i not in kept], new_ids[p:]


def make_delta(old_dir, new_dir, out, work_dir) -> dict | None:
    """Write the delta archive from bundle ``old_dir`` to ``new_dir`` to ``out``; returns
    {n_added, n_removed} or None when no delta reproduces the new index (or the index is not
    a file of both bundles, e.g. the codebook changed). ``work_dir`` holds the trial replays."""
    import numpy as np

    from ..index import Index

    old_dir, new_dir, out, work_dir = Path(old_dir), Path(new_dir), Path(out), Path(work_dir)
    old, new = read_bundle_info(old_dir), read_bundle_info(new_dir)
    if INDEX_FILE not in old["files"] or INDEX_FILE not in new["files"]:
        return None
    if old.get("codebook_sha256") != new.get("codebook_sha256"):
        return None
    a = Index.open(old_dir / INDEX_FILE, mmap=True, verify=False)
    b = Index.open(new_dir / INDEX_FILE, mmap=True, verify=False)
    try:
        if (a.kind, a.dim, a.codebook_checksum) != (b.kind, b.dim, b.codebook_checksum):
            return None
        removed, added_ids = _split(a.image_ids(), b.image_ids())
        adds = [(i, b.get_metadata(i), b.get(i)) for i in added_ids]
    finally:
        a.close()
    try:
        target = new["files"][INDEX_FILE]["sha256"]
        compact = None
        work_dir.mkdir(parents=True, exist_ok=True)
        for flag in (False, True):
            trial = work_dir / f"replay-{int(flag)}.d2ri"
            replay_index(old_dir / INDEX_FILE, removed, adds, flag, trial)
            same = _sha256_file(trial) == target
            trial.unlink()
            if same:
                compact = flag
                break
        if compact is None:
            return None
        words, payload, images = [], [], []
        for image_id, metadata, aggs in adds:
            items = []
            for agg in aggs:
                words.append(np.asarray(agg.words, dtype="<u4"))
                codes = agg.codes if agg.codes is not None else np.asarray(agg.vectors, dtype="<f4").view(np.uint8)
                payload.append(np.ascontiguousarray(codes).reshape(-1))
                items.append(int(agg.words.shape[0]))
            images.append({"id": image_id, "metadata": metadata, "items": items})
    finally:
        b.close()
    changed = sorted(rel for rel, meta in new["files"].items()
                     if rel != INDEX_FILE and old["files"].get(rel, {}).get("sha256") != meta["sha256"])
    recipe = {
        "format": DELTA_FORMAT,
        "format_version": DELTA_VERSION,
        "from": {"version": old["version"], "checksum": old["checksum"]},
        "to": {"version": new["version"], "checksum": new["checksum"]},
        "index": {"file": INDEX_FILE, "remove": removed, "add": images, "compact": compact},
        "files": changed,
    }
    members = [
        ("delta.json", json.dumps(recipe, ensure_ascii=False, separators=(",", ":")).encode("utf-8")),
        (BUNDLE_JSON, (new_dir / BUNDLE_JSON).read_bytes()),
        ("words.bin", b"".join(w.tobytes() for w in words)),
        ("payload.bin", b"".join(p.tobytes() for p in payload)),
    ]
    with open(out, "wb") as fh, tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tarinfo(name, len(data)), io.BytesIO(data))
        for rel in changed:
            with open(new_dir / rel, "rb") as src:
                tar.addfile(tarinfo("files/" + rel, os.fstat(src.fileno()).st_size), src)
    return {"n_added": len(images), "n_removed": len(removed)}


# -- applying (the device) -------------------------------------------------------------------------------
def _delta_images(d: dict, words_blob: bytes, payload_blob: bytes, kind: str, dim: int):
    """Yield (id, metadata, [Aggregation]) of the images a delta adds."""
    import numpy as np

    from ..aggregate import BINARY_KINDS, Aggregation

    binary = kind in BINARY_KINDS
    payload = (dim + 7) // 8 if binary else 4 * dim
    words = np.frombuffer(words_blob, dtype="<u4")
    codes = np.frombuffer(payload_blob, dtype=np.uint8)
    if codes.shape[0] != words.shape[0] * payload:
        raise ArchiveError(f"delta: payload.bin has {codes.shape[0]} bytes for {words.shape[0]} words of {payload} bytes")
    codes = codes.reshape(words.shape[0], payload)
    pos = 0
    for image in d["add"]:
        aggs = []
        for n in image["items"]:
            n = int(n)
            if n < 0 or pos + n > words.shape[0]:
                raise ArchiveError("delta: item sizes run past words.bin")
            w, c = words[pos : pos + n], codes[pos : pos + n]
            pos += n
            if binary:
                aggs.append(Aggregation(kind, dim, w, codes=c))
            else:
                aggs.append(Aggregation(kind, dim, w, vectors=c.view("<f4").reshape(n, dim)))
        yield image["id"], image.get("metadata"), aggs
    if pos != words.shape[0]:
        raise ArchiveError("delta: words.bin holds more words than the images use")


def apply_delta(old_dir, delta, new_dir) -> dict:
    """Build the new bundle folder ``new_dir`` from the verified bundle ``old_dir`` and the
    delta archive ``delta`` (path), then verify every file against the new bundle.json (which
    the caller checks against its signature). Returns the new bundle.json.
    Unchanged files are hard-linked (or copied) from ``old_dir``. :class:`ArchiveError` if the
    delta is malformed, made for another bundle, or does not rebuild the new one."""
    from ..index import Index

    old_dir, delta, new_dir = Path(old_dir), Path(delta), Path(new_dir)
    old = read_strict_info(old_dir)
    new_dir.mkdir(parents=False, exist_ok=False)
    try:
        with tarfile.open(delta, mode="r:") as tar:
            members = {}
            for m in tar.getmembers():
                name = safe_member(m, str(delta))
                if name in members:
                    raise ArchiveError(f"{delta}: member {name!r} appears twice")
                members[name] = m
            for need in ("delta.json", BUNDLE_JSON, "words.bin", "payload.bin"):
                if need not in members:
                    raise ArchiveError(f"{delta}: not a d2r delta (no {need})")
            if members["delta.json"].size > MAX_JSON_BYTES or members[BUNDLE_JSON].size > MAX_JSON_BYTES:
                raise ArchiveError(f"{delta}: delta.json or bundle.json is over the size limit")
            try:
                d = json.loads(open_member(tar, members["delta.json"], str(delta)).read())
            except ValueError as exc:
                raise ArchiveError(f"{delta}: delta.json is not JSON ({exc})") from None
            if not isinstance(d, dict) or d.get("format") != DELTA_FORMAT or d.get("format_version") != DELTA_VERSION:
                raise ArchiveError(f"{delta}: unknown delta format {d.get('format') if isinstance(d, dict) else None!r}")
            if d["from"]["checksum"] != old["checksum"]:
                raise ArchiveError(f"{delta}: made for bundle {d['from']['checksum'][:12]}..., not the active {old['checksum'][:12]}...")
            write_member(tar, members[BUNDLE_JSON], new_dir / BUNDLE_JSON)
            new = read_strict_info(new_dir)
            if d["to"]["checksum"] != new["checksum"]:
                raise ArchiveError(f"{delta}: delta.json and bundle.json disagree on the target bundle")
            index_rel = d["index"]["file"]
            if index_rel not in new["files"] or index_rel not in old["files"]:
                raise ArchiveError(f"{delta}: index file {index_rel!r} is not in both bundles")
            for rel, meta in new["files"].items():
                if rel == index_rel:
                    continue
                target = new_dir / rel
                if "files/" + rel in members:
                    write_member(tar, members["files/" + rel], target, meta["sha256"], str(delta))
                elif old["files"].get(rel, {}).get("sha256") == meta["sha256"]:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(old_dir / rel, target)  # bundle files are never modified in place
                    except OSError:
                        shutil.copyfile(old_dir / rel, target)
                else:
                    raise ArchiveError(f"{delta}: {rel} changed but the delta does not carry it")
            words_blob = open_member(tar, members["words.bin"], str(delta)).read()
            payload_blob = open_member(tar, members["payload.bin"], str(delta)).read()
        head = Index.open(old_dir / index_rel, mmap=True, verify=False)
        kind, dim = head.kind, head.dim
        head.close()
        adds = list(_delta_images(d["index"], words_blob, payload_blob, kind, dim))
        replay_index(old_dir / index_rel, d["index"]["remove"], adds, bool(d["index"]["compact"]), new_dir / index_rel)
    except tarfile.TarError as exc:
        raise ArchiveError(f"{delta}: not a valid uncompressed tar ({exc})") from exc
    except (KeyError, TypeError) as exc:
        raise ArchiveError(f"{delta}: delta.json lacks or mistypes {exc}") from None
    except D2RError as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"{delta}: cannot be applied to {old_dir} ({exc})") from exc
    return verify_bundle_folder(new_dir)
