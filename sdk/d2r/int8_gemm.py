"""int8 descriptor codes and their exact integer dot products, for fast putative matching.

Spatial verification compares every query feature with every feature of each candidate: for
100 candidates of 1000 features of D = 128 that is 12.8 G multiply-adds, about 240 ms of float32
GEMM on one core here. With int8 codes the same products run on the CPU's integer dot-product
instructions (AVX-512 VNNI, AVX-VNNI, ARM dotprod) through ONNX Runtime's ``MatMulInteger``,
which is 7-10 times faster (benchmarks/RESULTS.md, "Verification").

Codes: each row is scaled so that its largest component is +-127 and rounded,
``round(127 * x / max|x|)``; only the direction is kept (the verification descriptors are unit
vectors), and ``<a, b> ~= <qa, qb> / (|qa| |qb|)``. The codes of one 128-D row take 128 bytes.

The integer products are exact with either backend: ONNX Runtime's int32 accumulation, or, when
ONNX Runtime is not installed, a float32 BLAS GEMM of the codes (every partial sum is an integer
below 2**24 for D <= 1040, so float32 holds it exactly). Both give bit-identical results.
"""

from __future__ import annotations

import threading

import numpy as np

from ._protobuf import field as _field
from .errors import InputError

#: the largest code magnitude: codes lie in [-127, 127] (-128 is never used, so negation is safe)
INT8_MAX = 127.0
# float32 sums of int8 products stay exact while |sum| < 2**24: 127 * 127 * D < 2**24.
_EXACT_FLOAT_DIM = (1 << 24) // (127 * 127)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes of the rows of ``x`` [N, D] and float32 [N] inverse code norms (0 for a row of
    zeros): ``codes[i] * inv_norm[i]`` is the unit vector closest to ``x[i]`` in the code grid."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"descriptors: expected a 2-D array [N, D], got shape {x.shape}")
    peak = np.abs(x).max(axis=1, initial=0.0)
    scale = np.float32(INT8_MAX) / np.where(peak > 0, peak, np.float32(1.0))
    codes = np.clip(np.rint(x * scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
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
    ([Na, D] uint8), ``b_codes`` int8 [Nb, D]."""
    d = a_u8.shape[1]
    if b_codes.shape[1] != d:
        raise InputError(f"codes: dimensions differ ({d} and {b_codes.shape[1]})")
    sess = _session(threads) if a_u8.shape[0] and b_codes.shape[0] else None
    if sess is not None:
        return sess.run(None, {"a": a_u8, "b": np.ascontiguousarray(b_codes.T), "za": _ZERO_POINT})[0]
    if d > _EXACT_FLOAT_DIM:
        return ((a_u8.astype(np.int64) - 128) @ b_codes.T.astype(np.int64)).astype(np.int32)
    # Without ONNX Runtime: the same integers from a float32 GEMM (exact, see the module notes).
    a = a_u8.astype(np.float32) - np.float32(128.0)
    return (a @ b_codes.T.astype(np.float32)).astype(np.int32)
