"""``d2r eval``: run one retrieval method on a dataset folder and score it (Revisited protocol).

The method is the SDK's own pipeline: local features from a converted model (cached on disk,
so sweeps over codebooks, kinds and regions are cheap), a codebook trained on the database
(or loaded), aggregation of a kind, regions from an R-MAC grid or a detector, the index, and
optional spatial verification of the top 100. Metrics come from :mod:`d2r.evaluate`.

Region features: detector boxes re-extract features on each crop (docs/algorithm.md section 2);
R-MAC grid cells pool the whole-image features that fall inside them (a grid of up to 14
cells per image would multiply extraction time, and the grid is a baseline).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from d2r import verify
from d2r.aggregate import aggregate
from d2r.codebook import Codebook
from d2r.errors import InputError
from d2r.features import Features
from d2r.image import load_image
from d2r.index import Index

from . import evaluate

# Detector boxes are extracted down to this score (the paper's lowest threshold) and cached.
DETECT_FLOOR = 0.1
# Detector boxes kept per image (the detector's own cap); ``--max-regions`` keeps fewer.
MAX_REGIONS = 25
EVAL_KINDS = ("asmk_star", "rasmk_star", "d2r_asmk_star", "asmk", "rasmk", "naive_rasmk", "vlad", "rvlad")


def rmac_boxes(height: int, width: int, levels: int) -> list:
    """R-MAC regions (Tolias et al.): square cells of side 2*min(H, W)/(l+1) at levels l=1..L,
    evenly spread with about 40% overlap; normalised (ymin, xmin, ymax, xmax)."""
    boxes = []
    short = min(height, width)
    for level in range(1, levels + 1):
        side = 2.0 * short / (level + 1)
        ny = max(1, int(round((height - side) / (side * 0.6))) + 1) if height > side else 1
        nx = max(1, int(round((width - side) / (side * 0.6))) + 1) if width > side else 1
        for iy in range(ny):
            for ix in range(nx):
                y0 = 0.0 if ny == 1 else iy * (height - side) / (ny - 1)
                x0 = 0.0 if nx == 1 else ix * (width - side) / (nx - 1)
                boxes.append((y0 / height, x0 / width, min(1.0, (y0 + side) / height), min(1.0, (x0 + side) / width)))
    return boxes


def parse_regions(value: str):
    """``none`` | ``rmac:L`` | ``detector:NAME@THRESH`` | ``shuffled:NAME@THRESH`` -> (source, parameter).

    ``shuffled`` is a control for the detector: each database image gets the boxes the detector
    found on another database image (a fixed derangement), re-extracted on its own pixels. The
    number, sizes and shapes of the regions are the detector's; only where they fall is not.
    """
    if value == "none":
        return "none", None
    if value.startswith("rmac:"):
        try:
            levels = int(value[5:])
        except ValueError:
            levels = 0
        if not 1 <= levels <= 5:
            raise InputError(f"--regions: rmac:L needs L in 1..5, got {value!r}")
        return "rmac", levels
    for source in ("detector", "shuffled"):
        if value.startswith(source + ":"):
            name, _, thresh = value[len(source) + 1:].partition("@")
            try:
                t = float(thresh) if thresh else 0.1
            except ValueError:
                raise InputError(f"--regions: expected {source}:NAME@THRESHOLD, got {value!r}") from None
            return source, (name or "ssd", t)
    raise InputError(f"--regions: expected none, rmac:L, detector:NAME@THRESH or shuffled:NAME@THRESH, got {value!r}")


def _derangement(n: int, seed: int) -> np.ndarray:
    """A permutation of range(n) without fixed points (n >= 2): a random cyclic shift order."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[order] = np.roll(order, 1)
    return out


def parse_scales(value):
    """``"0.5,0.707,1"`` or a sequence -> tuple of floats; InputError otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise InputError(f"--scales: expected comma-separated positive numbers, got {value!r}") from None
    if not out or any(not (0 < v <= 4) for v in out):
        raise InputError(f"--scales: expected comma-separated numbers in (0, 4], got {value!r}")
    return out


def feature_setting(model_sha: str, ex) -> str:
    """Cache key material of a model-based extractor: the model file and every extraction setting."""
    setting = f"{model_sha}|{ex.scales}|{ex.max_features}|{ex.score_threshold}"
    if getattr(ex, "fit", "canvas") != "canvas":
        setting += f"|fit {ex.fit}"
    tiles = getattr(ex, "tile_overlap", None)
    if (any(s > 1 for s in ex.scales) or getattr(ex, "fit", "canvas") != "canvas") and tiles is not None:
        setting += f"|tiles {tiles}"
    return setting


class FeatureCache:
    """Features per image on disk, keyed by the model file's sha256, the extractor settings,
    and the image path, size and mtime. One .npz per image and setting."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, image: Path, tag: str) -> Path:
        st = image.stat()
        h = hashlib.sha256(f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tag}".encode()).hexdigest()[:24]
        return self.dir / f"{h}.npz"

    def get(self, image: Path, tag: str, compute):
        path = self._path(image, tag)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed
        value = compute()
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **value)
        os.replace(tmp, path)
        return value


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/d2r/eval`` (``~/.cache/d2r/eval``): where ``d2r eval`` and
    ``d2r detector mine-boxes`` keep extracted features."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "d2r" / "eval"


def open_cache(cache_dir, setting: str) -> FeatureCache:
    """The feature cache of one extraction ``setting`` (see :func:`feature_setting`)."""
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return FeatureCache(root, hashlib.sha256(setting.encode()).hexdigest()[:16])


def cached_whole(cache: FeatureCache, ex, path):
    """Whole-image features of ``path`` by extractor ``ex``, through ``cache``:
    (Features, (height, width))."""

    def compute():
        rgb = load_image(path)
        out = _pack(ex.extract(rgb))
        out["shape"] = np.array(rgb.shape[:2])
        return out

    d = cache.get(path, "whole+shape", compute)
    return _unpack(d), tuple(int(v) for v in d["shape"])


def _pack(f: Features) -> dict:
    return {"locations": f.locations, "descriptors": f.descriptors, "scores": f.scores, "scales": f.scales}


def _unpack(d: dict) -> Features:
    return Features(d["locations"], d["descriptors"], d["scores"], d["scales"])


def run(
    dataset,
    features: str = "xfeat",
    precision: str = "int8",
    backend: str = "tflite",
    codebook=None,
    codebook_size: int = 1024,
    kind: str = "rasmk_star",
    pooling: str = "max",
    regions: str = "none",
    verify_top: int = 0,
    verify_words: int = 0,
    verify_precision: str = "int8",
    limit: int | None = None,
    cache_dir=None,
    seed: int = 0,
    threads: int | None = None,
    progress=True,
    max_features: int | None = None,
    scales=None,
    score_threshold: float | None = None,
    fit: str | None = None,
    max_regions: int = MAX_REGIONS,
) -> dict:
    """Evaluate one method; returns the JSON-ready result (mAP in percent).

    features: a local-feature model of the manifest (``xfeat``) or a source of
    :mod:`d2r.feature_sources` (``rootsift``, ``aliked``); max_features, scales and
    score_threshold override the extractor's defaults (the manifest's for models); fit
    (models only): ``canvas`` or ``longest``, see :class:`d2r.LocalFeatureExtractor`.
    max_regions: detector regions: the best ``max_regions`` boxes above the threshold (25, all
    the detector gives, by default; the Engine's default is 8).
    progress: True (bars on stderr), False, or a callable(what, done, total) that receives the
    same events (``"index"`` reaches total when the database is aggregated).
    """
    from d2r.engine import Engine

    from .feature_sources import SOURCES, make_extractor

    if kind not in EVAL_KINDS:
        raise InputError(f"--kind: expected one of {', '.join(EVAL_KINDS)}, got {kind!r}")
    source, param = parse_regions(regions)
    if isinstance(max_regions, bool) or not isinstance(max_regions, (int, np.integer)) or not 0 <= max_regions <= MAX_REGIONS:
        raise InputError(f"--max-regions: expected 0 to {MAX_REGIONS}, got {max_regions!r}")
    if isinstance(verify_words, bool) or not isinstance(verify_words, (int, np.integer)) or not 0 <= verify_words <= 64:
        raise InputError(f"--verify-words: expected 0 (exhaustive) to 64, got {verify_words!r}")
    if verify_precision not in verify.PRECISIONS:
        raise InputError(f"--verify-precision: expected one of {', '.join(verify.PRECISIONS)}, got {verify_precision!r}")
    if kind in ("rasmk_star", "d2r_asmk_star", "rasmk", "naive_rasmk", "rvlad") and source == "none":
        raise InputError(f"--kind {kind} needs regions (--regions rmac:L or detector:NAME@THRESH)")
    if features not in SOURCES:
        from d2r.engine import _ALIASES
        from d2r.manifest import load_manifest

        models = sorted({m.name for m in load_manifest().models if m.task == "local_features"})
        if _ALIASES.get(features, features) not in models:
            raise InputError(f"--features: unknown {features!r}; expected a local-feature model of the manifest "
                             f"({', '.join(models)}) or a feature source ({', '.join(SOURCES)})")
    ds = evaluate.load_dataset(dataset)
    timings = {}
    t0 = time.perf_counter()
    detector = param[0] if source in ("detector", "shuffled") else None
    # Boxes are detected (and cached) down to DETECT_FLOOR whatever the threshold asked for, and
    # filtered by score when read: one extraction serves every threshold >= the floor (NMS keeps
    # a box only against higher-scoring boxes, so the boxes above t are the same either way).
    detect_at = min(param[1], DETECT_FLOOR) if detector else DETECT_FLOOR
    if scales is not None:
        scales = parse_scales(scales)
    overrides = {"max_features": max_features, "scales": scales, "score_threshold": score_threshold}
    if features in SOURCES and fit not in (None, "canvas"):
        raise InputError(f"--fit: only for feature models; {features} resizes to a longest side of 640 px")
    if features in SOURCES:
        # The engine still provides the detector (and is built on the default model).
        ex = make_extractor(features, threads=threads, **overrides)
        engine = Engine.create(features="xfeat", detector=detector, kind="asmk_star", backend=backend, precision=precision,
                               threads=threads, detector_threshold=detect_at, max_regions=MAX_REGIONS)
        setting = ex.setting
    else:
        engine = Engine.create(features=features, detector=detector, kind="asmk_star", backend=backend, precision=precision,
                               threads=threads, detector_threshold=detect_at, max_regions=MAX_REGIONS,
                               feature_fit=fit or "canvas", **{k: v for k, v in overrides.items() if v is not None})
        ex = engine.extractor
        setting = feature_setting(engine.feature_entry.sha256, ex)
    if engine.detector_entry is not None:
        setting += f"|{engine.detector_entry.sha256}|{engine.config.detector_threshold}"
    cache = open_cache(cache_dir, setting)

    db_paths = ds.image_paths
    q_paths = ds.query_paths
    if limit:
        q_paths = q_paths[:limit]
    report = _progress(progress)

    def whole(p):
        return cached_whole(cache, ex, p)

    def crops(rgb, boxes, out):
        """Features of each normalised box's crop, in image coordinates, into ``out``."""
        h, w = rgb.shape[:2]
        for i, box in enumerate(boxes):
            y0, x0 = int(np.floor(box[0] * h)), int(np.floor(box[1] * w))
            y1, x1 = int(np.ceil(box[2] * h)), int(np.ceil(box[3] * w))
            crop = rgb[y0:y1, x0:x1]
            f = ex.extract(crop) if crop.shape[0] and crop.shape[1] else Features.empty(ex.dim)
            f.locations = f.locations + np.array([y0, x0], np.float32)
            for k, v in _pack(f).items():
                out[f"r{i}_{k}"] = v
        return out

    def unpack_regions(d, keep):
        return [Features(d[f"r{i}_locations"], d[f"r{i}_descriptors"], d[f"r{i}_scores"], d[f"r{i}_scales"]) for i in keep]

    def detections(p):
        def compute():
            rgb = load_image(p)
            det = engine.detector.detect(rgb)
            out = {"boxes": det.boxes.astype(np.float32), "scores": det.scores.astype(np.float32), "n": np.array([len(det)])}
            return crops(rgb, det.boxes, out)

        return cache.get(p, "detector", compute)

    def detected_regions(p):
        d = detections(p)
        return unpack_regions(d, [i for i in range(int(d["n"][0])) if d["scores"][i] >= param[1]][:max_regions])

    # The shuffled control: image k takes the boxes of image donor[k] (a derangement, fixed seed).
    if source == "shuffled" and len(ds.image_paths) < 2:
        raise InputError(f"--regions {regions}: the shuffled control needs at least 2 database images")
    donor = _derangement(len(ds.image_paths), seed=12345) if source == "shuffled" else None
    db_index = {str(p): k for k, p in enumerate(ds.image_paths)}

    def shuffled_regions(p):
        d = detections(ds.image_paths[donor[db_index[str(p)]]])
        boxes = d["boxes"][d["scores"] >= param[1]][:max_regions].astype(np.float32).reshape(-1, 4)
        tag = "boxes-" + hashlib.sha256(boxes.tobytes()).hexdigest()[:16]
        got = cache.get(p, tag, lambda: crops(load_image(p), boxes, {"n": np.array([len(boxes)])}))
        return unpack_regions(got, range(int(got["n"][0])))

    def regions_of(p, f, shape):
        if source == "none":
            return []
        if source == "rmac":
            return [f.in_box(b, shape) for b in rmac_boxes(shape[0], shape[1], param)]
        if source == "shuffled":
            return shuffled_regions(p)
        return detected_regions(p)

    # Pass 1: features (and regions) of every image into the disk cache; only a bounded
    # sample of descriptors stays in memory, for the codebook.
    rng = np.random.default_rng(seed)
    per_image = -(-500_000 // max(len(db_paths), 1))
    sample = []
    n_regions = []
    for i, p in enumerate(db_paths):
        f, shape = whole(p)
        if codebook is None:
            take = rng.choice(len(f), size=min(len(f), per_image), replace=False) if len(f) else np.zeros(0, np.int64)
            sample.append(f.descriptors[np.sort(take)])
        n_regions.append(1 + len(regions_of(p, f, shape)))
        report("database features" + (" and regions" if source != "none" else ""), i + 1, len(db_paths))
    q_feats = []
    for i, p in enumerate(q_paths):
        q_feats.append(whole(p)[0])
        report("query features", i + 1, len(q_paths))
    timings["features_s"] = time.perf_counter() - t0

    t2 = time.perf_counter()
    if codebook is None:
        x = np.concatenate(sample)
        del sample
        cb = Codebook.train(x, size=codebook_size, seed=seed, progress=lambda it, n, moved: report("k-means", it, n))
        codebook_source = f"trained on the database, K={codebook_size}, seed {seed}"
    else:
        cb = codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)
        codebook_source = str(codebook)
    timings["codebook_s"] = time.perf_counter() - t2

    # Pass 2: aggregate image by image from the cache.
    t3 = time.perf_counter()
    binary = kind in ("asmk_star", "rasmk_star", "d2r_asmk_star")
    qkind = "asmk_star" if binary else "vlad" if "vlad" in kind else "asmk"
    index = None
    vectors = None
    if kind in ("vlad", "rvlad"):
        vectors = np.zeros((len(db_paths), cb.size * cb.dim), np.float32)
    else:
        index = Index(cb, kind="asmk_star" if kind == "d2r_asmk_star" else ("asmk" if kind == "asmk" else kind))
    for i, p in enumerate(db_paths):
        f, shape = whole(p)
        allf = [f] + regions_of(p, f, shape)
        sizes = [len(r) for r in allf]
        if kind == "vlad":
            vectors[i] = aggregate(f.descriptors, cb, kind="vlad").vector
        elif kind == "rvlad":
            vectors[i] = aggregate(np.concatenate([r.descriptors for r in allf]), cb, kind="rvlad", region_sizes=sizes).vector
        elif kind in ("asmk_star", "asmk"):
            index.add(str(i), aggregate(f.descriptors, cb, kind=kind))
        elif kind in ("rasmk_star", "rasmk", "naive_rasmk"):
            index.add(str(i), aggregate(np.concatenate([r.descriptors for r in allf]), cb, kind=kind, region_sizes=sizes))
        else:
            index.add_regions(str(i), [aggregate(r.descriptors, cb, kind="asmk_star") for r in allf])
        report("index", i + 1, len(db_paths))
    if index is not None:
        tmp = Path(cache.dir) / f"index-{os.getpid()}.d2ri"
        index.save(tmp)
        index_bytes = tmp.stat().st_size
        tmp.unlink()
    else:
        index_bytes = vectors.nbytes
    timings["index_s"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    n = ds.n_images
    ranks = []
    q_times = []
    for f in q_feats:
        tq = time.perf_counter()
        q = aggregate(f.descriptors, cb, kind=qkind)
        if vectors is not None:
            scores = vectors @ q.vector
            ranks.append(np.argsort(-scores.astype(np.float64), kind="stable"))
        else:
            hits = index.search(q, top_k=n, pooling=pooling)
            order = [int(h.image_id) for h in hits]
            seen = set(order)
            ranks.append(np.array(order + [i for i in range(n) if i not in seen], dtype=np.int64))
        q_times.append((time.perf_counter() - tq) * 1e3)
    timings["query_ms_median"] = float(np.median(q_times)) if q_times else 0.0

    gnd = ds.gnd[: len(q_paths)]
    if verify_top:
        tv = time.perf_counter()
        per_protocol = {}
        loaded = {}
        # Unit descriptors of another source: docs/algorithm.md's 0.9 (untuned for them).
        match_distance = engine.match_distance() if features not in SOURCES else 0.9

        def vfeats(c):
            # docs/algorithm.md section 6 verifies with whole-image features; the top 1000 by score.
            # With verify_words, each keeps its nearest codeword and matching stays within words.
            if c not in loaded:
                f = whole(db_paths[c])[0]
                words = cb.assign(f.descriptors[:1000]) if verify_words else None
                loaded[c] = verify.LocalFeatures(f.locations[:1000], f.descriptors[:1000], words)
            return loaded[c]

        q_verify = []
        for f in q_feats:
            words = cb.assign(f.descriptors[:1000], multiple=min(verify_words, cb.size)) if verify_words else None
            q_verify.append(verify.LocalFeatures(f.locations[:1000], f.descriptors[:1000], words))

        for protocol in evaluate.PROTOCOLS:
            _, junk = evaluate.protocol_lists(gnd, protocol)
            out = []
            for qi, (qv, r) in enumerate(zip(q_verify, ranks)):
                clean = evaluate.remove_junk(r, junk[qi])
                cands = [(int(c), float(-k), vfeats(int(c)) if k < verify_top else None) for k, c in enumerate(clean)]
                rr = verify.rerank(qv, cands, top_r=verify_top, max_distance=match_distance, precision=verify_precision)
                out.append(np.array([x.id for x in rr], dtype=np.int64))
            per_protocol[protocol] = out
        timings["verify_ms_per_query"] = (time.perf_counter() - tv) * 1e3 / max(1, len(q_feats) * 3)
        result = evaluate.compute_map(per_protocol, gnd)
    else:
        result = evaluate.compute_map(ranks, gnd)
    timings["search_s"] = time.perf_counter() - t4
    engine.close()
    regions_per_image = float(np.mean(n_regions)) if n_regions else 1.0
    out = result.to_dict()
    return {
        "dataset": str(ds.root),
        "options": {
            "features": features, "precision": precision, "backend": backend, "codebook": codebook_source,
            "codebook_size": cb.size, "kind": kind, "pooling": pooling, "regions": regions,
            "max_regions": int(max_regions) if source in ("detector", "shuffled") else None,
            "verify": bool(verify_top), "verify_words": int(verify_words) if verify_top else None,
            "verify_precision": verify_precision if verify_top else None,
            "max_features": ex.max_features, "scales": list(ex.scales), "score_threshold": ex.score_threshold,
            "fit": getattr(ex, "fit", None),
            "seed": seed,
        },
        "map": out["map"],
        "mp": {p: out["mp"][p] for p in ("easy", "medium", "hard")},
        "n_queries": len(q_paths),
        "n_evaluated": out["n_evaluated"],
        "n_images": n,
        "regions_per_image": regions_per_image,
        "index_bytes": int(index_bytes),
        "index_bytes_per_image": index_bytes / max(n, 1),
        "timings": timings,
        "table": result.table(),
        "_codebook": cb,  # for sweeps that reuse it (benchmarks/bench_features.py); not in the JSON
        # For --report: the Medium ranking of each query (junk kept, as shown to a user).
        "_report": {
            "queries": [str(p) for p in q_paths],
            "images": [str(p) for p in db_paths],
            "rankings": [np.asarray(r[:20]).tolist() for r in (per_protocol["medium"] if verify_top else ranks)],
            "gnd": [{k: np.asarray(g[k]).tolist() for k in ("easy", "hard", "junk")} for g in gnd],
            "ap_medium": [None if np.isnan(v) else float(v) for v in result.protocols["medium"].aps],
        },
    }


def _thumb_data_uri(path: str, size=(120, 90)) -> str:
    import base64
    import io

    from PIL import Image

    img = Image.fromarray(load_image(path))
    img.thumbnail(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_report(res: dict, path, top: int = 10) -> None:
    """A self-contained HTML page: the summary table, then per query its ranked thumbnails with
    green (positive, Medium protocol), red (wrong) or grey (junk) borders."""
    import html

    rep = res["_report"]
    o = res["options"]
    rows = []
    for q, (query, ranking, g, ap) in enumerate(zip(rep["queries"], rep["rankings"], rep["gnd"], rep["ap_medium"])):
        positives = set(g["easy"]) | set(g["hard"])
        junk = set(g["junk"])
        cells = []
        for rank, i in enumerate(ranking[:top], start=1):
            cls = "pos" if i in positives else "junk" if i in junk else "neg"
            name = html.escape(Path(rep["images"][i]).name)
            cells.append(f'<figure class="{cls}"><img src="{_thumb_data_uri(rep["images"][i])}" alt="{name}">'
                         f"<figcaption>{rank}. {name}</figcaption></figure>")
        ap_text = "no positives (skipped)" if ap is None else f"AP Medium {ap:.1f}"
        qname = html.escape(Path(query).name)
        rows.append(f'<section><h3>{q + 1}. {qname} <small>{ap_text}</small></h3><div class="row">'
                    f'<figure class="query"><img src="{_thumb_data_uri(query)}" alt="{qname}"><figcaption>query</figcaption></figure>'
                    + "".join(cells) + "</div></section>")
    table = "".join(
        f"<tr><td>{p}</td><td>{res['map'][p]:.2f}</td>" + "".join(f"<td>{v:.2f}</td>" for v in res["mp"].get(p, {}).values()) + "</tr>"
        for p in ("easy", "medium", "hard")
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>d2r eval: {html.escape(Path(res['dataset']).name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #bbb; padding: .2em .6em; text-align: right; }}
.row {{ display: flex; flex-wrap: wrap; gap: 6px; }}
figure {{ margin: 0; padding: 3px; border: 4px solid #ddd; font-size: 11px; width: 120px; }}
figure img {{ display: block; max-width: 120px; max-height: 90px; }}
figure.pos {{ border-color: #2a2; }} figure.neg {{ border-color: #d33; }} figure.junk {{ border-color: #999; }}
figure.query {{ border-color: #333; }}
figcaption {{ overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
</style></head><body>
<h1>d2r eval: {html.escape(res['dataset'])}</h1>
<p>{res['n_queries']} queries, {res['n_images']} images; features {html.escape(o['features'])} {o['precision']} ({o['backend']}),
kind {o['kind']} ({o['pooling']}), regions {html.escape(o['regions'])} ({res['regions_per_image']:.1f} per image),
K = {o['codebook_size']}, verification {'on' if o['verify'] else 'off'}.
Borders: <b style="color:#2a2">positive</b>, <b style="color:#d33">wrong</b>, <b style="color:#999">junk</b> (Medium protocol).</p>
<table><tr><th>protocol</th><th>mAP</th><th>mP@1</th><th>mP@5</th><th>mP@10</th></tr>{table}</table>
{''.join(rows)}
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")


def _progress(enabled):
    if callable(enabled):  # a caller's own callable(what, done, total)
        return enabled
    if not enabled:
        return lambda what, done, total: None
    last = {"t": 0.0}

    def report(what, done, total):
        now = time.monotonic()
        if done == total or now - last["t"] > 2.0:
            last["t"] = now
            print(f"\r{what}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return report


def parse_seeds(value) -> list:
    """``"0"`` or ``"0,1,2"`` -> list of ints (codebook seeds)."""
    try:
        seeds = [int(v) for v in str(value).split(",")]
    except ValueError:
        raise InputError(f"--seed: expected an integer or comma-separated integers, got {value!r}") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seed: repeated seed in {value!r}")
    return seeds


def cmd_eval(args) -> int:
    seeds = parse_seeds(args.seed)
    if len(seeds) > 1 and args.codebook:
        raise InputError("--seed: several seeds need a codebook trained here (--codebook-size), not --codebook")
    if len(seeds) > 1 and args.report:
        raise InputError("--report: one seed at a time")
    results = []
    for seed in seeds:
        res = run(
            args.dataset, features=args.features, precision=args.precision, backend=args.backend,
            codebook=args.codebook, codebook_size=args.codebook_size, kind=args.kind, pooling=args.pooling,
            regions=args.regions, verify_top=100 if args.verify else 0, verify_words=args.verify_words,
            verify_precision=args.verify_precision, limit=args.limit, cache_dir=args.cache,
            seed=seed, threads=args.threads, progress=not args.quiet, max_features=args.max_features,
            scales=args.scales, score_threshold=args.score_threshold, fit=args.fit, max_regions=args.max_regions,
        )
        o = res["options"]
        print(f"{res['dataset']}: {res['n_queries']} queries, {res['n_images']} images; {o['features']} {o['precision']} {o['backend']} "
              f"({o['max_features']} features, scales {','.join(f'{v:g}' for v in o['scales'])}, threshold {o['score_threshold']:g}), "
              f"{o['kind']} ({o['pooling']}), regions {o['regions']} ({res['regions_per_image']:.1f}/image), K={o['codebook_size']}, "
              f"seed {seed}, verify {o['verify']}")
        print(res["table"])
        print(f"index {res['index_bytes_per_image'] / 1024:.1f} KiB/image; query {res['timings']['query_ms_median']:.1f} ms (aggregation + search)")
        results.append(res)
    public = [{k: v for k, v in r.items() if k != "table" and not k.startswith("_")} for r in results]
    if len(seeds) > 1:
        mean = {p: float(np.mean([r["map"][p] for r in results])) for p in ("easy", "medium", "hard")}
        std = {p: float(np.std([r["map"][p] for r in results])) for p in ("easy", "medium", "hard")}
        print(f"mean over seeds {','.join(map(str, seeds))}: mAP " + ", ".join(f"{p} {mean[p]:.2f} (std {std[p]:.2f})" for p in mean))
    if args.json:
        doc = public[0] if len(seeds) == 1 else {"seeds": seeds, "map_mean": mean, "map_std": std, "runs": public}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.report:
        write_report(results[0], args.report)
        print(f"report: {args.report}")
    return 0


def register_cli(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a retrieval method on a dataset folder (gnd.json, db/, queries/)")
    e.add_argument("--dataset", required=True, help="folder in the roxford5k-mini layout")
    e.add_argument("--features", default="xfeat",
                   help="a local-feature model of the manifest (xfeat, aliked_t16, aliked_n16) or a source: rootsift, aliked "
                        "(default xfeat: the baseline of the comparison; the SDK default is aliked_t16)")
    e.add_argument("--max-features", type=int, help="keep the N best features per image (default: the model's or source's)")
    e.add_argument("--scales", help="image pyramid, comma-separated, e.g. 0.5,0.707,1,1.414 (model sources; >1 runs in tiles)")
    e.add_argument("--score-threshold", type=float, help="minimum keypoint score (default: the model's or source's)")
    e.add_argument("--fit", choices=["canvas", "longest"], help="feature models: scale 1 fits the image into the model input (canvas, "
                   "default) or sets its longest side to the input's (longest: portrait photos at full resolution, in tiles)")
    e.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"])
    e.add_argument("--backend", default="tflite", choices=["tflite", "onnx"])
    g = e.add_mutually_exclusive_group()
    g.add_argument("--codebook", help="codebook file trained elsewhere")
    g.add_argument("--codebook-size", type=int, default=1024, help="train a codebook of K words on the database (default 1024)")
    e.add_argument("--kind", default="asmk_star", choices=list(EVAL_KINDS))
    e.add_argument("--pooling", default="max", choices=["max", "avg"], help="regional search (d2r_asmk_star): max or mean over regions")
    e.add_argument("--regions", default="none",
                   help="none | rmac:L | detector:NAME@THRESH | shuffled:NAME@THRESH (control: another image's boxes)")
    e.add_argument("--max-regions", type=int, default=MAX_REGIONS,
                   help=f"detector regions: the best N boxes above the threshold per image (default {MAX_REGIONS}; d2r build keeps 8)")
    e.add_argument("--verify", action="store_true", help="spatial verification of the top 100")
    e.add_argument("--verify-words", type=int, default=0, metavar="M",
                   help="verification matches a query feature only with features of its M nearest visual words (default 0: exhaustive; faster, loses inliers)")
    e.add_argument("--verify-precision", default="int8", choices=list(verify.PRECISIONS),
                   help="exhaustive matching of verification: int8 codes (default, integer GEMM) or fp32")
    e.add_argument("--limit", type=int, help="only the first N queries (quick runs)")
    e.add_argument("--cache", help="feature cache folder (default ~/.cache/d2r/eval)")
    e.add_argument("--seed", default="0", help="codebook seed, or several comma-separated (each run is printed, then the mean)")
    e.add_argument("--threads", type=int)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", help="write every number to this JSON file")
    e.add_argument("--report", help="write an HTML page: per-query ranked thumbnails and the summary table")
    e.set_defaults(func=cmd_eval)
