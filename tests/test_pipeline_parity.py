"""One pipeline: ``d2r eval`` evaluates exactly what ``d2r build`` ships.

For the default configuration (ALIKED-t16, landmark regions, R-ASMK*, verification features),
the evaluation's codebook, rankings and verified rankings equal the Engine's, query by query:
both run the stage objects of d2r.pipeline.
"""

import numpy as np
import pytest

import d2r
from d2r.config import EngineConfig
from d2r_lab.evaluate import load_dataset
from d2r_lab.evaluation import PRESETS, Experiment, experiment, run

from shared_data import ukbench_retrieval_dataset

pytestmark = pytest.mark.slow  # real models on real photos, twice


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 5 objects: 5 queries, 15 database photos (UKBench, shipped in tests/data)
    return ukbench_retrieval_dataset(tmp_path_factory.mktemp("parity"), groups=5)


def test_the_default_experiment_is_what_d2r_build_ships():
    exp = experiment()
    from d2r.config import BUILD_VERIFICATION_FEATURES

    # EngineConfig's defaults are Engine.create's; d2r build adds its verification features.
    assert exp.pipeline == EngineConfig(verification_features=BUILD_VERIFICATION_FEATURES)
    assert exp.pipeline.features == "aliked_t16" and exp.pipeline.detector == "ssd_mobilenetv2_landmark"
    assert exp.pipeline.kind == "rasmk_star" and exp.pipeline.max_regions == 8 and exp.codebook_size == "auto"
    assert exp.feature_source is None and exp.region_source is None and exp.kind is None
    # the baselines are named presets, checked like any experiment
    for name in PRESETS:
        experiment(name)
    assert experiment("asmk").pipeline.detector is None
    assert experiment("xfeat-asmk").codebook_size == 1024
    with pytest.raises(d2r.InputError, match="preset"):
        experiment("best")
    with pytest.raises(d2r.InputError, match="max_regions"):
        experiment(max_regions=26)


@pytest.mark.parametrize("kind", ["rasmk_star", "d2r_asmk_star"])
def test_eval_ranks_every_query_as_the_engine_does(dataset, tmp_path, kind):
    ds = load_dataset(dataset)
    exp = experiment(kind=kind, codebook_size=32, seed=3, verify_top=100, verification_features=300)
    res = run(dataset, exp, cache_dir=tmp_path / "cache", threads=1, progress=False)

    with d2r.Engine.create(exp.pipeline, threads=1) as engine:
        engine.train_codebook(ds.image_paths, size=32, seed=3, progress=False)
        assert engine.codebook == res["_codebook"]  # the same codebook stage, the same sample
        engine.add_images(ds.image_paths, ids=[str(i) for i in range(ds.n_images)], progress=False)
        for qi, q in enumerate(ds.query_paths):
            plain = engine.query(q, top_k=ds.n_images)
            order = [int(h.image_id) for h in plain.hits]
            assert order, f"query {q.name}: no hits"
            np.testing.assert_array_equal(res["_rankings"][qi][: len(order)], order, err_msg=q.name)
            verified = engine.query(q, top_k=ds.n_images, verify=True, verify_top=100)
            assert all(h.inliers is not None for h in verified.hits)
            # UKBench has no junk: every protocol's verified list is the engine's verified ranking
            np.testing.assert_array_equal(res["_verified"]["medium"][qi][: len(order)], [int(h.image_id) for h in verified.hits],
                                          err_msg=q.name)
    assert res["options"]["pipeline"]["kind"] == kind and res["regions_per_image"] > 1
    assert res["map"]["medium"] > 50.0, res["table"]


def test_an_experiment_reads_a_bundles_configuration(dataset, tmp_path):
    from d2r_lab.evaluation import experiment_of_bundle

    ds = load_dataset(dataset)
    with d2r.Engine.create("xfeat", detector="ssd", kind="d2r_asmk_star", max_regions=3, threads=1) as engine:
        engine.train_codebook(ds.image_paths, size=16, progress=False)
        engine.add_images(ds.image_paths[:3], progress=False)
        bundle = engine.save(tmp_path / "b.d2r")
    exp = experiment_of_bundle(bundle)
    assert isinstance(exp, Experiment)
    assert exp.pipeline.features == "xfeat" and exp.pipeline.kind == "d2r_asmk_star" and exp.pipeline.max_regions == 3
    assert exp.pipeline.detector == "ssd_mobilenetv2_oidv4" and exp.codebook_size == 16
