"""d2r.load_image on real photos and on every kind of bad input."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import d2r
from d2r.image import load_image

from shared_data import ukbench_images


@pytest.fixture(scope="module")
def photo_path():
    return ukbench_images()[0]


def test_real_photo(photo_path):
    img = load_image(photo_path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[:2] == (480, 640)
    np.testing.assert_array_equal(load_image(str(photo_path)), img)
    np.testing.assert_array_equal(load_image(photo_path.read_bytes()), img)
    np.testing.assert_array_equal(load_image(Image.open(photo_path)), img)
    np.testing.assert_array_equal(load_image(img), img)


def _encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied(photo_path):
    src = Image.open(photo_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = _encode(src, "JPEG", exif=exif.tobytes(), quality=95)
    img = load_image(data)
    assert img.shape[:2] == (640, 480)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_modes_convert_to_rgb(photo_path, mode):
    src = Image.open(photo_path).convert("RGB").resize((64, 48))
    conv = src.convert("I").point(lambda v: v * 256).convert("I;16") if mode == "I;16" else src.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    img = load_image(_encode(conv, fmt))
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    img = load_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert img[0, 0].tolist() == [200, 0, 0] and img[3, 3].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "arr,shape",
    [
        (np.zeros((5, 6), np.uint8), (5, 6, 3)),
        (np.zeros((5, 6, 1), np.uint8), (5, 6, 3)),
        (np.zeros((5, 6, 4), np.uint8), (5, 6, 3)),
        (np.full((5, 6, 3), 0.5, np.float32), (5, 6, 3)),
        (np.full((5, 6, 3), 65535, np.uint16), (5, 6, 3)),
    ],
)
def test_arrays(arr, shape):
    assert load_image(arr).shape == shape


def test_bad_inputs(tmp_path, photo_path):
    good = photo_path.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello, not an image" * 10)
    cases = [
        (tmp_path / "missing.jpg", "missing.jpg: no such file"),
        (tmp_path, "is a directory"),
        (tmp_path / "trunc.jpg", "trunc.jpg: corrupt or truncated"),
        (tmp_path / "empty.jpg", "empty.jpg: empty file"),
        (tmp_path / "text.jpg", "text.jpg: not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "bytes"),
        (np.zeros((0, 5, 3), np.uint8), "empty image"),
        (np.zeros((5, 5, 2), np.uint8), "shape"),
        (np.full((5, 5, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((5, 5, 3), np.nan, np.float32), "NaN"),
        (np.zeros((5, 5, 3), np.int64), "dtype"),
        (12345, "expected a path"),
    ]
    for src, message in cases:
        with pytest.raises(d2r.ImageError, match=message):
            load_image(src)


def test_decompression_bomb_is_refused():
    big = _encode(Image.new("L", (4000, 3000)))
    with pytest.raises(d2r.ImageError, match="exceeds the limit"):
        load_image(big, max_pixels=1_000_000)
    assert load_image(big).shape == (3000, 4000, 3)


def test_image_error_is_a_d2r_error_and_value_error():
    assert issubclass(d2r.ImageError, d2r.D2RError) and issubclass(d2r.ImageError, ValueError)
    assert Path(__file__).exists()
