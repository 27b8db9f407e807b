"""The cheaper build (issue 18): crops packed four to a model run (regions="pack") and each
photo's whole-photo features extracted once (d2r.memo.FeatureMemo)."""

import os
from dataclasses import replace

import numpy as np
import pytest

from d2r import EngineConfig
from d2r.engine import Engine
from d2r.errors import InputError
from d2r.features.core import _resize, box_pixels, pack_cells
from d2r.image import load_image
from d2r.memo import FeatureMemo
from d2r.pipeline import Pipeline, RegionStage

from shared_data import landmark_photos, ukbench_images

BOXES = np.array([[0.0, 0.0, 0.6, 0.55], [0.3, 0.4, 0.9, 0.95], [0.1, 0.2, 0.5, 0.9], [0.5, 0.0, 1.0, 0.5], [0.25, 0.25, 0.75, 0.75]],
                 np.float32)


class CountingModel:
    """The real model, counting its runs."""

    def __init__(self, model):
        self.model, self.runs = model, 0

    def run(self, x):
        self.runs += 1
        return self.model.run(x)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.fixture(scope="module", params=["aliked_t16", "xfeat"])
def pipeline(request):
    p = Pipeline.load(replace(EngineConfig(features=request.param), regions="pack"), threads=1)
    yield p
    p.close()


def test_packed_crops_cost_one_model_run_per_four_boxes(pipeline):
    ex = pipeline.features.extractor
    counting = CountingModel(ex.model)
    ex.model = counting
    try:
        rgb = load_image(landmark_photos()[0])
        feats = ex.extract_crops(rgb, BOXES)
        assert counting.runs == 2  # 5 boxes: two canvases
        assert len(feats) == len(BOXES)
        for f, box in zip(feats, BOXES):
            y0, x0, y1, x1 = box_pixels(box, rgb.shape)
            assert len(f) > 50
            assert (f.locations[:, 0] >= y0 - 1).all() and (f.locations[:, 0] <= y1 + 1).all()
            assert (f.locations[:, 1] >= x0 - 1).all() and (f.locations[:, 1] <= x1 + 1).all()
            np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
            assert (np.diff(f.scores) <= 0).all()
        counting.runs = 0
        assert [len(f) for f in ex.extract_crops(rgb, BOXES[:0])] == [] and counting.runs == 0
    finally:
        ex.model = counting.model


def test_a_packed_crop_finds_what_the_crop_alone_finds_at_the_cell_size(pipeline):
    """Each cell is decoded as a canvas of its own: a packed crop's keypoints and descriptors
    are those of the same crop, resized to its cell, run alone at that size in the corner of a
    canvas (away from the cell's edges, where the neighbouring crop is within the network's reach)."""
    ex = pipeline.features.extractor
    rgb = load_image(landmark_photos()[1])
    packed = ex.extract_crops(rgb, BOXES[:4])
    ch, cw = pack_cells(ex.canvas, (2, 2))

    for f, box in zip(packed, BOXES[:4]):
        y0, x0, y1, x1 = box_pixels(box, rgb.shape)
        h, w = y1 - y0, x1 - x0
        fit = min(ch / h, cw / w)
        nh, nw = min(int(round(h * fit)), ch), min(int(round(w * fit)), cw)
        small = _resize(np.ascontiguousarray(rgb[y0:y1, x0:x1]), nh, nw)
        yx, _, desc = ex.decoder.decode(ex.model.run(ex._canvas(small)), nh, nw, ex.score_threshold, ex.max_features)
        desc = desc / np.linalg.norm(desc, axis=1, keepdims=True)
        ref_yx = yx * np.array([h / nh, w / nw], np.float32) + np.array([y0, x0], np.float32)
        # keypoints at least 24 cell pixels inside the crop's cell
        m = 24 * max(h / nh, w / nw)
        inner = ((f.locations[:, 0] > y0 + m) & (f.locations[:, 0] < y1 - m) & (f.locations[:, 1] > x0 + m) & (f.locations[:, 1] < x1 - m))
        assert inner.sum() > 30
        d = np.linalg.norm(f.locations[inner][:, None, :] - ref_yx[None, :, :], axis=2)
        nearest = d.argmin(1)
        close = d[np.arange(len(nearest)), nearest] < 1.5 * max(h / nh, w / nw)
        cos = (f.descriptors[inner] * desc[nearest]).sum(1)
        # the keypoints are the same ones (a misplaced cell or a wrong scale finds almost none);
        # descriptors differ somewhat: the network sees the neighbouring crops (ALIKED's
        # deformable head reaches up to a quarter of the canvas), median cosine 0.82-0.99 measured
        assert close.mean() > 0.8, (ex.entry.name, close.mean())
        assert np.median(cos[close]) > 0.75, (ex.entry.name, np.median(cos[close]))


def test_region_stage_packs_only_what_can_be_packed():
    class Source:  # a lab feature source: no extractor to pack with
        dim = 4

        def __call__(self, image):
            from d2r.features import Features

            n = 3
            return Features(np.zeros((n, 2), np.float32), np.eye(n, 4, dtype=np.float32), np.ones(n, np.float32), np.ones(n, np.float32))

    stage = RegionStage(None, Source(), 0.1, 8, mode="pack")
    rgb = np.zeros((100, 120, 3), np.uint8)
    feats = stage.region_features(rgb, Source()(rgb), BOXES[:2])
    assert [len(f) for f in feats] == [3, 3]
    with pytest.raises(InputError, match="regions: expected 'crop'"):
        EngineConfig(regions="packed").check()


def test_a_build_extracts_each_photo_once_and_writes_the_same_bundle(tmp_path):
    images = ukbench_images()[:12]
    config = EngineConfig(features="xfeat", detector="ssd", verification_features=200)

    def build(memo):
        with Engine.create(config, threads=1) as engine:
            counting = CountingModel(engine.pipeline.features.extractor.model)
            engine.pipeline.features.extractor.model = counting
            engine.train_codebook(images, size=64, progress=False, memo=memo)
            engine.add_images(images, progress=False, memo=memo)
            out = tmp_path / f"b{counting.runs}.d2r"
            engine.save(out)
            return counting.runs, out

    plain_runs, plain = build(None)
    with FeatureMemo(tmp_path) as memo:
        memo_runs, kept = build(memo)
        assert len(memo) == len(images) and memo.dir.parent == tmp_path
        made, full = memo.dir, memo.used
    assert not made.exists()  # removed: it was ours
    assert memo_runs == plain_runs - len(images)  # the index pass ran no whole-photo model
    for name in ("index.d2ri", "codebook.d2rcb", "features.d2rv"):
        assert (plain / name).read_bytes() == (kept / name).read_bytes(), name
    # a budget too small for every photo: the rest are extracted again, same bundle
    with FeatureMemo(tmp_path, max_bytes=full // 2) as memo:
        runs, small = build(memo)
        assert 0 < len(memo) < len(images) and plain_runs - len(images) < runs < plain_runs
    assert (plain / "index.d2ri").read_bytes() == (small / "index.d2ri").read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (plain, kept, small))


def test_memo_keys_follow_the_photo(tmp_path):
    from d2r.features import Features

    photo = tmp_path / "a.jpg"
    photo.write_bytes(ukbench_images()[0].read_bytes())
    f = Features(np.ones((2, 2), np.float32), np.eye(2, 4, dtype=np.float32), np.ones(2, np.float32), np.ones(2, np.float32))
    with FeatureMemo(tmp_path) as memo:
        assert memo.put(photo, f) and memo.get(photo).descriptors.tolist() == f.descriptors.tolist()
        assert not memo.put(np.zeros((4, 4, 3), np.uint8), f)  # in-memory images are not kept
        os.utime(photo, ns=(1, 1))  # the photo changed between the passes: read it again
        assert memo.get(photo) is None
    with pytest.raises(InputError, match="scratch: cannot make a temporary folder"):
        FeatureMemo(tmp_path / "missing")
