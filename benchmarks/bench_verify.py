"""Benchmark of spatial verification (issue 6): speed of re-ranking and inliers on a real pair.

1. Time to verify R = 100 candidates of 1000 features each against a 1000-feature query, on one
   core (BLAS, ONNX Runtime and Numba limited to one thread), split into the distance GEMM, the
   nearest-neighbour kernel and RANSAC, with float32 descriptors and with int8 codes (integer
   GEMM, ``d2r.int8_gemm``; the default of ``d2r.verify.rerank``). Candidates are synthetic:
   each shares 0-150 features with the query under an affine map and has 200 more matches at
   random places (outliers), so RANSAC runs its full 1000 trials on 200-350 matches, a harder
   case than most real candidates (shares scaled for other feature counts, see --configs).
2. Inlier counts on the scikit-image stereo pair (``skimage.data.stereo_motorcycle``) with
   OpenCV SIFT (RootSIFT) and ORB features: d2r's RANSAC against ``cv2.estimateAffine2D`` and
   ``skimage.measure.ransac`` on the same putative matches, threshold 10 px, 1000 trials.
3. With ``--oxford DIR`` (roxford5k-mini layout): every database image ranked by its inlier
   count against each query (OpenCV SIFT), d2r's RANSAC against OpenCV's, scored with
   ``d2r_lab.evaluate.compute_map``: a check of verification and metrics together on real data.
4. With ``--oxford DIR`` and ``--parts 4``: re-ranking 100 real candidates per query with
   exhaustive matching against matching within visual words (``LocalFeatures.words``, K = 1024,
   m = 1, 3, 5 words per query feature): CPU time, matches and inliers kept, and mAP.

Needs scikit-image and opencv-python-headless for part 2 (not project dependencies)::

    python benchmarks/bench_verify.py [--repeat 7] [--configs 1000x128 1000x64 500x128] \\
        [--oxford ../shared/data/roxford5k-mini --oxford-cache /tmp/sift.npz]
"""

from __future__ import annotations

import os

# One core: fix the thread pools before numpy and numba are imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from d2r import int8_gemm, verify, verify_kernels  # noqa: E402

N_FEATURES = 1000
N_CANDIDATES = 100


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_candidates(dim, n=N_FEATURES, seed=0):
    """A query of ``n`` features and 100 candidates of ``n`` each; the
    number of shared features scales with ``n`` (0-15 % inliers, 20 % outliers)."""
    rng = np.random.default_rng(seed)
    q_loc = rng.uniform(0, 640, size=(n, 2)).astype(np.float32)
    q_desc = unit(rng.normal(size=(n, dim)))
    cands = []
    for k in range(N_CANDIDATES):
        n_in = int(rng.integers(0, 3 * n // 20 + 1))
        n_out = n // 5
        loc = rng.uniform(0, 640, size=(n, 2)).astype(np.float32)
        desc = unit(rng.normal(size=(n, dim)))
        idx = rng.choice(n, size=n_in + n_out, replace=False)
        A = np.array([[1 + rng.normal(0, 0.1), rng.normal(0, 0.1), rng.uniform(-50, 50)],
                      [rng.normal(0, 0.1), 1 + rng.normal(0, 0.1), rng.uniform(-50, 50)]])
        src = q_loc[idx[:n_in]].astype(np.float64)
        loc[:n_in] = (src @ A[:, :2].T + A[:, 2] + rng.normal(0, 1.5, size=(n_in, 2))).astype(np.float32)
        desc[: n_in + n_out] = unit(q_desc[idx] + 0.04 * rng.normal(size=(n_in + n_out, dim)))
        cands.append((k, float(rng.random()), verify.LocalFeatures(loc, desc)))
    return verify.LocalFeatures(q_loc, q_desc), cands


def time_rerank(dim, n_features, repeat, precision="int8"):
    """Wall and CPU time of re-ranking; CPU time is the steadier number on a shared machine.

    With int8 the candidates' codes are computed once, before the timed passes, as the engine
    reads them from its int8 side file; the quantisation of 100 float candidates is reported
    apart (``quantise_ms``), and the query's is inside every pass."""
    query, cands = synthetic_candidates(dim, n_features)
    t0 = time.process_time()
    if precision == "int8":
        for _, _, c in cands:
            c.codes()
    quantise_ms = 1000 * (time.process_time() - t0)
    verify.rerank(query, cands[:2], precision=precision)  # compile (cached on disk after the first run)
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = verify.rerank(query, cands, top_r=N_CANDIDATES, precision=precision)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    # Breakdown, stage by stage on the same data: CPU time, best of `repeat` passes per stage.
    side = verify.matching._query_side(verify.LocalFeatures(query.locations, query.descriptors), precision)
    stages = np.full((repeat, 3), np.inf)
    n_matches = []
    for rep in range(repeat):
        t = np.zeros(3)
        for _, _, c in cands:
            t0 = time.process_time()
            block = verify.matching._distance_block(side, c)  # the GEMM (and |b|^2 or the code norms)
            t1 = time.process_time()
            m = verify_kernels.nearest_neighbours(*block, 0.81, 0.0, False)
            t2 = time.process_time()
            verify.ransac_affine(query.locations, c.locations, m)
            t3 = time.process_time()
            t += (t1 - t0, t2 - t1, t3 - t2)
            if rep == 0:
                n_matches.append(len(m))
        stages[rep] = t
    best = stages.min(axis=0)
    inl = [r.inliers for r in out]
    return {
        "dim": dim,
        "n": n_features,
        "precision": precision,
        "wall_ms": 1000 * float(np.median(walls)),
        "wall_best_ms": 1000 * float(np.min(walls)),
        "cpu_ms": 1000 * float(np.median(cpus)),
        "cpu_best_ms": 1000 * float(np.min(cpus)),
        "gemm_ms": 1000 * best[0],
        "nn_ms": 1000 * best[1],
        "ransac_ms": 1000 * best[2],
        "quantise_ms": quantise_ms,
        "matches": (int(np.min(n_matches)), int(np.median(n_matches)), int(np.max(n_matches))),
        "inliers_top": inl[:3],
        "order": [r.id for r in out[:N_CANDIDATES]],
    }


def _orb_unit(desc):
    # 256 bits -> +-1/16: a unit vector whose squared Euclidean distance is 4 * Hamming / 256.
    bits = np.unpackbits(desc, axis=1).astype(np.float32)
    return (2 * bits - 1) / np.sqrt(bits.shape[1])


def stereo_table(seeds=5):
    try:
        import cv2
        from skimage import data as skdata
        from skimage.measure import ransac as sk_ransac
        from skimage.transform import AffineTransform
    except ImportError as exc:
        print(f"\n(stereo pair skipped: {exc})")
        return
    cv2.setNumThreads(1)
    left, right, _ = skdata.stereo_motorcycle()
    grays = [cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in (left, right)]
    extractors = {
        "SIFT": (cv2.SIFT_create(nfeatures=1000), lambda d: np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-12))),
        "ORB": (cv2.ORB_create(nfeatures=1000), _orb_unit),
    }
    rows = []
    for name, (det, to_unit) in extractors.items():
        feats = []
        for g in grays:
            kp, d = det.detectAndCompute(g, None)
            loc = np.array([(k.pt[1], k.pt[0]) for k in kp], dtype=np.float32)
            feats.append(verify.LocalFeatures(loc, unit(to_unit(d))))
        for label, kw in (("d < 0.9", {}), ("d < 0.9, ratio 0.8", {"ratio": 0.8})):
            m = verify.match(feats[0].descriptors, feats[1].descriptors, **kw)
            src = feats[0].locations[m[:, 0]].astype(np.float64)
            dst = feats[1].locations[m[:, 1]].astype(np.float64)
            ours, ours_full, ours_refit, ours_t = [], [], [], []
            cv, cv_refine, cv_t = [], [], []
            sk, sk_t = [], []
            for s in range(seeds):
                t0 = time.perf_counter()
                r = verify.ransac_affine(feats[0].locations, feats[1].locations, m, seed=s)
                ours_t.append(time.perf_counter() - t0)
                ours.append(r.inliers)
                ours_full.append(verify.ransac_affine(feats[0].locations, feats[1].locations, m, seed=s, confidence=1.0).inliers)
                ours_refit.append(verify.ransac_affine(feats[0].locations, feats[1].locations, m, seed=s, refit=True).inliers)
                cv2.setRNGSeed(s)
                t0 = time.perf_counter()
                _, mask = cv2.estimateAffine2D(src[:, ::-1].copy(), dst[:, ::-1].copy(), method=cv2.RANSAC,
                                               ransacReprojThreshold=10.0, maxIters=1000, confidence=0.99, refineIters=0)
                cv_t.append(time.perf_counter() - t0)
                cv.append(int(mask.sum()) if mask is not None else 0)
                cv2.setRNGSeed(s)
                _, mask = cv2.estimateAffine2D(src[:, ::-1].copy(), dst[:, ::-1].copy(), method=cv2.RANSAC,
                                               ransacReprojThreshold=10.0, maxIters=1000, confidence=0.99)
                cv_refine.append(int(mask.sum()) if mask is not None else 0)
                t0 = time.perf_counter()
                _, inl = sk_ransac((src, dst), AffineTransform, min_samples=3, residual_threshold=10.0,
                                   max_trials=1000, rng=s)
                sk_t.append(time.perf_counter() - t0)
                sk.append(int(inl.sum()) if inl is not None else 0)
            rows.append((name, len(feats[0]), len(feats[1]), label, len(m), ours, ours_full, ours_refit, cv, cv_refine, sk,
                         np.median(ours_t), np.median(cv_t), np.median(sk_t)))

    def span(v):
        return f"{int(np.median(v))} ({min(v)}-{max(v)})"

    print(f"\nStereo pair (skimage stereo_motorcycle), affine RANSAC, threshold 10 px, at most 1000 trials, "
          f"{seeds} seeds: median (min-max) inliers; time per call, median. OpenCV ignores the seed "
          f"(fixed internal RNG); skimage runs all 1000 trials; d2r and OpenCV stop early at confidence 0.99")
    print("| features | matching | matches | d2r (confidence 0.99) | d2r (all 1000 trials) | d2r + refit "
          "| cv2.estimateAffine2D (refineIters=0) | cv2 (default LM refine) | skimage.measure.ransac "
          "| d2r ms | cv2 ms | skimage ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n0, n1, label, nm, o, of, orf, c, cr, s, ot, ct, st in rows:
        print(f"| {name} {n0}/{n1} | {label} | {nm} | {span(o)} | {span(of)} | {span(orf)} | {span(c)} | {span(cr)} | {span(s)} "
              f"| {1000 * ot:.2f} | {1000 * ct:.2f} | {1000 * st:.1f} |")


def _sift_features(path, cv2, sift):
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SystemExit(f"cannot read {path}")
    kp, d = sift.detectAndCompute(img, None)
    if d is None:
        return verify.LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
    d = np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-12))
    loc = np.array([(k.pt[1], k.pt[0]) for k in kp], dtype=np.float32)
    return verify.LocalFeatures(loc, unit(d))


def _cached_features(paths, cv2, sift, cache):
    """SIFT features of ``paths``, read from / written to the npz ``cache`` when given."""
    if cache and os.path.exists(cache):
        z = np.load(cache)
        if list(z["names"]) == [str(p) for p in paths]:
            return [verify.LocalFeatures(z[f"l{i}"], z[f"d{i}"]) for i in range(len(paths))]
    feats = [_sift_features(p, cv2, sift) for p in paths]
    if cache:
        arrays = {"names": np.array([str(p) for p in paths])}
        for i, f in enumerate(feats):
            arrays[f"l{i}"] = f.locations
            arrays[f"d{i}"] = f.descriptors
        np.savez(cache, **arrays)
    return feats


def oxford_table(folder, ratio, limit, cache):
    """Verification alone as the ranking: every database image scored by its inlier count."""
    try:
        import cv2
    except ImportError as exc:
        print(f"\n(roxford5k-mini part skipped: {exc})")
        return
    from d2r_lab import evaluate

    cv2.setNumThreads(1)
    ds = evaluate.load_dataset(folder)
    nq = ds.n_queries if limit is None else min(limit, ds.n_queries)
    sift = cv2.SIFT_create(nfeatures=1000)
    t0 = time.perf_counter()
    feats = _cached_features(list(ds.image_paths) + list(ds.query_paths), cv2, sift, cache)
    db, queries = feats[: ds.n_images], feats[ds.n_images : ds.n_images + nq]
    t_extract = time.perf_counter() - t0
    # The database as stored for verification: int8 descriptors, whole-pixel uint16 locations.
    packed = [verify.unpack_features(verify.pack_features(f, "int8")) for f in db]
    ours = np.zeros((nq, ds.n_images))
    ours_packed = np.zeros((nq, ds.n_images))
    ours_seed1 = np.zeros((nq, ds.n_images))
    theirs = np.zeros((nq, ds.n_images))
    t_match = t_ours = t_cv = 0.0
    for q, qf in enumerate(queries):
        for i, f in enumerate(db):
            t0 = time.perf_counter()
            m = verify.match(qf.descriptors, f.descriptors, ratio=ratio)
            t1 = time.perf_counter()
            ours[q, i] = verify.ransac_affine(qf.locations, f.locations, m).inliers
            t2 = time.perf_counter()
            ours_seed1[q, i] = verify.ransac_affine(qf.locations, f.locations, m, seed=1).inliers
            if len(m) >= verify.MIN_MATCHES:
                src = qf.locations[m[:, 0]][:, ::-1].astype(np.float64)
                dst = f.locations[m[:, 1]][:, ::-1].astype(np.float64)
                _, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=10.0,
                                               maxIters=1000, confidence=0.99, refineIters=0)
                theirs[q, i] = int(mask.sum()) if mask is not None else 0
            t3 = time.perf_counter()
            mp = verify.match(qf.descriptors, packed[i].descriptors, ratio=ratio)
            ours_packed[q, i] = verify.ransac_affine(qf.locations, packed[i].locations, mp).inliers
            t_match += t1 - t0
            t_ours += t2 - t1
            t_cv += t3 - t2
    gnd = ds.gnd[:nq]
    pairs = nq * ds.n_images
    print(f"\n{folder}: {nq} queries x {ds.n_images} images, OpenCV SIFT 1000 (RootSIFT), match d < 0.9"
          f"{f', ratio {ratio}' if ratio else ''}; every image ranked by inliers (ties: database order); "
          f"extraction (or cache) {t_extract:.0f} s, matching {1000 * t_match / pairs:.2f} ms/pair")
    print("| RANSAC | mAP Easy | mAP Medium | mAP Hard | mP@10 Medium | mP@10 Hard | ms/pair |")
    print("|---|---|---|---|---|---|---|")
    rows = (("d2r.verify.ransac_affine", ours, 1000 * t_ours / pairs),
            ("d2r, seed 1 (RANSAC noise level)", ours_seed1, None),
            ("d2r, database packed (int8 descriptors, uint16 locations)", ours_packed, None),
            ("cv2.estimateAffine2D", theirs, 1000 * t_cv / pairs))
    for name, scores, t in rows:
        r = evaluate.compute_map(evaluate.ranks_from_scores(scores), gnd, n_database=ds.n_images)
        print(f"| {name} | {r.map['easy']:.2f} | {r.map['medium']:.2f} | {r.map['hard']:.2f} "
              f"| {r.mp['medium'][10]:.2f} | {r.mp['hard'][10]:.2f} | {'-' if t is None else f'{t:.3f}'} |")
    print(f"same inlier count as seed 0: seed 1 {100 * np.mean(ours_seed1 == ours):.1f} % of pairs, "
          f"packed database {100 * np.mean(ours_packed == ours):.1f} %; "
          f"{verify.feature_bytes(1000, 128)} bytes per image of 1000 features")


def words_table(folder, limit, cache, ratio=None, multiples=(1, 3, 5), size=1024):
    """Re-ranking 100 real candidates, exhaustive matching against matching within visual words.

    RootSIFT (1000 per image, D = 128) on roxford5k-mini; a codebook of ``size`` words trained
    on 200k database descriptors; every database feature keeps its nearest word, every query
    feature its m nearest. Per query the candidates are its positives (easy + hard) and then the
    first database images up to 100, as the top of a good initial ranking would be. Reported:
    CPU ms per query for the 100 candidates, matches kept, inliers on the positive pairs, and
    the mAP of ranking the whole database by inliers (verification alone, as in part 3).
    """
    try:
        import cv2
    except ImportError as exc:
        print(f"\n(words part skipped: {exc})")
        return
    from d2r.codebook import Codebook
    from d2r_lab import evaluate

    cv2.setNumThreads(1)
    ds = evaluate.load_dataset(folder)
    nq = ds.n_queries if limit is None else min(limit, ds.n_queries)
    feats = _cached_features(list(ds.image_paths) + list(ds.query_paths), cv2, cv2.SIFT_create(nfeatures=1000), cache)
    db, queries = feats[: ds.n_images], feats[ds.n_images : ds.n_images + nq]
    rng = np.random.default_rng(0)
    allx = np.concatenate([f.descriptors for f in db])
    t0 = time.perf_counter()
    cb = Codebook.train(allx[rng.choice(len(allx), size=min(len(allx), 200_000), replace=False)], size=size, seed=0)
    t_cb = time.perf_counter() - t0
    # stored as in a bundle: int8 descriptors, uint16 locations, one word per feature
    db_w = [verify.unpack_features(verify.pack_features(verify.LocalFeatures(f.locations, f.descriptors, cb.assign(f.descriptors))))
            for f in db]
    db_x = [verify.LocalFeatures(f.locations, f.descriptors) for f in db_w]
    gnd = ds.gnd[:nq]
    # Lowe's ratio test needs exhaustive matching (d2r.verify refuses it within words): the
    # exhaustive row is run with and without it, the word rows without.
    # Matches and inliers kept are relative to the first row (exhaustive, no ratio test).
    settings = [("exhaustive", 0, None)] + ([(f"exhaustive, ratio {ratio}", 0, ratio)] if ratio else []) \
        + [(f"within words, m = {m}", m, None) for m in multiples]
    q_by = {m: [verify.LocalFeatures(q.locations, q.descriptors, cb.assign(q.descriptors, multiple=m) if m else None) for q in queries]
            for _, m, _ in settings}
    rows = []
    base_inl = None
    for label, m, ratio in settings:
        cands_db = db_w if m else db_x
        cpu = []
        n_matches = []
        pos_inl = []
        for qi in range(nq):
            g = gnd[qi]
            pos = list(g["easy"]) + list(g["hard"])
            ids = pos + [i for i in range(ds.n_images) if i not in set(pos)][: max(0, 100 - len(pos))]
            ids = ids[:100]
            cands = [(i, 0.0, cands_db[i]) for i in ids]
            c0 = time.process_time()
            verify.rerank(q_by[m][qi], cands, top_r=100, ratio=ratio)
            cpu.append(time.process_time() - c0)
            norm = np.einsum("ij,ij->i", q_by[m][qi].descriptors, q_by[m][qi].descriptors)
            for i in pos:
                mt = verify.matching._match_features(q_by[m][qi], cands_db[i], norm, verify.matching._match_params(0.9, ratio, False), True)
                n_matches.append(len(mt))
                pos_inl.append(verify.ransac_affine(q_by[m][qi].locations, cands_db[i].locations, mt).inliers)
        scores = np.zeros((nq, ds.n_images))
        for qi in range(nq):
            for i in range(ds.n_images):
                scores[qi, i] = verify.verify_pair(q_by[m][qi], cands_db[i], ratio=ratio).inliers
        r = evaluate.compute_map(evaluate.ranks_from_scores(scores), gnd, n_database=ds.n_images)
        pos_inl = np.array(pos_inl)
        if base_inl is None:
            base_inl, base_matches = pos_inl, np.array(n_matches)
        keep = base_inl >= 15
        rows.append((label, 1000 * np.median(cpu), np.median(np.array(n_matches) / np.maximum(base_matches, 1)),
                     np.median(pos_inl[keep] / base_inl[keep]) if keep.any() else float("nan"), r.map["medium"], r.map["hard"]))
    print(f"\n{folder}: re-rank 100 real candidates per query ({nq} queries; RootSIFT 1000 x 128, matches d < 0.9, "
          f"ratio test only where the row says); codebook K = {size} trained in {t_cb:.0f} s; CPU ms per query, median")
    print("| matching | CPU ms / 100 candidates | matches kept (positives, median) | inliers kept (positives with >= 15) "
          "| mAP Medium (inliers only) | mAP Hard |")
    print("|---|---|---|---|---|---|")
    for label, ms, mk, ik, mm, mh in rows:
        print(f"| {label} | {ms:.0f} | {100 * mk:.0f} % | {100 * ik:.0f} % | {mm:.2f} | {mh:.2f} |")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed passes over the 100 candidates (median reported)")
    ap.add_argument("--configs", nargs="+", default=["1000x128", "1000x64", "500x128"],
                    help="features per image x descriptor dimension, one timing row each")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"],
                    help="exhaustive matching precisions timed in part 1 (the first is the reference order)")
    ap.add_argument("--seeds", type=int, default=5, help="RANSAC seeds on the stereo pair")
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], help="which parts to run (4: matching within visual words, needs --oxford)")
    ap.add_argument("--oxford", default=None, help="a dataset folder (roxford5k-mini layout) for part 3")
    ap.add_argument("--oxford-ratio", type=float, default=0.8, help="Lowe ratio for part 3 (0: off)")
    ap.add_argument("--oxford-limit", type=int, default=None, help="first N queries only")
    ap.add_argument("--oxford-cache", default=None, help="npz file caching the SIFT features of part 3")
    args = ap.parse_args()

    import numba

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {_cpu_name()}, {os.cpu_count()} logical cores, load average {load:.2f}; "
          f"numpy {np.__version__}, numba {numba.__version__}, "
          f"BLAS/Numba threads: {os.environ['OPENBLAS_NUM_THREADS']}/{numba.config.NUMBA_NUM_THREADS}")
    if 1 in args.parts:
        time_table(args)
    if 2 in args.parts:
        stereo_table(args.seeds)
    if 3 in args.parts and args.oxford:
        oxford_table(args.oxford, args.oxford_ratio or None, args.oxford_limit, args.oxford_cache)
    if 4 in args.parts and args.oxford:
        words_table(args.oxford, args.oxford_limit, args.oxford_cache, args.oxford_ratio or None)


def time_table(args):
    print(f"\nRe-rank {N_CANDIDATES} candidates (query and candidates with N features each), one core, "
          f"{args.repeat} passes: wall and CPU time in ms, median (best); stages: CPU ms, best pass. "
          f"int8: integer GEMM on {int8_gemm.backend(1)}; 'same order' compares the re-ranked top 100 with fp32's")
    print("| N x D | matching | wall | CPU | distance GEMM | NN kernel | RANSAC | quantise 100 candidates | "
          "matches min/median/max | top inliers | same order |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in args.configs:
        n, dim = (int(v) for v in cfg.lower().split("x"))
        ref = None
        for precision in args.precisions:
            r = time_rerank(dim, n, args.repeat, precision)
            ref = ref or r["order"]
            quant = f"{r['quantise_ms']:.0f}" if precision == "int8" else "-"
            print(f"| {r['n']} x {r['dim']} | {precision} | {r['wall_ms']:.0f} ({r['wall_best_ms']:.0f}) "
                  f"| {r['cpu_ms']:.0f} ({r['cpu_best_ms']:.0f}) | {r['gemm_ms']:.0f} | {r['nn_ms']:.0f} | {r['ransac_ms']:.0f} "
                  f"| {quant} | {'/'.join(map(str, r['matches']))} | {r['inliers_top']} | {'yes' if r['order'] == ref else 'no'} |")


if __name__ == "__main__":
    main()
