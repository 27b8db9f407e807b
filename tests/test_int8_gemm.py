"""int8 codes and their exact integer dot products (d2r.int8_gemm), the fast path of matching."""

from __future__ import annotations

import json

import numpy as np
import pytest

import d2r
from d2r import int8_gemm


def _u8(codes):
    return int8_gemm.query_operand(codes)


def _exact(a_codes, b_codes):
    return a_codes.astype(np.int64) @ b_codes.astype(np.int64).T


@pytest.mark.parametrize("peak", [int8_gemm.STORED_MAX, int8_gemm.INT8_MAX])
def test_quantize_rows_keeps_directions_and_uses_the_whole_range(peak):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 128)).astype(np.float32)
    x[5] = 0.0
    codes, inv = int8_gemm.quantize_rows(x, peak)
    assert codes.dtype == np.int8 and inv.dtype == np.float32 and codes.shape == x.shape
    top = np.abs(codes.astype(np.int16)).max(axis=1)
    assert top[5] == 0 and inv[5] == 0
    assert (np.delete(top, 5) == peak).all()
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = np.einsum("ij,ij->i", codes * inv[:, None], unit)
    # 7-bit codes keep directions to within 0.2 %, 8-bit ones to within 0.05 %
    assert np.delete(cos, 5).min() > (0.998 if peak == 63 else 0.9995)
    np.testing.assert_allclose(np.linalg.norm(np.delete(codes * inv[:, None], 5, axis=0), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(d2r.InputError, match="2-D"):
        int8_gemm.quantize_rows(np.ones(5, np.float32))
    with pytest.raises(d2r.InputError, match="peak"):
        int8_gemm.quantize_rows(x, 100)


def _vpmaddubsw_gram(a_u8, b_codes):
    """The uint8 x int8 GEMM of CPUs without VNNI (AVX2 ``vpmaddubsw`` then ``vpmaddwd``):
    each adjacent pair of products is added into int16 with saturation, then summed in int32."""
    a = a_u8.astype(np.int64)
    b = b_codes.astype(np.int64)
    d = a.shape[1]
    if d % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 0), (0, 1)))
    prod = a[:, None, :] * b[None, :, :]
    pairs = prod[..., 0::2] + prod[..., 1::2]
    sat = np.clip(pairs, int8_gemm.INT16_MIN, int8_gemm.INT16_MAX)
    return sat.sum(axis=-1)


def test_code_ranges_cannot_saturate_int16_pairs():
    # The construction itself, for the extreme codes, whatever the CPU: every pair sum
    # a0*b0 + a1*b1 of shifted uint8 query codes and stored codes fits in int16.
    q = np.array([[-int8_gemm.INT8_MAX, int8_gemm.INT8_MAX]], np.int8)
    a_lo, a_hi = (int(v) for v in int8_gemm.query_operand(q)[0])
    b_lo, b_hi = -int8_gemm.STORED_MAX, int8_gemm.STORED_MAX
    assert (a_lo, a_hi) == (1, 255)
    extremes = [a0 * b0 + a1 * b1 for a0 in (a_lo, a_hi) for a1 in (a_lo, a_hi) for b0 in (b_lo, b_hi) for b1 in (b_lo, b_hi)]
    assert int8_gemm.INT16_MIN <= min(extremes) and max(extremes) <= int8_gemm.INT16_MAX
    # ...and what quantize_rows produces stays inside those ranges, for any input
    rng = np.random.default_rng(1)
    x = rng.standard_cauchy(size=(500, 64)).astype(np.float32)
    x[0] = 1.0
    x[1] = -1e30
    stored, _ = int8_gemm.quantize_rows(x)
    query, _ = int8_gemm.quantize_rows(x, int8_gemm.INT8_MAX)
    assert np.abs(stored.astype(np.int16)).max() == int8_gemm.STORED_MAX
    u8 = int8_gemm.query_operand(query)
    assert u8.min() >= a_lo and u8.max() <= a_hi


def test_saturating_pairs_are_exact_for_stored_codes_and_not_for_wide_ones():
    # The AVX2 path, emulated: exact with 7-bit stored codes, wrong with 8-bit ones (the bug
    # seen on AMD EPYC without VNNI: 16320 instead of 2064512 for D = 128).
    a = np.full((2, 128), 127, np.int8)
    a[1, ::2] = -127
    stored = np.full((3, 128), int8_gemm.STORED_MAX, np.int8)
    stored[1] = -int8_gemm.STORED_MAX
    stored[2, 1::2] = -int8_gemm.STORED_MAX
    u8 = int8_gemm.query_operand(a)
    assert np.array_equal(_vpmaddubsw_gram(u8, stored) - 128 * stored.astype(np.int64).sum(1), _exact(a, stored))
    wide = np.full((1, 128), 127, np.int8)
    assert _vpmaddubsw_gram(u8[:1], wide)[0, 0] - 128 * 127 * 128 != _exact(a[:1], wide)[0, 0]


@pytest.mark.parametrize("dim", [1, 7, 64, 128, 1040, 2096])
def test_gram_is_exact_on_both_backends(dim, monkeypatch):
    rng = np.random.default_rng(dim)
    a = rng.integers(-127, 128, size=(37, dim)).astype(np.int8)
    b = rng.integers(-63, 64, size=(53, dim)).astype(np.int8)
    # the largest sums: query rows of +-127 and stored rows of +-63 everywhere
    a[0], b[0], b[1] = 127, 63, -63
    ref = _exact(a, b)
    got = int8_gemm.gram(_u8(a), b)
    assert got.dtype == np.int32 and np.array_equal(got, ref)
    # what an AVX2 CPU without VNNI computes for the same codes (zero point 128 removed)
    if dim <= 128:
        avx2 = _vpmaddubsw_gram(_u8(a), b) - 128 * b.astype(np.int64).sum(1)
        assert np.array_equal(avx2, ref)
    monkeypatch.setattr(int8_gemm, "_session", lambda threads: None)
    assert int8_gemm.backend() == "blas-float32"
    fallback = int8_gemm.gram(_u8(a), b)
    assert fallback.dtype == np.int32 and np.array_equal(fallback, ref)


def test_gram_refuses_codes_wider_than_stored():
    a = np.zeros((2, 8), np.int8)
    with pytest.raises(d2r.InputError, match=r"\[-63, 63\]"):
        int8_gemm.gram(_u8(a), np.full((3, 8), 64, np.int8))


def test_to_stored_rescales_only_wide_rows():
    codes = np.array([[127, -64, 3, 0], [63, -63, 1, 0], [0, 0, 0, 0]], np.int8)
    stored, inv = int8_gemm.to_stored(codes)
    assert np.array_equal(stored[0], [63, -32, 1, 0])
    assert np.array_equal(stored[1:], codes[1:])
    assert inv[2] == 0 and abs(inv[1] - 1 / np.sqrt(63**2 * 2 + 1)) < 1e-9


def test_gram_beyond_float32_exactness_uses_integers(monkeypatch):
    # D = 3000: sums of 127 x 63 products reach 2.4e7 > 2^24, where float32 would round
    monkeypatch.setattr(int8_gemm, "_session", lambda threads: None)
    a = np.full((2, 3000), 127, np.int8)
    b = np.full((3, 3000), 63, np.int8)
    b[1, 0] = 62
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


_AVX2_CHILD = r"""
import json
import json

import numpy as np
from d2r import int8_gemm
rng = np.random.default_rng(0)
out = {"backend": int8_gemm.backend(), "stored": [], "wide": []}
for dim in (7, 64, 128, 1040):
    x = rng.normal(size=(40, dim)).astype(np.float32)
    x[0] = 1.0
    x[1] = -1.0
    q, _ = int8_gemm.quantize_rows(x[:20], int8_gemm.INT8_MAX)
    s, _ = int8_gemm.quantize_rows(x[20:])
    s[0], s[1] = int8_gemm.STORED_MAX, -int8_gemm.STORED_MAX
    exact = q.astype(np.int64) @ s.astype(np.int64).T
    out["stored"].append(bool(np.array_equal(int8_gemm.gram(int8_gemm.query_operand(q), s), exact)))
    # 8-bit codes on the same kernel, bypassing gram's range check: what d2r did before
    wide = np.full((2, dim), 127, np.int8)
    sess = int8_gemm._session(1)
    got = sess.run(None, {"a": int8_gemm.query_operand(q), "b": np.ascontiguousarray(wide.T), "za": int8_gemm._ZERO_POINT})[0]
    out["wide"].append(bool(np.array_equal(got, q.astype(np.int64) @ wide.astype(np.int64).T)))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_exact_on_an_avx2_cpu_without_vnni_under_qemu():
    """ONNX Runtime's real uint8 x int8 kernel of a CPU without VNNI (AMD Zen 2, AVX2 only),
    run under qemu-user's emulation of that CPU (Debian's qemu-user-static, which .ci/run
    installs). Stored codes are exact; 8-bit codes saturate there, which shows that the
    emulated CPU takes the vpmaddubsw path (the test skips if it does not)."""
    import os
    import platform
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("onnxruntime")
    qemu = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs qemu-x86_64(-static) on an x86-64 host (apt-get install qemu-user-static)")
    sdk = str(Path(int8_gemm.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=sdk + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([qemu, "-cpu", "EPYC-Rome", sys.executable, "-c", _AVX2_CHILD], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["backend"] == "onnxruntime"
    if all(out["wide"]):
        pytest.skip("the emulated CPU did not take ONNX Runtime's saturating AVX2 path")
    assert out["stored"] == [True, True, True, True]
