"""k-means backends (d2r.kmeans): ours against a numpy oracle bit for bit, for any thread count
and block split; faiss's from the same seeds; both give valid codebooks; faiss stays optional."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r import kernels, kmeans

import numpy_reference as ref

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["d2r", pytest.param("faiss", marks=pytest.mark.skipif(not kmeans.faiss_available(), reason="faiss-cpu not installed"))]


def mixture(seed, n=3000, d=16, centres=40, spread=0.35):
    """A Gaussian mixture of unequal, overlapping components (not uniform noise)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    weights = rng.dirichlet(np.ones(centres))
    x = c[rng.choice(centres, n, p=weights)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32)


def quantisation_error(x, c):
    return float(((x.astype(np.float64) - c[d2r.Codebook(c).assign(x)].astype(np.float64)) ** 2).sum(1).mean())


def test_kmeanspp_seeding_equals_the_numpy_oracle():
    x = mixture(1, n=1500)
    u = np.random.default_rng(3).random(64)
    np.testing.assert_array_equal(kernels.kmeanspp_seed(x, 64, u), ref.kmeanspp(x, 64, u))


@pytest.mark.parametrize("seeding", ["kmeans++", "random"])
def test_ours_is_lloyds_algorithm_bit_for_bit(seeding):
    x = mixture(0)
    init = kmeans.seed_centroids(x, 48, np.random.default_rng(7), seeding)
    got = kmeans.train_centroids(x, 48, 8, 7, seeding, backend="d2r", threads=2)
    np.testing.assert_array_equal(got, ref.lloyd(x, init, 8))


def test_ours_does_not_depend_on_threads_blocks_or_blas_threads(monkeypatch):
    x = mixture(2, n=2500, d=24)
    base = d2r.Codebook.train(x, size=64, iterations=6, seed=1, backend="d2r", threads=1)
    # Odd block sizes: the float32 GEMM blocks change, the exactly re-scored answer must not.
    monkeypatch.setattr(kmeans, "_ROWS_PER_TASK", 96)
    monkeypatch.setattr(kmeans, "_ROW_BLOCK", 40)
    monkeypatch.setattr(kmeans, "_COL_BLOCK", 24)
    for threads in (1, 2, 3):
        assert d2r.Codebook.train(x, size=64, iterations=6, seed=1, backend="d2r", threads=threads) == base
    # A multi-threaded BLAS inside each worker (as without threadpoolctl) gives the same codebook.
    monkeypatch.setattr(kmeans, "_one_thread_blas", lambda: __import__("contextlib").nullcontext())
    assert d2r.Codebook.train(x, size=64, iterations=6, seed=1, backend="d2r", threads=2) == base


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_gives_a_valid_codebook(backend):
    x = mixture(3, n=4000)
    seen = []
    cb = d2r.Codebook.train(x, size=64, iterations=10, seed=0, backend=backend, progress=lambda *a: seen.append(a))
    c = cb.centroids
    assert c.shape == (64, 16) and c.dtype == np.float32 and np.isfinite(c).all()
    assert np.bincount(cb.assign(x), minlength=64).min() >= 1  # no empty word
    assert len(np.unique(c, axis=0)) == 64
    assert 1 <= len(seen) <= 10 and seen[0][:2] == (1, 10)
    # Far better than the seeds alone: k-means did run.
    init = kmeans.seed_centroids(x, 64, np.random.default_rng(0), "auto")
    assert quantisation_error(x, c) < 0.9 * quantisation_error(x, init)


def test_both_backends_reach_the_same_quality():
    pytest.importorskip("faiss")
    x = mixture(4, n=6000, d=32, centres=100)
    errs = [quantisation_error(x, d2r.Codebook.train(x, size=128, iterations=15, seed=2, backend=b).centroids) for b in ("d2r", "faiss")]
    assert abs(errs[0] - errs[1]) < 0.02 * errs[0], errs


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_is_deterministic_per_seed(backend):
    x = mixture(5)
    a = d2r.Codebook.train(x, size=32, iterations=5, seed=3, backend=backend)
    b = d2r.Codebook.train(x, size=32, iterations=5, seed=3, backend=backend)
    c = d2r.Codebook.train(x, size=32, iterations=5, seed=4, backend=backend)
    assert a == b and a != c


def test_faiss_gives_the_same_codebook_on_one_and_two_threads():
    # Observed of faiss-cpu (its assignment is split by rows, its sums by centroid), not promised
    # by it: this test says so if a faiss release changes it.
    pytest.importorskip("faiss")
    x = mixture(6, n=5000)
    a = d2r.Codebook.train(x, size=64, iterations=6, seed=0, backend="faiss", threads=1)
    assert d2r.Codebook.train(x, size=64, iterations=6, seed=0, backend="faiss", threads=2) == a


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_fills_empty_clusters(backend):
    # 6 distinct points, many duplicates, K = 6 from random seeds that repeat points.
    x = np.repeat(np.eye(6, 8, dtype=np.float32), 30, axis=0)
    cb = d2r.Codebook.train(x, size=6, iterations=10, seed=0, seeding="random", backend=backend)
    assert np.isfinite(cb.centroids).all()
    assert sorted(cb.assign(np.eye(6, 8, dtype=np.float32)).tolist()) == [0, 1, 2, 3, 4, 5]


def test_bad_backend_or_threads_is_refused():
    x = mixture(7, n=200)
    with pytest.raises(d2r.InputError, match="backend: expected one of 'auto', 'd2r', 'faiss', got 'sklearn'"):
        d2r.Codebook.train(x, size=4, backend="sklearn")
    with pytest.raises(d2r.InputError, match="threads"):
        d2r.Codebook.train(x, size=4, threads=0)


WITHOUT_FAISS = """
import json, sys
sys.modules["faiss"] = None  # as if faiss-cpu were not installed: `import faiss` raises ImportError
import numpy as np
import d2r
x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
auto = d2r.Codebook.train(x, size=8, iterations=3, seed=0, backend="auto")
ours = d2r.Codebook.train(x, size=8, iterations=3, seed=0, backend="d2r")
try:
    d2r.Codebook.train(x, size=8, backend="faiss")
    error = None
except d2r.InputError as exc:
    error = str(exc)
print(json.dumps({"same": auto == ours, "error": error}))
"""


def test_without_faiss_auto_is_ours_and_faiss_is_a_clear_error():
    run = subprocess.run([sys.executable, "-c", WITHOUT_FAISS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["same"]
    assert "faiss-cpu" in out["error"] and "backend" in out["error"]


def _module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported by statements that run at import time (not in functions)."""
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def test_the_runtime_package_imports_faiss_only_inside_functions():
    offenders = {p.relative_to(REPO).as_posix() for p in (REPO / "sdk" / "d2r").rglob("*.py") if _module_level_imports(p) & {"faiss", "threadpoolctl"}}
    assert not offenders, f"modules importing faiss or threadpoolctl at import time: {sorted(offenders)}"


def test_training_with_our_backend_does_not_load_faiss():
    script = ("import sys, numpy as np, d2r; x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32); "
              "d2r.Codebook.train(x, size=8, iterations=2, backend='d2r'); print('faiss' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "False"


@pytest.mark.parametrize("seeding", ["kmeans++", "random"])
def test_the_bounded_assignment_skips_work_and_changes_nothing(seeding, monkeypatch):
    """From the second iteration on, most descriptors are compared only with the centroids
    that moved most; some of them are captured by one; the codebook is Lloyd's bit for bit."""
    monkeypatch.setattr(kmeans, "_MOVED_SHARE", 4)  # a quarter of K checked directly: more captures to check
    x = mixture(4, n=6000, d=16, centres=60)
    init = kmeans.seed_centroids(x, 96, np.random.default_rng(5), seeding)
    stats = []
    got = kmeans._d2r_lloyd(x, init.copy(), 12, 2, None, stats)
    np.testing.assert_array_equal(got, ref.lloyd(x, init, 12))
    assert stats[0] == (len(x), 0, 0)  # the first iteration compares every descriptor with every centroid
    assert all(full + bounded == len(x) for full, bounded, _ in stats)
    assert sum(b for _, b, _ in stats[1:]) > 0.5 * len(x) * (len(stats) - 1), stats
    assert sum(c for _, _, c in stats) > 0, stats  # the bounded path did move descriptors to other words


def test_the_bounded_assignment_handles_ties_and_duplicates():
    """Duplicate descriptors and centroids (exact ties, broken to the lower id) and a codebook of
    two words: the same as the oracle."""
    x = np.repeat(mixture(6, n=300, d=8, centres=5), 3, axis=0)
    for k in (2, 24):
        init = kmeans.seed_centroids(x, k, np.random.default_rng(1), "random")
        init[1] = init[0]  # two equal centroids
        np.testing.assert_array_equal(kmeans._d2r_lloyd(x, init.copy(), 8, 1, None), ref.lloyd(x, init, 8))
