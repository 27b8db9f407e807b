"""Read ``models/manifest.json``: the contract between the converters and the runtime.

Each entry describes one model file: what it computes (``task``), how to feed it (``input``),
what comes out (``outputs``), how output cells map to image pixels (``geometry``), default
thresholds, and for detectors the anchors, box decoding and labels. Nothing here needs more
than the standard library and numpy.

    m = load_manifest()                          # models/manifest.json of this checkout
    e = m.find("xfeat", format="tflite", precision="int8")
    e.path, e.input.shape, e.output("descriptors").shape, e.defaults["max_features"]
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError

SCHEMA_VERSION = 1
TASKS = ("local_features", "detector", "matcher")  # matcher: the pieces of LightGlue (d2r.verify.lightglue)
FORMATS = ("tflite", "onnx")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class InputSpec:
    """The model input: float32 NHWC RGB image of a fixed shape, value range and normalisation."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    color: str
    range: tuple[float, float]
    normalisation: str
    resize: str

    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]


@dataclass(frozen=True)
class OutputSpec:
    """One output; entries list outputs in the order the file returns them (``tensor``: name inside the file)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    meaning: str
    tensor: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """One model file of the manifest; ``path`` is resolved against the manifest's folder."""

    name: str
    task: str
    file: str
    format: str
    precision: str
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    sha256: str
    licence: str
    path: Path
    variant: str = ""
    size_bytes: int = 0
    quantization: str = ""
    geometry: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    anchors: dict | None = None
    decoding: dict | None = None
    labels: tuple[str, ...] | None = None
    ops: tuple[str, ...] = ()
    training: dict = field(default_factory=dict)  # fine-tuned models: how (d2r detector finetune)
    head: dict = field(default_factory=dict)  # host-side weights beside the file (ALIKED's SDDH): file, sha256

    @property
    def head_path(self) -> Path | None:
        """The file of ``head`` (resolved next to the model file), or None."""
        return self.path.parent / self.head["file"] if self.head.get("file") else None

    def output(self, name: str) -> OutputSpec:
        for o in self.outputs:
            if o.name == name:
                return o
        raise ModelError(f"{self.file}: no output named {name!r} (outputs: {[o.name for o in self.outputs]})")

    def verify(self) -> None:
        """Raise :class:`ModelError` if the file is missing or its sha256 differs from the manifest."""
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file listed in the manifest is missing")
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != self.sha256:
            raise ModelError(f"{self.path}: sha256 {h.hexdigest()} differs from the manifest's {self.sha256}")
        if self.head_path is not None:
            if not self.head_path.is_file():
                raise ModelError(f"{self.head_path}: head file listed in the manifest (model {self.file}) is missing")
            digest = hashlib.sha256(self.head_path.read_bytes()).hexdigest()
            if self.head.get("sha256") and digest != self.head["sha256"]:
                raise ModelError(f"{self.head_path}: sha256 {digest} differs from the manifest's {self.head['sha256']}")


@dataclass(frozen=True)
class Manifest:
    path: Path
    schema_version: int
    models: tuple[ModelEntry, ...]

    def find(self, name: str, format: str | None = None, precision: str | None = None, variant: str | None = None) -> ModelEntry:
        """The single entry matching the given fields; :class:`ModelError` if none or several match."""
        hits = [m for m in self.models if m.name == name and (format is None or m.format == format)
                and (precision is None or m.precision == precision) and (variant is None or m.variant == variant)]
        if len(hits) != 1:
            have = sorted(f"{m.name}/{m.variant or '-'}/{m.format}/{m.precision}" for m in self.models)
            what = "no model" if not hits else f"{len(hits)} models"
            raise ModelError(f"{self.path}: {what} for name={name!r} format={format!r} precision={precision!r} "
                             f"variant={variant!r}; available: {have}")
        return hits[0]


def default_path() -> Path:
    """``$D2R_MODELS_DIR/manifest.json``, else ``models/manifest.json`` of the source checkout."""
    env = os.environ.get("D2R_MODELS_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "models"
    return base / "manifest.json"


def _value_range(v, where: str) -> tuple[float, float]:
    if v is None:  # unbounded (the states a LightGlue layer passes on)
        return float("-inf"), float("inf")
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ModelError(f"{where}: input.range: expected [low, high], got {v!r}")
    return float(v[0]), float(v[1])


def _require(d: dict, key: str, where: str):
    if key not in d:
        raise ModelError(f"{where}: missing field {key!r}")
    return d[key]


def _entry(d: dict, root: Path, where: str) -> ModelEntry:
    inp = _require(d, "input", where)
    task, fmt, prec = (_require(d, k, where) for k in ("task", "format", "precision"))
    if task not in TASKS or fmt not in FORMATS or prec not in PRECISIONS:
        raise ModelError(f"{where}: unknown task/format/precision {task!r}/{fmt!r}/{prec!r}")
    input_spec = InputSpec(
        name=_require(inp, "name", where), shape=tuple(int(v) for v in _require(inp, "shape", where)),
        dtype=inp.get("dtype", "float32"), layout=inp.get("layout", "NHWC"), color=inp.get("color", "RGB"),
        range=_value_range(_require(inp, "range", where), where), normalisation=inp.get("normalisation", ""),
        resize=inp.get("resize", ""),
    )
    outputs = tuple(OutputSpec(_require(o, "name", where), tuple(int(v) for v in _require(o, "shape", where)),
                               o.get("dtype", "float32"), o.get("meaning", ""), o.get("tensor", ""))
                    for o in _require(d, "outputs", where))
    if task == "detector" and ("anchors" not in d or "decoding" not in d):
        raise ModelError(f"{where}: a detector entry needs 'anchors' and 'decoding'")
    file = _require(d, "file", where)
    return ModelEntry(
        name=_require(d, "name", where), task=task, file=file, format=fmt, precision=prec, input=input_spec,
        outputs=outputs, sha256=_require(d, "sha256", where), licence=_require(d, "licence", where),
        path=root / file, variant=d.get("variant", ""), size_bytes=int(d.get("size_bytes", 0)),
        quantization=d.get("quantization", ""), geometry=dict(d.get("geometry", {})), defaults=dict(d.get("defaults", {})),
        source=dict(d.get("source", {})), anchors=d.get("anchors"), decoding=d.get("decoding"),
        labels=tuple(d["labels"]) if d.get("labels") is not None else None, ops=tuple(d.get("ops", ())),
        training=dict(d.get("training", {})), head=dict(d.get("head", {})),
    )


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Parse and check a manifest (default: :func:`default_path`). Raises :class:`ModelError`."""
    path = Path(path) if path is not None else default_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model manifest ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModelError(f"{path}: manifest schema_version {version!r}, this d2r reads {SCHEMA_VERSION}")
    models = tuple(_entry(d, path.parent, f"{path} models[{i}]") for i, d in enumerate(raw.get("models", [])))
    return Manifest(path=path, schema_version=version, models=models)


# Preference when only a model name is given: the fastest file that is in the manifest.
_PREFERENCE = {"tflite": ("int8", "fp16", "fp32"), "onnx": ("int8", "fp32")}


# Short names users type for the default models.
# "landmark": the default region detector (OIDv4 SSD fine-tuned on mined landmark boxes, issue 7);
# "ssd": the Open Images V4 detector it was fine-tuned from.
ALIASES = {"ssd": "ssd_mobilenetv2_oidv4", "landmark": "ssd_mobilenetv2_landmark"}
# The default local features of Engine.create and `d2r build`: ALIKED-t16 (TFLite fp16; it has
# no int8 file, so precision="int8" runs its fp16 file). With the landmark detector it clears
# issue 6's mAP goal with D2R-R-ASMK* at K = 8192 and extracts in ~100 ms per photo on one
# core; XFeat int8 ("xfeat") is 7x faster and much lower in mAP (benchmarks/RESULTS.md,
# "The default pipeline").
DEFAULT_FEATURES = "aliked_t16"


def resolve_model_path(name: str, backend: str = "auto", manifest: Manifest | None = None) -> Path:
    """File of model ``name`` for a backend (``auto`` = TFLite), preferring int8, then fp16, then fp32."""
    manifest = manifest if manifest is not None else load_manifest()
    name = ALIASES.get(name, name)
    formats = ("tflite", "onnx") if backend == "auto" else (backend,)
    for fmt in formats:
        for precision in _PREFERENCE.get(fmt, ()):
            hits = [m for m in manifest.models if m.name == name and m.format == fmt and m.precision == precision]
            if hits:
                return hits[0].path
    raise ModelError(f"{manifest.path}: no {'/'.join(formats)} model named {name!r} "
                     f"(names: {sorted({m.name for m in manifest.models})})")


def entry_for_file(path) -> ModelEntry | None:
    """The manifest entry of a model file: from the ``manifest.json`` beside it (a bundle's
    ``models/`` or the shipped ``models/``), else from the default manifest; None if unlisted."""
    path = Path(path).resolve()
    for candidate in (path.parent / "manifest.json", default_path()):
        if not candidate.is_file():
            continue
        try:
            manifest = load_manifest(candidate)
        except ModelError:
            continue
        for entry in manifest.models:
            if entry.path.resolve() == path:
                return entry
    return None
