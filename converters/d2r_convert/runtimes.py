"""Run and time exported models in LiteRT (ai-edge-litert) and ONNX Runtime, by output name."""

from __future__ import annotations

import os
import time

import numpy as np

from ._tools import require

# Ops the TFLite GPU delegate accepts (delegates/gpu/common/model_builder.cc, LiteRT 2.x);
# the report flags anything else, which would fall back to the CPU.
GPU_DELEGATE_OPS = frozenset(
    """ABS ADD AVERAGE_POOL_2D BATCH_MATMUL CAST CONCATENATION CONV_2D COS CUMSUM DENSIFY
    DEPTH_TO_SPACE DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EQUAL EXP FLOOR FLOOR_DIV FLOOR_MOD
    FULLY_CONNECTED GATHER GREATER GREATER_EQUAL HARD_SWISH LEAKY_RELU LESS LESS_EQUAL LOG
    LOGICAL_AND LOGISTIC MAX_POOL_2D MAXIMUM MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL ONE_HOT
    PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU_N1_TO_1 RELU6
    RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT SELECT_V2 SIN SLICE SOFTMAX
    SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE STRIDED_SLICE SUB SUM TANH TILE
    TRANSPOSE TRANSPOSE_CONV""".split()
)


def _interpreter(path: str | os.PathLike, threads: int = 1, delegates: bool = True):
    litert = require("ai_edge_litert.interpreter")
    kw = {} if delegates else {"experimental_op_resolver_type": litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    it = litert.Interpreter(model_path=str(path), num_threads=threads, **kw)
    it.allocate_tensors()
    return it


def tflite_ops(path) -> list[str]:
    """Sorted builtin op names of a TFLite model (read without the XNNPACK delegate)."""
    return sorted({op["op_name"] for op in _interpreter(path, delegates=False)._get_ops_details()})


def onnx_ops(path) -> list[str]:
    onnx = require("onnx")
    return sorted({n.op_type for n in onnx.load(str(path)).graph.node})


def output_order(path) -> list[tuple[str, str]]:
    """(output name, tensor name in the file) in the order a plain interpreter/session returns them.

    TFLite: the subgraph's output order (``get_output_details``), which need not follow the
    signature's names; ONNX: the graph's output order.
    """
    if str(path).endswith(".onnx"):
        return [(o.name, o.name) for o in OnnxModel(path).session.get_outputs()]
    it = _interpreter(path, delegates=False)
    by_index = {d["index"]: name for name, d in it.get_signature_runner().get_output_details().items()}
    return [(by_index[d["index"]], d["name"]) for d in it.get_output_details()]


class TFLiteModel:
    """A TFLite file behind its ``serving_default`` signature: ``model(image) -> {name: array}``."""

    def __init__(self, path, threads: int = 1):
        self.interpreter = _interpreter(path, threads)
        # Files without a signature (the upstream SSD) are read by output tensor name.
        self.runner = self.interpreter.get_signature_runner() if self.interpreter.get_signature_list() else None

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        if self.runner is not None:
            return {k: np.array(v) for k, v in self.runner(image=image).items()}
        it = self.interpreter
        it.set_tensor(it.get_input_details()[0]["index"], image)
        it.invoke()
        return {d["name"]: np.array(it.get_tensor(d["index"])) for d in it.get_output_details()}


class OnnxModel:
    """An ONNX file in ONNX Runtime (CPU): ``model(image) -> {name: array}``."""

    def __init__(self, path, threads: int = 1):
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.input = self.session.get_inputs()[0].name

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {self.input: image})))


def load(path, threads: int = 1):
    """:class:`TFLiteModel` or :class:`OnnxModel` by file suffix."""
    return OnnxModel(path, threads) if str(path).endswith(".onnx") else TFLiteModel(path, threads)


def latency_ms(path, image: np.ndarray, threads: int, runs: int = 10, warmup: int = 2) -> float:
    """Median wall time of one inference in milliseconds."""
    model = load(path, threads)
    for _ in range(warmup):
        model(image)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(image)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
