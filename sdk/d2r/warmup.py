"""Compile d2r's Numba kernels ahead of the first query: ``d2r warmup``.

The kernels are compiled on first use and cached on disk (``cache=True``; next to the
installed package, or in ``$NUMBA_CACHE_DIR``). Without this step the first query of a fresh
install compiles them (about 5 s here, against about 150 ms for a query after that). Run it
once after ``pip install`` (``make demo`` does), or at an app's first start.

It runs the real pipeline of each requested local-feature model on a few synthetic textured
images, so every kernel a build, a query and a verified query use is compiled with the types
they use: feature extraction, codebook training, R-ASMK* and ASMK* aggregation, saving and
opening a bundle, search of an in-memory and of a memory-mapped index, and
int8 spatial verification.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .manifest import DEFAULT_FEATURES

# a photo-like texture: smooth blobs at several scales, so every model finds keypoints
_SIZE = (240, 320)


def texture(seed: int) -> np.ndarray:
    """A synthetic photo-like uint8 RGB [240, 320, 3] image with keypoints at several scales."""
    rng = np.random.default_rng(seed)
    h, w = _SIZE
    img = np.zeros((h, w, 3), np.float32)
    for cells in (4, 9, 23):
        coarse = rng.random((cells, cells, 3)).astype(np.float32)
        ys = np.linspace(0, cells - 1, h).astype(int)
        xs = np.linspace(0, cells - 1, w).astype(int)
        img += coarse[ys][:, xs] / 3
    img += rng.random((h, w, 3)).astype(np.float32) * 0.15
    return np.clip(img * 230, 0, 255).astype(np.uint8)


def warm_up(features=(DEFAULT_FEATURES,), backend: str = "tflite", log=None) -> dict:
    """Compile (or load from the cache) every kernel of the pipeline of each model in
    ``features``; returns seconds per model."""
    from .engine import Engine

    images = [texture(i) for i in range(4)]
    ids = [f"warmup{i}" for i in range(len(images))]
    seconds = {}
    for name in features:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="d2r-warmup-") as tmp:
            bundle = Path(tmp) / "warmup.d2r"
            with Engine.create(features=name, detector=None, kind="rasmk_star", backend=backend, verification_features=200) as engine:
                engine.train_codebook(images, size=16, iterations=2, progress=False)
                engine.add_images(images, ids=ids, progress=False, on_error="raise")
                engine.query(images[0], top_k=2, verify=True, verify_top=2)
                engine.save(bundle)
            # a saved index is searched through read-only memory maps: other array types, so
            # other compiled versions of the search kernels
            with Engine.open(bundle) as engine:
                engine.query(images[0], top_k=2, verify=True, verify_top=2)
                engine.query(images[0], top_k=2, normalize=True)
        seconds[name] = time.perf_counter() - t0
        if log is not None:
            log(f"warmed up {name} in {seconds[name]:.1f} s")
    return seconds
