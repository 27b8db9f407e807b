"""Index files: round trips, incremental updates after open, corruption, and a fuzz test."""

import hashlib
import os
import struct

import numpy as np
import pytest

import d2r
from d2r.index import format as index_mod

from test_index import check, make_codebook, oracle, random_agg

K, DIM = 32, 16


def small_index(seed=0, n=25, regions=True):
    rng = np.random.default_rng(seed)
    cb = make_codebook(K, DIM)
    idx = d2r.Index(cb, kind="rasmk_star", alpha=3.0, tau=0.0)
    db = []
    for i in range(n):
        aggs = [random_agg(rng, K, DIM, int(rng.integers(0, 12))) for _ in range(int(rng.integers(1, 3)) if regions else 1)]
        idx.add_regions(f"im{i}", aggs, metadata={"i": i, "name": f"n{i}"})
        db.append([f"im{i}", aggs, True])
    return cb, idx, db, rng


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, mmap):
    cb, idx, db, rng = small_index()
    idx.remove("im3")
    db[3][2] = False
    path = tmp_path / "a.d2ri"
    idx.save(path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left
    opened = d2r.Index.open(path, mmap=mmap, codebook=cb)
    assert (opened.kind, opened.dim, opened.codebook_size, opened.alpha, opened.tau) == ("rasmk_star", DIM, K, 3.0, 0.0)
    assert opened.codebook_checksum == cb.checksum
    assert len(opened) == len(idx) == 24 and "im3" not in opened and "im4" in opened
    assert opened.image_ids() == idx.image_ids()
    assert opened.get_metadata("im7") == {"i": 7, "name": "n7"}
    check(opened, db, rng, K, DIM, "rasmk_star", n_queries=3)
    # Incremental: add and remove on the opened (mapped) index, then save again and reopen.
    for i in range(25, 32):
        aggs = [random_agg(rng, K, DIM, int(rng.integers(0, 12)))]
        opened.add_regions(f"im{i}", aggs)
        db.append([f"im{i}", aggs, True])
    opened.remove("im0")
    opened.remove("im27")
    db[0][2] = db[27][2] = False
    check(opened, db, rng, K, DIM, "rasmk_star", n_queries=3)
    opened.save(path)  # over the file it is mapped from
    check(opened, db, rng, K, DIM, "rasmk_star", n_queries=1)
    again = d2r.Index.open(path, verify=True)
    assert len(again) == 29 and again.n_items == opened.n_items
    check(again, db, rng, K, DIM, "rasmk_star", n_queries=3)
    # A compacting save drops tombstoned images.
    again.save(tmp_path / "c.d2ri", compact=True)
    compacted = d2r.Index.open(tmp_path / "c.d2ri")
    assert len(compacted) == 29 and len(compacted.image_ids()) == 29
    assert compacted.n_items < again.n_items
    check(compacted, [r for r in db if r[2]], rng, K, DIM, "rasmk_star", n_queries=3)
    # compact() in place on a mapped index.
    again.compact()
    check(again, [r for r in db if r[2]], rng, K, DIM, "rasmk_star", n_queries=2)
    assert again.path is None


def test_float_kind_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    cb = make_codebook(16, 4)
    idx = d2r.Index(cb, kind="asmk", alpha=3.0, tau=0.0, normalize=True)
    db = []
    for i in range(20):
        a = random_agg(rng, 16, 4, int(rng.integers(0, 8)), "asmk")
        idx.add(f"f{i}", a)
        db.append([f"f{i}", [a], True])
    idx.save(tmp_path / "f.d2ri")
    opened = d2r.Index.open(tmp_path / "f.d2ri")
    check(opened, db, rng, 16, 4, "asmk", n_queries=3)
    q = random_agg(rng, 16, 4, 5, "asmk")
    assert [(h.image_id, h.score) for h in opened.search(q, top_k=5)] == oracle(db, q, 3.0, 0.0, True, "max")[:5]


def test_empty_index_round_trip(tmp_path):
    cb = make_codebook(K, DIM)
    d2r.Index(cb).save(tmp_path / "e.d2ri")
    e = d2r.Index.open(tmp_path / "e.d2ri")
    assert len(e) == 0 and e.search(random_agg(np.random.default_rng(0), K, DIM, 3)) == []


def test_codebook_mismatch_and_wrong_dim(tmp_path):
    cb, idx, _, rng = small_index()
    path = tmp_path / "a.d2ri"
    idx.save(path)
    with pytest.raises(d2r.IndexFormatError, match="another codebook") as e:
        d2r.Index.open(path, codebook=make_codebook(K, DIM, seed=1))
    assert str(path) in str(e.value)
    with pytest.raises(d2r.IndexFormatError, match="D = 16"):
        d2r.Index.open(path, codebook=make_codebook(K, 8))
    opened = d2r.Index.open(path)
    q8 = random_agg(rng, K, 8, 3)
    with pytest.raises(d2r.IndexFormatError, match=str(path).replace("\\", "\\\\")):
        opened.search(q8)


def resign(data: bytearray) -> bytearray:
    """Recompute every checksum of an index file (so that structural checks get exercised)."""
    h = index_mod._HEADER
    fields = h.unpack_from(data)
    header_size, n_sections = fields[2], fields[-1]
    if n_sections != len(index_mod._SECTIONS) or header_size > len(data) - 32:
        return data
    for i in range(n_sections):
        pos = h.size + i * index_mod._SECTION.size
        off, length, _ = index_mod._SECTION.unpack_from(data, pos)
        if off + length <= len(data):
            index_mod._SECTION.pack_into(data, pos, off, length, hashlib.sha256(data[off : off + length]).digest())
    data[-32:] = hashlib.sha256(data[:header_size]).digest()
    return data


def try_open_and_search(path, queries, verify):
    """Open and search; only IndexFormatError may come out. Returns True if it raised."""
    try:
        idx = d2r.Index.open(path, verify=verify)
        for q in queries:
            idx.search(q, top_k=5)
            idx.search(q, top_k=5, pooling="avg", normalize=True)
        len(idx)
        assert isinstance("im1" in idx, bool)
        idx.image_ids()
        if verify is False:
            idx.save(str(path) + ".out")  # merging an unverified file: checked too
            idx.verify()
    except d2r.IndexFormatError as exc:
        assert str(path) in str(exc)
        return True
    return False


def test_specific_corruptions(tmp_path):
    _, idx, _, rng = small_index()
    good = tmp_path / "good.d2ri"
    idx.save(good)
    data = bytearray(good.read_bytes())
    bad = tmp_path / "bad.d2ri"
    q = [random_agg(rng, K, DIM, 6)]

    def expect(blob, match, verify=None):
        bad.write_bytes(bytes(blob))
        with pytest.raises(d2r.IndexFormatError, match=match) as e:
            d2r.Index.open(bad, verify=verify)
        assert str(bad) in str(e.value)

    expect(b"NOTINDEX" + data[8:], "bad magic")
    newer = bytearray(data)
    struct.pack_into("<I", newer, 8, index_mod.VERSION + 1)
    expect(resign(newer), "newer")
    expect(data[:10], "too short")
    expect(data[:-1], "checksum|truncated|out of place")
    expect(data[: len(data) // 2], "checksum|truncated|out of place")
    expect(data + b"\0" * 64, "checksum|bytes")
    sections = {n: index_mod._SECTION.unpack_from(data, index_mod._HEADER.size + i * index_mod._SECTION.size)
                for i, n in enumerate(index_mod._SECTIONS)}
    flipped = bytearray(data)
    flipped[sections["ivf_codes"][0] + 3] ^= 0x10
    expect(flipped, "ivf_codes", verify=True)
    expect(flipped, "ivf_codes", verify=None)  # small file: full check by default
    bad.write_bytes(bytes(flipped))
    idx_unverified = d2r.Index.open(bad, verify=False)  # opens; verify() finds it
    with pytest.raises(d2r.IndexFormatError, match="ivf_codes"):
        idx_unverified.verify()
    flipped = bytearray(data)
    flipped[sections["ids"][0]] ^= 0x01
    expect(flipped, "ids", verify=False)  # directory sections are always checked
    # A re-signed file with an out-of-range item number: caught by search or verify(), no crash.
    forged = bytearray(data)
    off, length, _ = sections["ivf_items"]
    forged[off : off + 2] = struct.pack("<H", 60000)
    bad.write_bytes(bytes(resign(forged)))
    forged_idx = d2r.Index.open(bad, verify=False)
    with pytest.raises(d2r.IndexFormatError, match="beyond"):
        for word in range(K):
            forged_idx.search(d2r.Aggregation("asmk_star", DIM, np.array([word], np.uint32), codes=np.zeros((1, 2), np.uint8)))
    with pytest.raises(d2r.IndexFormatError, match="beyond"):
        forged_idx.verify()
    assert try_open_and_search(bad, q, verify=None)
    with pytest.raises(d2r.IndexFormatError, match="cannot read"):
        d2r.Index.open(tmp_path / "missing.d2ri")


@pytest.mark.slow
def test_fuzz_mutated_and_truncated_files(tmp_path):
    """Thousands of damaged files: every one raises IndexFormatError or still works; never a
    crash or another exception. Re-signed mutations get past the checksums and exercise the
    structural checks (bounds of every offset) and the kernels' range checks."""
    _, idx, _, rng = small_index(seed=4, n=12)
    idx.remove("im2")
    idx.add("extra", random_agg(rng, K, DIM, 4))
    good = tmp_path / "good.d2ri"
    idx.save(good)
    data = bytes(good.read_bytes())
    path = tmp_path / "fuzz.d2ri"
    queries = [random_agg(rng, K, DIM, n) for n in (0, 3, K)]
    header_end = index_mod._HEADER.size + index_mod._SECTION.size * len(index_mod._SECTIONS)
    raised = {"plain": 0, "resigned": 0}
    n_cases = 0
    for trial in range(3000):
        blob = bytearray(data)
        mode = trial % 4
        if mode == 0:  # truncation
            blob = blob[: int(rng.integers(0, len(blob)))]
        elif mode == 1:  # a few random byte changes anywhere
            for _ in range(int(rng.integers(1, 4))):
                p = int(rng.integers(0, len(blob)))
                blob[p] = (blob[p] + int(rng.integers(1, 256))) % 256
        else:  # targeted: header fields or section data, then checksums recomputed
            if mode == 2:
                p = int(rng.integers(8, header_end))
            else:
                p = int(rng.integers(header_end, len(blob) - 32))
            blob[p] = (blob[p] + int(rng.integers(1, 256))) % 256
            if rng.random() < 0.5:  # sometimes a large value in an 8-byte field
                q = p - p % 8
                blob[q : q + 8] = struct.pack("<Q", int(rng.integers(0, 2**63)))
            blob = resign(blob)
        if bytes(blob) == data:
            continue
        path.write_bytes(bytes(blob))
        n_cases += 1
        kind = "plain" if mode < 2 else "resigned"
        # Plain damage never goes unnoticed with the full check.
        if kind == "plain":
            assert try_open_and_search(path, queries, verify=True), f"trial {trial}: damage not detected"
            raised[kind] += 1
        else:
            raised[kind] += try_open_and_search(path, queries, verify=False)
    assert n_cases > 2500
    assert raised["plain"] > 1000 and raised["resigned"] > 100


def test_readd_removed_id_across_save(tmp_path):
    cb = make_codebook(8, 8)
    a = d2r.Aggregation("asmk_star", 8, np.array([1, 3], np.uint32), codes=np.array([[7], [9]], np.uint8))
    idx = d2r.Index(cb, kind="asmk_star")
    for name in "cabd":
        idx.add(name, a, metadata={"n": name})
    idx.remove("a")
    idx.add("a", a, metadata={"n": "a2"})
    idx.save(tmp_path / "r.d2ri")
    j = d2r.Index.open(tmp_path / "r.d2ri")
    assert [(h.image_id, h.metadata["n"]) for h in j.search(a)] == [("c", "c"), ("b", "b"), ("d", "d"), ("a", "a2")]
    assert len(j) == 4 and j.n_items == 5
    j.remove("a")
    j.add("a", a, metadata={"n": "a3"})
    j.compact()
    assert [(h.image_id, h.metadata["n"]) for h in j.search(a)] == [("c", "c"), ("b", "b"), ("d", "d"), ("a", "a3")]
    assert len(j) == 4 and j.n_items == 4
