"""The retrieval benchmark on real data (issue 6): a grid of methods through d2r_lab.evaluation.run.

For each (kind, region source) of the grid and each codebook seed, one `d2r eval` run on
roxford5k-mini with the cached features (`--cache`), then one table: mAP Medium / Hard as the
mean (and std) over the seeds, regions per image, index bytes per image, query time.

    python benchmarks/bench_eval.py --dataset ../shared/data/roxford5k-mini --cache /tmp/d2rcache2 \\
        --grid table1 --seeds 0 1 2 --out /tmp/bench6-k1024.jsonl

What the script does beyond calling run():
- The codebook of seed S is trained by the first run of that seed exactly as `d2r eval --seed S`
  trains it (same sample of the database descriptors, same k-means), then reused by the other
  runs of the grid (and saved with --save-codebooks DIR). `--codebook-iterations` and
  `--codebook-sample` shorten k-means for large K (say so when reporting).
- Database assignments are memoised per codebook by descriptor content: the same descriptor
  always gets the same visual word, so an R-MAC cell (a subset of the whole-image features) or
  a second kind costs no new assignment. The memo serves the database only: once run() reports
  the index complete, queries are assigned afresh, so the query time is the real one.
- `--memo-dir DIR` keeps each codebook's memo on disk, so a restarted sweep does not assign again.
- `--approximate` uses the codebook's two-level approximate assignment (database and queries),
  for K = 65536 on this machine.
Results are appended to --out (one JSON line per run) as they come, so a long sweep that is
stopped still has its table: `--table-only` prints the table of an --out file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
             "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from d2r.codebook import Codebook  # noqa: E402
from d2r_lab import evaluation  # noqa: E402

NAMES = {
    "asmk_star": "ASMK*", "asmk": "ASMK", "vlad": "VLAD", "rvlad": "R-VLAD", "rasmk": "R-ASMK",
    "rasmk_star": "R-ASMK*", "naive_rasmk": "Naive-R-ASMK", "d2r_asmk_star": "D2R-ASMK*",
}
RMAC = ["rmac:1", "rmac:2", "rmac:3"]
SSD = ["detector:ssd@0.7", "detector:ssd@0.5", "detector:ssd@0.3", "detector:ssd@0.1"]
LANDMARK = ["detector:landmark@0.3", "detector:landmark@0.1"]


def grid(name: str) -> list[tuple[str, str, str, bool]]:
    """(kind, pooling, regions, verify) rows."""
    if name == "table1":  # in order of priority (a sweep that is stopped early has the first rows)
        rows = [("asmk_star", "max", "none", False), ("asmk", "max", "none", False), ("vlad", "max", "none", False)]
        for r in RMAC:
            rows += [("rasmk_star", "max", r, False), ("d2r_asmk_star", "max", r, False), ("rvlad", "max", r, False),
                     ("naive_rasmk", "max", r, False)]
        rows += [("asmk_star", "max", "none", True)]
        for r in SSD:
            rows += [("rasmk_star", "max", r, False), ("d2r_asmk_star", "max", r, False)]
        rows += [("rasmk", "max", "rmac:2", False), ("d2r_asmk_star", "avg", "rmac:2", False)]
        for r in SSD:
            rows += [("d2r_asmk_star", "avg", r, False)]
        for r in ("rmac:1", "rmac:3"):
            rows += [("rasmk", "max", r, False), ("d2r_asmk_star", "avg", r, False)]
        for r in SSD:
            rows += [("rasmk", "max", r, False), ("rvlad", "max", r, False), ("naive_rasmk", "max", r, False)]
        return rows
    if name == "detectors":  # the other regional kinds on detector regions (OIDv4 SSD, landmark detector)
        rows = []
        for r in ["detector:ssd@0.3", "detector:ssd@0.1"] + LANDMARK:
            rows += [("rvlad", "max", r, False), ("naive_rasmk", "max", r, False), ("rasmk", "max", r, False)]
        for r in LANDMARK:
            rows += [("rasmk_star", "max", r, False), ("d2r_asmk_star", "max", r, False)]
        return rows
    if name == "large":  # K = 8192 / 65536: the two headline kinds
        return [("asmk_star", "max", "none", False), ("rasmk_star", "max", "rmac:2", False)]
    if name == "verify":
        return [("asmk_star", "max", "none", True)]
    raise SystemExit(f"--grid: unknown grid {name!r} (table1, detectors, large, verify)")


class SweepCodebook(Codebook):
    """A Codebook whose database assignments are memoised by descriptor content (see above)."""

    train_iterations: int | None = None
    train_sample: int | None = None
    approximate = False
    last_trained = None

    def __init__(self, centroids):
        super().__init__(centroids)
        self.memo_on = True
        self._keys = np.zeros(0, np.uint64)
        self._vals = np.zeros(0, np.int32)
        self._pending: dict[int, int] = {}
        self.memo_hits = 0
        self.memo_misses = 0

    @classmethod
    def train(cls, descriptors, size=1024, iterations=20, seed=0, seeding="auto", progress=None):
        x = np.asarray(descriptors)
        if cls.train_sample and x.shape[0] > cls.train_sample:
            rng = np.random.default_rng(seed + 7919)
            x = x[np.sort(rng.choice(x.shape[0], size=cls.train_sample, replace=False))]
        cb = super().train(x, size=size, iterations=cls.train_iterations or iterations, seed=seed, seeding=seeding,
                           progress=progress)
        SweepCodebook.last_trained = cb
        return cb

    @staticmethod
    def _hash(x: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        mult = np.random.default_rng(12345).integers(1, 2**63, size=v.shape[1], dtype=np.uint64) | np.uint64(1)
        with np.errstate(over="ignore"):
            h = (v * mult).sum(axis=1, dtype=np.uint64)
            h ^= h >> np.uint64(29)
        return h

    def _assign_with_distances(self, x, m, approximate=False, probes=8):
        approximate = approximate or self.approximate
        if not self.memo_on or m != 1:
            return super()._assign_with_distances(x, m, approximate, probes)
        n = x.shape[0]
        h = self._hash(x)
        words = np.full(n, -1, np.int32)
        if self._keys.size:
            pos = np.minimum(np.searchsorted(self._keys, h), self._keys.size - 1)
            hit = self._keys[pos] == h
            words[hit] = self._vals[pos[hit]]
        miss = np.flatnonzero(words < 0)
        if miss.size and self._pending:
            got = np.array([self._pending.get(int(k), -1) for k in h[miss]], np.int32)
            words[miss] = got
            miss = miss[got < 0]
        self.memo_hits += n - miss.size
        self.memo_misses += miss.size
        if miss.size:
            ids, _ = super()._assign_with_distances(x[miss], 1, approximate, probes)
            words[miss] = ids[:, 0]
            self._pending.update(zip(h[miss].tolist(), ids[:, 0].tolist()))
            if len(self._pending) > 300_000:
                self._merge()
        # aggregate() uses the words only; distances are not memoised.
        return words[:, None], np.zeros((n, 1))

    def save_memo(self, path: Path):
        if self._pending:
            self._merge()
        if self._keys.size != getattr(self, "_saved", -1):
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, keys=self._keys, vals=self._vals, checksum=np.array(self.checksum))
            os.replace(tmp, path)
            self._saved = self._keys.size

    def load_memo(self, path: Path):
        if path.is_file():
            with np.load(path) as z:
                if str(z["checksum"]) == self.checksum:
                    self._keys, self._vals = z["keys"], z["vals"]
                    self._saved = self._keys.size

    def _merge(self):
        keys = np.concatenate([self._keys, np.fromiter(self._pending.keys(), np.uint64, len(self._pending))])
        vals = np.concatenate([self._vals, np.fromiter(self._pending.values(), np.int32, len(self._pending))])
        order = np.argsort(keys, kind="stable")
        self._keys, self._vals = keys[order], vals[order]
        self._pending = {}


def run_one(args, kind, pooling, regions, verify, seed, codebooks):
    cb = codebooks.get(seed)
    events = {}

    def progress(what, done, total):
        if what == "index" and done == total and cb is not None:
            cb.memo_on = False  # queries are assigned afresh
        if done == total:
            events[what] = time.perf_counter()

    if cb is not None:
        cb.memo_on = True
    t = time.perf_counter()
    # The grid is the paper's Table 1 on XFeat int8 (up to 25 detector boxes per photo).
    res = evaluation.run(args.dataset, features="xfeat", max_regions=25, codebook=cb, codebook_size=args.codebook_size, kind=kind,
                         pooling=pooling, regions=regions, verify_top=100 if verify else 0, cache_dir=args.cache, seed=seed,
                         threads=1, progress=progress)
    wall = time.perf_counter() - t
    if cb is None:
        # The first run of a seed trained the codebook (a SweepCodebook, see main()).
        cb = SweepCodebook.last_trained
        codebooks[seed] = cb
        if args.save_codebooks:
            Path(args.save_codebooks).mkdir(parents=True, exist_ok=True)
            cb.save(Path(args.save_codebooks) / f"K{cb.size}-seed{seed}.d2rc")
    row = {
        "kind": kind, "pooling": pooling, "regions": regions, "verify": verify, "seed": seed, "K": cb.size,
        "approximate": bool(SweepCodebook.approximate), "map": res["map"], "mp": res["mp"],
        "regions_per_image": res["regions_per_image"], "index_bytes_per_image": res["index_bytes_per_image"],
        "timings": res["timings"], "wall_s": wall, "n_evaluated": res["n_evaluated"], "codebook": res["options"]["codebook"],
        "train_iterations": SweepCodebook.train_iterations, "train_sample": SweepCodebook.train_sample,
    }
    return row


def label(r) -> str:
    name = NAMES[r["kind"]]
    if r["kind"] == "d2r_asmk_star":
        name += f" ({r['pooling']})"
    if r["verify"]:
        name += " + SV"
    return name


def table(rows) -> str:
    groups: dict = {}
    seen = set()
    for r in rows:
        key = (r["kind"], r["pooling"], r["regions"], r["verify"], r["seed"], r["K"])
        if key in seen:  # a run repeated by two sweeps: the first counts
            continue
        seen.add(key)
        groups.setdefault((r["K"], label(r), r["regions"]), []).append(r)
    lines = ["| K | method | regions | regions / image | mAP Medium | mAP Hard | seeds | index KiB / image | query ms | SV ms / query |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [(k, p, r, v) for k, p, r, v in grid("table1") + grid("detectors") + grid("large")]

    def rank(item):
        (k, _, regions), rs = item
        r = rs[0]
        key = (r["kind"], r["pooling"], regions, r["verify"])
        return (k, order.index(key) if key in order else len(order))

    for (k, name, regions), rs in sorted(groups.items(), key=rank):
        med = np.array([r["map"]["medium"] for r in rs])
        hard = np.array([r["map"]["hard"] for r in rs])
        seeds = ",".join(str(r["seed"]) for r in rs)
        qms = np.median([r["timings"]["query_ms_median"] for r in rs])
        sv = [r["timings"].get("verify_ms_per_query") for r in rs if r["verify"]]
        approx = " (approx.)" if rs[0].get("approximate") else ""
        sv_text = f"{np.median(sv):.0f}" if sv else "-"
        lines.append(f"| {k}{approx} | {name} | {regions} | {np.mean([r['regions_per_image'] for r in rs]):.1f} | "
                     f"{med.mean():.1f} ± {med.std():.1f} | {hard.mean():.1f} ± {hard.std():.1f} | {len(rs)} ({seeds}) | "
                     f"{np.mean([r['index_bytes_per_image'] for r in rs]) / 1024:.1f} | {qms:.1f} | {sv_text} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="../shared/data/roxford5k-mini")
    p.add_argument("--cache", default="/tmp/d2rcache2")
    p.add_argument("--grid", default="table1", help="table1 | detectors | large | verify")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--codebook", nargs="+", help="codebook files, one per seed (instead of training)")
    p.add_argument("--codebook-iterations", type=int, help="k-means iterations (default: d2r eval's 20)")
    p.add_argument("--codebook-sample", type=int, help="k-means on a random subset of d2r eval's sample")
    p.add_argument("--approximate", action="store_true", help="two-level approximate assignment")
    p.add_argument("--save-codebooks", help="folder for the trained codebooks")
    p.add_argument("--only", nargs="+", help="only rows whose kind[/pooling]@regions is listed, e.g. rasmk_star@rmac:2")
    p.add_argument("--memo-dir", help="keep the assignment memo of each codebook here between sweeps")
    p.add_argument("--out", required=True, help="JSON lines, appended run by run")
    p.add_argument("--merge", nargs="+", default=[], help="more JSON-lines files of earlier runs (table, --skip-done)")
    p.add_argument("--skip-done", action="store_true", help="skip the runs already in --out / --merge")
    p.add_argument("--table-only", action="store_true", help="print the table of --out (and --merge) and stop")
    args = p.parse_args(argv)
    out = Path(args.out)
    earlier = []
    for f in [out] + [Path(m) for m in args.merge]:
        if f.is_file():
            earlier += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if args.table_only:
        print(table(sorted(earlier, key=lambda r: r["seed"])))
        return 0
    done_keys = {(r["kind"], r["pooling"], r["regions"], r["verify"], r["seed"], r["K"]) for r in earlier}
    import numba

    numba.set_num_threads(1)
    SweepCodebook.train_iterations = args.codebook_iterations
    SweepCodebook.train_sample = args.codebook_sample
    SweepCodebook.approximate = args.approximate

    # run() trains through the pipeline's codebook stage (`train_codebook`, looked up in
    # d2r_lab.evaluation): pointing it at SweepCodebook.train makes the trained codebook the
    # memoising one. The sample (DescriptorSample) is the pipeline's own.
    def train_sweep(x, size="auto", iterations=20, seed=0, n_images=None, progress=None):
        from d2r.codebook import auto_size

        return SweepCodebook.train(x, size=auto_size(len(x)) if size == "auto" else size, iterations=iterations, seed=seed, progress=progress)

    evaluation.train_codebook = train_sweep
    codebooks = {}
    if args.codebook:
        if len(args.codebook) != len(args.seeds):
            raise SystemExit("--codebook: give one file per seed")
        for s, f in zip(args.seeds, args.codebook):
            cb = SweepCodebook(Codebook.load(f).centroids)
            if args.memo_dir:
                cb.load_memo(Path(args.memo_dir) / f"memo-{cb.checksum[:16]}.npz")
            codebooks[s] = cb
    rows_spec = grid(args.grid)
    if args.only:
        want = set(args.only)
        rows_spec = [r for r in rows_spec if f"{r[0]}@{r[2]}" in want or f"{r[0]}/{r[1]}@{r[2]}" in want
                     or (r[3] and f"{r[0]}+sv@{r[2]}" in want)]
    done = []
    for kind, pooling, regions, verify in rows_spec:
        for seed in args.seeds:
            if args.skip_done and (kind, pooling, regions, verify, seed, args.codebook_size) in done_keys:
                continue
            row = run_one(args, kind, pooling, regions, verify, seed, codebooks)
            cb = codebooks[seed]
            if args.memo_dir:
                Path(args.memo_dir).mkdir(parents=True, exist_ok=True)
                cb.save_memo(Path(args.memo_dir) / f"memo-{cb.checksum[:16]}.npz")
            row["memo_hits"], row["memo_misses"] = cb.memo_hits, cb.memo_misses
            done.append(row)
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{label(row)} {regions} seed {seed}: mAP M {row['map']['medium']:.2f} H {row['map']['hard']:.2f}, "
                  f"{row['regions_per_image']:.1f} regions, {row['index_bytes_per_image'] / 1024:.1f} KiB, "
                  f"query {row['timings']['query_ms_median']:.1f} ms, wall {row['wall_s']:.0f} s", flush=True)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
