"""Local features: dense model outputs to keypoints (cell heatmap, non-maximum suppression,
bilinear sampling of descriptor maps), the kernels of :class:`d2r.LocalFeatureExtractor`.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def cell_heatmap(logits, cell):
    """Keypoint heatmap [h*cell, w*cell] from per-cell logits [h, w, cell*cell + 1].

    Softmax over the cell*cell positions plus the "no keypoint" bin, the bin dropped, and the
    positions (row-major within the cell) moved to their pixels (depth-to-space).
    """
    h, w, c = logits.shape
    out = np.empty((h * cell, w * cell), dtype=np.float32)
    for i in range(h):
        for j in range(w):
            mx = logits[i, j, 0]
            for k in range(1, c):
                if logits[i, j, k] > mx:
                    mx = logits[i, j, k]
            total = 0.0
            for k in range(c):
                total += np.exp(np.float64(logits[i, j, k] - mx))
            for k in range(cell * cell):
                out[i * cell + k // cell, j * cell + k % cell] = np.float32(np.exp(np.float64(logits[i, j, k] - mx)) / total)
    return out


@njit(cache=True, nogil=True)
def local_maxima(heat, radius, threshold, valid_h, valid_w):
    """(ys, xs) int64 of pixels that equal the max of their (2r+1)^2 window and exceed threshold.

    Only the top-left valid_h x valid_w part of the map is searched (the rest is padding).
    """
    h = min(heat.shape[0], valid_h)
    w = min(heat.shape[1], valid_w)
    ys = np.empty(h * w, dtype=np.int64)
    xs = np.empty(h * w, dtype=np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            v = heat[y, x]
            if not v > threshold:
                continue
            is_max = True
            for yy in range(max(0, y - radius), min(heat.shape[0], y + radius + 1)):
                for xx in range(max(0, x - radius), min(heat.shape[1], x + radius + 1)):
                    if heat[yy, xx] > v:
                        is_max = False
                        break
                if not is_max:
                    break
            if is_max:
                ys[n] = y
                xs[n] = x
                n += 1
    return ys[:n], xs[:n]


@njit(cache=True, nogil=True)
def bilinear_sample(grid, ys, xs, full_h, full_w):
    """Sample grid [h, w, C] at full-resolution pixel positions -> float32 [N, C].

    Follows grid_sample(align_corners=False) at u = 2x / (W - 1) - 1 (XFeat's convention):
    grid coordinate gx = x * w / (W - 1) - 0.5; zero outside the grid.
    """
    h, w, c = grid.shape
    n = ys.shape[0]
    out = np.zeros((n, c), dtype=np.float32)
    sy = h / max(full_h - 1, 1)
    sx = w / max(full_w - 1, 1)
    for i in range(n):
        gy = ys[i] * sy - 0.5
        gx = xs[i] * sx - 0.5
        y0 = int(np.floor(gy))
        x0 = int(np.floor(gx))
        fy = gy - y0
        fx = gx - x0
        for dy in range(2):
            yy = y0 + dy
            if yy < 0 or yy >= h:
                continue
            wy = fy if dy else 1.0 - fy
            for dx in range(2):
                xx = x0 + dx
                if xx < 0 or xx >= w:
                    continue
                wgt = wy * (fx if dx else 1.0 - fx)
                for k in range(c):
                    out[i, k] += np.float32(wgt * grid[yy, xx, k])
    return out
