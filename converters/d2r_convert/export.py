"""Write a Keras network as TFLite (fp32, fp16, int8) and ONNX (fp32, int8 static QDQ U8S8).

Every exported model has one input named ``image`` with a fixed shape and the named outputs of
the Keras model; TFLite files keep those names in their ``serving_default`` signature and ONNX
files as graph output names, so the runtime addresses outputs by name in both formats.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np

from d2r.errors import ModelError

from ._tools import require

TFLITE_PRECISIONS = ("fp32", "fp16", "int8")
ONNX_PRECISIONS = ("fp32", "int8")
ONNX_OPSET = 17


def serving_function(model, input_shape: Sequence[int], input_name: str = "image"):
    """A ``tf.function`` with one fixed-shape float32 input that returns the model's output dict."""
    tf = require("tensorflow")
    spec = (tf.TensorSpec(tuple(input_shape), tf.float32, name=input_name),)

    @tf.function(input_signature=spec)
    def serve(image):
        out = model(image, training=False)
        return {k: tf.identity(v, name=k) for k, v in out.items()}

    return serve, spec


def frozen_function(model, input_shape: Sequence[int], input_name: str = "image"):
    """:func:`serving_function` with the weights turned into constants.

    Keras 3 variables otherwise reach the TFLite file as VAR_HANDLE/READ_VARIABLE ops, which
    int8 calibration cannot run and no delegate accepts. Re-wrapping the frozen graph keeps the
    output names in the TFLite ``serving_default`` signature.
    """
    tf = require("tensorflow")
    c2c = require("tensorflow.python.framework.convert_to_constants")
    serve, spec = serving_function(model, input_shape, input_name)
    concrete = serve.get_concrete_function()
    names = sorted(concrete.structured_outputs)  # tf.nest flattens a dict in sorted key order
    frozen = c2c.convert_variables_to_constants_v2(concrete)

    @tf.function(input_signature=spec)
    def serve_frozen(image):
        return {n: tf.identity(t, name=n) for n, t in zip(names, frozen(image))}

    return serve_frozen, spec


def to_tflite(model, input_shape, precision: str = "fp32", calibration: Sequence[np.ndarray] | None = None) -> bytes:
    """Convert to TFLite with builtin ops only (no Flex ops, delegate-ready).

    precision: ``fp32``; ``fp16`` (weights stored in float16, computed in float32 on CPU);
    ``int8`` (full integer: every op int8, float32 input/output through QUANTIZE/DEQUANTIZE at
    the edges, calibrated on ``calibration``: float32 inputs of ``input_shape``).
    """
    tf = require("tensorflow")
    if precision not in TFLITE_PRECISIONS:
        raise ModelError(f"TFLite precision must be one of {TFLITE_PRECISIONS}, got {precision!r}")
    serve, _ = frozen_function(model, input_shape)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if not calibration:
            raise ModelError("int8 conversion needs calibration inputs (real photos)")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: ([x.astype(np.float32)] for x in calibration)
    try:
        return converter.convert()
    except Exception as exc:  # the converter raises many private exception types
        raise ModelError(f"TFLite {precision} conversion of {model.name} failed: {exc}") from exc


def to_onnx(model, input_shape, opset: int = ONNX_OPSET) -> bytes:
    """Convert to ONNX (standard opset ``opset``) through tf2onnx; fp32."""
    serve, spec = serving_function(model, input_shape)
    return function_to_onnx(serve, spec, model.name, opset)


def function_to_onnx(fn, spec, name: str, opset: int = ONNX_OPSET) -> bytes:
    """A ``tf.function`` with its input signature ``spec`` as ONNX bytes (tf2onnx, fp32);
    :class:`ModelError` naming ``name`` when the conversion fails."""
    tf2onnx = require("tf2onnx")
    try:
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    except Exception as exc:
        raise ModelError(f"ONNX conversion of {name} failed: {exc}") from exc
    proto.producer_name = "d2r_convert"
    return proto.SerializeToString()


def quantize_onnx(fp32_model: bytes, calibration: Sequence[np.ndarray], input_name: str = "image") -> bytes:
    """Static QDQ quantisation, uint8 activations and int8 per-channel weights (U8S8).

    U8S8 is the fast combination for ONNX Runtime on x86 (S8S8 measured 1.7-2.7x slower here).
    """
    q = require("onnxruntime.quantization")
    require("sympy")  # the pre-processing's symbolic shape inference needs it

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {input_name: x.astype(np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(src, "wb") as fh:
            fh.write(fp32_model)
        try:
            q.shape_inference.quant_pre_process(src, pre, skip_symbolic_shape=False)
        except Exception:
            pre = src  # pre-processing is an optimisation; quantise the plain model if it fails
        q.quantize_static(
            pre, dst, Reader(),
            quant_format=q.QuantFormat.QDQ,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            per_channel=True,
            calibrate_method=q.CalibrationMethod.MinMax,
        )
        with open(dst, "rb") as fh:
            return fh.read()
