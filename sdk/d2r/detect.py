"""SSD detection outside the graph: anchor generation, box decoding and non-maximum suppression.

The converted detectors output raw box encodings [1, A, 4] as (ty, tx, th, tw) and class
logits [1, A, C] (sigmoid; class 0 is background). Anchors and decoding follow the MediaPipe
SSD anchor scheme that the OIDv4 MobileNet-V2 SSD was trained with (6 layers, min scale 0.2,
max scale 0.95, strides 16..512, aspect ratios 1, 2, 1/2, 3, 1/3, three reduced boxes in the
lowest layer, one extra box per cell at the interpolated scale) -> 1917 anchors at 300x300.
Parameters come from the model manifest (``anchors``); :data:`OIDV4_ANCHORS` is that entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, ModelError

OIDV4_ANCHORS = {
    "num_layers": 6,
    "min_scale": 0.2,
    "max_scale": 0.95,
    "input_size": [300, 300],
    "strides": [16, 32, 64, 128, 256, 512],
    "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 1.0 / 3.0],
    "reduce_boxes_in_lowest_layer": True,
    "interpolated_scale_aspect_ratio": 1.0,
    "anchor_offset": [0.5, 0.5],
    "box_scale": [10.0, 10.0, 5.0, 5.0],
}


def _anchor_params(params: dict | None) -> dict:
    """Normalise anchor parameters: this module's keys, or the manifest's (MediaPipe-style)."""
    p = dict(OIDV4_ANCHORS if params is None else params)
    if "input_size_height" in p:
        p["input_size"] = [p["input_size_height"], p["input_size_width"]]
    if "anchor_offset_y" in p:
        p["anchor_offset"] = [p["anchor_offset_y"], p["anchor_offset_x"]]
    return p


def ssd_anchors(params: dict | None = None) -> np.ndarray:
    """float32 [A, 4] anchors as (y_centre, x_centre, height, width), normalised to [0, 1].

    params: :data:`OIDV4_ANCHORS` by default, or a manifest ``anchors`` entry. Order: layer by
    layer, row-major over the feature map cells, then the boxes of a cell (aspect ratios in
    the given order, then the interpolated-scale box), as the model's outputs are ordered.
    """
    p = _anchor_params(params)
    n_layers = int(p["num_layers"])
    strides = list(p["strides"])
    if len(strides) != n_layers:
        raise InputError(f"anchors: {n_layers} layers but {len(strides)} strides")
    in_h, in_w = (int(v) for v in p["input_size"])
    lo, hi = float(p["min_scale"]), float(p["max_scale"])
    ratios = [float(r) for r in p["aspect_ratios"]]
    interp = p.get("interpolated_scale_aspect_ratio", 1.0)
    off_y, off_x = (float(v) for v in p.get("anchor_offset", [0.5, 0.5]))
    map_sizes = p.get("feature_map_sizes")

    def scale_of(i):
        return (lo + hi) / 2 if n_layers == 1 else lo + (hi - lo) * i / (n_layers - 1)

    out = []
    for layer in range(n_layers):
        boxes = []  # (height, width) per cell
        if layer == 0 and p.get("reduce_boxes_in_lowest_layer", False):
            for ratio, scale in ((1.0, 0.1), (2.0, scale_of(0)), (0.5, scale_of(0))):
                boxes.append((scale / math.sqrt(ratio), scale * math.sqrt(ratio)))
        else:
            scale = scale_of(layer)
            for ratio in ratios:
                boxes.append((scale / math.sqrt(ratio), scale * math.sqrt(ratio)))
            if interp is not None and interp > 0:
                nxt = 1.0 if layer == n_layers - 1 else scale_of(layer + 1)
                s = math.sqrt(scale * nxt)
                boxes.append((s / math.sqrt(interp), s * math.sqrt(interp)))
        if map_sizes:
            fh = fw = int(map_sizes[layer])
        else:
            fh = math.ceil(in_h / strides[layer])
            fw = math.ceil(in_w / strides[layer])
        for y in range(fh):
            for x in range(fw):
                cy, cx = (y + off_y) / fh, (x + off_x) / fw
                for h, w in boxes:
                    out.append((cy, cx, h, w))
    return np.asarray(out, dtype=np.float32)


def decode_boxes(encodings: np.ndarray, anchors: np.ndarray, box_scale=(10.0, 10.0, 5.0, 5.0)) -> np.ndarray:
    """Raw (ty, tx, th, tw) [A, 4] -> boxes [A, 4] as normalised (ymin, xmin, ymax, xmax)."""
    sy, sx, sh, sw = (np.float32(v) for v in box_scale)
    e = encodings.astype(np.float32)
    yc = e[:, 0] / sy * anchors[:, 2] + anchors[:, 0]
    xc = e[:, 1] / sx * anchors[:, 3] + anchors[:, 1]
    h = np.exp(np.clip(e[:, 2] / sh, -20, 20)) * anchors[:, 2]
    w = np.exp(np.clip(e[:, 3] / sw, -20, 20)) * anchors[:, 3]
    return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] and b [M, 4] (ymin, xmin, ymax, xmax) -> [N, M]."""
    ymin = np.maximum(a[:, None, 0], b[None, :, 0])
    xmin = np.maximum(a[:, None, 1], b[None, :, 1])
    ymax = np.minimum(a[:, None, 2], b[None, :, 2])
    xmax = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ymax - ymin, 0, None) * np.clip(xmax - xmin, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_boxes: int) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    suppressed = np.zeros(len(order), dtype=bool)
    ious = iou_matrix(boxes[order], boxes[order]) if len(order) else np.zeros((0, 0))
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        if len(keep) >= max_boxes:
            break
        suppressed |= ious[i] > iou_threshold
    return np.asarray(keep, dtype=np.int64)


@dataclass
class Detections:
    """Detected boxes of one image.

    boxes: float32 [M, 4] normalised (ymin, xmin, ymax, xmax), clipped to [0, 1];
    scores: float32 [M] descending; classes: int32 [M] (1-based class ids; 0 is background);
    labels: class names, when the model has a label map.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    labels: list = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def postprocess(
    encodings: np.ndarray,
    logits: np.ndarray,
    anchors: np.ndarray,
    threshold: float,
    max_boxes: int,
    iou_threshold: float,
    box_scale=(10.0, 10.0, 5.0, 5.0),
    class_agnostic: bool = True,
    ignore_classes=(0,),
) -> Detections:
    """Raw SSD outputs of one image ([A, 4], [A, C]) -> :class:`Detections`."""
    if encodings.ndim == 3:
        encodings = encodings[0]
    if logits.ndim == 3:
        logits = logits[0]
    if encodings.shape != (anchors.shape[0], 4) or logits.shape[0] != anchors.shape[0]:
        raise ModelError(f"detector outputs {encodings.shape} / {logits.shape} do not match {anchors.shape[0]} anchors")
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
    probs[:, list(ignore_classes)] = 0.0
    cls = probs.argmax(axis=1)
    score = probs[np.arange(len(cls)), cls]
    cand = np.flatnonzero(score >= threshold)
    boxes = decode_boxes(encodings[cand], anchors[cand], box_scale)
    if class_agnostic:
        kept = nms(boxes, score[cand], iou_threshold, max_boxes)
    else:
        kept_parts = []
        for c in np.unique(cls[cand]):
            sel = np.flatnonzero(cls[cand] == c)
            kept_parts.append(sel[nms(boxes[sel], score[cand][sel], iou_threshold, max_boxes)])
        kept = np.concatenate(kept_parts) if kept_parts else np.zeros(0, np.int64)
        kept = kept[np.argsort(-score[cand][kept], kind="stable")][:max_boxes]
    out_boxes = np.clip(boxes[kept], 0.0, 1.0).astype(np.float32)
    return Detections(out_boxes, score[cand][kept].astype(np.float32), cls[cand][kept].astype(np.int32))


class Detector:
    """Runs a converted SSD detector: stretch to the model input, run, decode, NMS.

    Args:
        model: a :class:`d2r.backends.Model`.
        threshold: minimum class score of a box (the paper uses 0.1 for regions).
        max_boxes: keep at most this many boxes after NMS.
        iou_threshold: NMS overlap (manifest default otherwise).
        entry: the model's manifest entry (input, anchors, decoding, labels, defaults);
            default ``model.entry``, which :func:`d2r.load_model` fills in for listed files.
    """

    def __init__(self, model, threshold: float = 0.1, max_boxes: int | None = None, iou_threshold: float | None = None, entry=None):
        entry = entry if entry is not None else getattr(model, "entry", None)
        if entry is None or entry.task != "detector":
            raise ModelError(f"{getattr(model, 'path', model)}: not a detector listed in a model manifest (pass entry=)")
        if not 0.0 <= float(threshold) <= 1.0:
            raise InputError(f"threshold: expected a score in [0, 1], got {threshold}")
        self.model = model
        self.entry = entry
        decoding = entry.decoding or {}
        defaults = entry.defaults or {}
        self.threshold = float(threshold)
        self.max_boxes = int(max_boxes if max_boxes is not None else defaults.get("max_detections", 25))
        self.iou_threshold = float(iou_threshold if iou_threshold is not None else decoding.get("nms_iou_threshold", 0.4))
        scales = decoding.get("scales", {"y": 10.0, "x": 10.0, "h": 5.0, "w": 5.0})
        self.box_scale = (scales["y"], scales["x"], scales["h"], scales["w"])
        self.anchors = ssd_anchors(entry.anchors)
        self.labels = list(entry.labels or [])
        self._out = [o.name for o in entry.outputs]

    def detect(self, image) -> Detections:
        """Boxes of ``image`` (anything :func:`d2r.load_image` takes) with score >= threshold."""
        from .features import _resize  # one resize helper for every model input
        from .image import load_image

        rgb = load_image(image)
        h, w = self.entry.input.height, self.entry.input.width
        x = _resize(rgb, h, w).astype(np.float32)
        lo, hi = self.entry.input.range
        if (lo, hi) != (0.0, 255.0):
            x = x / 255.0 * (hi - lo) + lo
        outs = dict(zip(self._out, self.model.run(x[None])))
        det = postprocess(
            outs["box_encodings"], outs["class_logits"], self.anchors, self.threshold, self.max_boxes, self.iou_threshold, self.box_scale
        )
        if self.labels:
            det.labels = [self.labels[c] if c < len(self.labels) else str(c) for c in det.classes]
        return det
