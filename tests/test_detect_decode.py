"""SSD anchors, box decoding and NMS (the parts of detection that live outside the graph)."""

import numpy as np
import pytest

from d2r.detect import decode_boxes, iou_matrix, nms, postprocess, ssd_anchors


def test_oidv4_anchor_count_and_layout():
    a = ssd_anchors()
    assert a.shape == (1917, 4) and a.dtype == np.float32
    # Lowest layer: 19x19 cells, 3 reduced boxes each; first box is the 0.1 square.
    np.testing.assert_allclose(a[0], [0.5 / 19, 0.5 / 19, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(a[1, 2:], [0.2 / np.sqrt(2), 0.2 * np.sqrt(2)], atol=1e-6)
    # Last layer: one cell at the centre, 5 ratios + the interpolated box sqrt(0.95 * 1.0).
    np.testing.assert_allclose(a[-6, :2], [0.5, 0.5])
    np.testing.assert_allclose(a[-6, 2:], [0.95, 0.95], atol=1e-6)
    np.testing.assert_allclose(a[-1, 2:], [np.sqrt(0.95), np.sqrt(0.95)], atol=1e-6)
    per_layer = [19 * 19 * 3, 10 * 10 * 6, 5 * 5 * 6, 3 * 3 * 6, 2 * 2 * 6, 1 * 6]
    assert sum(per_layer) == 1917


def test_zero_encodings_decode_to_the_anchors():
    a = ssd_anchors()
    boxes = decode_boxes(np.zeros((len(a), 4), np.float32), a)
    np.testing.assert_allclose((boxes[:, 0] + boxes[:, 2]) / 2, a[:, 0], atol=1e-6)
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], a[:, 2], atol=1e-6)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], a[:, 3], atol=1e-6)


def test_decode_scales():
    anchor = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    enc = np.array([[1.0, -2.0, 5.0 * np.log(2.0), 0.0]], np.float32)
    box = decode_boxes(enc, anchor)[0]
    # y centre moves by 1/10 of the anchor height, x by -2/10 of its width; height doubles.
    np.testing.assert_allclose(box, [0.52 - 0.2, 0.42 - 0.2, 0.52 + 0.2, 0.42 + 0.2], atol=1e-6)


def test_iou_and_nms():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 0.9], [0, 0.5, 1, 1.5], [2, 2, 3, 3]], np.float32)
    iou = iou_matrix(boxes, boxes)
    np.testing.assert_allclose(np.diag(iou), 1.0)
    assert iou[0, 1] == pytest.approx(0.9) and iou[0, 3] == 0.0
    assert iou[0, 2] == pytest.approx(0.5 / 1.5)
    scores = np.array([0.9, 0.95, 0.5, 0.7], np.float32)
    assert nms(boxes, scores, 0.4, 10).tolist() == [1, 3, 2]
    assert nms(boxes, scores, 0.95, 10).tolist() == [1, 0, 3, 2]
    assert nms(boxes, scores, 0.4, 2).tolist() == [1, 3]
    assert nms(boxes[:0], scores[:0], 0.4, 2).tolist() == []


def test_postprocess_threshold_background_and_order():
    a = ssd_anchors()
    logits = np.full((1, len(a), 24), -10.0, np.float32)
    logits[0, :, 0] = 10.0  # background is confident everywhere and must be ignored
    logits[0, 100, 8] = 2.0  # sigmoid 0.881
    logits[0, 1500, 4] = 0.0  # 0.5
    logits[0, 1501, 4] = -1.0  # 0.269, below the threshold
    det = postprocess(np.zeros((1, len(a), 4), np.float32), logits, a, threshold=0.3, max_boxes=10, iou_threshold=0.4)
    assert det.classes.tolist() == [8, 4]
    np.testing.assert_allclose(det.scores, [1 / (1 + np.exp(-2)), 0.5], atol=1e-6)
    assert det.boxes.shape == (2, 4) and (det.boxes >= 0).all() and (det.boxes <= 1).all()
    assert len(det) == 2
