"""DELF's outputs -> features (converted by ``d2r_convert.delf``): receptive-field decoding.

The model gives an attention score and a descriptor at every cell of a stride-32 grid. Every
cell whose attention reaches the score threshold is a feature, located at the centre of its
receptive field: the box stride * [y, x, y, x] + [-p, -p, -p + rf - 1, -p + rf - 1] of the
manifest entry's ``geometry`` (receptive_field rf, stride, padding p); cells whose centre falls
in the canvas' padding are dropped. The descriptors are the model's own: the converter bakes
DELF's L2 -> PCA -> L2 into the graph (output ``descriptors``); a file converted without PCA
(output ``features``, raw block3) is for the converter's checks and is not read here.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from ..manifest import ModelEntry

#: the output that scores each cell, by preference
SCORE_OUTPUTS = ("attention", "scores")


class DelfDecoder:
    """Decodes the outputs of a dense receptive-field model (DELF) for :class:`~d2r.features.LocalFeatureExtractor`."""

    family = "delf"

    def __init__(self, entry: ModelEntry):
        self.outputs = {o.name: i for i, o in enumerate(entry.outputs)}
        if "descriptors" not in self.outputs:
            raise ModelError(f"manifest entry {entry.name!r} has no 'descriptors' output")
        score = [n for n in SCORE_OUTPUTS if n in self.outputs]
        if not score:
            raise ModelError(f"manifest entry {entry.name!r}: a DELF model needs an 'attention' (or 'scores') output")
        self.score_output = score[0]
        geo = entry.geometry or {}
        missing = [k for k in ("receptive_field", "stride") if k not in geo]
        if missing:
            raise ModelError(f"manifest entry {entry.name!r}: geometry lacks {missing} (needed to locate DELF features)")
        self.receptive_field = float(geo["receptive_field"])
        self.stride = float(geo["stride"])
        self.padding = float(geo.get("padding", 0.0))
        self.dim = int(entry.outputs[self.outputs["descriptors"]].shape[-1])

    def decode(self, outs, valid_h: int, valid_w: int, score_threshold: float, max_features: int):
        desc_map = outs[self.outputs["descriptors"]][0]
        att = outs[self.outputs[self.score_output]][0, :, :, 0]
        rf, stride, pad = self.receptive_field, self.stride, self.padding
        gy, gx = np.nonzero(att >= score_threshold)
        # Centre of the receptive field box stride*[y, x] + [-p, -p, -p + rf - 1, -p + rf - 1].
        cy = stride * gy - pad + (rf - 1) / 2
        cx = stride * gx - pad + (rf - 1) / 2
        keep = (cy < valid_h) & (cx < valid_w)
        yx = np.stack([cy[keep], cx[keep]], axis=1).astype(np.float32)
        return yx, att[gy[keep], gx[keep]].astype(np.float32), desc_map[gy[keep], gx[keep]].astype(np.float32)
