"""Codebook training, approximate assignment and the codebook file."""

import subprocess
import sys

import numpy as np
import pytest

import d2r

import numpy_reference as ref


def blobs(seed=0, k=12, d=16, per=60, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 3
    x = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((k * per, d)).astype(np.float32)
    return centres, x[rng.permutation(len(x))]


def test_train_recovers_separated_clusters():
    centres, x = blobs()
    cb = d2r.Codebook.train(x, size=12, iterations=20, seed=0)
    assert cb.centroids.shape == (12, 16) and cb.centroids.dtype == np.float32
    # Every true centre has a learned centroid close to it.
    nearest = ref.assign(centres, cb.centroids)[:, 0]
    assert len(set(nearest.tolist())) == 12
    assert np.abs(cb.centroids[nearest] - centres).max() < 0.05


def test_train_is_deterministic_and_seed_dependent():
    _, x = blobs(1, k=30, per=20, spread=1.0)
    a = d2r.Codebook.train(x, size=16, iterations=5, seed=3)
    b = d2r.Codebook.train(x, size=16, iterations=5, seed=3)
    c = d2r.Codebook.train(x, size=16, iterations=5, seed=4)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.checksum == b.checksum and a.checksum != c.checksum


def test_train_random_seeding_and_progress():
    _, x = blobs(2, k=20, per=30, spread=0.5)
    seen = []
    cb = d2r.Codebook.train(x, size=20, iterations=4, seed=0, seeding="random", progress=lambda *a: seen.append(a))
    assert cb.size == 20 and 1 <= len(seen) <= 4 and seen[0][:2] == (1, 4)


def test_empty_clusters_are_reseeded():
    # 5 distinct points, many duplicates: k-means++ must not leave K=5 clusters empty or NaN.
    x = np.repeat(np.eye(5, 8, dtype=np.float32), 40, axis=0)
    cb = d2r.Codebook.train(x, size=5, iterations=10, seed=0, seeding="random")
    assert np.isfinite(cb.centroids).all()
    assert sorted(cb.assign(np.eye(5, 8, dtype=np.float32)).tolist()) == [0, 1, 2, 3, 4]


def test_train_errors():
    x = np.ones((10, 4), np.float32)
    with pytest.raises(d2r.InputError, match="at least 20 descriptors"):
        d2r.Codebook.train(x, size=20)
    with pytest.raises(d2r.InputError, match="seeding"):
        d2r.Codebook.train(x, size=2, seeding="magic")
    with pytest.raises(d2r.InputError, match="size"):
        d2r.Codebook.train(x, size=0)


def test_auto_size_keeps_39_descriptors_per_word_up_to_8192():
    from d2r.codebook import auto_size

    assert auto_size(8192 * 39) == 8192 and auto_size(10**9) == 8192
    assert auto_size(8192 * 39 - 1) == 4096
    assert auto_size(24 * 1500) == 512  # the sample collection's size with ALIKED-t16
    assert auto_size(16 * 39) == 16
    with pytest.raises(d2r.InputError, match="too few for a codebook"):
        auto_size(16 * 39 - 1)
    assert auto_size(10**6, max_size=65536) == 16384


@pytest.mark.slow
def test_approximate_assignment_agrees_mostly_and_is_exact_with_all_probes():
    rng = np.random.default_rng(0)
    _, x = blobs(3, k=200, d=32, per=10, spread=0.3)
    cb = d2r.Codebook.train(x, size=256, iterations=5, seed=0)
    cb.build_coarse(groups=16)
    q = x[rng.permutation(len(x))[:500]] + 0.05 * rng.standard_normal((500, 32)).astype(np.float32)
    exact = cb.assign(q)
    assert (cb.assign(q, approximate=True, probes=4) == exact).mean() > 0.8
    np.testing.assert_array_equal(cb.assign(q, approximate=True, probes=16), exact)
    np.testing.assert_array_equal(cb.assign(q, multiple=3, approximate=True, probes=16), cb.assign(q, multiple=3))


def test_save_load_round_trip(tmp_path):
    _, x = blobs(4)
    cb = d2r.Codebook.train(x, size=10, iterations=3)
    cb.build_coarse(groups=3)
    path = tmp_path / "cb.d2rcb"
    cb.save(path)
    back = d2r.Codebook.load(path)
    assert back == cb
    np.testing.assert_array_equal(back.centroids, cb.centroids)
    np.testing.assert_array_equal(back.assign(x, approximate=True, probes=1), cb.assign(x, approximate=True, probes=1))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_load_rejects_bad_files(tmp_path):
    cb = d2r.Codebook(np.eye(4, 8, dtype=np.float32))
    good = tmp_path / "good.d2rcb"
    cb.save(good)
    data = good.read_bytes()
    cases = {
        "missing.d2rcb": None,
        "short.d2rcb": data[:10],
        "magic.d2rcb": b"XXXXXXXX" + data[8:],
        "truncated.d2rcb": data[:-5],
        "flipped.d2rcb": data[:40] + bytes([data[40] ^ 1]) + data[41:],
        "newer.d2rcb": data[:8] + (99).to_bytes(4, "little") + data[12:],
    }
    messages = {
        "missing.d2rcb": "cannot read",
        "short.d2rcb": "too short",
        "magic.d2rcb": "bad magic",
        "truncated.d2rcb": "truncated",
        "flipped.d2rcb": "checksum",
        "newer.d2rcb": "newer",
    }
    for name, blob in cases.items():
        path = tmp_path / name
        if blob is not None:
            path.write_bytes(blob)
        with pytest.raises(d2r.CodebookError, match=messages[name]) as err:
            d2r.Codebook.load(path)
        assert name in str(err.value)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "cb.d2rcb"
    d2r.Codebook(np.eye(4, 8, dtype=np.float32)).save(path)
    before = path.read_bytes()

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError):
        d2r.Codebook(np.ones((4, 8), np.float32)).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cb.d2rcb"]


@pytest.mark.slow
def test_cli_version_and_codebook_train(tmp_path):
    out = subprocess.run([sys.executable, "-m", "d2r.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("d2r ")
    _, x = blobs(5)
    np.save(tmp_path / "x.npy", x)
    res = subprocess.run(
        [sys.executable, "-m", "d2r.cli", "codebook", "train", str(tmp_path / "x.npy"), "--size", "12", "-o", str(tmp_path / "cb.d2rcb")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert d2r.Codebook.load(tmp_path / "cb.d2rcb").size == 12
    bad = subprocess.run(
        [sys.executable, "-m", "d2r.cli", "codebook", "train", str(tmp_path / "none.npy"), "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "none.npy" in bad.stderr
