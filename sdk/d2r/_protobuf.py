"""The two protobuf wire-format encoders d2r needs (no protobuf dependency): varints and fields."""

from __future__ import annotations


def varint(v: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def field(number: int, value) -> bytes:
    """One field: an int (varint, wire type 0) or bytes/str (length-delimited, wire type 2)."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(number << 3 | 2) + varint(len(value)) + value
