"""Model backends: TFLite (ai-edge-litert, tflite-runtime fallback) and ONNX Runtime.

``load_model`` gives one small interface over both runtimes: ``model.run(x)`` takes float32
input(s) and returns float32 outputs, quantising and dequantising int8/uint8 tensors of fully
quantised models itself, so callers never care about the precision of the file. Tensors are
allocated once and reused across calls.

Accelerators: ``cpu`` (XNNPACK for TFLite, the default CPU provider for ONNX Runtime),
``gpu`` (TFLite GPU delegate; CUDA for ONNX), ``nnapi`` (Android), ``cuda`` and ``tensorrt``
(ONNX Runtime execution providers). One that is not available falls back to the CPU with one
warning on the ``d2r`` logger, and ``model.accelerator`` says what is really used.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError, ModelError

if TYPE_CHECKING:  # the manifest is read on first use
    from .manifest import ModelEntry

log = logging.getLogger("d2r")

ACCELERATORS = ("cpu", "gpu", "nnapi", "cuda", "tensorrt")
BACKENDS = ("auto", "tflite", "onnx")

# Shared libraries of the TFLite GPU delegate by platform; none ships in the Linux wheels.
_TFLITE_GPU_DELEGATES = ("libtensorflowlite_gpu_delegate.so", "libtensorflowlite_gpu_gl.so")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape, dtype and quantisation (scale, zero point; (0.0, 0) if float) of a tensor."""

    name: str
    shape: tuple
    dtype: np.dtype
    quantization: tuple = (0.0, 0)


# What the TFLite runtime prints on stderr from C++ for every process that loads a model: an
# INFO line, not a problem, so d2r drops it (everything else it prints is passed on).
_NATIVE_NOISE = ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)


@contextlib.contextmanager
def _native_stderr_filtered():
    """Capture what native code writes to file descriptor 2 while the block runs, then write
    it back without the lines of ``_NATIVE_NOISE``. A no-op where fd 2 cannot be redirected."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    tmp = tempfile.TemporaryFile()
    try:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if line.strip() not in _NATIVE_NOISE]
            if kept:
                os.write(2, "".join(kept).encode())
    finally:
        os.close(saved)
        tmp.close()


def _library_loads(name: str) -> bool:
    """Whether the shared library ``name`` can be loaded at all. Asked before
    ``load_delegate``: a delegate whose library is missing leaves a half-built object whose
    ``__del__`` prints an AttributeError traceback (ai-edge-litert 2.x)."""
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _tflite_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "ai-edge-litert"
    except ImportError:
        pass
    try:  # 32-bit ARM and numpy < 2 only; see docs/models.md
        from tflite_runtime.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "tflite-runtime"
    except ImportError:
        raise ModelError(
            "running .tflite models needs a TFLite runtime: pip install ai-edge-litert "
            "(or tflite-runtime on 32-bit ARM with numpy < 2)"
        ) from None


class Model:
    """A loaded model. Use :func:`load_model`; close with :meth:`close` or a ``with`` block."""

    backend: str
    accelerator: str
    path: Path
    inputs: list
    outputs: list
    entry: ModelEntry | None = None  # the model's manifest entry, when it is listed

    def run(self, *arrays, **named) -> list:
        """Run on float32 (or already-quantised) inputs; returns float32 outputs, in order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        ins = ", ".join(f"{t.name}{list(t.shape)}:{np.dtype(t.dtype).name}" for t in self.inputs)
        return f"<d2r.Model {self.path.name} backend={self.backend} accelerator={self.accelerator} inputs=[{ins}]>"

    def _gather_inputs(self, arrays, named) -> list:
        if arrays and named:
            raise InputError(f"{self.path.name}: pass inputs by position or by name, not both")
        if named:
            missing = [t.name for t in self.inputs if t.name not in named]
            extra = sorted(set(named) - {t.name for t in self.inputs})
            if missing or extra:
                raise InputError(f"{self.path.name}: inputs {[t.name for t in self.inputs]} expected; missing {missing}, unknown {extra}")
            arrays = [named[t.name] for t in self.inputs]
        if len(arrays) != len(self.inputs):
            raise InputError(f"{self.path.name}: model takes {len(self.inputs)} input(s), got {len(arrays)}")
        out = []
        for spec, arr in zip(self.inputs, arrays):
            arr = np.asarray(arr)
            want = tuple(int(s) if s is not None and int(s) > 0 else -1 for s in spec.shape)
            if arr.ndim != len(want) or any(w not in (-1, a) for w, a in zip(want, arr.shape)):
                raise InputError(f"{self.path.name}: input {spec.name!r} expects shape {list(spec.shape)}, got {list(arr.shape)}")
            out.append(_to_input_dtype(arr, spec, self.path.name))
        return out


def _to_input_dtype(arr: np.ndarray, spec: TensorSpec, model_name: str) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if arr.dtype == dtype:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind != "f":
        raise InputError(f"{model_name}: input {spec.name!r} expects {dtype.name} or float32, got {arr.dtype}")
    if dtype.kind == "f":
        return np.ascontiguousarray(arr, dtype=dtype)
    scale, zero = spec.quantization
    if not scale:
        raise InputError(f"{model_name}: input {spec.name!r} is {dtype.name} without quantisation parameters")
    info = np.iinfo(dtype)
    q = np.round(arr.astype(np.float32) / np.float32(scale)) + zero
    return np.clip(q, info.min, info.max).astype(dtype)


def _from_output_dtype(arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    scale, zero = spec.quantization
    if scale:
        return (arr.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return arr


class TFLiteModel(Model):
    backend = "tflite"

    def __init__(self, path: Path, threads: int | None, accelerator: str):
        Interpreter, load_delegate, self.runtime = _tflite_interpreter_class()
        self.path = path
        delegates = []
        used = "cpu"
        if accelerator in ("gpu", "nnapi"):
            names = _TFLITE_GPU_DELEGATES if accelerator == "gpu" else ("libnnapi_delegate.so",)
            for lib in names:
                if not _library_loads(lib):
                    continue
                try:
                    delegates = [load_delegate(lib)]
                    used = accelerator
                    break
                except (ValueError, OSError, RuntimeError):
                    continue
            if not delegates:
                log.warning("d2r: %s: TFLite %s delegate not available on this device; running on the CPU (XNNPACK)", path.name, accelerator)
        elif accelerator in ("cuda", "tensorrt"):
            log.warning("d2r: %s: accelerator %r is an ONNX Runtime provider, not a TFLite delegate; running on the CPU (XNNPACK)", path.name, accelerator)
        try:
            with _native_stderr_filtered():
                self._interp = Interpreter(model_path=str(path), num_threads=threads, experimental_delegates=delegates or None)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            if delegates:
                log.warning("d2r: %s: %s delegate rejected the model (%s); running on the CPU", path.name, accelerator, exc)
                with _native_stderr_filtered():
                    self._interp = Interpreter(model_path=str(path), num_threads=threads)
                    self._interp.allocate_tensors()
                used = "cpu"
            else:
                raise ModelError(f"{path}: cannot load TFLite model ({exc})") from exc
        self.accelerator = used
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self.inputs = [TensorSpec(d["name"], tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"]), tuple(d["quantization"])) for d in self._in]
        self.outputs = [TensorSpec(d["name"], tuple(int(s) for s in d["shape"]), np.dtype(d["dtype"]), tuple(d["quantization"])) for d in self._out]

    def run(self, *arrays, **named) -> list:
        for detail, arr in zip(self._in, self._gather_inputs(arrays, named)):
            self._interp.set_tensor(detail["index"], arr)
        self._interp.invoke()
        return [_from_output_dtype(self._interp.get_tensor(d["index"]), spec) for d, spec in zip(self._out, self.outputs)]

    def close(self) -> None:
        self._interp = None


class ONNXModel(Model):
    backend = "onnx"

    def __init__(self, path: Path, threads: int | None, accelerator: str):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("running .onnx models needs ONNX Runtime: pip install 'd2r[onnx]' (or onnxruntime-gpu on a Jetson)") from None
        self.path = path
        wanted = {
            "cuda": "CUDAExecutionProvider",
            "gpu": "CUDAExecutionProvider",
            "tensorrt": "TensorrtExecutionProvider",
            "nnapi": "NnapiExecutionProvider",
        }.get(accelerator)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        used = "cpu"
        if wanted:
            if wanted in available:
                providers = [wanted, "CPUExecutionProvider"]
                used = accelerator
            else:
                log.warning("d2r: %s: ONNX Runtime has no %s here (available: %s); running on the CPU", path.name, wanted, ", ".join(available))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"{path}: cannot load ONNX model ({exc})") from exc
        if used != "cpu" and wanted not in self._session.get_providers():
            log.warning("d2r: %s: %s failed to initialise; running on the CPU", path.name, wanted)
            used = "cpu"
        self.accelerator = used
        self.inputs = [TensorSpec(i.name, tuple(s if isinstance(s, int) else -1 for s in i.shape), _ort_dtype(i.type)) for i in self._session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(s if isinstance(s, int) else -1 for s in o.shape), _ort_dtype(o.type)) for o in self._session.get_outputs()]
        self._out_names = [o.name for o in self.outputs]

    def run(self, *arrays, **named) -> list:
        feed = {spec.name: arr for spec, arr in zip(self.inputs, self._gather_inputs(arrays, named))}
        try:
            outs = self._session.run(self._out_names, feed)
        except Exception as exc:
            raise ModelError(f"{self.path.name}: inference failed ({exc})") from exc
        return [np.asarray(o).astype(np.float32, copy=False) if np.asarray(o).dtype.kind == "f" else np.asarray(o) for o in outs]

    def close(self) -> None:
        self._session = None


def _ort_dtype(type_str: str) -> np.dtype:
    return np.dtype(
        {
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(uint8)": np.uint8,
            "tensor(int8)": np.int8,
            "tensor(int32)": np.int32,
            "tensor(int64)": np.int64,
        }.get(type_str, np.float32)
    )


def load_model(name_or_path, backend: str = "auto", threads: int | None = None, accelerator: str = "cpu") -> Model:
    """Load a model file (``.tflite`` or ``.onnx``) or a model name from ``models/manifest.json``.

    A name picks the fastest file of that model for the backend (int8, then fp16, then fp32).
    ``model.entry`` is the file's manifest entry (input, outputs, geometry, defaults) if listed.

    backend: ``auto`` (by file extension), ``tflite`` or ``onnx``. threads: CPU threads
    (None: the runtime's default). accelerator: one of ``cpu, gpu, nnapi, cuda, tensorrt``.
    """
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if accelerator not in ACCELERATORS:
        raise InputError(f"accelerator: expected one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads: expected a positive integer or None, got {threads!r}")
    path = _resolve(name_or_path, backend)
    kind = backend if backend != "auto" else {".tflite": "tflite", ".onnx": "onnx"}.get(path.suffix.lower())
    if kind is None:
        raise ModelError(f"{path}: unknown model format (expected .tflite or .onnx, or pass backend=)")
    model = TFLiteModel(path, threads, accelerator) if kind == "tflite" else ONNXModel(path, threads, accelerator)
    from .manifest import entry_for_file

    model.entry = entry_for_file(path)
    return model


def _resolve(name_or_path, backend: str) -> Path:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise InputError(f"name_or_path: expected a model name or a file path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise ModelError(f"{path}: not a model file")
    if os.sep not in str(name_or_path) and path.suffix == "":
        from .manifest import resolve_model_path

        return resolve_model_path(str(name_or_path), backend)
    raise ModelError(f"{path}: no such model file")
