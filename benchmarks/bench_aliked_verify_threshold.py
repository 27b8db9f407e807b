"""Spatial-verification inliers of query/positive and query/negative pairs at several match cosines.

    PYTHONPATH=sdk .venv/bin/python benchmarks/bench_aliked_verify_threshold.py

Picks ``match_min_cosine`` (manifest ``defaults``) for a feature model: roxford5k-mini queries
0, 2, ..., 18, each against its first 3 "easy" positives and 3 random non-positive database
photos (seed 0), features from the evaluation cache (/tmp/d2rcache2: run the ASMK* evaluation of
each setting first), ``d2r.verify.verify_pair`` at max distance sqrt(2 - 2 cos). Prints median
and mean inliers per threshold.
"""

import hashlib

import numpy as np

import d2r
from d2r import verify
from d2r.features import Features
from d2r_lab import evaluate
from d2r_lab.evaluation import FeatureCache, feature_setting

ds = evaluate.load_dataset("../shared/data/roxford5k-mini")
rng = np.random.default_rng(0)
for feat, prec in (("aliked_n16", "fp16"), ("xfeat", "int8")):
    e = d2r.Engine.create(features=feat, detector=None, precision=prec, threads=1, max_features=2000 if feat != "xfeat" else None)
    setting = feature_setting(e.feature_entry.sha256, e.extractor)
    cache = FeatureCache("/tmp/d2rcache2", hashlib.sha256(setting.encode()).hexdigest()[:16])
    def get(p):
        d = cache.get(p, "whole+shape", None)
        return Features(d["locations"], d["descriptors"], d["scores"], d["scales"])
    res = {c: ([], []) for c in (0.4, 0.5, 0.6, 0.75, 0.82)}
    for qi in range(0, 20, 2):
        q = get(ds.query_paths[qi])
        pos = list(ds.gnd[qi]["easy"])[:3]
        known = set(ds.gnd[qi]["easy"]) | set(ds.gnd[qi]["hard"]) | set(ds.gnd[qi]["junk"])
        negs = [i for i in rng.choice(len(ds.image_paths), 8, replace=False) if i not in known][:3]
        for c in res:
            md = float(np.sqrt(2 - 2 * c))
            for i in pos:
                res[c][0].append(verify.verify_pair(q, get(ds.image_paths[i]), max_distance=md).inliers)
            for i in negs:
                res[c][1].append(verify.verify_pair(q, get(ds.image_paths[i]), max_distance=md).inliers)
    for c, (p, n) in res.items():
        print(feat, c, "positives median/mean inliers", np.median(p), round(np.mean(p), 1), "negatives", np.median(n), round(np.mean(n), 1))
