"""One conversion run: export every format/precision, check parity, time, write manifest and report.

A model module (``ssd``, ``xfeat``, ``delf``) describes its conversion as a :class:`Job`; this
module does the rest the same way for all of them, so that every shipped file is checked and
described the same way.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r.errors import ModelError

from . import compare, export, runtimes
from ._tools import require, sha256_file
from .manifest import update_manifest

Outputs = dict[str, np.ndarray]


@dataclass
class Job:
    """What a model module hands to :func:`run`.

    stem: file name stem (``xfeat_480x640``); ``{stem}_{precision}.{tflite|onnx}`` are written.
    model: the Keras network with its weights loaded.
    input_shape: fixed NHWC input shape.
    calibration: float32 inputs for int8 calibration (real photos).
    evaluation: float32 inputs on which outputs are compared (real photos, not the calibration set).
    source: runs the source model (upstream TFLite, PyTorch module, ...) on one input.
    entry: manifest fields shared by all files of this model (task, input, outputs, ...).
    task_compare: optional, compares two output dicts for the task (detections, keypoints);
        returns a dict of numbers averaged over the evaluation inputs.
    pair_check: optional, takes a runner (input -> outputs) and returns task numbers on an
        image pair (XFeat: matching inliers).
    """

    name: str
    stem: str
    model: object
    input_shape: tuple[int, ...]
    calibration: Sequence[np.ndarray]
    evaluation: Sequence[np.ndarray]
    source: Callable[[np.ndarray], Outputs]
    source_label: str
    entry: dict
    tflite_precisions: Sequence[str] = ("fp32", "fp16", "int8")
    onnx_precisions: Sequence[str] = ("fp32", "int8")
    task_compare: Callable[[Outputs, Outputs], dict] | None = None
    pair_check: Callable[[Callable[[np.ndarray], Outputs]], dict] | None = None
    notes: list[str] = field(default_factory=list)
    #: files written next to the models as they are (ALIKED's descriptor head weights); the
    #: entry refers to them itself (``entry["head"]``)
    extra_files: dict[str, bytes] = field(default_factory=dict)


def _mean_dicts(rows: list[dict]) -> dict:
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        out[k] = float(np.nanmean(vals)) if vals else None
    return out


def _diff_over(ref_runs: list[Outputs], runs: list[Outputs]) -> dict:
    per = [compare.tensor_diff(r, o) for r, o in zip(ref_runs, runs)]
    return {name: {"max_abs": max(p[name]["max_abs"] for p in per),
                   "max_abs_rel": max(p[name]["max_abs_rel"] for p in per)} for name in per[0]}


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def toolchain_versions() -> dict:
    versions = {}
    for mod in ("tensorflow", "tf2onnx", "onnx", "onnxruntime", "ai_edge_litert", "torch", "numpy"):
        try:
            m = require(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except ModelError:
            pass
    return versions


def run(job: Job, out_dir: str | os.PathLike, threads: Sequence[int] = (1, 2), timing_runs: int = 10,
        manifest_path: str | os.PathLike | None = None, report_path: str | os.PathLike | None = None,
        keep: set[tuple[str, str]] | None = None, log: Callable[[str], None] = print) -> dict:
    """Convert, check and time ``job``; write the files, the manifest entries and the JSON report.

    keep: (format, precision) pairs to keep in ``out_dir`` and list in the manifest; the others
    are measured for the report, then deleted (default: keep all).

    Returns the report dict. Raises :class:`ModelError` when the Keras rebuild does not
    reproduce the source model (max |diff| > 1e-3 relative to the output's range).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(manifest_path) if manifest_path else out_dir / "manifest.json"
    report_path = Path(report_path) if report_path else out_dir / "reports" / f"{job.stem}.json"

    for name, data in job.extra_files.items():
        (out_dir / name).write_bytes(data)

    # 1. The rebuilt float network against the source model.
    src_runs = [job.source(x) for x in job.evaluation]
    keras_runs = [{k: np.asarray(v) for k, v in job.model(x, training=False).items()} for x in job.evaluation]
    keras_vs_source = _diff_over(src_runs, keras_runs)
    worst = max(v["max_abs_rel"] for v in keras_vs_source.values())
    log(f"{job.name}: rebuilt network vs {job.source_label}: worst max|diff| relative {worst:.2e}")
    if worst > 1e-3:
        raise ModelError(f"{job.name}: the rebuilt network does not reproduce {job.source_label} (relative diff {worst:.2e})")

    # 2. Export.
    files = []
    for precision in job.tflite_precisions:
        log(f"{job.name}: TFLite {precision} ...")
        data = export.to_tflite(job.model, job.input_shape, precision, job.calibration)
        files.append(("tflite", precision, data))
    onnx_fp32 = None
    for precision in job.onnx_precisions:
        log(f"{job.name}: ONNX {precision} ...")
        if onnx_fp32 is None:
            onnx_fp32 = export.to_onnx(job.model, job.input_shape)
        data = onnx_fp32 if precision == "fp32" else export.quantize_onnx(onnx_fp32, job.calibration)
        files.append(("onnx", precision, data))

    # 3. Check and time each file.
    report_files, entries = [], []
    fp32_runs: dict[str, list[Outputs]] = {}
    for fmt, precision, data in files:
        path = out_dir / f"{job.stem}_{precision}.{fmt}"
        path.write_bytes(data)
        model = runtimes.load(path, threads=max(threads))
        runs = [model(x) for x in job.evaluation]
        row: dict = {"file": path.name, "format": fmt, "precision": precision, "size_bytes": path.stat().st_size,
                     "sha256": sha256_file(path)}
        row["ops"] = runtimes.tflite_ops(path) if fmt == "tflite" else runtimes.onnx_ops(path)
        if fmt == "tflite":
            row["gpu_delegate_unsupported_ops"] = sorted(set(row["ops"]) - runtimes.GPU_DELEGATE_OPS)
        row["vs_source"] = _diff_over(src_runs, runs)
        if precision == "fp32":
            fp32_runs[fmt] = runs
        ref = fp32_runs.get(fmt) or fp32_runs.get("tflite") or keras_runs
        if precision != "fp32":
            row["vs_fp32"] = _diff_over(ref, runs)
        if job.task_compare is not None:
            if precision != "fp32":
                row["task_vs_fp32"] = _mean_dicts([job.task_compare(r, o) for r, o in zip(ref, runs)])
            row["task_vs_source"] = _mean_dicts([job.task_compare(r, o) for r, o in zip(src_runs, runs)])
        if job.pair_check is not None:
            row["pair"] = job.pair_check(model)
        row["latency_ms"] = {str(t): runtimes.latency_ms(path, job.evaluation[0], t, runs=timing_runs) for t in threads}
        del model
        row["shipped"] = keep is None or (fmt, precision) in keep
        if not row["shipped"]:
            path.unlink()
            report_files.append(row)
            log(_row_line(row) + " (measured, not kept)")
            continue
        entry = dict(job.entry)
        # outputs in the file's own order (what an interpreter returns), with the file's tensor names
        specs = {o["name"]: o for o in job.entry["outputs"]}
        entry["outputs"] = [dict(specs[name], tensor=tensor) for name, tensor in runtimes.output_order(path)]
        entry.update({"file": path.name, "format": fmt, "precision": precision, "sha256": row["sha256"],
                      "size_bytes": row["size_bytes"], "ops": row["ops"]})
        entry["quantization"] = _QUANT_NOTE[(fmt, precision)]
        entries.append(entry)
        report_files.append(row)
        log(_row_line(row))

    update_manifest(manifest_path, entries, drop_files=[r["file"] for r in report_files if not r["shipped"]])
    report = {
        "model": job.name, "stem": job.stem, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "toolchain": toolchain_versions(), "input_shape": list(job.input_shape),
        "source": job.source_label, "evaluation_images": len(job.evaluation), "calibration_images": len(job.calibration),
        "keras_vs_source": keras_vs_source, "files": report_files, "notes": job.notes,
    }
    if job.pair_check is not None:
        report["pair_source"] = job.pair_check(job.source)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(format_table(report))
    log(f"report: {report_path}\nmanifest: {manifest_path}")
    return report


_QUANT_NOTE = {
    ("tflite", "fp32"): "none",
    ("tflite", "fp16"): "float16 weights, float32 compute on CPU (float16 on GPU delegates)",
    ("tflite", "int8"): "full integer: int8 weights (per channel) and activations, float32 input/output via QUANTIZE/DEQUANTIZE",
    ("onnx", "fp32"): "none",
    ("onnx", "int8"): "static QDQ, uint8 activations, int8 per-channel weights (U8S8)",
}


def _row_line(row: dict) -> str:
    worst = max(v["max_abs_rel"] for v in row["vs_source"].values())
    return f"  {row['file']}: {row['size_bytes'] / 1e6:.2f} MB, max|diff| vs source (rel) {worst:.2e}"


def format_table(report: dict) -> str:
    """The report as a fixed-width text table (one line per file)."""
    lines = [f"{report['model']} ({'x'.join(map(str, report['input_shape']))}) vs {report['source']}",
             f"{'file':34s} {'MB':>6s} {'1 thr ms':>9s} {'2 thr ms':>9s} {'rel diff vs src':>15s}  task vs fp32"]
    for row in report["files"]:
        worst = max(v["max_abs_rel"] for v in row["vs_source"].values())
        lat = row["latency_ms"]
        task = row.get("task_vs_fp32") or {}
        task_s = ", ".join(f"{k}={v:.3f}" for k, v in task.items() if isinstance(v, float)) if row["precision"] != "fp32" else "-"
        name = row["file"] + ("" if row.get("shipped", True) else " *")
        lines.append(f"{name:34s} {row['size_bytes'] / 1e6:6.2f} {lat.get('1', float('nan')):9.1f} "
                     f"{lat.get('2', float('nan')):9.1f} {worst:15.2e}  {task_s}")
        if row.get("gpu_delegate_unsupported_ops"):
            lines.append(f"    ops not in the GPU delegate: {row['gpu_delegate_unsupported_ops']}")
        if row.get("pair"):
            lines.append(f"    pair: {row['pair']}")
    if any(not r.get("shipped", True) for r in report["files"]):
        lines.append("* measured for this report, not kept")
    return "\n".join(lines)
