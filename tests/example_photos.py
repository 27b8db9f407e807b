"""Photos for the examples' tests and benchmarks (no pytest here, so a benchmark can import it):
loading an example script as a module, a visitor's hard photo of an exhibit, and images of
nothing in the collection."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def load_script(path: Path, name: str):
    """The Python file ``path`` imported as module ``name`` (its folder on sys.path meanwhile)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def hard_photo(src: Path, seed: int) -> Image.Image:
    """A visitor's photo as it comes: a part of the exhibit, tilted 12 degrees, among clutter."""
    rng = random.Random(seed)
    img = Image.open(src).convert("RGB")
    w, h = img.size
    part = img.crop((int(w * 0.12), int(h * 0.10), int(w * 0.90), int(h * 0.92)))
    part = part.rotate(12 if seed % 2 else -12, expand=True, resample=Image.BILINEAR, fillcolor=(200, 200, 190))
    canvas = Image.new("RGB", (int(part.width * 1.5), int(part.height * 1.4)), (180, 170, 150))
    draw = ImageDraw.Draw(canvas)
    for _ in range(25):
        x, y, s = rng.randrange(canvas.width), rng.randrange(canvas.height), rng.randrange(10, 60)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + s, y + s * 0.7], fill=colour)
    canvas.paste(part, (rng.randrange(canvas.width - part.width), rng.randrange(canvas.height - part.height)))
    return canvas


def nothing_images() -> list[tuple[str, np.ndarray]]:
    """Two images of nothing in any collection, always the same: coloured blobs, and noise."""
    rng = np.random.default_rng(0)
    blobs = Image.new("RGB", (320, 240), (120, 130, 140))
    draw = ImageDraw.Draw(blobs)
    for _ in range(40):
        x, y, s = (int(v) for v in rng.integers(0, 300, 3))
        draw.ellipse([x, y, x + s % 80 + 10, y + s % 50 + 10], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return [("blobs", np.asarray(blobs)), ("noise", rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))]
