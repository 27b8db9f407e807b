"""XFeat's outputs -> keypoints, scores, descriptors (converted by ``d2r_convert.xfeat``).

The model gives 8x8-cell keypoint logits (65 channels: 64 cell positions and a dustbin), a
reliability map and a descriptor map at stride 8. The logits give a full-resolution heatmap;
keypoints are its local maxima (``nms_kernel`` x ``nms_kernel``, 5 by default) above the score
threshold inside the image part of the canvas, scored by heatmap x reliability (sampled
bilinearly there); descriptors are sampled bilinearly from the descriptor map. The loops are
the Numba kernels of :mod:`d2r.kernels.keypoints`.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..errors import ModelError
from ..manifest import ModelEntry


class XFeatDecoder:
    """Decodes the outputs of a keypoint-logit model (XFeat) for :class:`~d2r.features.LocalFeatureExtractor`."""

    family = "xfeat"

    def __init__(self, entry: ModelEntry):
        self.outputs = {o.name: i for i, o in enumerate(entry.outputs)}
        if "descriptors" not in self.outputs:
            raise ModelError(f"manifest entry {entry.name!r} has no 'descriptors' output")
        if "keypoint_logits" not in self.outputs:
            raise ModelError(f"manifest entry {entry.name!r}: an XFeat model needs a 'keypoint_logits' output")
        self.dim = int(entry.outputs[self.outputs["descriptors"]].shape[-1])
        self.stride = int((entry.geometry or {}).get("stride", 8))
        self.nms_kernel = int((entry.defaults or {}).get("nms_kernel", 5))

    def decode(self, outs, valid_h: int, valid_w: int, score_threshold: float, max_features: int):
        heat = self._heat(outs)
        ys, xs = kernels.local_maxima(heat, self.nms_kernel // 2, np.float32(score_threshold), valid_h, valid_w)
        return self._describe(outs, heat, ys, xs)

    def _heat(self, outs):
        logits = outs[self.outputs["keypoint_logits"]][0]  # [h, w, 65]
        return kernels.cell_heatmap(np.ascontiguousarray(logits, dtype=np.float32), self.stride)

    def decode_cells(self, outs, cells, score_threshold: float, max_features: int):
        """Several images packed into one canvas: ``cells`` = [(y0, x0, h, w)], each an image's
        part of the canvas; the local maxima of each cell's part of the heatmap (a maximum
        needs only its own cell's pixels to beat), scored and described as one canvas.
        -> [(yx in canvas pixels, scores, descriptors)] per cell."""
        heat = self._heat(outs)
        out = []
        for y0, x0, h, w in cells:
            part = np.ascontiguousarray(heat[y0:y0 + h, x0:x0 + w])
            ys, xs = kernels.local_maxima(part, self.nms_kernel // 2, np.float32(score_threshold), h, w)
            out.append(self._describe(outs, heat, ys + y0, xs + x0))
        return out

    def _describe(self, outs, heat, ys, xs):
        desc_map = outs[self.outputs["descriptors"]][0]  # [h, w, D]
        rel = outs[self.outputs["reliability"]][0, :, :, 0] if "reliability" in self.outputs else None
        full_h, full_w = heat.shape
        score = heat[ys, xs]
        if rel is not None:
            score = score * kernels.bilinear_sample(rel[:, :, None].astype(np.float32), ys.astype(np.float32), xs.astype(np.float32), full_h, full_w)[:, 0]
        desc = kernels.bilinear_sample(np.ascontiguousarray(desc_map, dtype=np.float32), ys.astype(np.float32), xs.astype(np.float32), full_h, full_w)
        yx = np.stack([ys, xs], axis=1).astype(np.float32)
        return yx, score.astype(np.float32), desc
