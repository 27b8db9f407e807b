"""Benchmark of the d2r index (issue 3) against the `asmk` package's inverted file.

Synthetic databases with ASMK*-like word statistics at K = 65536, D = 128:

- words per image: log-normal, median 300, sigma 0.4, clipped to [30, 1500] (mean ~325).
  DELF gives up to 1000 features per image; at K = 65536 they fall into a few hundred distinct
  words (the paper's 10.3 GB ASMK* index for 1M images is ~500 entries of ~20 bytes per
  image; R-ASMK* more).
- word popularity: Zipf-like, p(rank r) ~ r^-0.5 over the 65536 words (a random permutation
  maps rank to word id). Its imbalance factor K * sum(p^2) is ~2.9: posting lists of popular
  words are long, as with real k-means codebooks, and a query touches ~3x the entries it would
  with uniform words (the pessimistic side of the range reported for k-means vocabularies).
- codes: uniform random bits (16 bytes per word); queries: 500 distinct words drawn from the
  same popularity, random codes.

For every N it prints build time (add + save), file size, bytes per stored entry, open time
(memory-mapped, verify=False: header, directory and offsets checked, file in the page
cache), the time of the full check ``idx.verify()`` (sha256 of the inverted file + entry scan), query latency (median and p95 over the queries) with
1 thread (a first pass, which maps the pages of the posting lists into the process, then 3
warm passes) and with all cores (3 passes, interleaved with the 1-thread ones), and RSS (anonymous and file-backed) before opening, after opening
and after the queries. The `asmk` package (0.1.1) builds its IVF from the same entries (its
Python loop over entries is slow: by default only up to N = 100k, --asmk-max), pickles its
state and answers the same queries (binary kernel, alpha = 3, threshold 0).

    python benchmarks/bench_index.py                 # N = 10k, 100k
    python benchmarks/bench_index.py --sizes 10000 100000 1000000

``--integrity`` measures instead what the file checks cost (issue 15), in one process, against
``verify=False`` (no check of the inverted file): open time (median of 9 opens of each mode,
interleaved) for verify=False / the default (verify=None: full sha256 up to 64 MiB, beyond
that the crc32 of each visual word when a search first reads it) / verify=True; the first pass
over the queries right after opening (each word's crc32 checked on first touch; the time spent
in those checks is shown too) and the next pass, for verify=False and the default (5 rounds,
both files opened afresh each round and each query run on both, order alternating; medians of
the per-pass totals, 1 thread); and the crc32 of every word (what the lazy check costs once
the whole file has been read) against ``idx.verify()``.

    python benchmarks/bench_index.py --integrity --sizes 10000 100000

``--search`` measures the search against the memory floor of the posting lists it reads
(issue 18), for each D of ``--dims`` and each N: per query, the entries of its 500 words'
posting lists, the floor (one thread reading every byte of those lists once, summed as uint16
and uint64 words: ``touched_read``), the search (``Index.search``, top 100, file mapped and in
the page cache) with 1 thread and with ``--threads`` threads; ``--rounds`` rounds over the
queries, interleaved, the fastest of each per query, then the median over the queries. The
floor and the 1-thread search are timed by the calling thread's CPU time (on a shared machine
the wall clock also counts the time the scheduler gives other jobs) and by the wall clock; the
threads by the wall clock and the CPU time of the process (all threads). It prints ns per
touched entry, the ratio to the floor, the growth from N / 10 to N (time and entries), the
speed-up of the threads, and whether both thread counts gave the same hits. D = 64 and 128;
``--widen N`` makes the D > 64 files of N images and more from the D = 64 file of the same N
(same images and words, new random codes) instead of building them again.

    python benchmarks/bench_index.py --search --sizes 10000 100000 1000000 --dims 64 128 --widen 1000000 --keep --reuse
"""

from __future__ import annotations

import argparse
import gc
import os

# OpenMP workers that spin-wait (libgomp's default) compete with every other job on a shared
# or small machine: on this 2-core sandbox an empty parallel region then took ~36 ms instead of
# ~0.03 ms. Must be set before numba starts its OpenMP pool; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import pickle
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numba
import numpy as np
from numba import njit

import d2r

K = 65536
DIM = 128
NBYTES = DIM // 8


@njit(cache=True)
def _draw_words(cdf, perm, counts, seed):
    """Distinct words per image: inverse-CDF draws from the Zipf-like law, duplicates redrawn.
    Returns (words uint32 [sum counts], each image's run ascending)."""
    np.random.seed(seed)
    total = counts.sum()
    out = np.empty(total, dtype=np.uint32)
    seen = np.zeros(cdf.shape[0], dtype=np.int64)
    pos = 0
    for i in range(counts.shape[0]):
        n = counts[i]
        j = 0
        while j < n:
            r = np.searchsorted(cdf, np.random.random(), side="right")
            if r >= cdf.shape[0]:
                r = cdf.shape[0] - 1
            w = perm[r]
            if seen[w] == i + 1:
                continue
            seen[w] = i + 1
            out[pos + j] = w
            j += 1
        out[pos : pos + n].sort()
        pos += n
    return out


class Synthetic:
    def __init__(self, seed=0, zipf=0.5, words=300, dim=DIM):
        self.words = words
        self.dim = dim
        self.nbytes = dim // 8
        rng = np.random.default_rng(seed)
        p = 1.0 / np.arange(1, K + 1) ** zipf
        p /= p.sum()
        self.imbalance = float(K * np.sum(p * p))
        self.cdf = np.cumsum(p)
        self.perm = rng.permutation(K).astype(np.uint32)
        self.seed = seed

    def images(self, start, n):
        """(counts int64 [n], words uint32 [E], codes uint8 [E, 16]) for images start..start+n."""
        rng = np.random.default_rng([self.seed, start])
        counts = np.clip(np.round(rng.lognormal(np.log(self.words), 0.4, n)), max(self.words // 10, 1), 1500).astype(np.int64)
        words = _draw_words(self.cdf, self.perm, counts, (self.seed * 7919 + start) % (2**31))
        codes = rng.integers(0, 256, (words.shape[0], self.nbytes), dtype=np.uint8)
        return counts, words, codes

    def queries(self, n, n_words=500):
        rng = np.random.default_rng([self.seed, 10**9])
        counts = np.full(n, n_words, dtype=np.int64)
        words = _draw_words(self.cdf, self.perm, counts, self.seed + 12345)
        codes = rng.integers(0, 256, (words.shape[0], self.nbytes), dtype=np.uint8)
        return [d2r.Aggregation("asmk_star", self.dim, words[i * n_words : (i + 1) * n_words],
                                codes=codes[i * n_words : (i + 1) * n_words]) for i in range(n)]


def rss():
    """(VmRSS, RssAnon, RssFile) in MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    return out.get("VmRSS", 0.0), out.get("RssAnon", 0.0), out.get("RssFile", 0.0)


def add_images(idx, data, start, n, chunk=50_000):
    for c0 in range(start, start + n, chunk):
        m = min(chunk, start + n - c0)
        counts, words, codes = data.images(c0, m)
        ends = np.cumsum(counts)
        begins = ends - counts
        for i in range(m):
            a, b = begins[i], ends[i]
            idx.add(f"img{c0 + i:07d}", d2r.Aggregation("asmk_star", data.dim, words[a:b], codes=codes[a:b]))


def index_path(folder: Path, n, words, dim) -> Path:
    return folder / (f"index_{n}_{words}w.d2ri" if dim == DIM else f"index_{n}_{words}w_{dim}d.d2ri")


def widen(src: Path, dst: Path, data, cb, chunk_entries=1 << 22):
    """Write at ``dst`` the index file of ``src`` (a D = 64 file of this benchmark) at D =
    ``data.dim``: the same images, items and words, new uniform random codes (as a build would
    draw them), written by the index's own writer. Much faster than building, for the 1M
    files: returns seconds."""
    from d2r.index import format as fmt
    from d2r.index.postings import IndexParams

    t0 = time.perf_counter()
    f = fmt.read(src, mmap=True)
    b = f.postings
    params = IndexParams(K, data.dim, "asmk_star", f.params.alpha, f.params.tau, f.params.normalize, cb.checksum)
    start = f.directory["image_item_start"]
    n_images, n_items, nb = start.shape[0] - 1, int(start[-1]), b.n_blocks
    word_end = b.offsets[nb :: nb].astype(np.int64)  # entries before the end of each word
    rng = np.random.default_rng([data.seed, data.dim])

    def chunks():
        w0 = 0
        while w0 < K:
            base = int(b.offsets[w0 * nb])
            w1 = min(max(int(np.searchsorted(word_end, base + chunk_entries, side="right")), w0 + 1), K)
            end = int(word_end[w1 - 1])
            counts = np.diff(b.offsets[w0 * nb : w1 * nb + 1].astype(np.int64))
            yield np.array(b.low[base:end]), rng.integers(0, 256, (end - base, data.nbytes), dtype=np.uint8), counts, w0
            w0 = w1

    fmt.write(dst, params, {name: f.directory[name] for name in fmt.DIRECTORY_SECTIONS}, n_images, n_items, f.n_entries, nb,
              chunks())
    f.close()
    return time.perf_counter() - t0


def build_d2r(data, n, folder: Path, cb, round_size, reuse=False):
    """Build an N-image index file: in memory up to round_size images, then incrementally
    (open the file mapped, add the next round, save a new file). Returns (path, seconds);
    with ``reuse`` an existing file of a previous --keep run is taken (seconds = nan)."""
    final = index_path(folder, n, data.words, data.dim)
    if reuse and final.exists():
        return final, float("nan")
    t0 = time.perf_counter()
    path = None
    done = 0
    r = 0
    while done < n:
        m = min(round_size, n - done)
        idx = d2r.Index(cb, kind="asmk_star") if path is None else d2r.Index.open(path, codebook=cb)
        add_images(idx, data, done, m)
        new_path = final.with_name(f"{final.stem}.round{r}.d2ri")
        idx.save(new_path)
        idx.close()
        del idx
        gc.collect()
        if path is not None:
            path.unlink()
        path = new_path
        done += m
        r += 1
    path.rename(final)
    return final, time.perf_counter() - t0


def query_times(idx, queries, threads, top_k=100):
    """Seconds of each query of one pass over the queries."""
    numba.set_num_threads(threads)
    times = []
    for q in queries:
        t = time.perf_counter()
        idx.search(q, top_k=top_k)
        times.append(time.perf_counter() - t)
    return times


def median_p95(times):
    times = sorted(times)
    return 1000 * statistics.median(times), 1000 * times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]


def bench_asmk(data, n, queries, folder):
    try:
        from asmk import inverted_file, kernel
    except ImportError as exc:
        return {"error": f"asmk not importable: {exc}"}
    t0 = time.perf_counter()
    ivf = inverted_file.IVF.initialize_empty(codebook_size=K, use_idf=False)
    for c0 in range(0, n, 50_000):
        m = min(50_000, n - c0)
        counts, words, codes = data.images(c0, m)
        imids = np.repeat(np.arange(c0, c0 + m), counts)
        ivf.add(codes.view(np.uint32), words.astype(np.int64), imids)
    build = time.perf_counter() - t0
    path = folder / f"asmk_{n}.pkl"
    with open(path, "wb") as fh:
        pickle.dump(ivf.state_dict(), fh, protocol=pickle.HIGHEST_PROTOCOL)
    size = path.stat().st_size
    path.unlink()
    kern = kernel.ASMKKernel(None, binary=True)
    sim = partial(kern.similarity, alpha=3.0, similarity_threshold=0.0)
    times = []
    for q in queries:
        t = time.perf_counter()
        ivf.search(q.codes.copy().view(np.uint32), q.words.astype(np.int64), similarity_func=sim, topk=100)
        times.append(time.perf_counter() - t)
    times.sort()
    del ivf
    gc.collect()
    return {"build": build, "size": size, "median": 1000 * statistics.median(times),
            "p95": 1000 * times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]}


def bench_integrity(path, cb, queries, reps=5, opens=9):
    """Costs of the file checks against verify=False, in this process (see the docstring)."""
    numba.set_num_threads(1)
    modes = {"off": False, "default": None, "full": True}
    t_open = {m: [] for m in modes}
    for _ in range(opens):
        for m, v in modes.items():
            if m == "full" and len(t_open["full"]) >= 3:
                continue
            t = time.perf_counter()
            idx = d2r.Index.open(path, mmap=True, codebook=cb, verify=v)
            t_open[m].append(time.perf_counter() - t)
            idx.close()
    # Query passes: both files opened afresh each round, each query run on one then the other
    # (order alternating), so that other jobs on the machine slow both alike.
    lazy = None
    first = {"off": [], "default": []}
    second = {"off": [], "default": []}
    in_checks = []
    for _ in range(reps):
        gc.collect()
        handles = {m: d2r.Index.open(path, mmap=True, codebook=cb, verify=modes[m]) for m in ("off", "default")}
        word_check = handles["default"]._store.word_check  # d2r.index.format.WordCheck, or None
        lazy = word_check is not None
        spent = [0.0]

        def timed(words, check=word_check.check if lazy else None, spent=spent):
            t = time.perf_counter()
            check(words)
            spent[0] += time.perf_counter() - t

        if lazy:
            word_check.check = timed  # time the crc32 checks inside the first pass
        for out in (first, second):
            total = {"off": 0.0, "default": 0.0}
            for i, q in enumerate(queries):
                for m in (("off", "default") if i % 2 == 0 else ("default", "off")):
                    t = time.perf_counter()
                    handles[m].search(q, top_k=100)
                    total[m] += time.perf_counter() - t
            for m in total:
                out[m].append(total[m])
            if out is first:
                in_checks.append(spent[0])
        for h in handles.values():
            h.close()
    idx = d2r.Index.open(path, mmap=True, codebook=cb, verify=False)
    word_check = idx._file.word_check()  # the lazy check, nothing checked yet
    t = time.perf_counter()
    word_check.check(np.arange(K))
    t_crc = time.perf_counter() - t
    t = time.perf_counter()
    idx.verify()
    t_verify = time.perf_counter() - t
    idx.close()
    med = statistics.median
    return {"open": {m: 1000 * med(v) for m, v in t_open.items()}, "lazy": lazy,
            "first": {m: 1000 * med(v) for m, v in first.items()}, "in_checks": 1000 * med(in_checks), "second": {m: 1000 * med(v) for m, v in second.items()},
            "crc_all": t_crc, "verify": t_verify}


def print_integrity(rows, n_queries):
    print(f"| N | file (MiB) | open verify=False (ms) | open default (ms) | default is | open verify=True (ms) | "
          f"first pass of {n_queries} queries, False / default (ms) | ratio | of which crc32 checks (ms) | "
          "next pass, False / default (ms) | ratio | crc32 of every word (s) | idx.verify() (s) |")
    print("|---" * 13 + "|")
    for n, size, r in rows:
        o, f, s2 = r["open"], r["first"], r["second"]
        print(f"| {n:,} | {size / 2**20:.1f} | {o['off']:.1f} | {o['default']:.1f} | {'lazy crc32' if r['lazy'] else 'full sha256'} | "
              f"{o['full']:.0f} | {f['off']:.0f} / {f['default']:.0f} | {f['default'] / f['off']:.2f} | {r['in_checks']:.0f} | "
              f"{s2['off']:.0f} / {s2['default']:.0f} | {s2['default'] / s2['off']:.2f} | {r['crc_all']:.2f} | {r['verify']:.2f} |",
              flush=True)


@njit(cache=True, nogil=True)
def touched_read(qwords, offsets, n_blocks, low, codes):
    """The memory floor of a query: read every byte of the posting lists of ``qwords`` once
    (each word's item numbers and codes are contiguous), summed as uint16 and uint64 words, which
    the compiler vectorises, so that nothing can be skipped. ``codes``: uint64 [E * W] (flat).
    Returns (sum, entries)."""
    t = np.uint64(0)
    n = 0
    w_per = codes.shape[0] // max(low.shape[0], 1)
    for qi in range(qwords.shape[0]):
        w = np.int64(qwords[qi])
        a = np.int64(offsets[w * n_blocks])
        e = np.int64(offsets[(w + 1) * n_blocks])
        s = np.uint64(0)
        for i in range(a, e):
            s += np.uint64(low[i])
        for i in range(a * w_per, e * w_per):
            s += codes[i]
        t += s
        n += e - a
    return t, n


def bench_search(path, cb, queries, rounds, threads=2):
    """Search cost against the memory floor, in this process (see ``--search`` in the docstring).

    For every query: the entries its posting lists hold, and over ``rounds`` rounds (queries
    interleaved; each round: the floor, search with 1 thread, search with ``threads`` threads)
    the fastest of each, by the calling thread's CPU time (1 thread: what the work costs, not
    counting time the scheduler gave to other jobs) and by wall-clock time (both thread counts).
    Returns medians over the queries."""
    idx = d2r.Index.open(path, mmap=True, codebook=cb, verify=False)
    base = idx._store.base
    codes = base.codes.view(np.uint64).reshape(-1)
    entries = np.array([base.run_entries(q.words.astype(np.int64)) for q in queries], dtype=np.float64)
    numba.set_num_threads(1)
    for q in queries:  # first pass: map the posting lists into the process, compile
        idx.search(q, top_k=100)
        touched_read(q.words, base.offsets, base.n_blocks, base.low, codes)
    keys = ("floor_cpu", "floor", "t1_cpu", "t1", "t2", "t2_cpu")
    best = {m: np.full(len(queries), np.inf) for m in keys}
    same = True

    def timed(i, cpu_key, wall_key, f, clock=time.thread_time):
        c, t = clock(), time.perf_counter()
        out = f()
        t, c = time.perf_counter() - t, clock() - c
        best[wall_key][i] = min(best[wall_key][i], t)
        if cpu_key:
            best[cpu_key][i] = min(best[cpu_key][i], c)
        return out

    for _ in range(rounds):
        for i, q in enumerate(queries):
            timed(i, "floor_cpu", "floor", lambda: touched_read(q.words, base.offsets, base.n_blocks, base.low, codes))
            numba.set_num_threads(1)
            h1 = timed(i, "t1_cpu", "t1", lambda: idx.search(q, top_k=100))
            numba.set_num_threads(threads)
            h2 = timed(i, "t2_cpu", "t2", lambda: idx.search(q, top_k=100), time.process_time)  # CPU of all threads
            same &= [(h.image_id, h.score) for h in h1] == [(h.image_id, h.score) for h in h2]
    numba.set_num_threads(1)
    idx.close()
    med = statistics.median
    out = {k + "_ms": 1000 * med(v) for k, v in best.items()}
    out.update(entries=med(entries), ns=med(1e9 * best["t1_cpu"] / entries), floor_ns=med(1e9 * best["floor_cpu"] / entries),
               ratio=med(best["t1_cpu"] / best["floor_cpu"]), ratio_wall=med(best["t1"] / best["floor"]),
               speedup=med(best["t1"] / best["t2"]), cpu2=med(best["t2_cpu"] / best["t1_cpu"]), same=same)
    return out


def print_search(rows, threads):
    print("| D | N | entries per query | floor, CPU ms | search 1 thread, CPU ms | ns per touched entry (floor) | ratio to the floor, "
          f"CPU (wall) | growth from N / 10: time (entries) | 1 thread / {threads} threads, wall ms | speed-up | "
          f"CPU of {threads} threads / 1 thread | same hits, 1 / {threads} threads |")
    print("|---" * 12 + "|")
    by = {(r["D"], r["N"]): r for r in rows}
    for r in rows:
        prev = by.get((r["D"], r["N"] // 10))
        growth = f"{r['t1_cpu_ms'] / prev['t1_cpu_ms']:.1f}x ({r['entries'] / prev['entries']:.1f}x)" if prev else "-"
        print(f"| {r['D']} | {r['N']:,} | {r['entries']:,.0f} | {r['floor_cpu_ms']:.2f} | {r['t1_cpu_ms']:.2f} | "
              f"{r['ns']:.2f} ({r['floor_ns']:.2f}) | {r['ratio']:.2f} ({r['ratio_wall']:.2f}) | {growth} | "
              f"{r['t1_ms']:.2f} / {r['t2_ms']:.2f} | {r['speedup']:.2f}x | {r['cpu2']:.2f} | {'yes' if r['same'] else 'NO'} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--asmk-max", type=int, default=100_000, help="largest N for the asmk comparison (0: none)")
    ap.add_argument("--round", type=int, default=200_000, help="images added per incremental build round")
    ap.add_argument("--folder", default="/tmp/d2r_bench_index")
    ap.add_argument("--keep", action="store_true", help="keep the index files")
    ap.add_argument("--reuse", action="store_true", help="time index files kept by an earlier --keep run instead of building")
    ap.add_argument("--integrity", action="store_true", help="measure the cost of the file checks instead (see the docstring)")
    ap.add_argument("--search", action="store_true",
                    help="measure search against the memory floor of its posting lists, 1 and --threads threads, instead")
    ap.add_argument("--dims", type=int, nargs="+", default=[DIM], help="descriptor dimensions D (--search; 64 or 128)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the parallel search (--search)")
    ap.add_argument("--widen", type=int, default=0,
                    help="--search: make the files of N >= this at D > 64 from the D = 64 file of the same N (same images "
                         "and words, new random codes) instead of building them (0: build every file)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over the queries (--search; the fastest round counts)")
    ap.add_argument("--words", type=int, default=300,
                    help="median words per image (default 300; fewer make a file with as many images, and as large a "
                         "directory, at a fraction of the build time)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    all_threads = numba.config.NUMBA_NUM_THREADS
    data = Synthetic(words=args.words)
    cb = d2r.Codebook(np.random.default_rng(1).standard_normal((K, DIM)).astype(np.float32))
    queries = data.queries(args.queries)
    print(f"# d2r {d2r.__version__}, numba {numba.__version__} ({numba.config.THREADING_LAYER} threading layer, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), numpy {np.__version__}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores; K={K} D={args.dims if args.search else DIM}, median {data.words} words per image, "
          f"Zipf 0.5 (imbalance {data.imbalance:.2f}), "
          f"{args.queries} queries of 500 words, top 100", flush=True)
    rows = []
    if args.search:
        for dim in args.dims:
            data = Synthetic(words=args.words, dim=dim)
            cb = d2r.Codebook(np.random.default_rng(1).standard_normal((K, dim)).astype(np.float32))
            queries = data.queries(args.queries)
            for n in args.sizes:
                if args.widen and n >= args.widen and dim > 64:
                    path = index_path(folder, n, data.words, dim)
                    if not (args.reuse and path.exists()):
                        cb64 = d2r.Codebook(np.random.default_rng(1).standard_normal((K, 64)).astype(np.float32))
                        src, _ = build_d2r(Synthetic(words=args.words, dim=64), n, folder, cb64, args.round, args.reuse)
                        print(f"# N={n} D={dim}: widened from {src.name} in {widen(src, path, data, cb):.0f} s", flush=True)
                else:
                    path, build = build_d2r(data, n, folder, cb, args.round, args.reuse)
                gc.collect()
                r = bench_search(path, cb, queries, args.rounds, args.threads)
                r.update(N=n, D=dim)
                rows.append(r)
                print_search(rows[-1:], args.threads)
                if not args.keep:
                    path.unlink()
                print(f"# load average {os.getloadavg()}", flush=True)
        print()
        print_search(rows, args.threads)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        return
    if args.integrity:
        for n in args.sizes:
            path, build = build_d2r(data, n, folder, cb, args.round, args.reuse)
            print(f"N={n}: built in {build:.1f} s", flush=True)
            rows.append((n, path.stat().st_size, bench_integrity(path, cb, queries)))
            print_integrity(rows[-1:], args.queries)
            if not args.keep:
                path.unlink()
        print()
        print_integrity(rows, args.queries)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        return
    for n in args.sizes:
        path, build = build_d2r(data, n, folder, cb, args.round, args.reuse)
        size = path.stat().st_size
        gc.collect()
        r0 = rss()
        t = time.perf_counter()
        idx = d2r.Index.open(path, mmap=True, codebook=cb, verify=False)
        t_open = time.perf_counter() - t
        r1 = rss()
        t = time.perf_counter()
        idx.verify()
        t_verify = time.perf_counter() - t
        idx.close()  # drop the mapping the full check touched, so RSS below is the queries'
        del idx
        gc.collect()
        idx = d2r.Index.open(path, mmap=True, codebook=cb, verify=False)
        entries = idx.n_entries
        # Load the cached kernels with a one-word query on the least popular word.
        rare = int(data.perm[-1])
        idx.search(d2r.Aggregation("asmk_star", DIM, np.array([rare], np.uint32), codes=np.zeros((1, NBYTES), np.uint8)))
        # First pass: the posting lists are in the page cache but not yet mapped into this
        # process (page faults); then 3 warm passes with 1 thread interleaved with 3 with all
        # threads (interleaved so that other jobs on the machine hit both alike).
        cold = median_p95(query_times(idx, queries, 1))
        single, multi = [], []
        for _ in range(3):
            single += query_times(idx, queries, 1)
            multi += query_times(idx, queries, all_threads)
        single, multi = median_p95(single), median_p95(multi)
        r2 = rss()
        row = {"N": n, "entries": entries, "build": build, "size": size, "bpe": size / entries, "open": t_open, "verify": t_verify,
               "q0": cold, "q1": single, "qall": multi, "rss": (r0, r1, r2)}
        idx.close()
        del idx
        gc.collect()
        if not args.keep:
            path.unlink()
        if args.asmk_max and n <= args.asmk_max:
            row["asmk"] = bench_asmk(data, n, queries, folder)
        rows.append(row)
        print_row(row, all_threads)
    print()
    print_table(rows, all_threads)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


def print_row(r, threads):
    print(f"N={r['N']}: {r['entries']} entries, build {r['build']:.1f} s, {r['size'] / 2**20:.1f} MiB "
          f"({r['bpe']:.2f} B/entry), open {1000 * r['open']:.1f} ms, verify {r['verify']:.2f} s, first query pass {r['q0'][0]:.2f}/{r['q0'][1]:.2f} ms, "
          f"query 1 thread {r['q1'][0]:.2f}/{r['q1'][1]:.2f} ms, "
          f"{threads} threads {r['qall'][0]:.2f}/{r['qall'][1]:.2f} ms, RSS {r['rss']}; asmk {r.get('asmk')}", flush=True)


def print_table(rows, threads):
    print("| N | entries | d2r build (s) | d2r file (MiB) | bytes/entry | open (ms) | full verify (s) | first pass, 1 thread med / p95 (ms) | "
          "query 1 thread med / p95 (ms) | "
          f"query {threads} threads med / p95 (ms) | RSS MiB before open / after open / after queries (anon + file) | "
          "asmk build (s) | asmk pickle (MiB) | asmk query med / p95 (ms) | speed-up (1 thread) | size ratio |")
    print("|---" * 16 + "|")
    for r in rows:
        rs = " / ".join(f"{v[1]:.0f} + {v[2]:.0f}" for v in r["rss"])
        a = r.get("asmk")
        if a and "error" not in a:
            asmk = (f"{a['build']:.1f} | {a['size'] / 2**20:.1f} | {a['median']:.1f} / {a['p95']:.1f} | "
                    f"{a['median'] / r['q1'][0]:.1f}x | {r['size'] / a['size']:.2f} |")
        else:
            asmk = f"{(a or {}).get('error', 'not run')} | | | | |"
        print(f"| {r['N']:,} | {r['entries']:,} | {r['build']:.1f} | {r['size'] / 2**20:.1f} | {r['bpe']:.2f} | "
              f"{1000 * r['open']:.1f} | {r['verify']:.2f} | {r['q0'][0]:.2f} / {r['q0'][1]:.2f} | {r['q1'][0]:.2f} / {r['q1'][1]:.2f} | "
              f"{r['qall'][0]:.2f} / {r['qall'][1]:.2f} | "
              f"{rs} | {asmk}")


if __name__ == "__main__":
    main()
