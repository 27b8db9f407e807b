"""Local features around any dense model: the DELF extraction procedure (docs/algorithm.md sec. 1).

A dense model maps an image to grids of scores and descriptors; :class:`LocalFeatureExtractor`
runs it over an image pyramid and keeps the top-k features by score. One module per part:

- :mod:`.core`: :class:`Features`, :class:`LocalFeatureExtractor` (pyramid, canvas fit, tiles,
  top-k, optional PCA: the same for every model) and :data:`DECODERS`, the registry of model
  families, picked by the model's manifest entry (:func:`model_family`);
- :mod:`.xfeat`: keypoint models (XFeat): 8x8-cell keypoint logits give a full-resolution
  heatmap, keypoints are its local maxima, descriptors are sampled from the stride-8 map;
- :mod:`.aliked`: ALIKED (``geometry.decoding == "aliked"``): keypoints by ALIKED's DKD and
  descriptors by its SDDH head on the host, after the converted dense graph;
- :mod:`.delf`: receptive-field models (DELF): every grid cell whose attention passes the
  threshold is a feature, at the centre of its receptive field.
"""

from .core import DECODERS, DELF_SCALES, MAX_SCALE, MIN_IMAGE_SIDE, TILE_OVERLAP, Decoder, Features, LocalFeatureExtractor, decoder_for, model_family

# Helpers that other parts of d2r (detect.py, the lab, the converters) share with the extractor.
from .core import _l2_rows as _l2_rows
from .core import _resize as _resize
from .core import _tiles as _tiles

__all__ = [
    "DECODERS",
    "DELF_SCALES",
    "MAX_SCALE",
    "MIN_IMAGE_SIDE",
    "TILE_OVERLAP",
    "Decoder",
    "Features",
    "LocalFeatureExtractor",
    "decoder_for",
    "model_family",
]
