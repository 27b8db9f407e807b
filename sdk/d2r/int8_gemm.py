"""int8 descriptor codes and their exact integer dot products, for fast putative matching.

Spatial verification compares every query feature with every feature of each candidate: for
100 candidates of 1000 features of D = 128 that is 12.8 G multiply-adds, about 240 ms of float32
GEMM on one core here. With int8 codes the same products run on the CPU's integer dot-product
instructions (AVX-512 VNNI, AVX-VNNI, ARM dotprod) through ONNX Runtime's ``MatMulInteger``,
which is several times faster (benchmarks/RESULTS.md, "Verification").

Codes: each row is scaled so that its largest component is +-``peak`` and rounded,
``round(peak * x / max|x|)``; only the direction is kept (the verification descriptors are unit
vectors), and ``<a, b> ~= <qa, qb> / (|qa| |qb|)``. The two operands have different ranges:

- query codes (the left operand) use +-127 and are shifted to uint8 (zero point 128), so they
  lie in [1, 255];
- stored codes (the right operand: candidates, and what the features file keeps) use +-63,
  7 bits.

Exact by construction on every instruction set: CPUs without VNNI (AVX2: AMD Zen 1-3, Intel
before Ice Lake) run uint8 x int8 GEMMs with ``vpmaddubsw``, which adds each adjacent pair of
products ``a0*b0 + a1*b1`` into int16 with saturation. With |b| <= 63 and a <= 255 a pair is at
most 255 * 63 * 2 = 32130 < 2**15 in magnitude, so nothing saturates whatever the query codes
(with |b| <= 127 it would: 64770). VNNI, ARM dotprod and the plain int32 kernels are exact for
these ranges too. :func:`gram` refuses stored codes outside +-63.

Without ONNX Runtime the same integers come from a float32 BLAS GEMM of the codes: every partial
sum is an integer below 2**24 for D <= 2096 (127 * 63 * D < 2**24), so float32 holds it exactly;
larger D use int64. Both backends give bit-identical results.
"""

from __future__ import annotations

import threading

import numpy as np

from ._protobuf import field as _field
from .errors import InputError

#: the largest query code magnitude: query codes lie in [-127, 127] (-128 is never used, so
#: negation is safe), [1, 255] once shifted by :func:`query_operand`
INT8_MAX = 127
#: the largest stored code magnitude: 7 bits, so that no pair of products saturates int16
STORED_MAX = 63
#: the int16 range that ``vpmaddubsw`` (AVX2 without VNNI) saturates each pair sum to
INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
# float32 sums of the products stay exact while |sum| < 2**24: 127 * 63 * D < 2**24.
_EXACT_FLOAT_DIM = (1 << 24) // (INT8_MAX * STORED_MAX)


def quantize_rows(x: np.ndarray, peak: int = STORED_MAX) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes of the rows of ``x`` [N, D] and float32 [N] inverse code norms (0 for a row of
    zeros): ``codes[i] * inv_norm[i]`` is the unit vector closest to ``x[i]`` in the code grid.

    ``peak``: the largest code magnitude, :data:`STORED_MAX` (63, the default) for stored and
    candidate codes, :data:`INT8_MAX` (127) for query codes."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"descriptors: expected a 2-D array [N, D], got shape {x.shape}")
    if peak not in (STORED_MAX, INT8_MAX):
        raise InputError(f"peak: expected {STORED_MAX} or {INT8_MAX}, got {peak!r}")
    top = np.abs(x).max(axis=1, initial=0.0)
    scale = np.float32(peak) / np.where(top > 0, top, np.float32(1.0))
    codes = np.clip(np.rint(x * scale[:, None]), -peak, peak).astype(np.int8)
    return codes, inverse_norms(codes)


def to_stored(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored codes (+-63) of int8 codes of any range, e.g. +-127 codes read from a features
    file written before d2r used 7-bit stored codes. Rows already within +-63 are kept as
    they are; wider rows are re-scaled to a largest component of 63."""
    codes = np.asarray(codes, dtype=np.int8)
    wide = np.abs(codes.astype(np.int16)).max(axis=1, initial=0) > STORED_MAX
    if wide.any():
        codes = codes.copy()
        codes[wide] = quantize_rows(codes[wide].astype(np.float32), STORED_MAX)[0]
    return codes, inverse_norms(codes)


def inverse_norms(codes: np.ndarray) -> np.ndarray:
    """float32 [N] 1 / |codes[i]| (0 for a row of zeros)."""
    sq = np.einsum("ij,ij->i", codes.astype(np.float32), codes.astype(np.float32))
    with np.errstate(divide="ignore"):
        return np.where(sq > 0, 1.0 / np.sqrt(sq), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# ONNX Runtime MatMulInteger, built without the onnx package (a 200-byte protobuf)
# --------------------------------------------------------------------------------------------


def _tensor_info(name: str, elem_type: int, dims: tuple) -> bytes:
    """ValueInfoProto: name, TypeProto.tensor_type {elem_type, shape {dim: value | param}}."""
    shape = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in dims)
    tensor = _field(1, elem_type) + _field(2, shape)
    return _field(1, name) + _field(2, _field(1, tensor))


# TensorProto.DataType
_UINT8, _INT8, _INT32 = 2, 3, 6


def matmul_integer_model() -> bytes:
    """A serialised ONNX model (opset 13): ``y = MatMulInteger(a, b, a_zero_point)`` with
    a uint8 [n, d], b int8 [d, m], a scalar uint8 zero point and y int32 [n, m]."""
    node = _field(1, "a") + _field(1, "b") + _field(1, "za") + _field(2, "y") + _field(4, "MatMulInteger")
    graph = (
        _field(1, node)
        + _field(2, "d2r_int8_gram")
        + _field(11, _tensor_info("a", _UINT8, ("n", "d")))
        + _field(11, _tensor_info("b", _INT8, ("d", "m")))
        + _field(11, _tensor_info("za", _UINT8, ()))
        + _field(12, _tensor_info("y", _INT32, ("n", "m")))
    )
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)


_SESSIONS: dict = {}
_LOCK = threading.Lock()
_ZERO_POINT = np.array(128, dtype=np.uint8)


def _session(threads: int):
    """A cached ONNX Runtime session for ``threads`` threads, or None without onnxruntime."""
    with _LOCK:
        if threads not in _SESSIONS:
            try:
                import onnxruntime as ort
            except ImportError:
                _SESSIONS[threads] = None
            else:
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.inter_op_num_threads = 1
                so.log_severity_level = 3
                _SESSIONS[threads] = ort.InferenceSession(matmul_integer_model(), so, providers=["CPUExecutionProvider"])
        return _SESSIONS[threads]


def backend(threads: int = 1) -> str:
    """``"onnxruntime"`` if the integer GEMM runs on ONNX Runtime, else ``"blas-float32"``."""
    return "onnxruntime" if _session(threads) is not None else "blas-float32"


def query_operand(codes: np.ndarray) -> np.ndarray:
    """The left operand of :func:`gram`: codes shifted to uint8 (zero point 128)."""
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def gram(a_u8: np.ndarray, b_codes: np.ndarray, threads: int = 1) -> np.ndarray:
    """Exact int32 [Na, Nb] dot products of int8 codes: ``a_u8`` from :func:`query_operand`
    ([Na, D] uint8), ``b_codes`` int8 [Nb, D] stored codes within +-:data:`STORED_MAX`
    (:class:`InputError` otherwise: wider codes could saturate on CPUs without VNNI)."""
    d = a_u8.shape[1]
    if b_codes.shape[1] != d:
        raise InputError(f"codes: dimensions differ ({d} and {b_codes.shape[1]})")
    if b_codes.size and (int(b_codes.max()) > STORED_MAX or int(b_codes.min()) < -STORED_MAX):
        raise InputError(f"codes: stored codes must lie in [-{STORED_MAX}, {STORED_MAX}] "
                         f"(got [{int(b_codes.min())}, {int(b_codes.max())}]); use quantize_rows or to_stored")
    sess = _session(threads) if a_u8.shape[0] and b_codes.shape[0] else None
    if sess is not None:
        return sess.run(None, {"a": a_u8, "b": np.ascontiguousarray(b_codes.T), "za": _ZERO_POINT})[0]
    if d > _EXACT_FLOAT_DIM:
        return ((a_u8.astype(np.int64) - 128) @ b_codes.T.astype(np.int64)).astype(np.int32)
    # Without ONNX Runtime: the same integers from a float32 GEMM (exact, see the module notes).
    a = a_u8.astype(np.float32) - np.float32(128.0)
    return (a @ b_codes.T.astype(np.float32)).astype(np.int32)
