"""Read the constant weights of a TFLite flatbuffer, keyed by the layer scope they belong to.

A TFLite file exported by the TF Object Detection API stores each conv layer as a CONV_2D or
DEPTHWISE_CONV_2D op whose filter and bias are constant tensors (fp16 behind a DEQUANTIZE op
in the MediaPipe build). The converter folds several names into one (``a;b;c``): the first
component always names the layer that owns the tensor, which is what we key on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._tools import require

# TFLite tensor types we may meet for weights (schema TensorType enum).
_NUMPY_OF_TYPE = {0: np.float32, 1: np.float16, 2: np.int32, 9: np.int8}


@dataclass
class ConvWeights:
    """Weights of one convolution as stored in TFLite.

    kernel: float32 [O, kh, kw, I] for CONV_2D, [1, kh, kw, C] for DEPTHWISE_CONV_2D.
    bias: float32 [O].
    """

    scope: str
    op: str
    kernel: np.ndarray
    bias: np.ndarray
    stride: int


def _layer_scope(tensor_name: str) -> str:
    first = tensor_name.split(";")[0]
    if first.endswith("_dequantize"):
        first = first[: -len("_dequantize")]
    for suffix in ("/BatchNorm/FusedBatchNormV3", "/depthwise", "/Conv2D", "/biases", "/BiasAdd"):
        if first.endswith(suffix):
            return first[: -len(suffix)]
    return first.rsplit("/", 1)[0]


def read_conv_weights(path) -> dict[str, ConvWeights]:
    """Map layer scope -> :class:`ConvWeights` for every convolution of the TFLite model at ``path``."""
    fbu = require("tensorflow.lite.tools.flatbuffer_utils")
    schema = require("tensorflow.lite.python.schema_py_generated")
    model = fbu.read_model(str(path))
    graph = model.subgraphs[0]
    op_name = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def code(op):
        oc = model.operatorCodes[op.opcodeIndex]
        return op_name[max(oc.builtinCode, oc.deprecatedBuiltinCode)]

    # A DEQUANTIZE output stands for its (fp16) input constant.
    produced_by_dequantize = {op.outputs[0]: op.inputs[0] for op in graph.operators if code(op) == "DEQUANTIZE"}

    def constant(tensor_index: int) -> np.ndarray:
        tensor_index = produced_by_dequantize.get(tensor_index, tensor_index)
        t = graph.tensors[tensor_index]
        raw = model.buffers[t.buffer].data
        if raw is None or len(raw) == 0:
            raise ValueError(f"tensor {t.name!r} is not a constant")
        arr = np.frombuffer(bytes(raw), dtype=_NUMPY_OF_TYPE[t.type]).reshape(tuple(t.shape))
        return arr.astype(np.float32)

    out: dict[str, ConvWeights] = {}
    for op in graph.operators:
        kind = code(op)
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        w_index, b_index = op.inputs[1], op.inputs[2]
        scope = _layer_scope(graph.tensors[w_index].name.decode())
        if scope in out:
            raise ValueError(f"two convolutions map to the layer scope {scope!r}")
        out[scope] = ConvWeights(scope, kind, constant(w_index), constant(b_index), int(op.builtinOptions.strideH))
    return out
