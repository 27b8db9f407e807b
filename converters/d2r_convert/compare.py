"""Output comparisons for the parity report: raw tensors, SSD detections, XFeat keypoints.

SSD detections are decoded with the runtime's own code (``d2r.detect``), so the parity report
measures what a device sees. The XFeat keypoint helpers below are plain numpy, written apart
from the runtime's Numba kernels.
"""

from __future__ import annotations

import numpy as np

from d2r import detect


def tensor_diff(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs difference and that difference relative to max |ref|."""
    res = {}
    for name, r in ref.items():
        d = float(np.abs(r.astype(np.float64) - out[name].astype(np.float64)).max())
        res[name] = {"max_abs": d, "max_abs_rel": d / max(float(np.abs(r).max()), 1e-12)}
    return res


# ---------------------------------------------------------------- SSD
def ssd_anchors(p: dict) -> np.ndarray:
    """Anchors [N, 4] as (y_center, x_center, h, w) from the manifest's anchor block: the
    runtime's own generator, checked against the anchor count the manifest states."""
    anchors = detect.ssd_anchors(p)
    if "num_anchors" in p and len(anchors) != p["num_anchors"]:
        raise ValueError(f"anchor parameters give {len(anchors)} anchors, the manifest says {p['num_anchors']}")
    return anchors


iou = detect.iou_matrix


def ssd_detect(box_encodings, class_logits, anchors, decoding: dict, score_threshold: float, max_detections: int = 25):
    """The runtime's decoding and per-class NMS -> (boxes [K, 4] ymin,xmin,ymax,xmax; scores; classes)."""
    det = detect.postprocess(
        np.asarray(box_encodings).reshape(-1, 4), np.asarray(class_logits).reshape(len(anchors), -1), anchors,
        threshold=score_threshold, max_boxes=max_detections, iou_threshold=decoding["nms_iou_threshold"],
        box_scale=decoding["box_scale"], class_agnostic=False, ignore_classes=(decoding["background_class"],),
    )
    return det.boxes, det.scores, det.classes


def match_detections(ref, out) -> dict:
    """Match each reference detection to the best same-class detection of ``out``.

    Returns counts, recall at IoU >= 0.5, and mean IoU / mean |score difference| of the matches.
    """
    rb, rs, rc = ref
    ob, os_, oc = out
    ious, dscore, matched = [], [], 0
    for i in range(len(rb)):
        same = np.flatnonzero(oc == rc[i])
        if len(same) == 0:
            ious.append(0.0)
            continue
        m = iou(rb[i : i + 1], ob[same])[0]
        j = int(np.argmax(m))
        ious.append(float(m[j]))
        if m[j] >= 0.5:
            matched += 1
            dscore.append(abs(float(rs[i]) - float(os_[same[j]])))
    good = [v for v in ious if v >= 0.5]
    return {"ref_detections": int(len(rb)), "detections": int(len(ob)), "matched_iou50": matched,
            "mean_iou": float(np.mean(ious)) if ious else float("nan"),
            "mean_iou_matched": float(np.mean(good)) if good else float("nan"),
            "mean_abs_score_diff": float(np.mean(dscore)) if dscore else float("nan")}


# ---------------------------------------------------------------- XFeat
def xfeat_heatmap(keypoint_logits: np.ndarray) -> np.ndarray:
    """[1, h, w, 65] logits -> [8h, 8w] keypoint probability (softmax, drop the dustbin, depth-to-space)."""
    z = keypoint_logits[0].astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    p = (z / z.sum(axis=-1, keepdims=True))[..., :64]
    h, w = p.shape[:2]
    return p.reshape(h, w, 8, 8).transpose(0, 2, 1, 3).reshape(h * 8, w * 8)


def xfeat_keypoints(outputs: dict, threshold: float = 0.05, top_k: int = 4096, nms: int = 5):
    """Keypoints as XFeat.detectAndCompute picks them. Returns (xy [K, 2] float32 in input pixels, score [K])."""
    heat = xfeat_heatmap(outputs["keypoint_logits"])
    pad = nms // 2
    padded = np.pad(heat, pad, constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(padded, (nms, nms)).max(axis=(2, 3))
    ys, xs = np.nonzero((heat == win) & (heat > threshold))
    rel = outputs["reliability"][0, :, :, 0]
    # reliability sampled bilinearly at the keypoint (stride-8 map, half-pixel centres)
    score = heat[ys, xs] * bilinear(rel[..., None], np.stack([xs, ys], 1).astype(np.float32), heat.shape)[:, 0]
    order = np.argsort(-score, kind="stable")[:top_k]
    return np.stack([xs, ys], 1)[order].astype(np.float32), score[order].astype(np.float32)


def bilinear(fmap: np.ndarray, xy: np.ndarray, image_hw) -> np.ndarray:
    """Sample fmap [h, w, C] at pixel positions xy [K, 2] of an image of size image_hw (grid_sample, align_corners=False)."""
    h, w = fmap.shape[:2]
    H, W = image_hw
    # XFeat's normgrid maps pixel x to 2x/(W-1)-1; grid_sample(align_corners=False) then reads map coordinate below
    gx = ((2 * xy[:, 0] / (W - 1) - 1) + 1) * w / 2 - 0.5
    gy = ((2 * xy[:, 1] / (H - 1) - 1) + 1) * h / 2 - 0.5
    x0, y0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = (gx - x0)[:, None], (gy - y0)[:, None]

    def at(yy, xx):
        ok = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[:, None]
        return np.where(ok, fmap[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)

    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1)) + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


def xfeat_descriptors(outputs: dict, xy: np.ndarray, image_hw) -> np.ndarray:
    d = bilinear(outputs["descriptors"][0], xy, image_hw)
    return (d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def keypoint_agreement(ref: dict, out: dict, image_hw, radius: float = 3.0, top_k: int = 1024) -> dict:
    """Repeatability of ``out``'s keypoints w.r.t. ``ref`` on the same image, and descriptor cosine.

    repeatability: fraction of the reference top-k keypoints with a keypoint of ``out`` within
    ``radius`` pixels; cosine: mean cosine between both descriptor maps sampled at the reference keypoints.
    """
    rxy, _ = xfeat_keypoints(ref, top_k=top_k)
    oxy, _ = xfeat_keypoints(out, top_k=top_k)
    if len(rxy) == 0:
        return {"keypoints": 0, "repeatability": float("nan"), "descriptor_cosine": float("nan")}
    if len(oxy):
        d2 = ((rxy[:, None, :] - oxy[None, :, :]) ** 2).sum(-1).min(axis=1)
        rep = float(np.mean(d2 <= radius * radius))
    else:
        rep = 0.0
    cos = np.sum(xfeat_descriptors(ref, rxy, image_hw) * xfeat_descriptors(out, rxy, image_hw), axis=1)
    return {"keypoints": int(len(rxy)), "repeatability": rep, "descriptor_cosine": float(np.mean(cos))}


def mutual_matches(d1: np.ndarray, d2: np.ndarray, min_cos: float = 0.82) -> np.ndarray:
    """Mutual nearest neighbours by cosine (XFeat's default 0.82 threshold). Returns [M, 2] index pairs."""
    if len(d1) == 0 or len(d2) == 0:
        return np.zeros((0, 2), np.int64)
    s = d1 @ d2.T
    a, b = s.argmax(1), s.argmax(0)
    i = np.flatnonzero((b[a] == np.arange(len(d1))) & (s[np.arange(len(d1)), a] > min_cos))
    return np.stack([i, a[i]], 1)


def true_inliers(p1: np.ndarray, p2: np.ndarray, H: np.ndarray, threshold: float = 3.0) -> int:
    """Matches [M, 2] x2 whose first point, mapped by the known homography H, lands within ``threshold`` px."""
    if len(p1) == 0:
        return 0
    q = np.concatenate([p1, np.ones((len(p1), 1))], 1) @ H.T
    return int(np.sum(np.linalg.norm(q[:, :2] / q[:, 2:3] - p2, axis=1) <= threshold))


def epipolar_inliers(p1: np.ndarray, p2: np.ndarray, max_dy: float = 2.0) -> int:
    """Matches of a rectified stereo pair that keep their row (|dy| <= max_dy) with a non-negative disparity."""
    if len(p1) == 0:
        return 0
    return int(np.sum((np.abs(p1[:, 1] - p2[:, 1]) <= max_dy) & (p1[:, 0] - p2[:, 0] >= -max_dy)))
