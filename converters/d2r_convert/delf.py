"""DELF (Noh et al., ICCV 2017): ResNet-50 v1 up to block3 + the attention head, in Keras.

No DELF weights can be had from a package registry: users bring the official TF1 checkpoint
(``delf_v1_20171026`` style, or the ``variables/variables`` prefix of the exported SavedModel)
and its PCA files. :func:`load_checkpoint` reads the official variable names::

    resnet_v1_50/conv1/weights, resnet_v1_50/conv1/BatchNorm/{gamma,beta,moving_mean,moving_variance}
    resnet_v1_50/block{1,2,3}/unit_{u}/bottleneck_v1/{shortcut,conv1,conv2,conv3}/weights (+ BatchNorm)
    attention_block/attention/compute/conv1/weights (+ BatchNorm)
    attention_block/attention/compute/conv2/{weights,biases}

The network follows TF-slim's resnet_v1 exactly: the stride of a block sits in its LAST unit
(so block3 ends at stride 32, matching DELF's receptive-field constants rf 291, stride 32,
padding 145), stride-2 convolutions pad explicitly ("conv2d_same"), pool1 is a 3x3/2 SAME max
pool, and an identity shortcut of a stride-2 unit is a 1x1/2 subsampling.

PCA (mean.datum, pca_proj_mat.datum) becomes a 1x1 convolution after an L2 normalisation,
followed by another L2 normalisation; this is per location, so it commutes with the
attention-based selection that the runtime does afterwards.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from d2r.errors import ModelError

from ._tools import require

# ---------------------------------------------------------------- default configuration
RESNET_BLOCKS = (("block1", 64, 3, 2), ("block2", 128, 4, 2), ("block3", 256, 6, 2))  # (name, base depth, units, stride)
BN_EPS = 1e-5  # resnet_arg_scope's batch_norm_epsilon
ATTENTION_SCOPE = "attention_block/attention/compute"
FEATURE_DIM = 1024
PCA_DIM = 128
DEFAULT_SIZE = (256, 256)
RECEPTIVE_FIELD = {"receptive_field": 291, "stride": 32, "padding": 145}
DEFAULT_SCORE_THRESHOLD = 100.0
DEFAULT_MAX_FEATURES = 1000
PYRAMID_SCALES = [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]
LICENSE = "Apache-2.0 (DELF code and released weights); user-supplied weights keep their own licence"


def _units():
    """(scope, depth, bottleneck depth, stride, has conv shortcut) of every bottleneck unit, in order."""
    depth_in = 64
    for block, base, n, stride in RESNET_BLOCKS:
        for u in range(1, n + 1):
            s = stride if u == n else 1
            yield f"resnet_v1_50/{block}/unit_{u}/bottleneck_v1", base * 4, base, s, depth_in != base * 4
            depth_in = base * 4


def official_variables() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every checkpoint variable the importer reads (official TF1 names)."""
    v: dict[str, tuple[int, ...]] = {}

    def conv_bn(scope, kh, cin, cout):
        v[f"{scope}/weights"] = (kh, kh, cin, cout)
        for p in ("gamma", "beta", "moving_mean", "moving_variance"):
            v[f"{scope}/BatchNorm/{p}"] = (cout,)

    conv_bn("resnet_v1_50/conv1", 7, 3, 64)
    depth_in = 64
    for scope, depth, bott, _, shortcut in _units():
        if shortcut:
            conv_bn(f"{scope}/shortcut", 1, depth_in, depth)
        conv_bn(f"{scope}/conv1", 1, depth_in, bott)
        conv_bn(f"{scope}/conv2", 3, bott, bott)
        conv_bn(f"{scope}/conv3", 1, bott, depth)
        depth_in = depth
    conv_bn(f"{ATTENTION_SCOPE}/conv1", 1, FEATURE_DIM, 512)
    v[f"{ATTENTION_SCOPE}/conv2/weights"] = (1, 1, 512, 1)
    v[f"{ATTENTION_SCOPE}/conv2/biases"] = (1,)
    return v


# ---------------------------------------------------------------- Keras network
def build(height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1], pca_dim: int | None = PCA_DIM):
    """DELF in Keras (untrained; see :func:`load_checkpoint`).

    Input ``image``: float32 [1, H, W, 3] RGB in [0, 255]; (x - 128) / 128 is applied inside.
    Outputs (h = ceil(H/32), w = ceil(W/32)): ``attention`` float32 [1, h, w, 1] (softplus
    score, DELF keeps locations >= 100) and either ``descriptors`` float32 [1, h, w, pca_dim]
    (L2 -> PCA -> L2) or, with ``pca_dim=None``, ``features`` float32 [1, h, w, 1024] (raw block3).
    """
    if height < 32 or width < 32:
        raise ModelError(f"DELF input must be at least 32x32, got {height}x{width}")
    tf = require("tensorflow")
    keras = tf.keras
    L, ops = keras.layers, keras.ops

    def n(scope):
        return scope.replace("/", "__")

    def conv_bn(x, scope, filters, kernel, stride=1, relu=True):
        if stride > 1 and kernel > 1:  # slim conv2d_same: explicit symmetric padding, then VALID
            pad = (kernel - 1) // 2
            x = L.ZeroPadding2D(((pad, kernel - 1 - pad), (pad, kernel - 1 - pad)), name=n(scope) + "__pad")(x)
            padding = "valid"
        else:
            padding = "same"
        x = L.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=n(scope))(x)
        x = L.BatchNormalization(epsilon=BN_EPS, name=n(scope + "/BatchNorm"))(x)
        return L.ReLU(name=n(scope) + "__relu")(x) if relu else x

    image = keras.Input((height, width, 3), batch_size=1, name="image")
    x = L.Rescaling(1.0 / 128.0, offset=-1.0, name="normalise")(image)  # (x - 128) / 128
    x = conv_bn(x, "resnet_v1_50/conv1", 64, 7, 2)
    x = L.MaxPooling2D(3, strides=2, padding="same", name="resnet_v1_50__pool1")(x)
    for scope, depth, bott, stride, has_conv_shortcut in _units():
        if has_conv_shortcut:
            shortcut = conv_bn(x, f"{scope}/shortcut", depth, 1, stride, relu=False)
        elif stride > 1:
            shortcut = L.MaxPooling2D(1, strides=stride, name=n(scope) + "__subsample")(x)
        else:
            shortcut = x
        r = conv_bn(x, f"{scope}/conv1", bott, 1)
        r = conv_bn(r, f"{scope}/conv2", bott, 3, stride)
        r = conv_bn(r, f"{scope}/conv3", depth, 1, relu=False)
        x = L.ReLU(name=n(scope) + "__out")(L.Add(name=n(scope) + "__add")([shortcut, r]))
    features = x
    a = conv_bn(features, f"{ATTENTION_SCOPE}/conv1", 512, 1)
    a = L.Conv2D(1, 1, name=n(f"{ATTENTION_SCOPE}/conv2"))(a)
    # softplus written in its overflow-free form: the TFLite converter lowers a plain softplus
    # to log(exp(x) + 1), which is inf for x > 88, and DELF keeps scores >= 100.
    attention = ops.maximum(a, 0.0) + ops.log(1.0 + ops.exp(-ops.abs(a)))
    outputs = {"attention": attention}
    if pca_dim is None:
        outputs["features"] = features
    else:
        f = features * ops.rsqrt(ops.maximum(ops.sum(features * features, axis=-1, keepdims=True), 1e-12))
        p = L.Conv2D(pca_dim, 1, name="pca_projection")(f)
        outputs["descriptors"] = p * ops.rsqrt(ops.maximum(ops.sum(p * p, axis=-1, keepdims=True), 1e-12))
    return keras.Model(image, outputs, name=f"delf_{height}x{width}")


# ---------------------------------------------------------------- importers
def read_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """The official variables of a TF1 checkpoint (or SavedModel ``variables/variables``) as numpy arrays."""
    tf = require("tensorflow")
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as exc:  # NotFoundError, DataLossError, ...
        raise ModelError(f"{prefix}: not a readable TensorFlow checkpoint ({exc})") from exc
    shapes = reader.get_variable_to_shape_map()
    wanted = official_variables()
    missing = [k for k in wanted if k not in shapes and not k.endswith("/gamma")]
    if missing:
        raise ModelError(f"{prefix}: {len(missing)} DELF variables missing, e.g. {missing[:3]} (is this a DELF resnet_v1_50 checkpoint?)")
    out = {}
    for name, shape in wanted.items():
        if name not in shapes:  # batch norm without scale: gamma = 1
            out[name] = np.ones(shape, np.float32)
            continue
        if tuple(shapes[name]) != shape:
            raise ModelError(f"{prefix}: variable {name} has shape {tuple(shapes[name])}, expected {shape}")
        out[name] = np.asarray(reader.get_tensor(name), dtype=np.float32)
    return out


def read_pca(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """mean [1024], projection [1024, 1024] (rows = components) and, if present, variances [1024]."""
    from .datum_io import read_datum

    folder = Path(folder)
    pca = {"mean": read_datum(folder / "mean.datum"), "projection": read_datum(folder / "pca_proj_mat.datum")}
    if (folder / "pca_vars.datum").is_file():
        pca["variances"] = read_datum(folder / "pca_vars.datum")
    if pca["mean"].shape != (FEATURE_DIM,) or pca["projection"].ndim != 2 or pca["projection"].shape[1] != FEATURE_DIM:
        raise ModelError(f"{folder}: PCA shapes mean {pca['mean'].shape}, projection {pca['projection'].shape}; expected [1024] and [K, 1024]")
    return pca


def load_checkpoint(model, variables: dict[str, np.ndarray], pca: dict[str, np.ndarray] | None = None) -> int:
    """Set every weight of ``model`` from official-name ``variables`` (see :func:`read_checkpoint`)."""
    count = 0
    for layer in model.layers:
        kind = layer.__class__.__name__
        if kind not in ("Conv2D", "BatchNormalization"):
            continue
        if layer.name == "pca_projection":
            if pca is None:
                raise ModelError("the network has a PCA projection but no PCA files were given")
            dim = layer.weights[0].shape[-1]
            proj = pca["projection"][:dim]  # [dim, 1024]
            layer.set_weights([proj.T[None, None].astype(np.float32), (-proj @ pca["mean"]).astype(np.float32)])
            count += 1
            continue
        scope = layer.name.replace("__", "/")
        if kind == "BatchNormalization":
            values = [variables[f"{scope}/{p}"] for p in ("gamma", "beta", "moving_mean", "moving_variance")]
        elif layer.use_bias:
            values = [variables[f"{scope}/weights"], variables[f"{scope}/biases"]]
        else:
            values = [variables[f"{scope}/weights"]]
        layer.set_weights(values)
        count += 1
    return count


# ---------------------------------------------------------------- random official checkpoint (tests)
def random_variables(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with the official names and shapes; scaled so activations stay finite."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in official_variables().items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "weights":
            fan_in = int(np.prod(shape[:3]))
            gain = 0.5 if "/conv3/" in name or "/shortcut/" in name else 1.0
            out[name] = rng.normal(0, gain * np.sqrt(2.0 / fan_in), shape)
        elif leaf == "gamma":
            out[name] = rng.uniform(0.5, 1.0, shape)
        elif leaf == "beta":
            out[name] = rng.normal(0, 0.1, shape)
        elif leaf == "moving_mean":
            out[name] = rng.normal(0, 0.1, shape)
        elif leaf == "moving_variance":
            out[name] = rng.uniform(0.5, 1.5, shape)
        else:  # biases
            out[name] = rng.normal(0, 0.1, shape)
        out[name] = out[name].astype(np.float32)
    return out


def write_checkpoint(prefix: str | os.PathLike, variables: dict[str, np.ndarray]) -> None:
    """Write a TF checkpoint (V2 format, as TF1 Savers wrote) holding exactly ``variables``."""
    tf = require("tensorflow")
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[k]) for k in names])


def random_pca(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(FEATURE_DIM, FEATURE_DIM)))
    return {"mean": rng.normal(0, 0.01, FEATURE_DIM).astype(np.float32), "projection": q.T.astype(np.float32),
            "variances": np.sort(rng.uniform(0.01, 1.0, FEATURE_DIM))[::-1].astype(np.float32)}


# ---------------------------------------------------------------- independent reference
def reference_forward(variables: dict[str, np.ndarray], image: np.ndarray, pca=None, pca_dim: int = PCA_DIM) -> dict[str, np.ndarray]:
    """DELF straight from the checkpoint dict with ``tf.nn`` ops: the oracle for the Keras rebuild.

    Written independently of :func:`build` (no Keras, names looked up directly) so that a
    wrong name mapping or padding in the rebuild shows up as a difference.
    """
    tf = require("tensorflow")

    def bn(x, scope):
        g, b, m, v = (variables[f"{scope}/BatchNorm/{p}"] for p in ("gamma", "beta", "moving_mean", "moving_variance"))
        return tf.nn.batch_normalization(x, m, v, b, g, BN_EPS)

    def conv(x, scope, stride=1):
        w = variables[f"{scope}/weights"]
        k = w.shape[0]
        if stride > 1 and k > 1:
            p = (k - 1) // 2
            x = tf.pad(x, [[0, 0], [p, k - 1 - p], [p, k - 1 - p], [0, 0]])
            return tf.nn.conv2d(x, w, stride, "VALID")
        return tf.nn.conv2d(x, w, stride, "SAME")

    x = (tf.constant(image) - 128.0) / 128.0
    x = tf.nn.relu(bn(conv(x, "resnet_v1_50/conv1", 2), "resnet_v1_50/conv1"))
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for block, _base, n, stride in RESNET_BLOCKS:
        for u in range(1, n + 1):
            s = stride if u == n else 1
            sc = f"resnet_v1_50/{block}/unit_{u}/bottleneck_v1"
            if f"{sc}/shortcut/weights" in variables:
                short = bn(conv(x, f"{sc}/shortcut", s), f"{sc}/shortcut")
            else:
                short = x[:, ::s, ::s, :]
            r = tf.nn.relu(bn(conv(x, f"{sc}/conv1"), f"{sc}/conv1"))
            r = tf.nn.relu(bn(conv(r, f"{sc}/conv2", s), f"{sc}/conv2"))
            r = bn(conv(r, f"{sc}/conv3"), f"{sc}/conv3")
            x = tf.nn.relu(short + r)
    a = tf.nn.relu(bn(conv(x, f"{ATTENTION_SCOPE}/conv1"), f"{ATTENTION_SCOPE}/conv1"))
    a = conv(a, f"{ATTENTION_SCOPE}/conv2") + variables[f"{ATTENTION_SCOPE}/conv2/biases"]
    out = {"attention": tf.nn.softplus(a).numpy()}
    if pca is None:
        out["features"] = x.numpy()
    else:
        f = tf.math.l2_normalize(x, axis=-1).numpy()
        p = (f - pca["mean"]) @ pca["projection"][:pca_dim].T
        out["descriptors"] = (p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-6)).astype(np.float32)
    return out


# ---------------------------------------------------------------- conversion job
def manifest_entry(height: int, width: int, pca_dim: int | None, weights_label: str) -> dict:
    h, w = -(-height // 32), -(-width // 32)
    outputs = [{"name": "attention", "shape": [1, h, w, 1], "dtype": "float32",
                "meaning": "softplus attention score per location; keep locations >= score_threshold"}]
    if pca_dim is None:
        outputs.append({"name": "features", "shape": [1, h, w, FEATURE_DIM], "dtype": "float32",
                        "meaning": "raw block3 features; post-process: L2, PCA, L2"})
    else:
        outputs.append({"name": "descriptors", "shape": [1, h, w, pca_dim], "dtype": "float32",
                        "meaning": f"L2-normalised, PCA-projected to {pca_dim}-D (no whitening), L2-normalised again"})
    return {
        "name": "delf", "variant": f"{height}x{width}", "task": "local_features",
        "input": {"name": "image", "shape": [1, height, width, 3], "dtype": "float32", "layout": "NHWC", "color": "RGB",
                  "range": [0.0, 255.0], "normalisation": "(x - 128) / 128 inside the graph",
                  "resize": f"one model per pyramid level size; this file takes {height}x{width}"},
        "outputs": outputs,
        "geometry": dict(RECEPTIVE_FIELD, location="box = stride*[y, x, y, x] + [-p, -p, -p+rf-1, -p+rf-1]; centre, divided by the scale"),
        "defaults": {"score_threshold": DEFAULT_SCORE_THRESHOLD, "max_features": DEFAULT_MAX_FEATURES,
                     "pyramid_scales": PYRAMID_SCALES},
        "source": {"weights": weights_label, "format": "TF1 checkpoint, official DELF variable names"},
        "licence": LICENSE,
    }


def make_job(height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1], checkpoint=None, pca_dir=None,
             calibration=None, evaluation=None, random_weights: bool = False, work_dir=None, seed: int = 0):
    """The :class:`d2r_convert.pipeline.Job` for DELF.

    With ``random_weights`` a checkpoint with the official names is written from random values
    (and random PCA files), then read back through the same importer as a real one: this checks
    the whole path but yields no usable model, and the files are named ``delf_random_*``.
    """
    from ._tools import default_photo_sets, load_rgb
    from .datum_io import write_datum
    from .pipeline import Job

    notes = []
    if random_weights:
        with tempfile.TemporaryDirectory(prefix="d2r_delf_") as tmp:
            tmp = Path(tmp)
            write_checkpoint(tmp / "model.ckpt", random_variables(seed))
            pca_rand = random_pca(seed)
            for key, fname in (("mean", "mean.datum"), ("projection", "pca_proj_mat.datum"), ("variances", "pca_vars.datum")):
                write_datum(tmp / fname, pca_rand[key])
            # read back through the same importers a real checkpoint goes through
            variables, pca = read_checkpoint(tmp / "model.ckpt"), read_pca(tmp)
        label = "RANDOM weights in a checkpoint with the official names (pipeline check; not a usable model)"
        notes.append("random weights: int8 accuracy cannot be judged on them (rounding noise is amplified)")
    else:
        if checkpoint is None:
            raise ModelError("DELF needs the official checkpoint (--checkpoint); no DELF weights ship with d2r")
        label = f"user-supplied checkpoint {Path(checkpoint).name}"
        variables = read_checkpoint(checkpoint)
        pca = read_pca(pca_dir) if pca_dir else None
    pca_dim = PCA_DIM if pca is not None else None
    model = build(height, width, pca_dim)
    load_checkpoint(model, variables, pca)
    if calibration is None or evaluation is None:
        cal_paths, eval_paths = default_photo_sets()
        calibration = calibration if calibration is not None else cal_paths
        evaluation = evaluation if evaluation is not None else eval_paths
    size = (height, width)
    cal = [load_rgb(p, size).astype(np.float32)[None] for p in calibration]
    ev = [load_rgb(p, size).astype(np.float32)[None] for p in evaluation]
    stem = f"delf_random_{height}x{width}" if random_weights else f"delf_{height}x{width}"
    return Job(
        name="delf", stem=stem, model=model, input_shape=(1, height, width, 3), calibration=cal, evaluation=ev,
        source=lambda x: reference_forward(variables, x, pca, pca_dim or PCA_DIM), source_label="tf.nn reference on the checkpoint",
        entry=manifest_entry(height, width, pca_dim, label), tflite_precisions=("fp32", "int8"), onnx_precisions=("fp32", "int8"),
        notes=notes + [f"calibration: {len(cal)} photos; evaluation: {len(ev)} other photos"],
    )
