"""Local features around any dense model: the DELF extraction procedure (ALGORITHM.md sec. 1).

A dense model maps an image to a grid of descriptors plus a grid of scores. Two kinds of
models are handled, told apart by their manifest entry:

- keypoint models (XFeat): 8x8-cell keypoint logits give a full-resolution heatmap; keypoints
  are its 5x5 local maxima above a threshold, scored by heatmap x reliability, and descriptors
  are sampled bilinearly from the stride-8 descriptor map;
- receptive-field models (DELF): every grid position whose attention score passes the
  threshold is a feature, located at the centre of its receptive field.

Either way the image pyramid, the top-k by score and the optional PCA follow the DELF procedure.
Models have static input shapes (for GPU delegates and NPUs), so each pyramid level is fitted
into the model canvas keeping its aspect ratio, and the padding is excluded from the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import InputError, ModelError
from .image import load_image

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
MIN_IMAGE_SIDE = 10


@dataclass
class Features:
    """Local features of one image.

    locations: float32 [N, 2] (y, x) in original image pixels; descriptors: float32 [N, D]
    L2-normalised; scores: float32 [N] (descending); scales: float32 [N] (1 / pyramid scale).
    """

    locations: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    scales: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, dim: int) -> "Features":
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))

    def in_box(self, box, image_shape) -> "Features":
        """The features inside a normalised box (ymin, xmin, ymax, xmax) of an image [H, W].

        This is the cheap region source: pooling whole-image features into detected boxes
        instead of re-extracting features on each crop.
        """
        h, w = image_shape[:2]
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        y, x = self.locations[:, 0], self.locations[:, 1]
        keep = (y >= ymin * h) & (y < ymax * h) & (x >= xmin * w) & (x < xmax * w)
        return Features(self.locations[keep], self.descriptors[keep], self.scores[keep], self.scales[keep])


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def _l2_rows(x: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.maximum((x.astype(np.float64) ** 2).sum(1, keepdims=True), 1e-12))
    return (x / n).astype(np.float32)


class LocalFeatureExtractor:
    """Extracts :class:`Features` with a dense local-feature model.

    Args:
        model: a :class:`d2r.backends.Model` (from :func:`d2r.load_model`).
        scales: pyramid scales relative to the image fitted into the model canvas; values
            above 1 are refused for static-shape models. Default: the manifest's, else (1.0,).
        max_features: keep the top-k features by score (manifest default otherwise).
        score_threshold: minimum keypoint / attention score (manifest default otherwise).
        pca: optional (mean [D], projection [D', D]) applied after L2 normalisation, then
            L2 normalisation again (DELF post-processing, no whitening).
        entry: the model's manifest entry (``outputs``, ``geometry``, ``defaults`` say how to
            read it); default ``model.entry``, filled in by :func:`d2r.load_model`.
    """

    def __init__(self, model, scales=None, max_features=None, score_threshold=None, pca=None, entry=None):
        entry = entry if entry is not None else getattr(model, "entry", None)
        if entry is None or entry.task != "local_features":
            raise ModelError(f"{getattr(model, 'path', model)}: not a local-feature model listed in a model manifest (pass entry=)")
        self.model = model
        self.entry = entry
        defaults = entry.defaults or {}
        self.scales = tuple(float(s) for s in (scales if scales is not None else defaults.get("scales", (1.0,))))
        if not self.scales or any(not (0 < s <= 1.0) for s in self.scales):
            raise InputError(f"scales: expected values in (0, 1] for a static-shape model, got {list(self.scales)}")
        self.max_features = int(max_features if max_features is not None else defaults.get("max_features", 1000))
        if self.max_features < 1:
            raise InputError(f"max_features: expected >= 1, got {self.max_features}")
        self.score_threshold = float(score_threshold if score_threshold is not None else defaults.get("score_threshold", 0.0))
        names = [o.name for o in entry.outputs]
        self._out = {name: i for i, name in enumerate(names)}
        if "descriptors" not in self._out:
            raise ModelError(f"manifest entry {entry.name!r} has no 'descriptors' output")
        self.keypoint_model = "keypoint_logits" in self._out
        self.canvas = (entry.input.height, entry.input.width)
        self.input_range = tuple(entry.input.range)
        self.stride = int((entry.geometry or {}).get("stride", 8))
        self.nms_kernel = int(defaults.get("nms_kernel", 5))
        self.pca = pca
        self.dim = int(entry.outputs[self._out["descriptors"]].shape[-1]) if pca is None else int(pca[1].shape[0])

    def _prepare(self, rgb: np.ndarray, scale: float):
        """Fit the image at ``scale`` into the canvas; returns (input, factor, valid_h, valid_w)."""
        ch, cw = self.canvas
        h, w = rgb.shape[:2]
        fit = min(ch / h, cw / w) * scale
        nh, nw = max(1, int(round(h * fit))), max(1, int(round(w * fit)))
        nh, nw = min(nh, ch), min(nw, cw)
        small = _resize(rgb, nh, nw)
        # Edge-replicated padding: keeps the image statistics (XFeat normalises the whole input).
        canvas = np.pad(small, ((0, ch - nh), (0, cw - nw), (0, 0)), mode="edge").astype(np.float32)
        lo, hi = self.input_range
        if (lo, hi) != (0.0, 255.0):
            canvas = canvas / 255.0 * (hi - lo) + lo
        return canvas[None], (h / nh, w / nw), nh, nw

    def extract(self, image) -> Features:
        rgb = load_image(image)
        if rgb.shape[0] < MIN_IMAGE_SIDE or rgb.shape[1] < MIN_IMAGE_SIDE:
            return Features.empty(self.dim)
        locs, descs, scores, scales = [], [], [], []
        for s in self.scales:
            x, (fy, fx), vh, vw = self._prepare(rgb, s)
            outs = self.model.run(x)
            if self.keypoint_model:
                yx, sc, de = self._keypoints(outs, vh, vw)
            else:
                yx, sc, de = self._dense(outs, vh, vw)
            locs.append(yx * np.array([fy, fx], np.float32))
            scores.append(sc)
            descs.append(de)
            scales.append(np.full(len(sc), 1.0 / s, np.float32))
        loc = np.concatenate(locs)
        score = np.concatenate(scores)
        desc = np.concatenate(descs)
        scale = np.concatenate(scales)
        order = np.argsort(-score, kind="stable")[: self.max_features]
        desc = _l2_rows(desc[order])
        if self.pca is not None:
            mean, proj = self.pca
            desc = _l2_rows((desc - mean) @ proj.T)
        return Features(loc[order].astype(np.float32), desc, score[order].astype(np.float32), scale[order])

    # -- keypoint models (XFeat) ---------------------------------------------------------------
    def _keypoints(self, outs, vh, vw):
        logits = outs[self._out["keypoint_logits"]][0]  # [h, w, 65]
        desc_map = outs[self._out["descriptors"]][0]  # [h, w, D]
        rel = outs[self._out["reliability"]][0, :, :, 0] if "reliability" in self._out else None
        heat = kernels.cell_heatmap(np.ascontiguousarray(logits, dtype=np.float32), self.stride)
        ys, xs = kernels.local_maxima(heat, self.nms_kernel // 2, np.float32(self.score_threshold), vh, vw)
        full_h, full_w = heat.shape
        score = heat[ys, xs]
        if rel is not None:
            score = score * kernels.bilinear_sample(rel[:, :, None].astype(np.float32), ys.astype(np.float32), xs.astype(np.float32), full_h, full_w)[:, 0]
        desc = kernels.bilinear_sample(np.ascontiguousarray(desc_map, dtype=np.float32), ys.astype(np.float32), xs.astype(np.float32), full_h, full_w)
        yx = np.stack([ys, xs], axis=1).astype(np.float32)
        return yx, score.astype(np.float32), desc

    # -- receptive-field models (DELF) ---------------------------------------------------------
    def _dense(self, outs, vh, vw):
        geo = self.entry.geometry or {}
        desc_map = outs[self._out["descriptors"]][0]
        score_name = "attention" if "attention" in self._out else "scores"
        att = outs[self._out[score_name]][0, :, :, 0]
        rf, stride, pad = float(geo["receptive_field"]), float(geo["stride"]), float(geo.get("padding", 0.0))
        gy, gx = np.nonzero(att >= self.score_threshold)
        # Centre of the receptive field box stride*[y, x] + [-p, -p, -p + rf - 1, -p + rf - 1].
        cy = stride * gy - pad + (rf - 1) / 2
        cx = stride * gx - pad + (rf - 1) / 2
        keep = (cy < vh) & (cx < vw)
        yx = np.stack([cy[keep], cx[keep]], axis=1).astype(np.float32)
        return yx, att[gy[keep], gx[keep]].astype(np.float32), desc_map[gy[keep], gx[keep]].astype(np.float32)
