"""Revisited Oxford / Paris metrics (docs/algorithm.md section 7) and the dataset folder loader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r_lab.evaluate import DatasetError, compute_ap, compute_map, evaluate_protocol, load_dataset, protocol_lists, ranks_from_scores, remove_junk

from shared_data import require_roxford

# --------------------------------------------------------------------------------------------
# An independent implementation, written from the text of docs/algorithm.md section 7 only
# --------------------------------------------------------------------------------------------


def spec_metrics(ranking, positives, junk, kappas):
    """(AP, [P@k]) of one query, fractions; None if it has no positives. Plain Python loops."""
    positives = set(int(i) for i in positives)
    junk = set(int(i) for i in junk) - positives
    if not positives:
        return None
    cleaned = [int(i) for i in ranking if int(i) not in junk]  # junk removed before counting
    hits = [r for r, img in enumerate(cleaned) if img in positives]  # 0-based ranks
    ap = 0.0
    for i, r in enumerate(hits):
        left = 1.0 if r == 0 else i / r
        right = (i + 1) / (r + 1)
        ap += (left + right) / 2
    ap /= len(positives)
    precisions = []
    for k in kappas:
        if not hits:
            precisions.append(0.0)
            continue
        kq = min(hits[-1] + 1, k)  # k capped at the (1-based) rank of the last positive
        precisions.append(sum(1 for r in hits if r + 1 <= kq) / kq)
    return ap, precisions


def spec_map(ranks, gnd, kappas):
    out = {}
    for protocol in ("easy", "medium", "hard"):
        aps, prs = [], []
        for ranking, g in zip(ranks, gnd):
            easy, hard, junk = list(g["easy"]), list(g["hard"]), list(g["junk"])
            if protocol == "easy":
                res = spec_metrics(ranking, easy, junk + hard, kappas)
            elif protocol == "medium":
                res = spec_metrics(ranking, easy + hard, junk, kappas)
            else:
                res = spec_metrics(ranking, hard, junk + easy, kappas)
            if res is not None:
                aps.append(res[0])
                prs.append(res[1])
        out[protocol] = (
            100 * sum(aps) / len(aps) if aps else math.nan,
            [100 * sum(p[j] for p in prs) / len(prs) if prs else math.nan for j in range(len(kappas))],
        )
    return out


# --------------------------------------------------------------------------------------------
# compute_ap: hand-computed values
# --------------------------------------------------------------------------------------------


def test_ap_perfect_ranking_is_one():
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)


def test_ap_single_positive_at_rank_one():
    # i = 0, r = 1: left = 0 / 1, right = 1 / 2 -> 0.25
    assert compute_ap([1], 1) == pytest.approx(0.25)


def test_ap_two_positives_hand_computed():
    # (1 + 1) / 2 = 1 for rank 0; (1/2 + 2/3) / 2 = 7/12 for rank 2; mean over 2 positives
    assert compute_ap([0, 2], 2) == pytest.approx((1 + 7 / 12) / 2)


def test_ap_truncated_ranking_is_penalised():
    # only 1 of 2 positives retrieved: its contribution is divided by 2
    assert compute_ap([0], 2) == pytest.approx(0.5)
    assert compute_ap([], 3) == 0.0


@pytest.mark.parametrize(
    "ranks, n, msg",
    [([1, 0], 2, "ascending"), ([0, 0], 2, "more than once"), ([0, 1, 2], 2, "only 2"), ([-1], 1, ">= 0"), ([0], 0, "n_positives")],
)
def test_ap_rejects_bad_input(ranks, n, msg):
    with pytest.raises(d2r.InputError, match=msg):
        compute_ap(ranks, n)


# --------------------------------------------------------------------------------------------
# compute_map: protocols, junk, truncation, skipped queries, mP@k
# --------------------------------------------------------------------------------------------


def test_junk_is_removed_before_counting():
    # ranking: junk 9, positive 1, negative 5, positive 2 -> adjusted ranks 0 and 2
    res = evaluate_protocol([[9, 1, 5, 2]], positives=[[1, 2]], junk=[[9]])
    assert res.map == pytest.approx(100 * (1 + 7 / 12) / 2)
    # the same ranking without the junk label: ranks 1 and 3
    res2 = evaluate_protocol([[9, 1, 5, 2]], positives=[[1, 2]], junk=[[]])
    expected = ((0 + 0.5) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert res2.map == pytest.approx(100 * expected)


def test_protocols_easy_medium_hard_hand_computed():
    # database: 0 easy, 1 hard, 2 junk, 3 negative
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranking = [[3, 1, 2, 0]]
    res = compute_map(ranking, gnd)
    # Easy: positives {0}, junk {1, 2} -> ranking 3, 0 -> 0 at rank 1 -> 0.25
    assert res.map["easy"] == pytest.approx(25.0)
    # Medium: positives {0, 1}, junk {2} -> ranking 3, 1, 0 -> ranks 1, 2
    assert res.map["medium"] == pytest.approx(100 * ((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    # Hard: positives {1}, junk {0, 2} -> ranking 3, 1 -> rank 1 -> 0.25
    assert res.map["hard"] == pytest.approx(25.0)
    # mP@1 is 0 everywhere; mP@5 capped at the last positive's rank
    assert res.mp["medium"][1] == 0.0
    assert res.mp["medium"][5] == pytest.approx(100 * 2 / 3)  # positives at 2, 3 (1-based), k -> 3
    assert res.mp["hard"][5] == pytest.approx(50.0)  # positive at 2, k -> 2


def test_truncated_ranking_penalised_in_map():
    gnd = [{"easy": [0, 1, 2], "hard": [], "junk": []}]
    res = compute_map([[0, 7, 1]], gnd)  # positive 2 never retrieved
    assert res.map["medium"] == pytest.approx(100 * (1 + 7 / 12) / 3)
    assert res.map["easy"] == pytest.approx(100 * (1 + 7 / 12) / 3)


def test_queries_without_positives_are_skipped():
    gnd = [
        {"easy": [0], "hard": [], "junk": []},
        {"easy": [], "hard": [], "junk": [1]},  # no positives in any protocol
    ]
    res = compute_map([[0, 1], [1, 0]], gnd)
    assert res.map["medium"] == pytest.approx(100.0)
    assert res.protocols["medium"].n_evaluated == 1
    assert np.isnan(res.protocols["medium"].aps[1])
    # Hard: no query has hard positives -> nothing to average
    assert math.isnan(res.map["hard"])
    assert res.protocols["hard"].n_evaluated == 0


def test_precision_at_k_capped_at_last_positive():
    # positives at 1-based ranks 1 and 4
    res = evaluate_protocol([[0, 5, 6, 1, 7, 8]], positives=[[0, 1]], junk=[[]], kappas=(1, 5, 10))
    assert res.mp[1] == pytest.approx(100.0)
    assert res.mp[5] == pytest.approx(50.0)  # k capped at 4: 2 / 4
    assert res.mp[10] == pytest.approx(50.0)


def test_precision_when_no_positive_is_retrieved_is_zero():
    res = evaluate_protocol([[5, 6]], positives=[[0]], junk=[[]], kappas=(1, 5))
    assert res.map == 0.0
    assert res.mp == {1: 0.0, 5: 0.0}


def test_image_both_positive_and_junk_counts_as_positive():
    res = evaluate_protocol([[3, 0]], positives=[[0]], junk=[[0, 3]])
    assert res.map == pytest.approx(100.0)


def test_ranks_from_scores_breaks_ties_by_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert ranks_from_scores(scores).tolist() == [[1, 3, 0, 2, 4]]
    assert ranks_from_scores(scores, top=2).tolist() == [[1, 3]]
    # ties decide AP deterministically: positive 2 ties with negative 0 and comes after it;
    gnd = [{"easy": [2], "hard": [], "junk": []}]
    # ranking 1, 3, 0, 2, 4: the positive is at rank 3 -> (0 / 3 + 1 / 4) / 2
    assert compute_map(ranks_from_scores(scores), gnd).map["medium"] == pytest.approx(12.5)


def test_results_are_percent_and_json_ready():
    gnd = [{"easy": [0], "hard": [1], "junk": []}]
    res = compute_map(np.array([[0, 1, 2]]), gnd)
    d = res.to_dict()
    json.dumps(d)
    assert d["map"]["medium"] == pytest.approx(100.0)
    assert set(d["mp"]["hard"]) == {"1", "5", "10"}
    assert "medium" in res.table()


def test_matches_independent_implementation_on_random_cases():
    rng = np.random.default_rng(7)
    kappas = (1, 3, 5, 10)
    for trial in range(60):
        n_db = int(rng.integers(5, 60))
        nq = int(rng.integers(1, 6))
        gnd, ranks = [], []
        for _ in range(nq):
            perm = rng.permutation(n_db)
            a, b, c = sorted(rng.integers(0, n_db // 2 + 1, size=3))
            gnd.append({"easy": perm[:a].tolist(), "hard": perm[a:b].tolist(), "junk": perm[b:c].tolist()})
            order = rng.permutation(n_db)
            if rng.random() < 0.4:  # truncated ranking
                order = order[: int(rng.integers(0, n_db + 1))]
            ranks.append(order)
        res = compute_map(ranks, gnd, kappas=kappas, n_database=n_db)
        ref = spec_map(ranks, gnd, kappas)
        for p in ("easy", "medium", "hard"):
            m, prs = ref[p]
            if math.isnan(m):
                assert math.isnan(res.map[p])
                continue
            assert res.map[p] == pytest.approx(m, abs=1e-9), (trial, p)
            for j, k in enumerate(kappas):
                assert res.mp[p][k] == pytest.approx(prs[j], abs=1e-9), (trial, p, k)


def test_remove_junk_keeps_order_and_metrics():
    gnd = [{"easy": [0], "hard": [4], "junk": [2]}]
    ranking = np.array([3, 2, 4, 1, 0])
    for p in ("easy", "medium", "hard"):
        _, junk = protocol_lists(gnd, p)
        cleaned = remove_junk(ranking, junk[0])
        assert 2 not in cleaned
        assert cleaned.tolist() == [i for i in ranking if i not in set(junk[0].tolist())]
        assert evaluate_protocol([cleaned], *protocol_lists(gnd, p)).map == pytest.approx(
            evaluate_protocol([ranking], *protocol_lists(gnd, p)).map
        )


def test_compute_map_accepts_one_ranking_per_protocol():
    gnd = [{"easy": [0], "hard": [1], "junk": []}]
    res = compute_map({"easy": [[0, 1]], "medium": [[2, 0, 1]], "hard": [[1]]}, gnd)
    assert res.map["easy"] == pytest.approx(100.0)
    assert res.map["medium"] == pytest.approx(100 * ((0 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert res.map["hard"] == pytest.approx(100.0)
    with pytest.raises(d2r.InputError, match="missing hard"):
        compute_map({"easy": [[0]], "medium": [[0]]}, gnd)


def test_protocol_lists():
    gnd = [{"easy": [0], "hard": [1], "junk": [2]}]
    pos, junk = protocol_lists(gnd, "hard")
    assert pos[0].tolist() == [1] and sorted(junk[0].tolist()) == [0, 2]
    with pytest.raises(d2r.InputError, match="protocol"):
        protocol_lists(gnd, "extreme")


@pytest.mark.parametrize(
    "ranks, msg",
    [
        ([[0, 0]], "more than once"),
        ([[0], [1]], "one ranking per query"),
        ([[-1]], ">= 0"),
        ([[5]], "out of range"),
        ([[0.5]], "integer"),
    ],
)
def test_compute_map_rejects_bad_rankings(ranks, msg):
    gnd = [{"easy": [0], "hard": [], "junk": []}]
    with pytest.raises(d2r.InputError, match=msg):
        compute_map(ranks, gnd, n_database=3)


def test_compute_map_rejects_bad_gnd_and_kappas():
    with pytest.raises(d2r.InputError, match="easy"):
        compute_map([[0]], [{"ok": [0]}])
    with pytest.raises(d2r.InputError, match="kappas"):
        compute_map([[0]], [{"easy": [0], "hard": [], "junk": []}], kappas=(0,))


# --------------------------------------------------------------------------------------------
# Dataset folders
# --------------------------------------------------------------------------------------------


def _make_folder(root: Path, gnd: dict, db=("a", "b", "c"), queries=("q",)):
    (root / "db").mkdir(parents=True)
    (root / "queries").mkdir()
    for n in db:
        (root / "db" / f"{n}.jpg").write_bytes(b"\xff\xd8")
    for n in queries:
        (root / "queries" / f"{n}.jpg").write_bytes(b"\xff\xd8")
    (root / "gnd.json").write_text(json.dumps(gnd))


GOOD = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 10, 10], "easy": [0], "hard": [2], "junk": [1]}]}


def test_load_dataset_small_folder(tmp_path):
    _make_folder(tmp_path, GOOD)
    ds = load_dataset(tmp_path)
    assert ds.n_images == 3 and ds.n_queries == 1
    assert ds.image_paths[2] == tmp_path / "db" / "c.jpg"
    assert ds.query_paths[0] == tmp_path / "queries" / "q.jpg"
    assert ds.gnd[0]["hard"].tolist() == [2] and ds.gnd[0]["bbx"] == (0.0, 0.0, 10.0, 10.0)
    assert compute_map([[0, 2, 1]], ds.gnd).map["medium"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda g: g.pop("imlist"), "imlist"),
        (lambda g: g.update(gnd=[]), "one entry per query"),
        (lambda g: g["gnd"][0].update(easy=[3]), "outside"),
        (lambda g: g["gnd"][0].update(hard="2"), "integer indices"),
        (lambda g: g["gnd"][0].update(bbx=[0, 0]), "bbx"),
        (lambda g: g.update(imlist=["a", "a", "c"]), "more than once"),
        (lambda g: g.update(imlist=["a", "b", "zzz"]), "missing: zzz"),
    ],
)
def test_load_dataset_malformed(tmp_path, mutate, msg):
    g = json.loads(json.dumps(GOOD))
    mutate(g)
    _make_folder(tmp_path, g)
    with pytest.raises(DatasetError, match=msg):
        load_dataset(tmp_path)


def test_load_dataset_missing_pieces(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="gnd.json"):
        load_dataset(tmp_path)
    (tmp_path / "gnd.json").write_text("{not json")
    with pytest.raises(DatasetError, match="JSON"):
        load_dataset(tmp_path)
    (tmp_path / "gnd.json").write_text(json.dumps(GOOD))
    with pytest.raises(DatasetError, match="missing folder"):
        load_dataset(tmp_path)
    assert isinstance(DatasetError("x"), d2r.InputError)


def test_load_real_roxford5k_mini():
    ds = load_dataset(require_roxford())
    assert ds.n_images == 1097 and ds.n_queries == 21
    assert all(p.exists() for p in ds.query_paths[:3])
    # query 2 has no positives in the subset and is skipped
    perfect = []
    for g in ds.gnd:
        pos = np.concatenate([g["easy"], g["hard"]])
        perfect.append(np.concatenate([pos, np.setdiff1d(np.arange(ds.n_images), pos)]))
    res = compute_map(perfect, ds.gnd, n_database=ds.n_images)
    assert res.protocols["medium"].n_evaluated == 20
    assert np.isnan(res.protocols["medium"].aps[2])
    assert res.map == {"easy": pytest.approx(100.0), "medium": pytest.approx(100.0), "hard": pytest.approx(100.0)}
    rng = np.random.default_rng(0)
    ranks = [rng.permutation(ds.n_images)[:100] for _ in range(ds.n_queries)]
    ref = spec_map(ranks, ds.gnd, (1, 5, 10))
    res = compute_map(ranks, ds.gnd)
    for p in ("easy", "medium", "hard"):
        assert res.map[p] == pytest.approx(ref[p][0], abs=1e-9)
