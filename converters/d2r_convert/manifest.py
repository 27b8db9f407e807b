"""Write ``manifest.json``: the model contract the d2r runtime reads (schema in docs/models.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA_VERSION = 1


def update_manifest(path: str | os.PathLike, entries: list[dict], drop_files=()) -> dict:
    """Add ``entries`` to the manifest at ``path`` (created if missing).

    Entries of the same file are replaced; entries of ``drop_files`` (files this run wrote and
    did not keep) are removed so that the manifest never lists a missing file.
    """
    path = Path(path)
    if path.is_file():
        manifest = json.loads(path.read_text())
    else:
        manifest = {"schema_version": SCHEMA_VERSION, "models": []}
    files = {e["file"] for e in entries} | set(drop_files)
    models = [m for m in manifest.get("models", []) if m.get("file") not in files] + entries
    models.sort(key=lambda m: (m["name"], m["format"], m["precision"]))
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["models"] = models
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
