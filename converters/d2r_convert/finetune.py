"""Fine-tune the MobileNet-V2 SSD into a one-class ("landmark") detector from a boxes file.

``d2r detector finetune --images DIR --boxes boxes.json -o OUT``: the boxes come from
``d2r detector mine-boxes`` (retrieval + spatial verification, no annotation), one box per
image or none. Training is made for a CPU:

* The OIDv4 network (:mod:`d2r_convert.ssd`) is the start. Its backbone and extra feature
  layers stay frozen; only the SSD heads (1x1 box and class predictors on the six feature
  maps) are trained. The box head starts from the OIDv4 box head; the class head becomes
  two channels (background, landmark): background from the OIDv4 background channel,
  landmark from zero weights and a prior bias (score 0.01).
* The frozen feature maps are computed once per image and *view* (the whole image, its
  mirror image, and seeded random crops of 50-100% of the area, mirrored at random) and kept
  in float16 memory-mapped files on disk (about 0.7 MB per view), so memory stays bounded
  and every epoch after the first costs only the heads.
* Anchors are matched as in the TF Object Detection API: IoU >= 0.5 positive (and the best
  anchor of the box), < 0.4 negative, in between ignored. Loss: sigmoid focal loss
  (alpha 0.25, gamma 2) on both class channels, smooth-L1 on the positive anchors' box
  encodings, both divided by the number of positives.
* A validation split held out by image (seeded) chooses the epoch (lowest validation loss)
  and reports AP@0.5 against the mined boxes.
* Images whose mined box is null are left out by default (``--null ignore``): null means that
  no other image verified against it, not that it shows no landmark (most photos of a
  landmark collection show one), so teaching "no landmark here" from them would teach the
  detector to miss real landmarks. ``--null negative`` uses them as all-background images.

The trained network is exported by the converters pipeline (:mod:`d2r_convert.pipeline`) like
the OIDv4 model, with the same output names and decoding, so :class:`d2r.detect.Detector`
runs it from its manifest entry.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from d2r.errors import InputError, ModelError

from . import ssd
from .cli import add_photo_arguments, photo_sets

BOXES_FORMAT = "d2r-boxes"
BOXES_VERSION = 1
DEFAULT_NAME = "ssd_mobilenetv2_landmark"
LABELS = ["background", "landmark"]
MATCH_POSITIVE = 0.5
MATCH_NEGATIVE = 0.4
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
PRIOR = 0.01
MIN_VISIBLE = 0.5  # a crop keeps the box if at least this fraction of the box area is inside


# ---------------------------------------------------------------- boxes file
def load_boxes(path, images_dir) -> list[dict]:
    """Read and check a ``d2r-boxes`` file; returns its image records with absolute ``file`` paths.

    Raises :class:`InputError` naming the file and the problem: not JSON, wrong format or
    version, a record without path, a missing image, a box that is not 4 numbers in [0, 1]
    with ymin < ymax and xmin < xmax.
    """
    path = Path(path)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"--images {images_dir}: not a folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"--boxes {path}: cannot read the boxes file ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--boxes {path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != BOXES_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"--boxes {path}: expected a {BOXES_FORMAT!r} file (written by d2r detector mine-boxes), got format {got!r}")
    if raw.get("version") != BOXES_VERSION:
        raise InputError(f"--boxes {path}: {BOXES_FORMAT} version {raw.get('version')!r}, this d2r reads version {BOXES_VERSION}")
    images = raw.get("images")
    if not isinstance(images, list) or not images:
        raise InputError(f"--boxes {path}: 'images' must be a non-empty list")
    out, seen = [], set()
    for i, rec in enumerate(images):
        where = f"--boxes {path}: images[{i}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str) or not rec["path"]:
            raise InputError(f"{where}: expected an object with a 'path' string")
        file = images_dir / rec["path"]
        if not file.is_file():
            raise InputError(f"{where}: image {rec['path']!r} not found in {images_dir}")
        if rec["path"] in seen:
            raise InputError(f"{where}: image {rec['path']!r} listed twice")
        seen.add(rec["path"])
        box = rec.get("box")
        if box is not None:
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                raise InputError(f"{where} ({rec['path']}): box must be [ymin, xmin, ymax, xmax] numbers or null, got {box!r}")
            if not all(0.0 <= v <= 1.0 for v in box):
                raise InputError(f"{where} ({rec['path']}): box {box} is outside [0, 1] (boxes are normalised to the image size)")
            if not (box[0] < box[2] and box[1] < box[3]):
                raise InputError(f"{where} ({rec['path']}): box {box} is empty (needs ymin < ymax and xmin < xmax)")
            box = [float(v) for v in box]
        out.append({"path": rec["path"], "file": file, "box": box,
                    "support": int(rec.get("support") or 0), "inliers": int(rec.get("inliers") or 0)})
    return out


# ---------------------------------------------------------------- anchors and targets
def anchor_corners() -> np.ndarray:
    """The 1917 anchors as (ymin, xmin, ymax, xmax), float32."""
    from d2r.detect import ssd_anchors

    a = ssd_anchors(ssd.ANCHORS)
    return np.stack([a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2], 1)


def encode(box, anchors_cyxhw: np.ndarray) -> np.ndarray:
    """Faster R-CNN box coding of one box against every anchor: [A, 4] (ty, tx, th, tw)."""
    sy, sx, sh, sw = ssd.DECODING["box_scale"]
    ymin, xmin, ymax, xmax = box
    h, w = max(ymax - ymin, 1e-6), max(xmax - xmin, 1e-6)
    yc, xc = (ymin + ymax) / 2, (xmin + xmax) / 2
    a = anchors_cyxhw
    return np.stack([(yc - a[:, 0]) / a[:, 2] * sy, (xc - a[:, 1]) / a[:, 3] * sx,
                     np.log(h / a[:, 2]) * sh, np.log(w / a[:, 3]) * sw], 1).astype(np.float32)


def match(box, anchors_corners: np.ndarray, anchors_cyxhw: np.ndarray):
    """Targets of one view: labels [A] int8 (1 positive, 0 negative, -1 ignored) and encodings [A, 4].

    ``box`` None: every anchor negative (an image without landmark).
    """
    from d2r.detect import iou_matrix

    n = len(anchors_corners)
    if box is None:
        return np.zeros(n, np.int8), np.zeros((n, 4), np.float32)
    iou = iou_matrix(anchors_corners, np.asarray([box], np.float32))[:, 0]
    labels = np.where(iou >= MATCH_POSITIVE, 1, np.where(iou < MATCH_NEGATIVE, 0, -1)).astype(np.int8)
    labels[int(np.argmax(iou))] = 1  # every box gets at least its best anchor
    return labels, encode(box, anchors_cyxhw)


# ---------------------------------------------------------------- views (augmentation)
def make_views(paths: list[str], views: int, seed: int) -> list[list[tuple]]:
    """Per image, ``views`` (crop [y0, x0, y1, x1] normalised, flip) tuples, seeded per image path.

    View 0: the whole image; view 1: the whole image mirrored; further views: random crops of
    50-100% of the area (aspect change up to 4:3 either way), mirrored with probability 1/2.
    Views do not depend on the boxes, so the feature cache survives new boxes files.
    """
    import zlib

    out = []
    for path in paths:
        rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
        vs = [((0.0, 0.0, 1.0, 1.0), False), ((0.0, 0.0, 1.0, 1.0), True)][: max(views, 1)]
        while len(vs) < views:
            area = rng.uniform(0.5, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            h = min(1.0, math.sqrt(area * aspect))
            w = min(1.0, math.sqrt(area / aspect))
            y0 = rng.uniform(0.0, 1.0 - h)
            x0 = rng.uniform(0.0, 1.0 - w)
            vs.append(((y0, x0, y0 + h, x0 + w), bool(rng.random() < 0.5)))
        out.append(vs)
    return out


def view_box(box, crop, flip: bool):
    """The box in the view's coordinates; None when less than MIN_VISIBLE of it is inside."""
    if box is None:
        return None
    y0, x0, y1, x1 = crop
    ymin, xmin, ymax, xmax = box
    iy0, ix0, iy1, ix1 = max(ymin, y0), max(xmin, x0), min(ymax, y1), min(xmax, x1)
    if iy1 <= iy0 or ix1 <= ix0:
        return None
    if (iy1 - iy0) * (ix1 - ix0) < MIN_VISIBLE * (ymax - ymin) * (xmax - xmin):
        return None
    h, w = y1 - y0, x1 - x0
    b = [(iy0 - y0) / h, (ix0 - x0) / w, (iy1 - y0) / h, (ix1 - x0) / w]
    if flip:
        b = [b[0], 1.0 - b[3], b[2], 1.0 - b[1]]
    return [float(np.clip(v, 0.0, 1.0)) for v in b]


def view_pixels(rgb: np.ndarray, crop, flip: bool) -> np.ndarray:
    """float32 [1, 300, 300, 3] input of the network for one view of an image."""
    from d2r.features import _resize

    h, w = rgb.shape[:2]
    y0, x0 = int(round(crop[0] * h)), int(round(crop[1] * w))
    y1, x1 = max(int(round(crop[2] * h)), y0 + 1), max(int(round(crop[3] * w)), x0 + 1)
    part = rgb[y0:y1, x0:x1]
    if flip:
        part = part[:, ::-1]
    return _resize(np.ascontiguousarray(part), ssd.INPUT_SIZE, ssd.INPUT_SIZE).astype(np.float32)[None]


# ---------------------------------------------------------------- networks
def _tf(threads: int | None):
    from ._tools import require

    tf = require("tensorflow")
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass  # already initialised in this process
    return tf


def source_network(source_tflite=None, cache=None):
    """The OIDv4 SSD in Keras with its weights, and the path of its source TFLite file."""
    if source_tflite is None:
        source_tflite, _ = ssd.fetch_source(cache)
    model = ssd.build()
    ssd.load_weights(model, source_tflite)
    return model, Path(source_tflite)


def backbone(model):
    """image -> the six feature maps the SSD heads read (frozen part of the network)."""
    tf = _tf(None)
    taps = [model.get_layer(f"BoxPredictor_{i}__BoxEncodingPredictor").input for i in range(len(ssd.FEATURE_MAPS))]
    return tf.keras.Model(model.input, taps, name="ssd_backbone")


def head_network(source_model=None, num_classes: int = 2):
    """The trainable heads on cached feature maps (any batch size), initialised from ``source_model``:
    box head copied, class head = (OIDv4 background channel, landmark channel at the prior)."""
    tf = _tf(None)
    inputs = [tf.keras.Input((f, f, c), name=f"tap_{i}") for i, (f, c) in enumerate(zip(ssd.FEATURE_MAPS, ssd.TAP_CHANNELS))]
    box, logits = ssd.heads(inputs, num_classes)
    net = tf.keras.Model(inputs, {"box_encodings": box, "class_logits": logits}, name="ssd_heads")
    if source_model is not None:
        prior = -math.log((1 - PRIOR) / PRIOR)
        for i, a in enumerate(ssd.ANCHORS_PER_CELL):
            bname = f"BoxPredictor_{i}__BoxEncodingPredictor"
            net.get_layer(bname).set_weights(source_model.get_layer(bname).get_weights())
            cname = f"BoxPredictor_{i}__ClassPredictor"
            k, b = source_model.get_layer(cname).get_weights()  # [1, 1, C, a*24], [a*24]
            k = k.reshape(k.shape[0], k.shape[1], k.shape[2], a, ssd.NUM_CLASSES)
            b = b.reshape(a, ssd.NUM_CLASSES)
            nk = np.zeros(k.shape[:3] + (a, num_classes), np.float32)
            nb = np.full((a, num_classes), prior, np.float32)
            nk[..., 0] = k[..., 0]
            nb[:, 0] = b[:, 0]
            net.get_layer(cname).set_weights([nk.reshape(k.shape[:3] + (a * num_classes,)), nb.reshape(-1)])
    return net


def full_network(source_model, heads_net, name: str):
    """The whole 2-class SSD (image -> raw outputs): OIDv4 backbone weights + trained heads."""
    model = ssd.build(num_classes=len(LABELS), name=name)
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name.startswith("BoxPredictor_"):
            layer.set_weights(heads_net.get_layer(layer.name).get_weights())
        else:
            layer.set_weights(source_model.get_layer(layer.name).get_weights())
    return model


# ---------------------------------------------------------------- feature cache
class FeatureStore:
    """float16 feature maps of every view, in one memory-mapped file per feature map."""

    def __init__(self, folder: Path, n_views: int, mode: str):
        self.folder = folder
        self.maps = [np.lib.format.open_memmap(folder / f"tap_{i}.npy", mode=mode, dtype=np.float16,
                                               shape=(n_views, f, f, c) if mode == "w+" else None)
                     for i, (f, c) in enumerate(zip(ssd.FEATURE_MAPS, ssd.TAP_CHANNELS))]

    def batch(self, idx: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(idx)  # memmap reads in file order
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return [m[idx[order]].astype(np.float32)[inv] for m in self.maps]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.maps)


def cache_features(records, views, model, cache_root: Path, log=print, tf_threads=None) -> tuple[FeatureStore, list[int]]:
    """Compute (or reuse) the frozen feature maps of every view of every image.

    Returns the store and, per record, the store row of its first view (its views follow).
    Rows are kept in the order of the image paths, so the cache does not depend on the
    order of the boxes file.
    """
    from d2r.image import load_image

    order = sorted(range(len(records)), key=lambda i: records[i]["path"])
    starts = np.cumsum([0] + [len(views[i]) for i in order])
    first = [0] * len(records)
    for pos, i in enumerate(order):
        first[i] = int(starts[pos])
    key_src = json.dumps([[str(records[i]["file"].resolve()), records[i]["file"].stat().st_size,
                           records[i]["file"].stat().st_mtime_ns, views[i]] for i in order]) + "|" + str(ssd.TAP_CHANNELS)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    folder = cache_root / key
    n_views = sum(len(v) for v in views)
    done = folder / "complete"
    if done.is_file():
        log(f"feature cache: reusing {folder} ({n_views} views)")
        return FeatureStore(folder, n_views, "r"), first
    folder.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(folder, n_views, "w+")
    net = backbone(model)
    tf = _tf(tf_threads)
    run = tf.function(lambda x: net(x, training=False))
    log(f"feature cache: {len(records)} images x {len(views[0])} views -> {folder} ({store.nbytes / 1e9:.2f} GB float16 on disk)")
    t0 = time.perf_counter()
    k = 0
    for n, i in enumerate(order):
        rgb = load_image(records[i]["file"])
        for crop, flip in views[i]:
            outs = run(tf.constant(view_pixels(rgb, crop, flip)))
            for m, o in zip(store.maps, outs):
                m[k] = np.asarray(o[0], np.float16)
            k += 1
        if (n + 1) % 50 == 0 or n + 1 == len(records):
            el = time.perf_counter() - t0
            log(f"  features {n + 1}/{len(records)} images, {el:.0f} s, ~{el / (n + 1) * (len(records) - n - 1):.0f} s left")
    for m in store.maps:
        m.flush()
    done.write_text("ok\n")
    return FeatureStore(folder, n_views, "r"), first


# ---------------------------------------------------------------- loss, AP
def make_train_step(tf, net, optimizer):
    def losses(feats, labels, targets):
        out = net(feats, training=True)
        logits = out["class_logits"]  # [B, A, 2]
        enc = out["box_encodings"]
        pos = tf.cast(tf.equal(labels, 1), tf.float32)
        valid = tf.cast(tf.greater_equal(labels, 0), tf.float32)
        y = tf.stack([1.0 - pos, pos], axis=-1)
        p = tf.sigmoid(logits)
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
        pt = y * p + (1 - y) * (1 - p)
        at = y * FOCAL_ALPHA + (1 - y) * (1 - FOCAL_ALPHA)
        focal = tf.reduce_sum(at * tf.pow(1 - pt, FOCAL_GAMMA) * ce, axis=-1) * valid
        npos = tf.maximum(tf.reduce_sum(pos), 1.0)
        cls = tf.reduce_sum(focal) / npos
        huber = tf.reduce_sum(tf.keras.losses.Huber(delta=1.0, reduction="none")(targets[..., None], enc[..., None]), -1)
        box = tf.reduce_sum(huber * pos) / npos
        return cls, box

    @tf.function
    def train_step(feats, labels, targets):
        with tf.GradientTape() as tape:
            cls, box = losses(feats, labels, targets)
            loss = cls + box
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return cls, box

    @tf.function
    def eval_step(feats, labels, targets):
        return losses(feats, labels, targets)

    @tf.function
    def predict(feats):
        return net(feats, training=False)

    return train_step, eval_step, predict


def average_precision(detections: list, truths: list, iou_threshold: float = 0.5) -> float:
    """VOC-style AP (area under the interpolated precision/recall curve) of one class.

    detections: per image (boxes [M, 4], scores [M]); truths: per image boxes [G, 4] (G may be 0).
    """
    from d2r.detect import iou_matrix

    n_gt = sum(len(t) for t in truths)
    if n_gt == 0:
        return float("nan")
    rows = [(float(s), i, j) for i, (b, sc) in enumerate(detections) for j, s in enumerate(sc)]
    rows.sort(key=lambda r: -r[0])
    used = [np.zeros(len(t), bool) for t in truths]
    tp = np.zeros(len(rows))
    for k, (_, i, j) in enumerate(rows):
        gt = np.asarray(truths[i], np.float32).reshape(-1, 4)
        if len(gt) == 0:
            continue
        iou = iou_matrix(np.asarray(detections[i][0][j : j + 1], np.float32), gt)[0]
        g = int(np.argmax(iou))
        if iou[g] >= iou_threshold and not used[i][g]:
            used[i][g] = True
            tp[k] = 1
    if not rows:
        return 0.0
    ctp = np.cumsum(tp)
    recall = ctp / n_gt
    precision = ctp / np.arange(1, len(rows) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def detections_from_outputs(box_encodings, class_logits, threshold: float = 0.01, max_boxes: int = 25):
    """(boxes, scores) of one image from raw outputs, as the runtime decodes them (class-agnostic NMS)."""
    from d2r.detect import postprocess, ssd_anchors

    det = postprocess(box_encodings, class_logits, _ANCHORS_CACHE.setdefault("a", ssd_anchors(ssd.ANCHORS)), threshold,
                      max_boxes, ssd.DECODING["nms_iou_threshold"], tuple(ssd.DECODING["box_scale"]))
    return det.boxes, det.scores


_ANCHORS_CACHE: dict = {}


# ---------------------------------------------------------------- training
def split_images(records, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) image indices; validation drawn among images with a box, seeded."""
    with_box = [i for i, r in enumerate(records) if r["box"] is not None]
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(with_box)))
    if val_fraction > 0 and len(with_box) >= 2:
        n_val = min(max(n_val, 1), len(with_box) - 1)
    val = sorted(rng.choice(with_box, size=n_val, replace=False).tolist()) if n_val else []
    vs = set(val)
    return [i for i in range(len(records)) if i not in vs], val


def train(records, *, views: int = 3, epochs: int = 20, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
          val_fraction: float = 0.1, null: str = "ignore", min_support: int = 1, cache_root=None, threads: int = 1,
          source_tflite=None, log=print) -> dict:
    """Train the heads; returns a dict with the Keras ``model`` (whole network), ``heads`` and the training report."""
    if null not in ("ignore", "negative"):
        raise InputError(f"--null: expected 'ignore' or 'negative', got {null!r}")
    if views < 1 or epochs < 1 or batch_size < 1 or not 0.0 <= val_fraction < 1.0 or lr <= 0:
        raise InputError("--views, --epochs and --batch-size must be >= 1, --lr > 0 and --val-fraction in [0, 1)")
    tf = _tf(threads)
    tf.keras.utils.set_random_seed(seed)
    try:
        tf.config.experimental.enable_op_determinism()
    except Exception:  # noqa: BLE001 - older TF: determinism is best effort
        pass
    t_start = time.perf_counter()
    # Boxes with too little support are treated as null.
    for r in records:
        r["use_box"] = r["box"] if (r["box"] is not None and r["support"] >= min_support) else None
    usable_idx = [i for i, r in enumerate(records) if r["use_box"] is not None or null == "negative"]
    usable = [records[i] for i in usable_idx]
    n_boxes = sum(r["use_box"] is not None for r in records)
    if n_boxes == 0:
        raise InputError("the boxes file has no usable box (all null or below --min-support)")
    train_idx, val_idx = split_images([dict(r, box=r["use_box"]) for r in usable], val_fraction, seed)
    log(f"images: {len(records)} listed, {n_boxes} with a box, {len(records) - n_boxes} null ({null}); "
        f"train {len(train_idx)}, validation {len(val_idx)} (held out by image, seed {seed})")

    source_model, source_path = source_network(source_tflite)
    # Features of every listed image (null ones too): the cache then fits any boxes file of the same images.
    views_all = make_views([r["path"] for r in records], views, seed)
    cache_root = Path(cache_root) if cache_root else Path(os.environ.get("D2R_CACHE_DIR", Path.home() / ".cache" / "d2r")) / "finetune"
    t0 = time.perf_counter()
    store, first_row = cache_features(records, views_all, source_model, cache_root, log=log, tf_threads=threads)
    t_features = time.perf_counter() - t0
    n_rows = sum(len(v) for v in views_all)
    all_views = [views_all[i] for i in usable_idx]

    corners = anchor_corners()
    from d2r.detect import ssd_anchors

    cyxhw = ssd_anchors(ssd.ANCHORS)
    # Targets per view; views where the box falls out of the crop are skipped.
    offsets = np.asarray([first_row[i] for i in usable_idx], np.int64)  # store row of each usable image's view 0
    view_rows: dict[int, list[int]] = {}
    labels = np.zeros((n_rows, len(corners)), np.int8)
    targets = np.zeros((n_rows, len(corners), 4), np.float16)
    dropped = 0
    for i, (r, vs) in enumerate(zip(usable, all_views)):
        rows = []
        for v, (crop, flip) in enumerate(vs):
            k = int(offsets[i] + v)
            if r["use_box"] is None:
                labels[k], targets[k] = match(None, corners, cyxhw)
                rows.append(k)
                continue
            b = view_box(r["use_box"], crop, flip)
            if b is None:
                dropped += 1
                continue
            lab, enc = match(b, corners, cyxhw)
            labels[k], targets[k] = lab, enc
            rows.append(k)
        view_rows[i] = rows
    train_rows = np.asarray([k for i in train_idx for k in view_rows[i]], np.int64)
    val_rows = np.asarray([int(offsets[i]) for i in val_idx], np.int64)
    row_owner = {int(offsets[i]): i for i in val_idx}  # view 0: the whole image, as at run time
    log(f"training views: {len(train_rows)} ({dropped} crops dropped: less than {MIN_VISIBLE:.0%} of the box inside); "
        f"validation: {len(val_rows)} whole images; positives per view: {float((labels[train_rows] == 1).sum(1).mean()):.1f} anchors")

    net = head_network(source_model)
    steps_per_epoch = max(1, math.ceil(len(train_rows) / batch_size))
    schedule = tf.keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps_per_epoch * epochs, alpha=0.05)
    optimizer = tf.keras.optimizers.Adam(schedule)
    train_step, eval_step, predict = make_train_step(tf, net, optimizer)
    rng = np.random.default_rng(seed)

    def run_eval(rows):
        if len(rows) == 0:
            return float("nan"), float("nan"), float("nan")
        cls_sum = box_sum = 0.0
        dets, truths = [], []
        for s in range(0, len(rows), batch_size):
            idx = rows[s : s + batch_size]
            feats = store.batch(idx)
            c, b = eval_step(feats, tf.constant(labels[idx]), tf.constant(targets[idx].astype(np.float32)))
            cls_sum += float(c) * len(idx)
            box_sum += float(b) * len(idx)
            out = predict(feats)
            for j in range(len(idx)):
                dets.append(detections_from_outputs(out["box_encodings"][j].numpy(), out["class_logits"][j].numpy()))
        for k in rows:
            i = row_owner[int(k)]
            truths.append([usable[i]["use_box"]] if usable[i]["use_box"] is not None else [])
        return cls_sum / len(rows), box_sum / len(rows), average_precision(dets, truths)

    history = []
    c0, b0, ap0 = run_eval(val_rows)
    log(f"epoch  0: validation loss {c0 + b0:.4f} (class {c0:.4f}, box {b0:.4f}), AP@0.5 {ap0:.3f}")
    history.append({"epoch": 0, "val_class": c0, "val_box": b0, "val_ap50": ap0})
    best = (c0 + b0 if val_rows.size else float("inf"), 0, [w.copy() for w in net.get_weights()])
    t_train = time.perf_counter()
    for epoch in range(1, epochs + 1):
        te = time.perf_counter()
        order = rng.permutation(train_rows)
        cls_sum = box_sum = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            c, b = train_step(store.batch(idx), tf.constant(labels[idx]), tf.constant(targets[idx].astype(np.float32)))
            cls_sum += float(c) * len(idx)
            box_sum += float(b) * len(idx)
        vc, vb, ap = run_eval(val_rows)
        row = {"epoch": epoch, "train_class": cls_sum / len(order), "train_box": box_sum / len(order),
               "val_class": vc, "val_box": vb, "val_ap50": ap, "seconds": time.perf_counter() - te}
        history.append(row)
        log(f"epoch {epoch:2d}: train loss {row['train_class'] + row['train_box']:.4f} (class {row['train_class']:.4f}, "
            f"box {row['train_box']:.4f}); validation loss {vc + vb:.4f}, AP@0.5 {ap:.3f}; {row['seconds']:.1f} s")
        score = vc + vb if val_rows.size else -epoch
        if score < best[0]:
            best = (score, epoch, [w.copy() for w in net.get_weights()])
    net.set_weights(best[2])
    t_heads = time.perf_counter() - t_train
    log(f"kept epoch {best[1]} (lowest validation loss)")
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "images": len(records), "with_box": n_boxes, "null": null, "min_support": min_support,
        "train_images": [usable[i]["path"] for i in train_idx], "validation_images": [usable[i]["path"] for i in val_idx],
        "validation_boxes": {usable[i]["path"]: usable[i]["use_box"] for i in val_idx},
        "views_per_image": views, "training_views": int(len(train_rows)), "crops_dropped": dropped,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads, "kept_epoch": best[1],
        "history": history, "seconds": {"features": t_features, "heads": t_heads, "total": time.perf_counter() - t_start},
        "feature_cache_bytes": store.nbytes, "source_tflite_sha256": ssd.TFLITE_SHA256,
        "loss": f"sigmoid focal (alpha {FOCAL_ALPHA}, gamma {FOCAL_GAMMA}) + smooth-L1 on positives, / positives",
        "matching": f"IoU >= {MATCH_POSITIVE} positive (and each box's best anchor), < {MATCH_NEGATIVE} negative",
        "frozen": "backbone and extra feature layers (OIDv4); trained: the 12 SSD head convolutions",
    }
    return {"source_model": source_model, "source_path": source_path, "heads": net, "report": report}


# ---------------------------------------------------------------- export
def manifest_entry(name: str, train_report: dict, boxes_path: Path, boxes_sha: str) -> dict:
    entry = ssd.manifest_entry(LABELS)
    entry["name"] = name
    entry["outputs"] = [dict(o) for o in entry["outputs"]]
    entry["outputs"][1]["shape"] = [1, ssd.NUM_ANCHORS, len(LABELS)]
    entry["outputs"][1]["meaning"] = "per anchor and class (background, landmark), sigmoid -> score; class 0 is background"
    entry["defaults"] = dict(entry["defaults"], score_threshold=0.5)
    src = dict(entry["source"])
    src["derived"] = ("MediaPipe OIDv4 MobileNet-V2 SSD (npm @mediapipe/objectron) with its heads fine-tuned by "
                      "d2r detector finetune on mined boxes (retrieval + spatial verification; no ground truth)")
    entry["source"] = src
    entry["training"] = {
        "tool": "d2r detector finetune (d2r_convert.finetune)", "boxes_file": boxes_path.name, "boxes_sha256": boxes_sha,
        "images": train_report["images"], "with_box": train_report["with_box"],
        "train_images": len(train_report["train_images"]), "validation_images": len(train_report["validation_images"]),
        "epochs": train_report["epochs"], "kept_epoch": train_report["kept_epoch"], "seed": train_report["seed"],
        "ground_truth_used": False,
    }
    return entry


def export(result: dict, out_dir, name: str, boxes_path: Path, keep, tflite=("fp32", "int8"), onnx=("fp32", "int8"),
           threads=(1,), timing_runs: int = 5, manifest_path=None, report_path=None, calibration=None,
           evaluation=None, data_notice: str | None = None, log=print) -> dict:
    """Export the fine-tuned network through :func:`d2r_convert.pipeline.run` (parity report, manifest).
    ``calibration`` / ``evaluation``: photo paths (default: :func:`default_photo_sets`)."""
    from . import compare, pipeline
    from ._tools import default_photo_sets, load_rgb, sha256_file

    model = full_network(result["source_model"], result["heads"], name)
    if calibration is None or evaluation is None:
        cal_default, ev_default = default_photo_sets()
        calibration = calibration if calibration is not None else cal_default
        evaluation = evaluation if evaluation is not None else ev_default
    cal_paths, ev_paths = list(calibration), list(evaluation)
    size = (ssd.INPUT_SIZE, ssd.INPUT_SIZE)
    cal = [ssd.preprocess(load_rgb(p, size)) for p in cal_paths]
    ev = [ssd.preprocess(load_rgb(p, size)) for p in ev_paths]
    anchors = compare.ssd_anchors(ssd.ANCHORS)

    def source(x):
        return {k: np.asarray(v) for k, v in model(x, training=False).items()}

    def task_compare(ref, out):
        det = lambda o: compare.ssd_detect(o["box_encodings"], o["class_logits"], anchors, ssd.DECODING, 0.3)  # noqa: E731
        return compare.match_detections(det(ref), det(out))

    entry = manifest_entry(name, result["report"], Path(boxes_path), sha256_file(boxes_path))
    if data_notice:
        entry["training"]["data_notice"] = data_notice
    job = pipeline.Job(
        name=name, stem=name, model=model, input_shape=(1, ssd.INPUT_SIZE, ssd.INPUT_SIZE, 3), calibration=cal,
        evaluation=ev, source=source, source_label="the fine-tuned Keras network (float32)", entry=entry,
        tflite_precisions=tuple(tflite), onnx_precisions=tuple(onnx), task_compare=task_compare,
        notes=["detections compared at score >= 0.3 with NMS IoU 0.4",
               f"calibration: {len(cal)} photos; evaluation: {len(ev)} other photos (shared/data)",
               "the source is the fine-tuned float network itself: the rows measure the export, not the training"],
    )
    return pipeline.run(job, out_dir, threads=threads, timing_runs=timing_runs, manifest_path=manifest_path,
                        report_path=report_path, keep=keep, log=log)


# ---------------------------------------------------------------- CLI
def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``d2r detector finetune``."""
    p.add_argument("--images", required=True, metavar="DIR", help="folder of the images the boxes file lists")
    p.add_argument("--boxes", required=True, metavar="FILE", help="boxes.json from d2r detector mine-boxes (format d2r-boxes v1)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the model files, manifest.json and reports/")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"model name and file stem (default {DEFAULT_NAME})")
    p.add_argument("--epochs", type=int, default=20, help="training epochs over the cached views (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="views per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed (default 1e-3)")
    p.add_argument("--views", type=int, default=3,
                   help="views per image: whole, mirrored, then seeded random crops (default 3)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="images with a box held out for validation (default 0.1)")
    p.add_argument("--null", choices=("ignore", "negative"), default="ignore",
                   help="images whose mined box is null: leave out (default) or use as landmark-free images")
    p.add_argument("--min-support", type=int, default=1, help="treat boxes supported by fewer images as null (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, crops, shuffling and initialisation (default 0)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow threads (default 1)")
    p.add_argument("--cache", metavar="DIR", help="feature cache folder (default ~/.cache/d2r/finetune)")
    p.add_argument("--limit", type=int, help="use only the first N images of the boxes file (quick trials)")
    p.add_argument("--no-export", action="store_true", help="train and report only; write no model file")
    p.add_argument("--keep", default="tflite:int8,onnx:int8",
                   help="files to keep and list in the manifest (default tflite:int8,onnx:int8); fp32 files are measured for the parity report")
    p.add_argument("--measure", default="tflite:fp32,onnx:fp32",
                   help="files exported and compared for the parity report but not kept (default tflite:fp32,onnx:fp32; '' for none)")
    add_photo_arguments(p)
    p.add_argument("--manifest", metavar="FILE", help="manifest to update (default: OUT/manifest.json)")
    p.add_argument("--timing-runs", type=int, default=5, help="timed inferences per exported file (default 5)")
    p.add_argument("--data-notice", help="a line about the training photos' terms, stored in the manifest entry")


def cmd_finetune(args) -> int:
    """``d2r detector finetune``: train, then export through the converters pipeline."""
    boxes_path = Path(args.boxes)
    records = load_boxes(boxes_path, args.images)
    if args.limit:
        records = records[: args.limit]
    out = Path(args.output)
    def pairs(text, option):
        out = {tuple(item.strip().split(":")) for item in text.split(",") if item.strip()}
        if any(len(k) != 2 or k[0] not in ("tflite", "onnx") or k[1] not in ("fp32", "fp16", "int8") for k in out):
            raise InputError(f"{option}: expected FORMAT:PRECISION pairs such as tflite:int8, got {text!r}")
        return out

    keep = pairs(args.keep, "--keep")
    measure = pairs(args.measure, "--measure") | keep
    calibration, evaluation = (None, None) if args.no_export else photo_sets(args)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = train(records, views=args.views, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   val_fraction=args.val_fraction, null=args.null, min_support=args.min_support, cache_root=args.cache,
                   threads=args.threads, log=log)
    report = result["report"]
    report["boxes_file"] = str(boxes_path)
    report_dir = out / "reports"
    report_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_export:
        order = {"fp32": 0, "fp16": 1, "int8": 2}  # fp32 first: the other precisions are compared with it
        tfl = sorted({p for f, p in measure if f == "tflite"}, key=order.get)
        onx = sorted({p for f, p in measure if f == "onnx"}, key=order.get)
        t0 = time.perf_counter()
        export(result, out, args.name, boxes_path, keep, tflite=tfl, onnx=onx, manifest_path=args.manifest,
               timing_runs=args.timing_runs, calibration=calibration, evaluation=evaluation, data_notice=args.data_notice, log=log)
        report["seconds"]["export"] = time.perf_counter() - t0
    from d2r._files import atomic_write

    path = report_dir / f"{args.name}_training.json"
    atomic_write(path, (json.dumps(report, indent=1) + "\n").encode())
    log(f"training report: {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m d2r_convert.finetune", description=__doc__.splitlines()[0])
    add_finetune_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_finetune(args)
    except (InputError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
