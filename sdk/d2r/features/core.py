"""What every local-feature model shares: :class:`Features`, and :class:`LocalFeatureExtractor`
with the DELF extraction procedure around the model (docs/algorithm.md sec. 1).

The image pyramid, the fit of each level into the model's static canvas (aspect ratio kept,
padding excluded), the tiling of levels larger than the canvas, the top-k by score and the
optional PCA are the same for every model. What a model's outputs mean is its decoder's
business: :data:`DECODERS` maps a model family to the class that turns one canvas' outputs
into keypoints, scores and descriptors (:mod:`.xfeat`, :mod:`.aliked`, :mod:`.delf`), and the
manifest entry says which family a model is (:func:`model_family`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from ..errors import InputError, ModelError
from ..image import load_image
from ..manifest import ModelEntry
from .aliked import AlikedDecoder
from .delf import DelfDecoder
from .xfeat import XFeatDecoder

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
MIN_IMAGE_SIDE = 10
MAX_SCALE = 4.0
#: overlap of neighbouring tiles of a pyramid level larger than the canvas (model pixels)
TILE_OVERLAP = 64


class Decoder(Protocol):
    """Turns the outputs of one model run into features; built from the model's manifest entry
    (checks its outputs, loads what else it needs)."""

    #: the model family (the key of :data:`DECODERS`)
    family: str
    #: descriptor dimension before the optional PCA
    dim: int

    def decode(self, outs, valid_h: int, valid_w: int, score_threshold: float, max_features: int):
        """outs: the model's outputs (list, manifest order, NHWC, batch 1); valid_h x valid_w:
        the image part of the canvas. -> (yx float32 [N, 2] in canvas pixels, scores [N],
        descriptors [N, dim])."""
        ...


#: model family -> its decoder (what the outputs of a converted model of that family mean)
DECODERS: dict[str, Callable[[ModelEntry], Decoder]] = {cls.family: cls for cls in (XFeatDecoder, AlikedDecoder, DelfDecoder)}


def model_family(entry: ModelEntry) -> str:
    """The family of a local-feature model: the entry's ``geometry.decoding`` where it names one
    (ALIKED's entries do), else by its outputs, as the converters write them: keypoint logits
    for XFeat, a dense descriptor grid for DELF."""
    named = (entry.geometry or {}).get("decoding")
    if named:
        return str(named)
    return "xfeat" if any(o.name == "keypoint_logits" for o in entry.outputs) else "delf"


def decoder_for(entry: ModelEntry) -> Decoder:
    """The decoder of a manifest entry's model family; :class:`ModelError` for an unknown family."""
    family = model_family(entry)
    if family not in DECODERS:
        raise ModelError(f"manifest entry {entry.name!r}: unknown local-feature decoding {family!r} (known: {', '.join(sorted(DECODERS))})")
    return DECODERS[family](entry)


def _tiles(n: int, c: int, overlap: int):
    """Tiles of length ``c`` covering [0, n): (start, core_lo, core_hi); the cores partition the line."""
    if n <= c:
        return [(0, -np.inf, np.inf)]
    count = -(-(n - overlap) // (c - overlap))
    starts = [round(i * (n - c) / (count - 1)) for i in range(count)]
    out = []
    for i, s in enumerate(starts):
        lo = -np.inf if i == 0 else (s + starts[i - 1] + c) // 2
        hi = np.inf if i == count - 1 else (starts[i + 1] + s + c) // 2
        out.append((s, lo, hi))
    return out


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


def box_pixels(box, shape) -> tuple[int, int, int, int]:
    """The pixel bounds (y0, x0, y1, x1) of a normalised box (ymin, xmin, ymax, xmax) in an
    image of ``shape``: outward-rounded, clipped to the image."""
    h, w = shape[:2]
    ymin, xmin, ymax, xmax = (float(v) for v in box)
    y0, x0 = max(int(np.floor(ymin * h)), 0), max(int(np.floor(xmin * w)), 0)
    y1, x1 = min(int(np.ceil(ymax * h)), h), min(int(np.ceil(xmax * w)), w)
    return y0, x0, y1, x1


def pack_cells(canvas, cells) -> tuple[int, int]:
    """The cell size (height, width) of a ``rows x cols`` grid on a canvas; cell (r, c) starts
    at (r * height, c * width)."""
    return canvas[0] // cells[0], canvas[1] // cells[1]


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def _l2_rows(x: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.maximum((x.astype(np.float64) ** 2).sum(1, keepdims=True), 1e-12))
    return (x / n).astype(np.float32)


class LocalFeatureExtractor:
    """Extracts :class:`Features` with a dense local-feature model.

    Args:
        model: a :class:`d2r.backends.Model` (from :func:`d2r.load_model`).
        scales: pyramid scales relative to the image fitted into the model canvas. A level
            larger than the canvas (scale above 1) runs as overlapping canvas-sized tiles,
            each keypoint kept by the tile whose core holds it (about ceil(scale)^2 model
            runs per level). Default: the manifest's, else (1.0,).
        max_features: keep the top-k features by score (manifest default otherwise).
        score_threshold: minimum keypoint / attention score (manifest default otherwise).
        pca: optional (mean [D], projection [D', D]) applied after L2 normalisation, then
            L2 normalisation again (DELF post-processing, no whitening).
        entry: the model's manifest entry (``outputs``, ``geometry``, ``defaults`` say how to
            read it); default ``model.entry``, filled in by :func:`d2r.load_model`.
        fit: what scale 1 means: ``"canvas"`` (default) fits the whole image into the model
            canvas (a 640x480 portrait photo runs at 480x360 in a 480x640 canvas);
            ``"longest"`` scales the image's longest side to the canvas' longest side, so
            portrait photos keep the resolution of landscape ones (in two tiles).
    """

    def __init__(self, model, scales=None, max_features=None, score_threshold=None, pca=None, entry=None, fit="canvas"):
        entry = entry if entry is not None else getattr(model, "entry", None)
        if entry is None or entry.task != "local_features":
            raise ModelError(f"{getattr(model, 'path', model)}: not a local-feature model listed in a model manifest (pass entry=)")
        self.model = model
        self.entry = entry
        defaults = entry.defaults or {}
        self.scales = tuple(float(s) for s in (scales if scales is not None else defaults.get("scales", (1.0,))))
        if not self.scales or any(not (0 < s <= MAX_SCALE) for s in self.scales):
            raise InputError(f"scales: expected values in (0, {MAX_SCALE:g}], got {list(self.scales)}")
        self.max_features = int(max_features if max_features is not None else defaults.get("max_features", 1000))
        if self.max_features < 1:
            raise InputError(f"max_features: expected >= 1, got {self.max_features}")
        self.score_threshold = float(score_threshold if score_threshold is not None else defaults.get("score_threshold", 0.0))
        if fit not in ("canvas", "longest"):
            raise InputError(f"fit: expected 'canvas' or 'longest', got {fit!r}")
        self.fit = fit
        self.decoder = decoder_for(entry)
        self.canvas = (entry.input.height, entry.input.width)
        self.input_range = tuple(entry.input.range)
        self.pca = pca
        self.entry_dim = self.decoder.dim
        self.dim = self.entry_dim if pca is None else int(pca[1].shape[0])

    tile_overlap = TILE_OVERLAP

    def _canvas(self, tile: np.ndarray) -> np.ndarray:
        """Pad a tile of at most the canvas size to the canvas (edge-replicated: keeps the image
        statistics, XFeat normalises the whole input) and map it to the input range."""
        ch, cw = self.canvas
        nh, nw = tile.shape[:2]
        canvas = np.pad(tile, ((0, ch - nh), (0, cw - nw), (0, 0)), mode="edge").astype(np.float32)
        return self._range(canvas)[None]

    def _level(self, rgb: np.ndarray, scale: float):
        """Features of one pyramid level: (yx in original pixels, scores, descriptors)."""
        ch, cw = self.canvas
        h, w = rgb.shape[:2]
        if self.fit == "longest":
            fit = max(ch, cw) / max(h, w) * scale
        else:
            fit = min(ch / h, cw / w) * scale
        nh, nw = max(1, int(round(h * fit))), max(1, int(round(w * fit)))
        if scale <= 1.0 and self.fit == "canvas":
            nh, nw = min(nh, ch), min(nw, cw)
        small = _resize(rgb, nh, nw)
        locs, scores, descs = [], [], []
        for y0, ylo, yhi in _tiles(nh, ch, self.tile_overlap):
            for x0, xlo, xhi in _tiles(nw, cw, self.tile_overlap):
                tile = small[y0:y0 + ch, x0:x0 + cw]
                outs = self.model.run(self._canvas(tile))
                vh, vw = tile.shape[:2]
                yx, sc, de = self.decoder.decode(outs, vh, vw, self.score_threshold, self.max_features)
                yx = yx + np.array([y0, x0], np.float32)
                keep = (yx[:, 0] >= ylo) & (yx[:, 0] < yhi) & (yx[:, 1] >= xlo) & (yx[:, 1] < xhi)
                locs.append(yx[keep])
                scores.append(sc[keep])
                descs.append(de[keep])
        return np.concatenate(locs) * np.array([h / nh, w / nw], np.float32), np.concatenate(scores), np.concatenate(descs)

    def can_pack(self) -> bool:
        """Whether :meth:`extract_crops` packs crops into shared canvases: the model's decoder
        reads cells of a canvas (``decode_cells``) and scale 1 fits into the canvas, one level."""
        return hasattr(self.decoder, "decode_cells") and self.scales == (1.0,) and self.fit == "canvas"

    def extract_crops(self, rgb: np.ndarray, boxes, cells: tuple[int, int] = (2, 2), max_features: int | None = None) -> list:
        """Features of the crops of several normalised boxes of one photo, in photo pixels, one
        :class:`Features` per box: each crop is fitted into one cell of a ``rows x cols`` grid
        on the model canvas (at most the cell's size, aspect kept), ``rows * cols`` crops per
        model run; keypoints are found in each cell as in a canvas of its own, at most
        ``max_features`` per crop (default: the extractor's). Models without cell decoding, or
        a pyramid, extract each crop on its own canvas (:meth:`extract` of the crop)."""
        rgb = load_image(rgb)
        limit = self.max_features if max_features is None else int(max_features)
        bounds = [box_pixels(b, rgb.shape) for b in boxes]
        out: list = [None] * len(bounds)
        pending = []
        for i, (y0, x0, y1, x1) in enumerate(bounds):
            if y1 - y0 < MIN_IMAGE_SIDE or x1 - x0 < MIN_IMAGE_SIDE:
                out[i] = Features.empty(self.dim)
            elif not self.can_pack():
                f = self.extract(rgb[y0:y1, x0:x1])
                out[i] = Features(f.locations + np.array([y0, x0], np.float32), f.descriptors, f.scores, f.scales)
            else:
                pending.append(i)
        rows, cols = cells
        ch, cw = pack_cells(self.canvas, cells)
        per_run = rows * cols
        for start in range(0, len(pending), per_run):
            group = pending[start:start + per_run]
            canvas = np.zeros((self.canvas[0], self.canvas[1], 3), np.uint8)
            windows, fits = [], []
            for slot, i in enumerate(group):
                y0, x0, y1, x1 = bounds[i]
                h, w = y1 - y0, x1 - x0
                fit = min(ch / h, cw / w)
                nh, nw = min(max(1, int(round(h * fit))), ch), min(max(1, int(round(w * fit))), cw)
                cy, cx = (slot // cols) * ch, (slot % cols) * cw
                small = _resize(np.ascontiguousarray(rgb[y0:y1, x0:x1]), nh, nw)
                # the crop, edge-replicated to its cell (as a lone crop is padded to the canvas)
                canvas[cy:cy + ch, cx:cx + cw] = np.pad(small, ((0, ch - nh), (0, cw - nw), (0, 0)), mode="edge")
                windows.append((cy, cx, nh, nw))
                fits.append((h / nh, w / nw))
            outs = self.model.run(self._range(canvas.astype(np.float32))[None])
            decoded = self.decoder.decode_cells(outs, windows, self.score_threshold, limit)
            for i, (cy, cx, _, _), (sy, sx), (yx, sc, de) in zip(group, windows, fits, decoded):
                y0, x0 = bounds[i][:2]
                order = np.argsort(-sc, kind="stable")[:limit]
                loc = (yx[order] - np.array([cy, cx], np.float32)) * np.array([sy, sx], np.float32) + np.array([y0, x0], np.float32)
                desc = _l2_rows(np.asarray(de, np.float32).reshape(-1, self.entry_dim)[order])
                if self.pca is not None:
                    mean, proj = self.pca
                    desc = _l2_rows((desc - mean) @ proj.T)
                out[i] = Features(loc.astype(np.float32), desc, sc[order].astype(np.float32), np.ones(len(order), np.float32))
        return out

    def _range(self, canvas: np.ndarray) -> np.ndarray:
        lo, hi = self.input_range
        return canvas / 255.0 * (hi - lo) + lo if (lo, hi) != (0.0, 255.0) else canvas

    def extract(self, image) -> Features:
        rgb = load_image(image)
        if rgb.shape[0] < MIN_IMAGE_SIDE or rgb.shape[1] < MIN_IMAGE_SIDE:
            return Features.empty(self.dim)
        locs, descs, scores, scales = [], [], [], []
        for s in self.scales:
            yx, sc, de = self._level(rgb, s)
            locs.append(yx)
            scores.append(sc)
            descs.append(de)
            scales.append(np.full(len(sc), 1.0 / s, np.float32))
        loc = np.concatenate(locs)
        score = np.concatenate(scores)
        desc = np.concatenate(descs).reshape(-1, self.entry_dim)
        scale = np.concatenate(scales)
        order = np.argsort(-score, kind="stable")[: self.max_features]
        desc = _l2_rows(desc[order])
        if self.pca is not None:
            mean, proj = self.pca
            desc = _l2_rows((desc - mean) @ proj.T)
        return Features(loc[order].astype(np.float32), desc, score[order].astype(np.float32), scale[order])
