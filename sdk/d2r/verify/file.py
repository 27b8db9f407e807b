"""The verification features file (``features.d2rv`` in a bundle): one image's features packed
(:func:`pack_features`, :func:`unpack_features`) and many images in one checksummed side file
(:func:`save_features`, :class:`FeatureFile`, :func:`load_features`)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .. import int8_gemm
from .._checks import positive_int
from .._files import atomic_file
from ..errors import IndexFormatError, InputError
from .features import LocalFeatures, _features

# One image packed: a 10-byte header (magic "VF", uint8 version, uint8 descriptor code, uint32 N,
# uint16 D), then N (y, x) uint16 pixel coordinates, then N descriptors, all little-endian.
# Version 2 (written only for features that carry visual words) appends N uint32 word ids.
_PACK_MAGIC = b"VF"
_PACK_VERSION = 1
_PACK_VERSION_WORDS = 2
_DESC_CODES = {"int8": 1, "float16": 2}
_DESC_DTYPES = {1: np.int8, 2: np.float16}
_HEADER = struct.Struct("<2sBBIH")  # magic, version, descriptor code, N, D -> 10 bytes
# int8 descriptors store each row's stored codes (d2r.int8_gemm.quantize_rows: scaled so that its
# largest component is +-63; files written before 7-bit stored codes hold +-127 and are re-scaled
# on reading): the row is re-normalised on reading, so only its direction matters and no scale
# needs storing.


def feature_bytes(n: int, dim: int, descriptor_dtype: str = "int8", words: bool = False) -> int:
    """Bytes of one packed image: 10-byte header + N * (4 + D) for int8 (4 + 2D for float16).

    For 1000 features of D = 128: 132,010 bytes (int8) or 260,010 bytes (float16), against
    520,000 bytes for float32 descriptors with float32 locations (+8,000). ``words``: each
    feature also stores its visual word (4 bytes more per feature).
    """
    n = positive_int(n, "n", minimum=0)
    dim = positive_int(dim, "dim")
    if descriptor_dtype not in _DESC_CODES:
        raise InputError(f"descriptor_dtype: expected one of {', '.join(_DESC_CODES)}, got {descriptor_dtype!r}")
    per = 4 + dim * (1 if descriptor_dtype == "int8" else 2) + (4 if words else 0)
    return _HEADER.size + n * per


def pack_features(features, descriptor_dtype: str = "int8") -> bytes:
    """Pack one image's verification features into bytes (:func:`feature_bytes` long).

    Locations are rounded to whole pixels and stored as uint16 (at most 0.5 px of error,
    far below the 10 px RANSAC threshold); they must lie in [0, 65535]. Descriptors are stored
    as float16, or as int8 ``round(63 * x / max|x|)`` per row (the stored codes of int8 matching): only the direction is kept, and
    :func:`unpack_features` returns unit vectors (the descriptors of verification are
    L2-normalised). Scaling each row to its own maximum, rather than by a fixed scale, uses the
    whole int8 range for descriptors with small components such as RootSIFT. Features with
    ``words`` keep each feature's first word (format version 2).
    """
    f = _features(features, "features")
    if descriptor_dtype not in _DESC_CODES:
        raise InputError(f"descriptor_dtype: expected one of {', '.join(_DESC_CODES)}, got {descriptor_dtype!r}")
    n, dim = f.descriptors.shape
    if n > 0xFFFFFFFF or dim > 0xFFFF:
        raise InputError(f"features: too many features or too large a dimension to pack ({n} x {dim})")
    loc = np.rint(f.locations)
    if loc.size and (loc.min() < 0 or loc.max() > 65535):
        raise InputError("features: locations must lie in [0, 65535] pixels to be packed as uint16")
    loc = loc.astype("<u2")
    if descriptor_dtype == "int8":
        desc = f.codes()[0]
    else:
        desc = f.descriptors.astype("<f2")
    if f.words is None:
        header = _HEADER.pack(_PACK_MAGIC, _PACK_VERSION, _DESC_CODES[descriptor_dtype], n, dim)
        return header + loc.tobytes() + desc.tobytes()
    if n and f.words[:, 0].min() < 0:
        raise InputError("features: every feature needs a visual word (>= 0) to be packed with words")
    header = _HEADER.pack(_PACK_MAGIC, _PACK_VERSION_WORDS, _DESC_CODES[descriptor_dtype], n, dim)
    return header + loc.tobytes() + desc.tobytes() + f.words[:, 0].astype("<u4").tobytes()


def unpack_features(data: bytes, name: str = "packed features") -> LocalFeatures:
    """Inverse of :func:`pack_features`: float32 locations and descriptors.

    int8 descriptors are re-normalised to unit length (rows of zeros stay zero). Raises :class:`IndexFormatError` naming ``name`` if the bytes are malformed.
    """
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise IndexFormatError(f"{name}: truncated ({len(data)} bytes, a header alone is {_HEADER.size})")
    magic, version, code, n, dim = _HEADER.unpack_from(data, 0)
    if magic != _PACK_MAGIC:
        raise IndexFormatError(f"{name}: not packed verification features (bad magic {magic!r})")
    if version not in (_PACK_VERSION, _PACK_VERSION_WORDS):
        raise IndexFormatError(f"{name}: unknown version {version} (this d2r reads versions 1 and 2)")
    with_words = version == _PACK_VERSION_WORDS
    if code not in _DESC_DTYPES or dim == 0:
        raise IndexFormatError(f"{name}: bad descriptor code {code} or dimension {dim}")
    dtype = np.dtype(_DESC_DTYPES[code]).newbyteorder("<")
    expected = _HEADER.size + n * 4 + n * dim * dtype.itemsize + (4 * n if with_words else 0)
    if len(data) != expected:
        raise IndexFormatError(f"{name}: expected {expected} bytes for {n} features of D = {dim}, got {len(data)}")
    off = _HEADER.size
    loc = np.frombuffer(data, dtype="<u2", count=2 * n, offset=off).reshape(n, 2).astype(np.float32)
    off += 4 * n
    raw = np.frombuffer(data, dtype=dtype, count=n * dim, offset=off).reshape(n, dim)
    desc = raw.astype(np.float32)
    if code == 1:
        norms = np.sqrt(np.einsum("ij,ij->i", desc, desc))
        desc /= np.where(norms > 0, norms, 1.0)[:, None]
    if not np.isfinite(desc).all():
        raise IndexFormatError(f"{name}: descriptors contain NaN or inf")
    words = None
    if with_words:
        off += n * dim * dtype.itemsize
        words = np.frombuffer(data, dtype="<u4", count=n, offset=off)
        if n and words.max() > np.iinfo(np.int32).max:
            raise IndexFormatError(f"{name}: visual-word id out of range")
        words = words.astype(np.int32)
    feats = LocalFeatures(loc, desc, words)
    if code == 1:
        # The stored codes are what int8 matching needs: keep them rather than re-quantise
        # (codes of +-127 from older files are re-scaled to the 7-bit stored range).
        object.__setattr__(feats, "_codes", int8_gemm.to_stored(raw))
    return feats


# Side file: many images' packed features, each read on its own (a phone need not load them all).
#   header: magic b"D2RVERIF" | uint32 version | uint32 count
#   table:  uint64 offsets[count + 1] (from the start of the payload) | uint32 crc[count]
#           (CRC-32 of each packed image) | uint32 CRC-32 of header and table
#   payload: the packed images back to back.
# All little-endian. The table is checked on open, each image when it is read.
_FILE_MAGIC = b"D2RVERIF"
_FILE_VERSION = 1
_FILE_HEADER = struct.Struct("<8sII")
# Refuse absurd counts from a corrupt header before allocating a table for them.
_MAX_IMAGES = 1 << 32


def _table_size(count: int) -> int:
    return _FILE_HEADER.size + 8 * (count + 1) + 4 * count + 4


def save_features(path, images: Iterable, descriptor_dtype: str = "int8") -> int:
    """Write many images' verification features to one side file; returns its size in bytes.

    ``images``: an iterable of features (see :func:`verify_pair`), in database order; the
    size is 28 + 12 * count + the sum of :func:`feature_bytes`. The file is written to a
    temporary name and renamed, so a crash never leaves a half-written file.
    """
    blobs = [pack_features(f, descriptor_dtype) for f in images]
    offsets = np.zeros(len(blobs) + 1, dtype="<u8")
    offsets[1:] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    crcs = np.array([zlib.crc32(b) & 0xFFFFFFFF for b in blobs], dtype="<u4")
    table = _FILE_HEADER.pack(_FILE_MAGIC, _FILE_VERSION, len(blobs)) + offsets.tobytes() + crcs.tobytes()
    table += struct.pack("<I", zlib.crc32(table) & 0xFFFFFFFF)
    with atomic_file(Path(path)) as fh:
        fh.write(table)
        for b in blobs:
            fh.write(b)
    return len(table) + int(offsets[-1])


class FeatureFile:
    """Random access to a side file written by :func:`save_features`.

    ``len(f)`` images; ``f[i]`` reads, checks (CRC-32) and unpacks image i as
    :class:`LocalFeatures`. Use as a context manager, or call :meth:`close`.

    Raises :class:`IndexFormatError` naming the file: on open if it is truncated, of another
    format or version, or its table fails its checksum; on ``f[i]`` if image i is corrupt.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise IndexFormatError(f"{self.path}: cannot read verification features ({exc.strerror or exc})") from exc
        try:
            self._read_table()
        except BaseException:
            self._fh.close()
            raise

    def _read_table(self) -> None:
        path = self.path
        size = self._fh.seek(0, 2)
        self._fh.seek(0)
        head = self._fh.read(_FILE_HEADER.size)
        if len(head) < _FILE_HEADER.size:
            raise IndexFormatError(f"{path}: truncated ({size} bytes), not a verification features file")
        magic, version, count = _FILE_HEADER.unpack(head)
        if magic != _FILE_MAGIC:
            raise IndexFormatError(f"{path}: not a d2r verification features file (bad magic {magic!r})")
        if version != _FILE_VERSION:
            raise IndexFormatError(f"{path}: unknown version {version} (this d2r reads version {_FILE_VERSION})")
        start = _table_size(count)
        if count >= _MAX_IMAGES or size < start:
            raise IndexFormatError(f"{path}: truncated table for {count} images ({size} bytes)")
        rest = self._fh.read(start - _FILE_HEADER.size)
        table = head + rest
        (crc,) = struct.unpack_from("<I", table, start - 4)
        if zlib.crc32(table[:-4]) & 0xFFFFFFFF != crc:
            raise IndexFormatError(f"{path}: table checksum mismatch, the file is corrupt")
        offsets = np.frombuffer(table, dtype="<u8", count=count + 1, offset=_FILE_HEADER.size).astype(np.int64)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise IndexFormatError(f"{path}: inconsistent offset table")
        if start + int(offsets[-1]) != size:
            raise IndexFormatError(
                f"{path}: expected {start + int(offsets[-1])} bytes for {count} images, got {size} (truncated or padded)"
            )
        self._offsets = offsets
        self._crcs = np.frombuffer(table, dtype="<u4", count=count, offset=_FILE_HEADER.size + 8 * (count + 1))
        self._start = start

    def __len__(self) -> int:
        return len(self._crcs)

    def __getitem__(self, i) -> LocalFeatures:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise InputError(f"image index: expected an integer, got {i!r}")
        n = len(self)
        if not -n <= i < n:
            raise InputError(f"image index {i} out of range for {n} images in {self.path}")
        i = int(i) % n
        if self._fh.closed:
            raise InputError(f"{self.path}: the feature file is closed")
        lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
        self._fh.seek(self._start + lo)
        blob = self._fh.read(hi - lo)
        if len(blob) != hi - lo or zlib.crc32(blob) & 0xFFFFFFFF != int(self._crcs[i]):
            raise IndexFormatError(f"{self.path}: image {i} fails its checksum, the file is corrupt")
        return unpack_features(blob, f"{self.path} image {i}")

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_features(path) -> list[LocalFeatures]:
    """Every image of a side file written by :func:`save_features`, in order.

    Raises :class:`IndexFormatError` naming the file if it is truncated, of another format or
    version, or fails a checksum.
    """
    with FeatureFile(path) as f:
        return [f[i] for i in range(len(f))]
