"""Deltas between two versions of a collection: the images added and removed.

The device rebuilds the new index from its active one (``d2r.sync.replay_index``: remove ids,
add images, save), so a delta is kept only if that replay reproduces the new ``index.d2ri``
byte for byte, which the server checks here before serving it; otherwise the device downloads
the full bundle. Files other than the index that changed travel whole inside the delta.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from d2r._files import sha256_file as _sha
from d2r.engine import read_bundle_info
from d2r.index import Index
from d2r.sync import DELTA_FORMAT, DELTA_VERSION, _tarinfo, replay_index

INDEX_FILE = "index.d2ri"


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
    a file of both bundles, e.g. the codebook changed)."""
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
            same = _sha(trial) == target
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
        ("bundle.json", (new_dir / "bundle.json").read_bytes()),
        ("words.bin", b"".join(w.tobytes() for w in words)),
        ("payload.bin", b"".join(p.tobytes() for p in payload)),
    ]
    with open(out, "wb") as fh, tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        for rel in changed:
            with open(new_dir / rel, "rb") as src:
                tar.addfile(_tarinfo("files/" + rel, os.fstat(src.fileno()).st_size), src)
    return {"n_added": len(images), "n_removed": len(removed)}
