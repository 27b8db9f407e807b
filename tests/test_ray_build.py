"""``d2r build --ray`` and ``d2r add --ray`` (issue 18) on a real Ray cluster on loopback: a head and one worker node
(its own raylet and worker processes, one CPU), started and stopped by this module.

The bundle must be the single-machine bundle: index.d2ri (and the codebook and verification
features) byte for byte, the same photos skipped with the same reasons; a worker killed in the
middle of a build is restarted and the build finishes the same; an interrupted build resumes from
its shards. The shard folder's rules are checked without a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from d2r.cli import build_parser
from d2r.cli.build import config_from_args
from d2r.errors import ImageError, InputError
from d2r.photos import list_images

from shared_data import ukbench_images

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "d2r.cli"]
# XFeat and the landmark detector (regions re-extracted on each crop), a small codebook.
FAST = ["--features", "xfeat", "--detector", "landmark@0.1", "--codebook-size", "16", "--verification-features", "100"]
BUNDLE_FILES = ("index.d2ri", "codebook.d2rcb", "features.d2rv", "features.ids.json")
# Ray takes 127.0.0.1 as "this node" and swaps in the machine's address; with this setting every
# Ray process of the cluster (they inherit the environment) stays on the loopback interface.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Nine good photos and a corrupt JPEG (a truncated download)."""
    folder = tmp_path_factory.mktemp("ray") / "photos"
    folder.mkdir()
    for p in ukbench_images()[:9]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(ukbench_images()[12].read_bytes()[:300])
    return folder


def d2r_cli(*args, cwd=None, timeout=300):
    env = {**os.environ, **LOOPBACK, "PYTHONPATH": os.pathsep.join(str(Path(p).absolute()) for p in sys.path)}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def same_files(a: Path, b: Path) -> dict:
    return {name: (a / name).read_bytes() == (b / name).read_bytes() for name in BUNDLE_FILES}


@pytest.fixture(scope="module")
def single(photos, tmp_path_factory):
    """The single-machine build (no --ray): the reference. The photos are given by a relative
    path, as people type them (the reason a photo is skipped names it so)."""
    out = tmp_path_factory.mktemp("single") / "single.d2r"
    run = d2r_cli("build", "photos", "-o", out, *FAST, cwd=photos.parent)
    assert run.returncode == 0, run.stderr
    return out, run


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster on 127.0.0.1: a head without CPUs (it only coordinates) and one worker node
    with one CPU, so every worker of a build runs in the worker node's processes."""
    temp = tempfile.mkdtemp(prefix="d2r-ray-")  # short: Ray's socket paths live under it
    # RAY_TMPDIR: Ray's files (sessions, the current cluster's address) go there, not to /tmp/ray
    env = {**LOOPBACK, "RAY_TMPDIR": temp}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray is imported: it reads LOOPBACK at import
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    c = None
    try:
        c = Cluster(initialize_head=True, shutdown_at_exit=True,
                    head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                                    "temp_dir": os.path.join(temp, "ray")})
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        assert c.address.startswith("127.0.0.1:")
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if c is not None:
            c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cli_config(photos, out):
    """The configuration `d2r build PHOTOS -o OUT FAST` runs (for the builds made in this process)."""
    return config_from_args(build_parser().parse_args(["build", str(photos), "-o", str(out), *FAST]))


@pytest.mark.slow
def test_the_index_built_on_ray_is_the_single_machine_index_byte_for_byte(photos, single, cluster, tmp_path):
    ref, ref_run = single
    out = tmp_path / "ray.d2r"
    # a relative path: the workers run in another folder than the driver
    run = d2r_cli("build", "photos", "-o", out, *FAST, "--ray", cluster.address, cwd=photos.parent)
    assert run.returncode == 0, run.stderr
    assert "1 Ray worker(s)" in run.stdout and "photos/s" in run.stdout
    assert same_files(ref, out) == dict.fromkeys(BUNDLE_FILES, True)
    info, ref_info = (json.loads((p / "bundle.json").read_text()) for p in (out, ref))
    assert info["n_images"] == ref_info["n_images"] == 9
    # the corrupt photo is skipped and listed as a single-machine build lists it
    assert info["skipped"] == ref_info["skipped"] and list(info["skipped"]) == ["broken.jpg"]
    assert info["skipped"]["broken.jpg"].startswith("photos/broken.jpg: ")
    assert "skipped 1 photo(s)" in run.stderr and "broken.jpg" in run.stderr
    assert info["config"] == ref_info["config"]
    # progress: photos per second and time left
    assert "features: 10/10 photos" in run.stderr and "photos/s" in run.stderr
    assert not (tmp_path / "ray.d2r.shards").exists()  # ours, removed once the bundle is written


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_the_build_is_restarted(photos, single, cluster, tmp_path):
    from d2r_build.ray_build import RayBuild

    ref, _ = single
    out = tmp_path / "killed.d2r"
    killed = []

    def progress(stage, done, total):
        # after the first batch, SIGKILL the worker while it holds the next two
        if stage == "features" and done >= 2 and not killed:
            (pid,) = build.report.worker_pids
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    build = RayBuild(list_images(photos), out, cli_config(photos, out), address=cluster.address, codebook_size=16, batch_size=2,
                     progress=progress, timeout=120)
    report = build.run()
    assert killed and len(report.worker_pids) == 2  # the worker came back as a new process
    assert killed[0] in report.worker_pids
    assert report.computed == {"features": 5, "aggregated": 5}
    assert same_files(ref, out) == dict.fromkeys(BUNDLE_FILES, True)
    assert list(report.skipped) == list(json.loads((ref / "bundle.json").read_text())["skipped"]) == ["broken.jpg"]


@pytest.mark.slow
def test_given_a_codebook_the_workers_aggregate_in_the_same_pass_and_store_no_features(photos, single, cluster, tmp_path):
    from d2r.codebook import Codebook
    from d2r_build.ray_build import RayBuild

    ref, _ = single
    out = tmp_path / "given.d2r"
    stages = set()
    report = RayBuild(list_images(photos), out, cli_config(photos, out), address=cluster.address, codebook=Codebook.load(ref / "codebook.d2rcb"),
                      batch_size=2, progress=lambda stage, done, total: stages.add(stage), timeout=120).run()
    assert stages == {"features + aggregation", "merge"}
    assert report.computed == {"aggregated": 5}  # no feature shards, no codebook training
    assert same_files(ref, out) == dict.fromkeys(BUNDLE_FILES, True)
    assert list(report.skipped) == ["broken.jpg"]


@pytest.mark.slow
def test_adding_on_ray_writes_the_bundle_of_an_add_on_one_machine(photos, single, cluster, tmp_path):
    """`d2r add BUNDLE PHOTOS --ray` == `d2r add BUNDLE PHOTOS` == a build of all the photos."""
    ref, _ = single
    good = sorted(p.name for p in photos.glob("ukbench*.jpg"))
    for name, part in (("first", good[:5]), ("more", [*good[5:], "broken.jpg"])):
        (tmp_path / name).mkdir()
        for n in part:
            shutil.copy(photos / n, tmp_path / name / n)
    given = [f for f in FAST if f not in ("--codebook-size", "16")]
    run = d2r_cli("build", "first", "-o", "one.d2r", *given, "--codebook", ref / "codebook.d2rcb", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    shutil.copytree(tmp_path / "one.d2r", tmp_path / "ray.d2r")
    one = d2r_cli("add", "one.d2r", "more", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    run = d2r_cli("add", "ray.d2r", "more", "--ray", cluster.address, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "1 Ray worker(s)" in run.stdout and "wrote ray.d2r version 2: 9 images (4 added)" in run.stdout
    assert same_files(tmp_path / "one.d2r", tmp_path / "ray.d2r") == dict.fromkeys(BUNDLE_FILES, True)
    assert same_files(ref, tmp_path / "ray.d2r") == dict.fromkeys(BUNDLE_FILES, True)
    info, one_info = (json.loads((tmp_path / p / "bundle.json").read_text()) for p in ("ray.d2r", "one.d2r"))
    assert info["skipped"] == one_info["skipped"] and list(info["skipped"]) == ["broken.jpg"]
    assert info["skipped"]["broken.jpg"].startswith("more/broken.jpg: ")
    assert "skipped 1 photo(s)" in run.stderr and "features + aggregation: 5/5 photos" in run.stderr
    assert not (tmp_path / "ray.d2r.shards").exists()


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_build_resumes_from_its_shards(photos, single, cluster, tmp_path):
    from d2r_build.ray_build import RayBuild

    ref, _ = single
    out = tmp_path / "resumed.d2r"
    shards = tmp_path / "resumed.d2r.shards"

    def stop_after_one_aggregation(stage, done, total):
        if stage == "aggregation" and done >= 2:
            raise Interrupted

    config = cli_config(photos, out)
    with pytest.raises(Interrupted):
        RayBuild(list_images(photos), out, config, address=cluster.address, codebook_size=16, batch_size=2,
                 progress=stop_after_one_aggregation, timeout=120).run()
    assert not out.exists()
    assert len(list((shards / "features").iterdir())) == 5 and (shards / "codebook.d2rcb").is_file()
    n_aggregated = len(list((shards / "aggregated").iterdir()))
    assert 1 <= n_aggregated < 5
    # without resume the shards are never reused nor removed
    with pytest.raises(InputError, match="resume"):
        RayBuild(list_images(photos), out, config, address=cluster.address, codebook_size=16, batch_size=2, progress=False).run()
    # another build's options are refused by name
    with pytest.raises(InputError, match="'batch_size' differs"):
        RayBuild(list_images(photos), out, config, address=cluster.address, codebook_size=16, batch_size=3, resume=True, progress=False).run()
    report = RayBuild(list_images(photos), out, config, address=cluster.address, codebook_size=16, batch_size=2, resume=True,
                      progress=False, timeout=120).run()
    assert report.reused == {"features": 5, "aggregated": n_aggregated}
    assert report.computed == {"features": 0, "aggregated": 5 - n_aggregated}
    assert same_files(ref, out) == dict.fromkeys(BUNDLE_FILES, True)
    assert not shards.exists()


@pytest.mark.slow
def test_a_strict_build_on_ray_stops_at_the_bad_photo(photos, cluster, tmp_path):
    from d2r_build import build

    out = tmp_path / "strict.d2r"
    with pytest.raises(ImageError, match="broken.jpg"):
        build(list_images(photos), out, cli_config(photos, out), address=cluster.address, codebook_size=16, batch_size=5,
              on_error="raise", progress=False, timeout=120)
    assert not out.exists()


# -- without a cluster -------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_address_where_no_cluster_listens_fails_at_once_and_leaves_nothing(photos, tmp_path):
    import socket

    pytest.importorskip("ray")
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nowhere.d2r"
    run = d2r_cli("build", photos, "-o", out, *FAST, "--ray", f"127.0.0.1:{port}", timeout=60)
    assert run.returncode == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in run.stderr, run.stderr
    assert not out.exists() and not (tmp_path / "nowhere.d2r.shards").exists()
    run = d2r_cli("build", photos, "-o", out, *FAST, "--ray", "head-without-port", timeout=60)
    assert run.returncode == 1 and "expected 'auto' or HOST:PORT" in run.stderr, run.stderr


def test_the_shard_folder_of_another_build_or_of_nobody_is_never_used_nor_removed(tmp_path):
    from d2r_build.shards import ShardFolder

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="is not the shard folder of a d2r build"):
        ShardFolder(theirs).start({"photos": []}, resume=True)
    ShardFolder(theirs).remove()
    assert (theirs / "notes.txt").read_text() == "mine"

    ours = ShardFolder(tmp_path / "ours")
    assert ours.start({"photos": ["a.jpg"], "batch_size": 2}, resume=False) == 0
    with pytest.raises(InputError, match="'photos' differs"):
        ours.start({"photos": ["b.jpg"], "batch_size": 2}, resume=True)
    assert ours.start({"photos": ["a.jpg"], "batch_size": 2}, resume=True) == 0
    ours.remove()
    assert not ours.root.exists()


def test_the_ray_flags_need_ray_and_are_refused_without_it(tmp_path):
    from d2r.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(ukbench_images()[0], photos)
    for flags in (["--resume"], ["--shards", str(tmp_path / "s")], ["--ray-workers", "2"]):
        with pytest.raises(InputError, match=f"{flags[0]}: only with --ray"):
            args = build_parser().parse_args(["build", str(photos), "-o", str(tmp_path / "o.d2r"), *flags])
            args.func(args)
    assert main(["build", str(photos), "-o", str(tmp_path / "o.d2r"), "--resume"]) == 1
    assert not (tmp_path / "o.d2r").exists()


def test_without_ray_installed_the_flag_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    from d2r.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(ukbench_images()[0], photos)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    assert main(["build", str(photos), "-o", str(tmp_path / "o.d2r"), "--ray", "auto"]) == 1
    err = capsys.readouterr().err
    assert "d2r build: error: --ray: a distributed build needs the 'ray' extra: pip install 'd2r[ray]'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_the_driver_samples_the_shards_as_a_single_machine_build_samples_the_photos(tmp_path):
    """ShardFolder.sample_into (the driver's codebook sample) keeps the rows a single-machine
    build's DescriptorSample keeps, photo by photo in order, skipping the photos not read, for a
    sample that takes every descriptor and for one that takes one a photo (a 1M-photo build)."""
    import numpy as np

    from d2r.features import Features
    from d2r.pipeline import WHOLE_BOX, DescriptorSample, Regions
    from d2r_build.shards import PhotoShard, ShardFolder

    rng = np.random.default_rng(0)

    def feats(n):
        return Features(rng.random((n, 2), np.float32), rng.standard_normal((n, 8)).astype(np.float32),
                        rng.random(n, np.float32), np.ones(n, np.float32))

    folder = ShardFolder(tmp_path / "shards")
    (folder.root / "features").mkdir(parents=True)
    wholes = []
    for b in range(3):
        photos = []
        for i in range(4):
            if (b, i) == (1, 2):
                photos.append(PhotoShard(f"p{b}{i}", "p12.jpg: cannot identify image file", None))
                continue
            whole, crop = feats(int(rng.integers(5, 40))), feats(7)
            wholes.append(whole.descriptors)
            photos.append(PhotoShard(f"p{b}{i}", None, Regions([whole, crop], [WHOLE_BOX, np.array([0, 0, 0.5, 0.5], np.float32)])))
        folder.write_features(b, photos)
    for n_photos, cap in ((12, 10_000), (1_000_000, 500_000)):
        want = DescriptorSample(n_photos, cap, seed=3)
        for d in wholes:
            want.add(d)
        got = DescriptorSample(n_photos, cap, seed=3)
        assert folder.sample_into(got, range(3)) == (12, 8)
        np.testing.assert_array_equal(got.array(8), want.array(8))
    assert len(got.array(8)) == len(wholes)  # one descriptor a photo at 1M photos
