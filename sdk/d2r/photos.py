"""A folder of photos and its metadata CSV: what ``d2r build`` and the examples read."""

from __future__ import annotations

import csv
from pathlib import Path

from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of images")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def read_metadata_csv(path) -> dict:
    """CSV with a header; column ``image_id`` (or ``file``) names the image, the rest is metadata."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise InputError(f"{path}: cannot read metadata CSV ({exc.strerror or exc})") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid UTF-8 CSV file ({exc})") from exc
    if not rows:
        return {}
    key = "image_id" if "image_id" in rows[0] else "file" if "file" in rows[0] else None
    if key is None:
        raise InputError(f"{path}: the CSV needs an 'image_id' or 'file' column, found {list(rows[0])}")
    out = {}
    for n, row in enumerate(rows, start=2):
        image_id = (row.get(key) or "").strip()
        if not image_id:
            raise InputError(f"{path}: line {n} has an empty {key!r}")
        out[image_id] = {k: v for k, v in row.items() if k != key and k is not None}
    return out


def check_metadata(metadata: dict, images) -> list[str]:
    """Warnings for a metadata CSV that does not match the photos: rows naming no photo, and
    photos without a row (each list shortened to its first 10 names)."""
    names = {Path(p).name for p in images}
    unmatched = sorted(set(metadata) - names)
    missing = sorted(names - set(metadata))
    out = []
    for what, items in (("metadata rows that match no photo", unmatched), ("photos without a metadata row", missing)):
        if items:
            shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
            out.append(f"{len(items)} {what}: {shown}")
    return out
