"""The local features of one image as verification uses them (:class:`LocalFeatures`), and the
checks of locations and visual words."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import int8_gemm
from .._checks import descriptors_array
from ..errors import InputError


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """The local features of one image, as used for verification.

    Attributes:
        locations: float32 [N, 2] keypoint (y, x) coordinates in pixels.
        descriptors: float32 [N, D] descriptors.
        words: optional visual-word ids, int32 [N, m] (given as [N] or [N, m]; -1 = none):
            a query's m nearest codewords per feature, or a database image's nearest one.
            When both sides of a pair have words, matching is restricted to shared words.
    """

    locations: np.ndarray
    descriptors: np.ndarray
    words: np.ndarray | None = None

    def __post_init__(self):
        desc = descriptors_array(self.descriptors, "descriptors")
        loc = _locations_array(self.locations, "locations", desc.shape[0])
        object.__setattr__(self, "descriptors", desc)
        object.__setattr__(self, "locations", loc)
        if self.words is not None:
            object.__setattr__(self, "words", _words_array(self.words, desc.shape[0]))

    def __len__(self) -> int:
        return int(self.locations.shape[0])

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored int8 codes of the descriptors (+-63, the candidate side of int8 matching)
        and their float32 inverse norms (see :mod:`d2r.int8_gemm`), computed once; features
        read from an int8 side file carry the stored codes."""
        cached = self.__dict__.get("_codes")
        if cached is None:
            cached = int8_gemm.quantize_rows(self.descriptors, int8_gemm.STORED_MAX)
            object.__setattr__(self, "_codes", cached)
        return cached

    def query_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Query int8 codes of the descriptors (+-127, the left operand of int8 matching) and
        their float32 inverse norms, computed once."""
        cached = self.__dict__.get("_query_codes")
        if cached is None:
            cached = int8_gemm.quantize_rows(self.descriptors, int8_gemm.INT8_MAX)
            object.__setattr__(self, "_query_codes", cached)
        return cached


def _locations_array(value, name: str, n: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"{name}: expected a float32 array [N, 2] of (y, x), got {type(value).__name__}") from exc
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"{name}: expected an array [N, 2] of (y, x) locations, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InputError(f"{name}: expected a real-valued array, got dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name}: expected {n} rows (one per descriptor), got {arr.shape[0]}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise InputError(f"{name}: row {bad} contains NaN or inf")
    return arr


def _words_array(value, n: int) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"words: expected an int array [N] or [N, m], got {type(value).__name__}") from exc
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < 1:
        raise InputError(f"words: expected {n} rows of visual-word ids ([N] or [N, m]), got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise InputError(f"words: expected integer visual-word ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < -1 or arr.max() > np.iinfo(np.int32).max):
        raise InputError("words: ids must be >= 0 (or -1 for none) and fit in int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _features(value, name: str) -> LocalFeatures:
    if isinstance(value, LocalFeatures):
        return value
    if hasattr(value, "locations") and hasattr(value, "descriptors"):
        return LocalFeatures(value.locations, value.descriptors, getattr(value, "words", None))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            return LocalFeatures(value[0], value[1])
        except InputError as exc:
            raise InputError(f"{name}: {exc}") from exc
    raise InputError(
        f"{name}: expected LocalFeatures, an object with .locations and .descriptors, or a "
        f"(locations, descriptors) pair, got {type(value).__name__}"
    )
