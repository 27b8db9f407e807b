"""Argument checks shared by the public wrappers: clear messages, no silent conversions."""

from __future__ import annotations

import numpy as np

from .errors import InputError


def descriptors_array(value, name: str = "descriptors", dim: int | None = None) -> np.ndarray:
    """Return ``value`` as a C-contiguous float32 [N, D] array or raise :class:`InputError`.

    float64 (and other real float) input is converted to float32, the precision of the
    kernels; integer, complex, object and bool arrays are rejected, as are NaN and inf.
    """
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except Exception as exc:  # ragged lists and the like
            raise InputError(f"{name}: expected a float32 array of shape [N, D], got {type(value).__name__}") from exc
    if value.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array [N, D], got shape {value.shape}")
    if value.dtype.kind != "f":
        raise InputError(f"{name}: expected a floating-point array (float32), got dtype {value.dtype}")
    if dim is not None and value.shape[1] != dim:
        raise InputError(f"{name}: expected descriptors of dimension D = {dim}, got D = {value.shape[1]}")
    value = np.ascontiguousarray(value, dtype=np.float32)
    if value.size and not np.isfinite(value).all():
        bad = int(np.flatnonzero(~np.isfinite(value).all(axis=1))[0])
        raise InputError(f"{name}: row {bad} contains NaN or inf")
    return value


def positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def real_number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name}: expected a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise InputError(f"{name}: expected a finite number, got {value}")
    return value
