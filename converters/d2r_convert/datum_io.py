"""Read and write DELF's ``DatumProto`` files (``mean.datum``, ``pca_proj_mat.datum``, ``pca_vars.datum``).

The message (delf/protos/datum.proto) is small enough to decode by hand, which avoids a
protobuf code-generation step::

    message DatumShape { repeated int64 dim = 1 [packed = true]; }
    message FloatList  { repeated float value = 1 [packed = true]; }
    message DatumProto { optional DatumShape shape = 1; oneof { FloatList float_list = 2; } }
"""

from __future__ import annotations

import os
import struct

import numpy as np

from d2r._protobuf import field as _field
from d2r._protobuf import varint as _enc_varint
from d2r.errors import ModelError


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a serialized message; value is bytes or int."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, value


def decode_datum(data: bytes) -> np.ndarray:
    """A serialized DatumProto -> float32 array of its shape (row major)."""
    dims: list[int] = []
    values: list[np.ndarray] = []
    for field, wire, value in _fields(data):
        if field == 1 and wire == 2:
            for f, w, v in _fields(value):
                if f == 1 and w == 2:  # packed
                    pos = 0
                    while pos < len(v):
                        d, pos = _varint(v, pos)
                        dims.append(d)
                elif f == 1 and w == 0:
                    dims.append(v)
        elif field == 2 and wire == 2:
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    values.append(np.frombuffer(v, dtype="<f4"))
                elif f == 1 and w == 5:
                    values.append(np.frombuffer(v, dtype="<f4"))
    arr = np.concatenate(values) if values else np.zeros(0, np.float32)
    if int(np.prod(dims)) != arr.size:
        raise ValueError(f"shape {dims} does not match {arr.size} values")
    return arr.reshape(dims).astype(np.float32)


def _len_field(number: int, payload: bytes) -> bytes:
    return _field(number, bytes(payload))


def encode_datum(array: np.ndarray) -> bytes:
    """float array -> serialized DatumProto (packed fields, as the official writer produces)."""
    a = np.asarray(array, dtype="<f4")
    shape = _len_field(1, b"".join(_enc_varint(int(d)) for d in a.shape))
    floats = _len_field(1, a.tobytes())
    return _len_field(1, shape) + _len_field(2, floats)


def read_datum(path: str | os.PathLike) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            return decode_datum(fh.read())
    except (OSError, ValueError, struct.error) as exc:
        raise ModelError(f"{path}: not a readable DELF DatumProto file ({exc})") from exc


def write_datum(path: str | os.PathLike, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        fh.write(encode_datum(array))
