"""The end-to-end Engine on real photos (UKBench subset) through the shipped models, and bundles."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import d2r
from d2r.engine import BundleError, Engine
from d2r.manifest import DEFAULT_FEATURES

from shared_data import ukbench_groups, ukbench_images

pytestmark = pytest.mark.slow  # builds bundles

K = 256


def ukbench_score(engine, images):
    groups = ukbench_groups()["groups"]
    group_of = {name: i for i, g in enumerate(groups) for name in g}
    per_image = []
    for path in images:
        hits = engine.query(path, top_k=4).hits
        per_image.append(sum(group_of[h.image_id] == group_of[path.name] for h in hits))
    return float(np.mean(per_image)), per_image


@pytest.fixture(scope="module")
def images():
    return ukbench_images()


@pytest.fixture(scope="module")
def built(images, tmp_path_factory):
    """One engine per backend, same codebook (trained through TFLite), same images."""
    engine = Engine.create(features="xfeat", detector="ssd", kind="rasmk_star", backend="tflite", precision="int8", threads=2,
                           verification_features=500)
    engine.train_codebook(images, size=K, progress=False)
    engine.add_images(images, progress=False)
    path = tmp_path_factory.mktemp("bundles") / "ukbench.d2r"
    engine.save(path)
    return engine, path


def test_ukbench_tflite_int8(built, images):
    engine, _ = built
    score, per_image = ukbench_score(engine, images)
    print(f"UKBench-56 top-4 score, XFeat int8 TFLite, R-ASMK*, K={K}: {score:.2f}")
    assert score >= 3.0, per_image
    res = engine.query(images[0], top_k=3)
    assert set(res.timings) >= {"load_image", "features", "aggregation", "search", "total"}
    assert res.hits[0].image_id == images[0].name
    image_id, score, metadata = res.hits[0]  # hits unpack as (image_id, score, metadata)
    assert image_id == images[0].name and score == res.hits[0].score and metadata is None


def test_default_pipeline_on_ukbench(images):
    """Engine.create() with every default: ALIKED-t16 (its fp16 file: there is no int8 one), the
    landmark detector at 0.1, D2R-R-ASMK*, a codebook of auto size."""
    with Engine.create(threads=2) as engine:
        assert engine.config.features == DEFAULT_FEATURES == "aliked_t16"
        assert engine.feature_entry.precision == "fp16" and engine.config.kind == "rasmk_star"
        assert engine.detector_entry.name == "ssd_mobilenetv2_landmark"
        engine.train_codebook(images, progress=False)
        # 56 photos give ~80k descriptors: 2048 words keep at least 39 per word.
        assert engine.codebook.size in (1024, 2048)
        engine.add_images(images, progress=False)
        score, per_image = ukbench_score(engine, images)
    print(f"UKBench-56 top-4 score, default pipeline (ALIKED-t16, landmark regions, R-ASMK*, K={engine.codebook.size}): {score:.2f}")
    assert score >= 3.0, per_image


def test_onnx_gives_the_same_results(built, images):
    engine, path = built
    onnx = Engine.create(features="xfeat", detector="ssd", codebook=engine.codebook, kind="rasmk_star", backend="onnx", precision="int8", threads=2)
    onnx.add_images(images, progress=False)
    score, per_image = ukbench_score(onnx, images)
    tfl_score, _ = ukbench_score(engine, images)
    print(f"UKBench-56 top-4 score, XFeat int8 ONNX: {score:.2f} (TFLite int8: {tfl_score:.2f})")
    assert score >= 3.0, per_image
    assert abs(score - tfl_score) <= 0.25
    # Each runtime's int8 files are quantised by its own toolchain, so rankings below the
    # first hit may differ; the first hit (the image itself) must not.
    for p in images[::4]:
        assert onnx.query(p, top_k=1).hits[0].image_id == engine.query(p, top_k=1).hits[0].image_id == p.name


def test_fp32_features_agree_between_runtimes(images):
    a = Engine.create(features="xfeat", detector=None, kind="asmk_star", backend="tflite", precision="fp32").extract(images[9])
    b = Engine.create(features="xfeat", detector=None, kind="asmk_star", backend="onnx", precision="fp32").extract(images[9])
    # Same keypoints (most of them: near-ties in the heatmap can swap) with the same descriptors.
    pa = {tuple(v) for v in a.locations.astype(int).tolist()}
    pb = {tuple(v) for v in b.locations.astype(int).tolist()}
    assert len(pa & pb) >= 0.95 * len(pa)
    common = {tuple(v): i for i, v in enumerate(b.locations.astype(int).tolist())}
    idx = [(i, common[tuple(v)]) for i, v in enumerate(a.locations.astype(int).tolist()) if tuple(v) in common]
    cos = np.sum(a.descriptors[[i for i, _ in idx]] * b.descriptors[[j for _, j in idx]], axis=1)
    assert np.median(cos) > 0.999 and cos.min() > 0.98


def test_query_with_spatial_verification(built, images):
    engine, path = built
    res = engine.query(images[8], top_k=4, verify=True, verify_top=20)
    assert [h.image_id for h in res.hits][0] == images[8].name
    assert set(res.inliers) == {h.image_id for h in res.hits}
    inl = [res.inliers[h.image_id] for h in res.hits]
    assert inl == sorted(inl, reverse=True) and inl[0] >= 100  # the image itself
    assert "verify" in res.timings
    with Engine.open(path) as opened:  # the features travel in the bundle
        again = opened.query(images[8], top_k=4, verify=True, verify_top=20)
        assert [h.image_id for h in again.hits] == [h.image_id for h in res.hits]
        assert (path / "features.d2rv").is_file()
    plain = Engine.create(features="xfeat", detector=None, kind="asmk_star", codebook=engine.codebook)
    plain.add_images(images[:4], progress=False)
    with pytest.raises(d2r.InputError, match="no verification features"):
        plain.query(images[0], verify=True)


def test_verification_within_visual_words_travels_in_the_bundle(built, images, tmp_path):
    engine, _ = built
    words = Engine.create(features="xfeat", detector=None, kind="asmk_star", codebook=engine.codebook, verification_features=300, verification_words=3)
    words.add_images(images[:12], progress=False)
    words.save(tmp_path / "w.d2r")
    with Engine.open(tmp_path / "w.d2r") as opened:
        assert opened.config.verification_words == 3
        stored = opened._verification_features(images[8].name)
        assert stored.words is not None and stored.words.shape == (len(stored), 1)
        res = opened.query(images[8], top_k=3, verify=True, verify_top=12)
    assert res.hits[0].image_id == images[8].name and res.inliers[images[8].name] >= 50
    with pytest.raises(d2r.InputError, match="verification_words"):
        Engine.create(detector=None, verification_words=-1)


def test_bundle_round_trip(built, images, tmp_path):
    engine, path = built
    info = json.loads((path / "bundle.json").read_text())
    assert info["version"] == 1 and info["n_images"] == len(images)
    assert {"index.d2ri", "codebook.d2rcb", "models/manifest.json"} <= set(info["files"])
    with Engine.open(path) as opened:
        assert len(opened.index) == len(images)
        for p in images[:5]:
            a = engine.query(p, top_k=5).hits
            b = opened.query(p, top_k=5).hits
            assert [h.image_id for h in a] == [h.image_id for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-6)
        # Incremental: remove an image, save a new version over the old bundle.
        opened.remove(images[0].name)
        copy = tmp_path / "copy.d2r"
        opened.save(copy)
        assert opened.bundle_version == 2
    with Engine.open(copy) as again:
        assert images[0].name not in again.index and len(again.index) == len(images) - 1


def test_normalised_scoring_is_the_bundles_setting(built, images, tmp_path, monkeypatch):
    """Engine builds normalised indexes (d2r.config.NORMALIZE) and Engine.query follows the
    index's own header: a bundle saved before (un-normalised header) keeps its scoring."""
    import d2r.pipeline
    from d2r.config import NORMALIZE

    engine, path = built
    assert NORMALIZE is True and engine.index.normalize is True
    with Engine.open(path) as opened:
        assert opened.index.normalize is True
    p = images[5]
    default = [(h.image_id, h.score) for h in engine.query(p, top_k=8).hits]
    assert default == [(h.image_id, h.score) for h in engine.query(p, top_k=8, normalize=True).hits]
    raw = [(h.image_id, h.score) for h in engine.query(p, top_k=8, normalize=False).hits]
    assert [s for _, s in raw] != [s for _, s in default]
    # An index built with the old default: the header says un-normalised, and the query obeys it.
    monkeypatch.setattr(d2r.pipeline, "NORMALIZE", False)
    with Engine.create(features="xfeat", detector="ssd", codebook=engine.codebook, kind="rasmk_star", backend="tflite",
                       precision="int8", threads=2) as old:
        old.add_images(images[:12], progress=False)
        old.save(tmp_path / "old.d2r")
    with Engine.open(tmp_path / "old.d2r") as reopened:
        assert reopened.index.normalize is False
        hits = reopened.query(p, top_k=4).hits
        want = reopened.query(p, top_k=4, normalize=False).hits
        assert [(h.image_id, h.score) for h in hits] == [(h.image_id, h.score) for h in want]
        assert [h.score for h in hits] != [h.score for h in reopened.query(p, top_k=4, normalize=True).hits]


def test_bundle_errors(built, tmp_path):
    _, path = built

    def broken(name):
        dst = tmp_path / name
        shutil.copytree(path, dst)
        return dst

    missing = broken("missing.d2r")
    model = next((missing / "models").glob("*.tflite"))
    model.unlink()
    with pytest.raises(BundleError, match="missing"):
        Engine.open(missing)

    altered = broken("altered.d2r")
    model = next((altered / "models").glob("xfeat*"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered"):
        Engine.open(altered)

    edited = broken("edited.d2r")
    info = json.loads((edited / "bundle.json").read_text())
    info["n_images"] += 1
    (edited / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="checksum"):
        Engine.open(edited)

    newer = broken("newer.d2r")
    info = json.loads((newer / "bundle.json").read_text())
    info["format_version"] = 99
    (newer / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="newer"):
        Engine.open(newer)

    with pytest.raises(BundleError, match="no such bundle"):
        Engine.open(tmp_path / "nope.d2r")
    with pytest.raises(BundleError, match="no bundle.json"):
        Engine.open(tmp_path)


def test_bad_queries_and_options(built, tmp_path):
    engine, _ = built
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(d2r.ImageError, match="bad.jpg"):
        engine.query(tmp_path / "bad.jpg")
    assert len(engine.query(np.zeros((5, 5, 3), np.uint8)).hits) >= 0  # tiny image: no features, no crash
    with pytest.raises(d2r.InputError, match="kind"):
        Engine.create(kind="vlad")
    with pytest.raises(d2r.ModelError, match="no tflite model named 'nope'"):
        Engine.create(features="nope")
    with pytest.raises(d2r.InputError, match="accelerator"):
        Engine.create(accelerator="tpu")


def test_unavailable_accelerator_falls_back_to_cpu(caplog):
    with caplog.at_level("WARNING", logger="d2r"):
        engine = Engine.create(detector=None, kind="asmk_star", accelerator="gpu")
    assert engine.extractor.model.accelerator == "cpu"
    assert any("running on the CPU" in r.message for r in caplog.records)


def test_cli_build_and_query(images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in images[:12]:
        shutil.copy(p, folder / p.name)
    (tmp_path / "meta.csv").write_text("image_id,title\n" + "".join(f"{p.name},Object {i // 4}\n" for i, p in enumerate(images[:12])))
    bundle = tmp_path / "small.d2r"
    run = subprocess.run(
        [sys.executable, "-m", "d2r.cli", "build", str(folder), "-o", str(bundle), "--codebook-size", "64", "--detector", "none",
         "--metadata", str(tmp_path / "meta.csv")],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    out = subprocess.run([sys.executable, "-m", "d2r.cli", "query", str(bundle), str(images[4]), "--top-k", "3", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)[str(images[4])]
    assert res["hits"][0]["image_id"] == images[4].name
    assert res["hits"][0]["metadata"] == {"title": "Object 1"}
    # query expansion from the command line: the same photo first, the other photos of its object next
    out = subprocess.run([sys.executable, "-m", "d2r.cli", "query", str(bundle), str(images[4]), "--top-k", "4", "--expand", "2", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)[str(images[4])]["hits"]
    assert hits[0]["image_id"] == images[4].name and len(hits) == 4
    bad = subprocess.run([sys.executable, "-m", "d2r.cli", "query", str(bundle), str(images[4]), "--expand", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--expand" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "d2r.cli", "query", str(tmp_path / "none.d2r"), str(images[0])], capture_output=True, text=True)
    assert bad.returncode == 1 and "none.d2r" in bad.stderr
    for size in ("many", "0"):
        bad = subprocess.run([sys.executable, "-m", "d2r.cli", "build", str(folder), "-o", str(tmp_path / "x.d2r"), "--codebook-size", size],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and "--codebook-size" in bad.stderr and not (tmp_path / "x.d2r").exists()


def test_real_bundle_syncs_to_a_device_and_answers_there(built, images, tmp_path):
    """The whole path: Engine bundle -> TUF-signed publish -> loopback edge server -> device sync ->
    LiveBundle opens it with Engine.open and answers like the original; a new version
    (one image removed) is picked up between queries."""
    pytest.importorskip("waitress")
    pytest.importorskip("tuf")
    from d2r.sync import LiveBundle, SyncClient
    from d2r_server.client import AdminClient
    from d2r_server.testing import ADMIN_TOKEN, ServerThread, tuf_keys

    engine, path = built
    keys = tuf_keys(tmp_path / "keys")
    key, pub = keys["targets"], tmp_path / "museum.root.json"
    with ServerThread(tmp_path / "data") as srv:
        admin = AdminClient(srv.url, ADMIN_TOKEN)
        admin.create_collection("museum", [keys["root"]], key, out=pub)
        admin.publish(path, "museum", key)
        token = admin.add_device(["museum"], "kiosk")["token"]
        client = SyncClient(srv.url, "museum", token, tmp_path / "device", pub)
        client.sync()
        with LiveBundle(tmp_path / "device") as live:
            got = [h.image_id for h in live.query(images[12], top_k=4).hits]
            assert got == [h.image_id for h in engine.query(images[12], top_k=4).hits]
            with Engine.open(path) as v2:
                v2.remove(images[12].name)
                v2.save(tmp_path / "v2.d2r")
            admin.publish(tmp_path / "v2.d2r", "museum", key)
            client.sync()
            assert images[12].name not in [h.image_id for h in live.query(images[12], top_k=4).hits]


def test_runtime_objects_from_model_names(images):
    """d2r.load_model by name fills in the manifest entry; Detector and LocalFeatureExtractor
    need nothing else."""
    xfeat = d2r.load_model("xfeat", threads=1)
    assert xfeat.entry.name == "xfeat" and xfeat.accelerator == "cpu"
    feats = d2r.LocalFeatureExtractor(xfeat, max_features=500).extract(images[0])
    assert len(feats) == 500 and feats.descriptors.shape == (500, 64)
    np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, atol=1e-5)
    assert (np.diff(feats.scores) <= 0).all()
    assert (feats.locations[:, 0] < 480).all() and (feats.locations[:, 1] < 640).all()
    ssd = d2r.Detector(d2r.load_model("ssd"), threshold=0.5)
    from PIL import Image

    cat = Image.open(__import__("skimage").data.__path__[0] + "/chelsea.png")
    det = ssd.detect(cat)
    assert det.labels[:1] == ["Cat"] and det.scores[0] > 0.7
    with pytest.raises(d2r.ModelError, match="not a detector"):
        d2r.Detector(xfeat)
