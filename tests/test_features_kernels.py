"""Keypoint kernels (heatmap, NMS, bilinear sampling) against numpy written from their definition."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from d2r import kernels


def test_cell_heatmap_is_softmax_depth_to_space():
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((6, 7, 65))).astype(np.float32)
    heat = kernels.cell_heatmap(logits, 8)
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    sm = e / e.sum(-1, keepdims=True)
    want = sm[..., :64].reshape(6, 7, 8, 8).transpose(0, 2, 1, 3).reshape(48, 56)
    np.testing.assert_allclose(heat, want, atol=1e-7)
    # Channel k of cell (i, j) lands at pixel (8i + k // 8, 8j + k % 8).
    one = np.full((1, 1, 65), -50.0, np.float32)
    one[0, 0, 8 * 3 + 5] = 50.0
    assert np.unravel_index(np.argmax(kernels.cell_heatmap(one, 8)), (8, 8)) == (3, 5)


def test_local_maxima_matches_max_filter():
    rng = np.random.default_rng(1)
    heat = rng.random((40, 50)).astype(np.float32)
    ys, xs = kernels.local_maxima(heat, 2, np.float32(0.3), 40, 50)
    padded = np.pad(heat, 2, constant_values=-np.inf)
    mx = sliding_window_view(padded, (5, 5)).max(axis=(2, 3))
    want = np.argwhere((heat == mx) & (heat > 0.3))
    np.testing.assert_array_equal(np.stack([ys, xs], 1), want)
    # The padded part of the canvas is not searched.
    ys2, xs2 = kernels.local_maxima(heat, 2, np.float32(0.3), 20, 30)
    assert (ys2 < 20).all() and (xs2 < 30).all() and len(ys2) < len(ys)


def test_bilinear_sample_align_corners_false():
    rng = np.random.default_rng(2)
    grid = rng.standard_normal((4, 6, 3)).astype(np.float32)
    full_h, full_w = 32, 48
    ys = rng.uniform(0, full_h - 1, 50).astype(np.float32)
    xs = rng.uniform(0, full_w - 1, 50).astype(np.float32)
    got = kernels.bilinear_sample(grid, ys, xs, full_h, full_w)
    padded = np.pad(grid, ((1, 1), (1, 1), (0, 0)))  # zeros outside, as grid_sample
    for i in range(50):
        gy = ys[i] * 4 / (full_h - 1) - 0.5 + 1
        gx = xs[i] * 6 / (full_w - 1) - 0.5 + 1
        y0, x0 = int(np.floor(gy)), int(np.floor(gx))
        fy, fx = gy - y0, gx - x0
        want = (
            padded[y0, x0] * (1 - fy) * (1 - fx)
            + padded[y0, x0 + 1] * (1 - fy) * fx
            + padded[y0 + 1, x0] * fy * (1 - fx)
            + padded[y0 + 1, x0 + 1] * fy * fx
        )
        np.testing.assert_allclose(got[i], want, atol=1e-5)
