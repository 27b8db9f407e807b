"""``d2r show BUNDLE IMAGE -o out.png`` (a lab command): the picture of a query, its boxes, results and inlier matches."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import d2r
from d2r.cli import main
from d2r_lab import visualize

pytestmark = pytest.mark.slow  # builds a bundle

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample"
# Two objects of the sample collection (photos 16-18: a picture book, 20-22: a toy duck).
COLLECTION = [SAMPLE / "collection" / f"ukbench000{n}.jpg" for n in (16, 17, 18, 20, 21, 22)]
QUERY = SAMPLE / "visitors" / "ukbench00019.jpg"  # the picture book


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("show")
    with d2r.Engine.create(features="xfeat", detector="ssd", kind="rasmk_star", threads=2, verification_features=500) as engine:
        engine.train_codebook(COLLECTION, size=64, progress=False)
        engine.add_images(COLLECTION, metadata={p.name: {"title": "book" if int(p.stem[-2:]) < 20 else "duck"} for p in COLLECTION}, progress=False)
        return engine.save(folder / "small.d2r")


def rows_of(png: Path, n_rows: int):
    """The picture as an array and the y ranges of its rows (header + one per result)."""
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] == visualize.PAD + n_rows * (visualize.ROW_HEIGHT + visualize.CAPTION)
    step = visualize.ROW_HEIGHT + visualize.CAPTION
    return img, [(visualize.PAD + r * step, visualize.PAD + r * step + visualize.ROW_HEIGHT) for r in range(n_rows)]


def green(block: np.ndarray) -> int:
    return int(np.all(block == np.array(visualize.INLIER, np.uint8), axis=-1).sum())


def test_show_draws_query_boxes_results_and_inlier_lines(bundle, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = main(["show", str(bundle), str(QUERY), "--top-k", "2", "--verify", "-o", str(out), "--images-dir", str(SAMPLE / "collection")])
    assert rc == 0
    assert f"picture: {out}" in capsys.readouterr().out
    img, rows = rows_of(out, 3)
    q_w = round(320 * visualize.ROW_HEIGHT / 240)
    assert img.shape[1] >= visualize.PAD * 3 + 2 * q_w  # query and result side by side
    # Result rows: the result photo is there (not the grey card) and inlier lines join the two.
    for y0, y1 in rows[1:]:
        assert green(img[y0:y1]) > 200
        right = img[y0:y1, visualize.PAD * 2 + q_w :]
        assert right.std() > 20
    # The header row has the query and its detected boxes (box colours), no match lines.
    header = img[rows[0][0] : rows[0][1]]
    assert green(header) == 0
    assert any(np.all(header == np.array(c, np.uint8), axis=-1).sum() > 50 for c in visualize.BOX_COLOURS)


def test_inlier_lines_are_the_verification_of_the_query(bundle):
    with d2r.Engine.open(bundle, threads=2) as engine:
        res = engine.query(QUERY, top_k=3, verify=True)
        best = res.hits[0]
        assert best.metadata["title"] == "book"
        q_pts, db_pts, inliers, db_all = visualize.match_lines(engine, d2r.load_image(QUERY), best.image_id)
        assert int(inliers.sum()) == res.inliers[best.image_id]
        assert q_pts.shape == db_pts.shape == (len(inliers), 2)
        h, w = np.asarray(Image.open(SAMPLE / "collection" / best.image_id)).shape[:2]
        assert (db_all[:, 0] < h).all() and (db_all[:, 1] < w).all()


def test_show_without_verification_or_photos(bundle, tmp_path):
    out = tmp_path / "plain.png"
    assert main(["show", str(bundle), str(QUERY), "--top-k", "3", "-o", str(out)]) == 0
    img, rows = rows_of(out, 4)
    assert green(img) == 0  # not verified: no lines
    # No --images-dir: grey cards stand for the result photos.
    y0, y1 = rows[1]
    card = img[y0 + 40 : y1 - 5, -60:-20]
    assert card.size and (card == 215).mean() > 0.9


def test_show_wants_a_png(bundle, tmp_path, capsys):
    assert main(["show", str(bundle), str(QUERY), "-o", str(tmp_path / "out.jpg")]) == 1
    assert ".png" in capsys.readouterr().err
    assert not (tmp_path / "out.jpg").exists()
