"""Retrieval metrics of the Revisited Oxford and Paris protocol (docs/algorithm.md section 7).

Three protocols per query, from its ground truth lists ``easy``, ``hard`` and ``junk``:

=========  ===============  ====================
protocol   positives        junk (ignored)
=========  ===============  ====================
easy       easy             junk + hard
medium     easy + hard      junk
hard       hard             junk + easy
=========  ===============  ====================

Junk images are removed from a ranking before positions are counted. AP averages, over the
ground-truth positives, the trapezoid of the precisions left and right of each retrieved
positive; a positive missing from a (truncated) ranking adds 0, so truncation is penalised.
Queries without positives are skipped. mP@k is the precision at k with k capped at the rank of
the last retrieved positive. Every mean is reported in percent::

    ds = d2r_lab.evaluate.load_dataset("../shared/data/roxford5k-mini")
    result = d2r_lab.evaluate.compute_map(ranks, ds.gnd)   # ranks[q]: database indices, best first
    result.map["medium"], result.mp["hard"][10]

``ranks`` holds one row per query (unlike the revisitop code, whose array is [database, query]).
Two cases the revisitop code does not define: when a query has positives but the ranking
retrieves none of them, its AP and its P@k are 0 (revisitop fails on it); an image listed both
as positive and as junk counts as a positive.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2r.errors import DatasetError, InputError  # noqa: F401  (DatasetError: re-exported)

PROTOCOLS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)
# File extensions tried, in order, for a name of gnd.json that has none.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")

__all__ = [
    "IMAGE_EXTENSIONS",
    "KAPPAS",
    "PROTOCOLS",
    "Dataset",
    "DatasetError",
    "EvalResult",
    "ProtocolResult",
    "compute_ap",
    "compute_map",
    "evaluate_protocol",
    "load_dataset",
    "protocol_lists",
    "ranks_from_scores",
    "remove_junk",
]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ProtocolResult:
    """Metrics of one protocol, in percent.

    Attributes:
        map: mean AP over the evaluated queries (NaN if no query has positives).
        mp: {k: mean precision at k} over the evaluated queries.
        aps: float64 [Q] AP of each query, NaN for skipped queries.
        prs: float64 [Q, len(kappas)] precision at each k per query, NaN for skipped queries.
        n_evaluated: number of queries with at least one positive.
    """

    map: float
    mp: dict
    aps: np.ndarray
    prs: np.ndarray
    n_evaluated: int


@dataclass(frozen=True, eq=False)
class EvalResult:
    """Metrics of the three protocols, in percent.

    Attributes:
        map: {"easy", "medium", "hard"} -> mAP.
        mp: {"easy", "medium", "hard"} -> {k: mP@k}.
        protocols: {"easy", "medium", "hard"} -> :class:`ProtocolResult` (per-query values).
        n_queries: number of queries given (including skipped ones).
        kappas: the k of mP@k.
    """

    map: dict
    mp: dict
    protocols: dict = field(repr=False)
    n_queries: int
    kappas: tuple

    def to_dict(self) -> dict:
        """JSON-ready: ``{"map": {...}, "mp": {protocol: {"1": .., "5": .., "10": ..}}, ...}``."""
        return {
            "map": {p: float(v) for p, v in self.map.items()},
            "mp": {p: {str(k): float(v) for k, v in d.items()} for p, d in self.mp.items()},
            "n_queries": self.n_queries,
            "n_evaluated": {p: r.n_evaluated for p, r in self.protocols.items()},
        }

    def table(self) -> str:
        """A plain-text table: one row per protocol, mAP then mP@k."""
        head = "protocol  mAP    " + " ".join(f"mP@{k:<4d}" for k in self.kappas)
        rows = [head]
        for p in PROTOCOLS:
            rows.append(f"{p:<9s} {self.map[p]:6.2f} " + " ".join(f"{self.mp[p][k]:7.2f}" for k in self.kappas))
        return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _index_array(value, name: str, n_database: int | None = None, unique: bool = True) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise InputError(f"{name}: expected a 1-D array of database indices, got {type(value).__name__}") from exc
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise InputError(f"{name}: expected a 1-D array of database indices, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"{name}: expected integer database indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise InputError(f"{name}: database indices must be >= 0, got {int(arr.min())}")
    if n_database is not None and arr.max() >= n_database:
        raise InputError(f"{name}: database index {int(arr.max())} out of range for {n_database} images")
    if unique and np.unique(arr).size != arr.size:
        raise InputError(f"{name}: an image appears more than once")
    return arr


def _kappas(kappas) -> tuple:
    try:
        ks = tuple(kappas)
    except TypeError as exc:
        raise InputError(f"kappas: expected a sequence of positive integers, got {kappas!r}") from exc
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"kappas: expected positive integers, got {k!r}")
    return tuple(int(k) for k in ks)


def _rows(ranks, n_queries: int, n_database: int | None) -> list:
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        rows = list(ranks)
    elif isinstance(ranks, np.ndarray) and ranks.ndim != 1:
        raise InputError(f"ranks: expected one ranking per query, got an array of shape {ranks.shape}")
    else:
        try:
            rows = list(ranks)
        except TypeError as exc:
            raise InputError(f"ranks: expected a sequence of per-query rankings, got {type(ranks).__name__}") from exc
    if len(rows) != n_queries:
        raise InputError(
            f"ranks: expected one ranking per query ({n_queries}), got {len(rows)} "
            "(rows are queries; the revisitop array [database, query] must be transposed)"
        )
    return [_index_array(r, f"ranks[{q}]", n_database) for q, r in enumerate(rows)]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def compute_ap(ranks_of_positives, n_positives: int) -> float:
    """Average precision of one query, as a fraction in [0, 1].

    Args:
        ranks_of_positives: int [P] the junk-adjusted 0-based ranks of the retrieved positives,
            strictly ascending.
        n_positives: size of the ground-truth positive list (>= P); positives missing from the
            ranking contribute 0.

    For the i-th retrieved positive (0-based) at rank r: precision left = 1 if r == 0 else i / r,
    right = (i + 1) / (r + 1); AP = sum((left + right) / 2) / n_positives.
    """
    if isinstance(n_positives, (bool, np.bool_)) or not isinstance(n_positives, (int, np.integer)) or n_positives < 1:
        raise InputError(f"n_positives: expected a positive integer, got {n_positives!r}")
    r = _index_array(ranks_of_positives, "ranks_of_positives")
    if r.size > 1 and np.any(np.diff(r) <= 0):
        raise InputError("ranks_of_positives: expected strictly ascending ranks")
    if r.size > n_positives:
        raise InputError(f"ranks_of_positives: {r.size} ranks for only {n_positives} positives")
    i = np.arange(r.size, dtype=np.float64)
    rf = r.astype(np.float64)
    left = np.where(r == 0, 1.0, i / np.where(r == 0, 1.0, rf))
    right = (i + 1.0) / (rf + 1.0)
    return float(np.sum((left + right) / 2.0) / n_positives)


def _adjusted_positive_ranks(order: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``order`` after junk images are removed."""
    is_pos = np.isin(order, positives)
    # An image listed both as positive and junk counts as a positive.
    keep = ~(np.isin(order, junk) & ~is_pos)
    adjusted = np.cumsum(keep) - 1
    return adjusted[is_pos]


def evaluate_protocol(ranks, positives: Sequence, junk: Sequence, kappas=KAPPAS, n_database: int | None = None) -> ProtocolResult:
    """mAP and mP@k of one protocol, in percent.

    Args:
        ranks: per query, int [L] database indices best first (L may be shorter than the
            database: a truncated ranking); a 2-D array is read as one row per query.
        positives, junk: per query, int arrays of database indices.
        kappas: the k of mP@k.
        n_database: if given, indices must be below it.
    """
    kappas = _kappas(kappas)
    nq = len(positives)
    if len(junk) != nq:
        raise InputError(f"junk: expected one list per query ({nq}), got {len(junk)}")
    rows = _rows(ranks, nq, n_database)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q in range(nq):
        pos = _index_array(positives[q], f"positives[{q}]", n_database)
        if pos.size == 0:
            continue
        jnk = _index_array(junk[q], f"junk[{q}]", n_database, unique=False)
        ranked = _adjusted_positive_ranks(rows[q], pos, jnk)
        aps[q] = compute_ap(ranked, int(pos.size))
        one_based = ranked + 1
        for j, k in enumerate(kappas):
            if one_based.size == 0:
                # No positive retrieved at all: nothing to cap k at, the precision is 0.
                prs[q, j] = 0.0
                continue
            kq = min(int(one_based.max()), k)
            prs[q, j] = np.count_nonzero(one_based <= kq) / kq
    evaluated = ~np.isnan(aps)
    n_eval = int(evaluated.sum())
    if n_eval:
        m = float(aps[evaluated].mean() * 100.0)
        mp = {k: float(prs[evaluated, j].mean() * 100.0) for j, k in enumerate(kappas)}
    else:
        m = float("nan")
        mp = {k: float("nan") for k in kappas}
    return ProtocolResult(m, mp, aps * 100.0, prs * 100.0, n_eval)


def protocol_lists(gnd: Sequence[Mapping], protocol: str) -> tuple[list, list]:
    """(positives, junk) per query for ``protocol`` in easy / medium / hard from gnd entries."""
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    positives, junk = [], []
    for q, g in enumerate(gnd):
        if not isinstance(g, Mapping) or not all(key in g for key in ("easy", "hard", "junk")):
            raise InputError(f"gnd[{q}]: expected a mapping with 'easy', 'hard' and 'junk' lists")
        easy = _index_array(g["easy"], f"gnd[{q}]['easy']", unique=False)
        hard = _index_array(g["hard"], f"gnd[{q}]['hard']", unique=False)
        jk = _index_array(g["junk"], f"gnd[{q}]['junk']", unique=False)
        if protocol == "easy":
            positives.append(np.unique(easy))
            junk.append(np.concatenate([jk, hard]))
        elif protocol == "medium":
            positives.append(np.unique(np.concatenate([easy, hard])))
            junk.append(jk)
        else:
            positives.append(np.unique(hard))
            junk.append(np.concatenate([jk, easy]))
    return positives, junk


def compute_map(ranks, gnd: Sequence[Mapping], kappas=KAPPAS, n_database: int | None = None) -> EvalResult:
    """mAP and mP@k for the Easy, Medium and Hard protocols, in percent.

    Args:
        ranks: per query, int [L] database indices best first; may be truncated (L smaller
            than the database). A 2-D array is read as one row per query. Or a mapping
            {"easy", "medium", "hard"} -> such rankings, one per protocol (spatial
            verification re-ranks the top R non-junk images, and junk differs by protocol).
        gnd: per query, a mapping with ``easy``, ``hard`` and ``junk`` lists of database
            indices (the entries of ``gnd.json``, or :attr:`Dataset.gnd`).
        kappas: the k of mP@k.
        n_database: if given, every index must be below it.
    """
    kappas = _kappas(kappas)
    try:
        nq = len(gnd)
    except TypeError as exc:
        raise InputError(f"gnd: expected a sequence of per-query ground truth, got {type(gnd).__name__}") from exc
    if isinstance(ranks, Mapping):
        missing = [p for p in PROTOCOLS if p not in ranks]
        if missing:
            raise InputError(f"ranks: a mapping of rankings needs every protocol, missing {', '.join(missing)}")
        per_protocol = {p: _rows(ranks[p], nq, n_database) for p in PROTOCOLS}
    else:
        rows = _rows(ranks, nq, n_database)
        per_protocol = {p: rows for p in PROTOCOLS}
    results = {}
    for p in PROTOCOLS:
        positives, junk = protocol_lists(gnd, p)
        results[p] = evaluate_protocol(per_protocol[p], positives, junk, kappas, n_database)
    return EvalResult(
        map={p: r.map for p, r in results.items()},
        mp={p: dict(r.mp) for p, r in results.items()},
        protocols=results,
        n_queries=nq,
        kappas=kappas,
    )


def remove_junk(ranking, junk) -> np.ndarray:
    """``ranking`` without the images of ``junk``, order kept: int64 [L'].

    For spatial verification under the protocol (docs/algorithm.md section 6: the top 100 of the
    initial ranking, junk removed), with the junk of the protocol from :func:`protocol_lists`.
    Removing junk does not change any metric of that protocol.
    """
    r = _index_array(ranking, "ranking")
    j = _index_array(junk, "junk", unique=False)
    return r[~np.isin(r, j)]


def ranks_from_scores(scores, top: int | None = None) -> np.ndarray:
    """Rankings from a similarity matrix: int64 [Q, L], best first.

    ``scores``: float [Q, N] similarity of each query to each database image (higher is
    better). Ties are broken by the lower database index, so a ranking is reproducible.
    ``top`` truncates each ranking to its first ``top`` entries.
    """
    s = np.asarray(scores)
    if s.ndim != 2 or s.dtype.kind not in "fiu":
        raise InputError(f"scores: expected a real array [Q, N], got {s.dtype} {s.shape}")
    if s.dtype.kind == "f" and np.isnan(s).any():
        raise InputError("scores: contains NaN")
    order = np.argsort(-s.astype(np.float64), axis=1, kind="stable")
    if top is not None:
        if isinstance(top, (bool, np.bool_)) or not isinstance(top, (int, np.integer)) or top < 1:
            raise InputError(f"top: expected a positive integer or None, got {top!r}")
        order = order[:, : int(top)]
    return order


# --------------------------------------------------------------------------------------------
# Dataset folders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A retrieval benchmark folder in the roxford5k-mini layout.

    Attributes:
        root: the folder.
        names: database image names (``imlist``), in index order.
        query_names: query image names (``qimlist``).
        image_paths: path of each database image (in ``db/``).
        query_paths: path of each query image (in ``queries/``, already cropped to its bbx).
        gnd: per query, {"easy", "hard", "junk": int64 arrays of database indices,
            "bbx": (x1, y1, x2, y2) floats or None}.
        query_source: per query, how its crop was made (``query_source`` of gnd.json), or None.
    """

    root: Path
    names: list
    query_names: list
    image_paths: list
    query_paths: list
    gnd: list
    query_source: list | None = None

    @property
    def n_images(self) -> int:
        return len(self.names)

    @property
    def n_queries(self) -> int:
        return len(self.query_names)


def _name_list(g: dict, key: str, path: Path) -> list:
    value = g.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DatasetError(f"{path}: '{key}' must be a list of non-empty image names")
    if len(set(value)) != len(value):
        raise DatasetError(f"{path}: '{key}' lists an image more than once")
    return value


def _resolve(folder: Path, names: list, what: str) -> list:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder of {what} images")
    present = set(os.listdir(folder))
    paths, missing = [], []
    for name in names:
        if name in present:
            paths.append(folder / name)
            continue
        hit = next((name + ext for ext in IMAGE_EXTENSIONS if name + ext in present), None)
        if hit is None:
            missing.append(name)
        else:
            paths.append(folder / hit)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(f"{folder}: {len(missing)} {what} image(s) listed in gnd.json are missing: {shown}")
    return paths


def load_dataset(root, check_images: bool = True) -> Dataset:
    """Read a dataset folder: ``gnd.json``, ``db/`` and ``queries/`` (roxford5k-mini layout).

    ``gnd.json`` holds ``imlist`` (database names), ``qimlist`` (query names) and ``gnd``, one
    entry per query with ``easy``, ``hard``, ``junk`` (0-based indices into ``imlist``) and
    optionally ``bbx``. Names without an extension are looked up with
    :data:`IMAGE_EXTENSIONS`. With ``check_images`` every listed image must exist.

    Raises :class:`DatasetError` naming the file and the problem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    gpath = root / "gnd.json"
    try:
        g = json.loads(gpath.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"{gpath}: missing; a dataset folder needs gnd.json, db/ and queries/") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{gpath}: not readable JSON ({exc})") from exc
    if not isinstance(g, dict):
        raise DatasetError(f"{gpath}: expected a JSON object with imlist, qimlist and gnd")
    names = _name_list(g, "imlist", gpath)
    qnames = _name_list(g, "qimlist", gpath)
    entries = g.get("gnd")
    if not isinstance(entries, list) or len(entries) != len(qnames):
        raise DatasetError(f"{gpath}: 'gnd' must be a list with one entry per query ({len(qnames)})")
    n = len(names)
    gnd = []
    for q, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DatasetError(f"{gpath}: gnd[{q}] must be an object")
        item: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            v = e.get(key)
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise DatasetError(f"{gpath}: gnd[{q}]['{key}'] must be a list of integer indices")
            if any(i < 0 or i >= n for i in v):
                raise DatasetError(f"{gpath}: gnd[{q}]['{key}'] has an index outside [0, {n})")
            item[key] = np.asarray(v, dtype=np.int64)
        bbx = e.get("bbx")
        if bbx is not None:
            if not isinstance(bbx, list) or len(bbx) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbx):
                raise DatasetError(f"{gpath}: gnd[{q}]['bbx'] must be [x1, y1, x2, y2]")
            bbx = tuple(float(v) for v in bbx)
        item["bbx"] = bbx
        gnd.append(item)
    source = g.get("query_source")
    if source is not None and (not isinstance(source, list) or len(source) != len(qnames)):
        raise DatasetError(f"{gpath}: 'query_source' must have one entry per query")
    if check_images:
        image_paths = _resolve(root / "db", names, "database")
        query_paths = _resolve(root / "queries", qnames, "query")
    else:
        image_paths = [root / "db" / (nm + ".jpg") for nm in names]
        query_paths = [root / "queries" / (nm + ".jpg") for nm in qnames]
    return Dataset(root, names, qnames, image_paths, query_paths, gnd, source)
