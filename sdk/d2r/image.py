"""Image loading for the device side: one function, every input a phone or a kiosk produces.

``load_image`` returns uint8 RGB [H, W, 3] with the EXIF orientation applied, whatever came
in: a path, encoded bytes, a numpy array or a PIL image; grayscale, palette, CMYK, 16-bit and
alpha images are converted. Anything unusable raises :class:`d2r.ImageError` naming the input.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import ImageError

# Decompression-bomb guard: 64 megapixels is far above any phone photo we need (we work at
# ~640 px) and far below what would exhaust a Raspberry Pi's memory.
DEFAULT_MAX_PIXELS = 64_000_000
# JPEG photos above max_pixels (108 and 200 megapixel phone cameras) are decoded reduced, by
# 1/2, 1/4 or 1/8 in the DCT (Pillow's draft mode: no full-size buffer is ever allocated), to at
# most this many pixels; a JPEG that would still be larger at 1/8 is refused as a bomb.
DRAFT_PIXELS = 16_000_000


def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.dtype} {src.shape}>"
    return f"<{type(src).__name__}>"


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise ImageError("decoding images needs Pillow: pip install pillow") from exc
    return Image, ImageOps


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an image array [H, W], [H, W, 3] or [H, W, 4], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: empty image (shape {arr.shape})")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: float image contains NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"{name}: float images must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported image dtype {arr.dtype} (use uint8, uint16 or float in [0, 1])")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha dropped: colour pixels are kept as they are
    return np.ascontiguousarray(arr)


def _pil_to_rgb(img, name: str) -> np.ndarray:
    Image, ImageOps = _pil()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good photo
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return _array_to_rgb(arr, name)
    if img.mode == "F":
        return _array_to_rgb(np.clip(np.asarray(img, dtype=np.float32), 0, 1), name)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white, as a viewer shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: empty image")
    return np.ascontiguousarray(arr)


def _open_jpeg_reduced(data: bytes, name: str, max_pixels: int):
    """A JPEG opened for decoding at a reduced scale when it has more than ``max_pixels``
    pixels (None when it has fewer: the ordinary path opens it). Pillow's own bomb check in
    ``Image.open`` would refuse a 200-megapixel photo before draft mode can shrink it, so the
    JPEG is opened through its plugin and checked here instead."""
    from PIL import JpegImagePlugin

    img = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    w, h = img.size
    if w * h <= max_pixels:
        return None
    target = min(max_pixels, DRAFT_PIXELS)
    for scale in (2, 4, 8):
        if (w // scale) * (h // scale) <= target:
            break
    else:
        raise ImageError(f"{name}: refused, {w}x{h} = {w * h} pixels is too many even decoded at 1/8 (decompression bomb?)")
    img.draft("RGB", (-(-w // scale), -(-h // scale)))
    return img


def load_image(src, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``src`` to uint8 RGB [H, W, 3].

    src: a path (str or os.PathLike), encoded image bytes, a numpy array ([H, W], [H, W, 1],
    [H, W, 3] RGB or [H, W, 4] RGBA; uint8, uint16 or float in [0, 1]) or a PIL image.
    max_pixels: images with more pixels are refused (decompression bombs), except JPEG
    photos, which are decoded reduced by 1/2, 1/4 or 1/8 to at most :data:`DRAFT_PIXELS`
    pixels (108 and 200 megapixel phone photos) when that is possible.
    Raises :class:`d2r.ImageError` for missing, unreadable, corrupt, truncated, empty or
    oversized images, naming the input.
    """
    name = _describe(src)
    if isinstance(src, np.ndarray):
        arr = _array_to_rgb(src, name)
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise ImageError(f"{name}: {arr.shape[0] * arr.shape[1]} pixels exceeds the limit of {max_pixels}")
        return arr
    Image, _ = _pil()
    if isinstance(src, Image.Image):
        if src.width * src.height > max_pixels:
            raise ImageError(f"{name}: {src.width * src.height} pixels exceeds the limit of {max_pixels}")
        return _pil_to_rgb(src, name)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a directory, not an image") from None
        except OSError as exc:
            raise ImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        raise ImageError(f"{name}: expected a path, bytes, a numpy array or a PIL image")
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open_jpeg_reduced(data, name, max_pixels) if data[:3] == b"\xff\xd8\xff" else None
            if img is None:
                img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageError(f"{name}: {img.width}x{img.height} = {img.width * img.height} pixels exceeds the limit of {max_pixels}")
            img.load()  # decodes fully: truncated files fail here, not later
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused, too many pixels ({exc})") from exc
    except Image.DecompressionBombWarning as exc:
        raise ImageError(f"{name}: refused, too many pixels ({exc})") from exc
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format (corrupt or not an image)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc
    return _pil_to_rgb(img, name)
