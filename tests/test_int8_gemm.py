"""int8 codes and their exact integer dot products (d2r.int8_gemm), the fast path of matching."""

from __future__ import annotations

import numpy as np
import pytest

import d2r
from d2r import int8_gemm


def _u8(codes):
    return int8_gemm.query_operand(codes)


def _exact(a_codes, b_codes):
    return a_codes.astype(np.int64) @ b_codes.astype(np.int64).T


def test_quantize_rows_keeps_directions_and_uses_the_whole_range():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 128)).astype(np.float32)
    x[5] = 0.0
    codes, inv = int8_gemm.quantize_rows(x)
    assert codes.dtype == np.int8 and inv.dtype == np.float32 and codes.shape == x.shape
    peak = np.abs(codes.astype(np.int16)).max(axis=1)
    assert peak[5] == 0 and inv[5] == 0
    assert (np.delete(peak, 5) == 127).all()
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = np.einsum("ij,ij->i", codes * inv[:, None], unit)
    assert np.delete(cos, 5).min() > 0.9995
    np.testing.assert_allclose(np.linalg.norm(np.delete(codes * inv[:, None], 5, axis=0), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(d2r.InputError, match="2-D"):
        int8_gemm.quantize_rows(np.ones(5, np.float32))


@pytest.mark.parametrize("dim", [1, 7, 64, 128, 1040])
def test_gram_is_exact_on_both_backends(dim, monkeypatch):
    rng = np.random.default_rng(dim)
    a = rng.integers(-127, 128, size=(37, dim)).astype(np.int8)
    b = rng.integers(-127, 128, size=(53, dim)).astype(np.int8)
    # the largest sums: rows of +-127 everywhere
    a[0], b[0], b[1] = 127, 127, -127
    ref = _exact(a, b)
    got = int8_gemm.gram(_u8(a), b)
    assert got.dtype == np.int32 and np.array_equal(got, ref)
    monkeypatch.setattr(int8_gemm, "_session", lambda threads: None)
    assert int8_gemm.backend() == "blas-float32"
    fallback = int8_gemm.gram(_u8(a), b)
    assert fallback.dtype == np.int32 and np.array_equal(fallback, ref)


def test_gram_beyond_float32_exactness_uses_integers(monkeypatch):
    # D = 2000: sums of +-127^2 products reach 3.2e7 > 2^24, where float32 would round
    monkeypatch.setattr(int8_gemm, "_session", lambda threads: None)
    a = np.full((2, 2000), 127, np.int8)
    b = np.full((3, 2000), 127, np.int8)
    b[1, 0] = 126
    assert np.array_equal(int8_gemm.gram(_u8(a), b), _exact(a, b))


def test_gram_empty_and_mismatched():
    a = np.zeros((0, 16), np.int8)
    b = np.ones((4, 16), np.int8)
    assert int8_gemm.gram(_u8(a), b).shape == (0, 4)
    assert int8_gemm.gram(_u8(b), np.zeros((0, 16), np.int8)).shape == (4, 0)
    with pytest.raises(d2r.InputError, match="dimensions differ"):
        int8_gemm.gram(_u8(b), np.ones((4, 8), np.int8))


def test_onnxruntime_runs_the_hand_built_model():
    ort = pytest.importorskip("onnxruntime")
    assert int8_gemm.backend() == "onnxruntime"
    so = ort.SessionOptions()
    sess = ort.InferenceSession(int8_gemm.matmul_integer_model(), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["a", "b", "za"]
    assert [i.type for i in sess.get_inputs()] == ["tensor(uint8)", "tensor(int8)", "tensor(uint8)"]
    assert sess.get_outputs()[0].type == "tensor(int32)"


def test_hand_built_model_is_valid_onnx():
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(int8_gemm.matmul_integer_model())
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    assert node.op_type == "MatMulInteger" and list(node.input) == ["a", "b", "za"]
    assert model.opset_import[0].version == 13
    dims = [[d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.input]
    assert dims == [["n", "d"], ["d", "m"], []]
