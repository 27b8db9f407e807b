"""One picture of a query and its answer (``d2r query BUNDLE IMAGE --show out.png``); Pillow only.

    res = engine.query(photo, top_k=3, verify=True)
    d2r_lab.visualize.draw_query(engine, photo, res, "out.png", images_dir="photos/")

The picture has a header row with the query photo and the boxes the detector finds in it,
then one row per result: the query again beside the result's photo with the detector regions
that were indexed for it, and, for a verified result, the inlier matches of spatial
verification drawn as lines between the two. The bundle does not hold the database photos:
``images_dir`` is the folder they were built from (file name = image id). Without it a
result is drawn as a grey card of the size its stored keypoints span, still with the inlier
lines ending at the matched keypoints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from d2r.errors import InputError
from d2r.image import load_image

__all__ = ["draw_query", "match_lines"]

ROW_HEIGHT = 240  # pixels of each photo in the picture
MAX_LINES = 60  # inlier lines drawn per result (an even sample): more hide the photos
PAD = 10
CAPTION = 40  # space under each row for its caption
BOX_COLOURS = [(230, 60, 40), (40, 120, 230), (240, 170, 20), (160, 60, 200), (20, 170, 160), (220, 80, 160), (120, 160, 30), (90, 90, 90)]
INLIER = (40, 200, 70)
WRONG = (210, 40, 40)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        return ImageFont.load_default()


def _fit(rgb: np.ndarray, height: int):
    """PIL image of ``rgb`` scaled to ``height`` pixels; and the scale factor."""
    from PIL import Image

    img = Image.fromarray(rgb)
    scale = height / img.height
    return img.resize((max(1, round(img.width * scale)), height), Image.Resampling.BILINEAR), scale


def _draw_boxes(draw, boxes, size, origin, scores=None, labels=None, font=None) -> None:
    """Normalised (ymin, xmin, ymax, xmax) boxes onto an image of ``size`` (w, h) at ``origin``."""
    w, h = size
    ox, oy = origin
    for i, box in enumerate(boxes):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        draw.rectangle([ox + xmin * w, oy + ymin * h, ox + xmax * w, oy + ymax * h], outline=colour, width=3)
        text = []
        if labels is not None and i < len(labels):
            text.append(str(labels[i]))
        if scores is not None:
            text.append(f"{float(scores[i]):.2f}")
        if text:
            # White on the box's colour: readable on any photo.
            at = (ox + xmin * w + 3, oy + ymin * h + 3)
            draw.rectangle(draw.textbbox(at, " ".join(text), font=font), fill=colour)
            draw.text(at, " ".join(text), fill="white", font=font)


def match_lines(engine, query_rgb: np.ndarray, image_id: str):
    """The matches spatial verification finds between a query and one indexed image.

    Same features and parameters as ``engine.query(verify=True)``. Returns (query (y, x)
    float32 [M, 2], database (y, x) float32 [M, 2], inlier bool [M], database keypoints
    float32 [N, 2]), or None when the bundle has no verification features for ``image_id``.
    """
    from d2r.verify import LocalFeatures, verify_pair

    if not engine.config.verification_features:
        return None
    db = engine._verification_features(image_id)
    if db is None:
        return None
    n = engine.config.verification_features
    feats = engine.extract(query_rgb)
    q = LocalFeatures(feats.locations[:n], feats.descriptors[:n])
    res = verify_pair(q, db, max_distance=engine.match_distance())
    m = res.matches
    return q.locations[m[:, 0]], db.locations[m[:, 1]], np.asarray(res.inlier_mask, bool), db.locations


def draw_query(engine, image, result, out, images_dir=None, top: int | None = None, truth=None) -> Path:
    """Draw ``result`` (a :class:`d2r.QueryResult` of ``image``) into the PNG file ``out``.

    engine: the :class:`d2r.Engine` that answered (its detector draws the boxes, its bundle
    gives the verification features). images_dir: folder of the database photos, or None.
    top: results to draw (default all hits). truth: optional callable hit -> bool; a hit it
    calls wrong gets a red caption. Returns ``out``.
    """
    from PIL import Image, ImageDraw

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: the picture is a PNG file; give a file name ending in .png")
    hits = list(result.hits[: top if top is not None else len(result.hits)])
    q_rgb = load_image(image)
    font, small = _font(16), _font(13)

    rows: list[tuple] = []  # (left image, right image or None, lines, caption, caption colour)
    q_img, q_scale = _fit(q_rgb, ROW_HEIGHT)
    header = q_img.copy()
    hd = ImageDraw.Draw(header)
    det = engine.detector.detect(q_rgb) if engine.detector is not None else None
    n_boxes = 0
    if det is not None and len(det):
        keep = det.scores >= engine.config.detector_threshold
        boxes = det.boxes[keep][: max(engine.config.max_regions, 1)]
        n_boxes = len(boxes)
        _draw_boxes(hd, boxes, header.size, (0, 0), det.scores[keep][:n_boxes], (det.labels or None) and det.labels[:n_boxes], small)
    title = f"query {Path(image).name if isinstance(image, (str, Path)) else ''}: {n_boxes} detected region(s), {result.timings.get('total', 0):.0f} ms"
    rows.append((header, None, None, title, (20, 20, 20)))

    for rank, hit in enumerate(hits, start=1):
        db_rgb = None
        if images_dir is not None:
            p = Path(images_dir) / hit.image_id
            if p.is_file():
                db_rgb = load_image(p)
        lines = match_lines(engine, q_rgb, hit.image_id) if hit.image_id in result.inliers else None
        if db_rgb is not None:
            r_img, r_scale = _fit(db_rgb, ROW_HEIGHT)
            rd = ImageDraw.Draw(r_img)
            if engine.detector is not None:
                d = engine.detector.detect(db_rgb)
                _draw_boxes(rd, d.boxes[: engine.config.max_regions], r_img.size, (0, 0))
        else:
            # No photo: a card as large as the stored keypoints span (or the query's size).
            span = lines[3].max(axis=0) + 1 if lines is not None and len(lines[3]) else np.array(q_rgb.shape[:2], np.float32)
            r_scale = ROW_HEIGHT / float(span[0])
            r_img = Image.new("RGB", (max(1, round(float(span[1]) * r_scale)), ROW_HEIGHT), (215, 215, 215))
            ImageDraw.Draw(r_img).text((8, 8), "photo not given (--images DIR)", fill=(90, 90, 90), font=small)
        hit_title = (hit.metadata or {}).get("title") if isinstance(hit.metadata, dict) else None
        caption = f"{rank}. {hit.image_id}" + (f"  {hit_title}" if hit_title else "") + f"  score {hit.score:.3f}"
        if hit.image_id in result.inliers:
            caption += f"  inliers {result.inliers[hit.image_id]}"
            if lines is not None and int(lines[2].sum()) > MAX_LINES:
                caption += f" ({MAX_LINES} drawn)"
        colour = (20, 20, 20) if truth is None else ((30, 140, 50) if truth(hit) else WRONG)
        rows.append((q_img, r_img, (lines, q_scale, r_scale) if lines is not None else None, caption, colour))

    width = max(PAD + a.width + (PAD + b.width if b is not None else 0) + PAD for a, b, *_ in rows)
    width = max(width, 520)
    height = PAD + sum(ROW_HEIGHT + CAPTION for _ in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for left, right, lines, caption, colour in rows:
        sheet.paste(left, (PAD, y))
        if right is not None:
            rx = PAD + left.width + PAD
            sheet.paste(right, (rx, y))
            if lines is not None:
                (ql, dl, inl, _), qs, rs = lines
                # Inliers only (the outliers would bury them), at most MAX_LINES of them.
                ql, dl = ql[inl], dl[inl]
                pick = np.linspace(0, len(ql) - 1, min(len(ql), MAX_LINES)).round().astype(int) if len(ql) else []
                for (qy, qx), (dy, dx) in zip(ql[pick], dl[pick]):
                    a = (PAD + qx * qs, y + qy * qs)
                    b = (rx + dx * rs, y + dy * rs)
                    draw.line([a, b], fill=INLIER, width=1)
                    draw.ellipse([a[0] - 2, a[1] - 2, a[0] + 2, a[1] + 2], outline=INLIER)
                    draw.ellipse([b[0] - 2, b[1] - 2, b[0] + 2, b[1] + 2], outline=INLIER)
        draw.text((PAD, y + ROW_HEIGHT + 8), caption, fill=colour, font=font)
        y += ROW_HEIGHT + CAPTION
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
