"""A reference reader of the d2r index file (``.d2ri``, format versions 1 and 2), numpy only.

Written from ``docs/index-format.md`` alone (it does not import d2r), to be ported to Kotlin,
Swift or C++ by an app that ships a bundle's ``index.d2ri``. It opens the file, checks its
hashes, and scores a query exactly as ``d2r.Index.search`` does::

    idx = IndexReader("museum.d2r/index.d2ri")
    idx.search(query_words, query_codes, top_k=5)   # [(image_id, score, metadata), ...]

The query (ascending uint32 visual words and their packed uint8 binary codes) is the ASMK*
aggregation of the photo's local features with the bundle's codebook: on the phone, run the
feature model (TFLite), assign each descriptor to its nearest codeword, and per word take the
sign bits of the sum of the residuals (see README.md here).

    python examples/mobile/reader.py museum.d2r/index.d2ri       # prints the header and images
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys

import numpy as np

MAGIC = b"D2RINDEX"
VERSION = 2  # version 2 appends section 10, a crc32 per visual word (this reader checks the sha256s)
HEADER = struct.Struct("<8sIIIIII dd 32s QQQQ II")  # 120 bytes
SECTION = struct.Struct("<QQ32s")  # offset, length, sha256
SECTIONS = ("image_item_start", "item_words", "tombstones", "id_offsets", "ids", "metadata_offsets", "metadata",
            "ivf_offsets", "ivf_items", "ivf_codes", "ivf_word_crc32")
SECTIONS_OF_VERSION = {1: SECTIONS[:10], 2: SECTIONS}
KINDS = {0: "asmk", 1: "asmk_star", 2: "rasmk", 3: "rasmk_star"}
BLOCK = 65536  # items per block of the inverted file: entries store the item number modulo 2^16
# Bits set in each byte value: the Hamming distance of two packed codes is the sum over bytes.
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


class FormatError(ValueError):
    """The file is not a d2r index of a version this reader knows, or it is damaged."""


class IndexReader:
    """A d2r index file, read into memory (an app would memory-map it the same way)."""

    def __init__(self, path, verify: bool = True):
        self.path = str(path)
        with open(path, "rb") as fh:
            self.data = fh.read()
        d = self.data
        if len(d) < HEADER.size + 32:
            raise FormatError(f"{self.path}: too short for a d2r index ({len(d)} bytes)")
        (magic, version, header_size, self.K, self.D, kind, flags, self.alpha, self.tau, self.codebook_sha256,
         self.n_images, self.n_items, self.n_entries, self.n_blocks, self.payload, n_sections) = HEADER.unpack_from(d, 0)
        if magic != MAGIC:
            raise FormatError(f"{self.path}: not a d2r index (magic {magic!r})")
        if version > VERSION:
            raise FormatError(f"{self.path}: format version {version} is newer than this reader ({VERSION})")
        if version not in SECTIONS_OF_VERSION:
            raise FormatError(f"{self.path}: invalid format version {version}")
        names = SECTIONS_OF_VERSION[version]
        if n_sections != len(names) or header_size != HEADER.size + SECTION.size * n_sections or kind not in KINDS:
            raise FormatError(f"{self.path}: unexpected header (sections {n_sections}, header size {header_size}, kind {kind})")
        self.kind = KINDS[kind]
        self.binary = self.kind.endswith("_star")
        self.normalize = bool(flags & 1)
        # Trailer: sha256 of the header and section table; the table holds each section's sha256.
        if hashlib.sha256(d[:header_size]).digest() != d[-32:]:
            raise FormatError(f"{self.path}: header checksum mismatch (damaged or cut file)")
        self.sections = {}
        pos = header_size
        for i, name in enumerate(names):
            off, length, sha = SECTION.unpack_from(d, HEADER.size + SECTION.size * i)
            if off % 64 or off < pos or off + length > len(d) - 32:
                raise FormatError(f"{self.path}: section {name} lies outside the file")
            # The alignment padding before each section (covered by no hash) must be zero.
            if verify and (d[pos:off].count(0) != off - pos or hashlib.sha256(d[off : off + length]).digest() != sha):
                raise FormatError(f"{self.path}: section {name} checksum mismatch (damaged file)")
            self.sections[name] = (off, length)
            pos = off + length
        if verify and d[pos : len(d) - 32].count(0) != len(d) - 32 - pos:
            raise FormatError(f"{self.path}: non-zero bytes after the last section (damaged file)")
        m, b = self.n_images, self.n_blocks
        self.item_start = self._array("image_item_start", "<u8", m + 1).astype(np.int64)
        self.item_words = self._array("item_words", "<u4", self.n_items).astype(np.int64)
        self.dead = np.unpackbits(self._array("tombstones", "u1", (m + 7) // 8), bitorder="little")[:m].astype(bool)
        self._id_off = self._array("id_offsets", "<u8", m + 1)
        self._meta_off = self._array("metadata_offsets", "<u8", m + 1)
        self.ivf_offsets = self._array("ivf_offsets", "<u8", self.K * b + 1).astype(np.int64)
        self.ivf_items = self._array("ivf_items", "<u2", self.n_entries)
        self.ivf_codes = self._array("ivf_codes", "u1", self.n_entries * self.payload).reshape(self.n_entries, self.payload)
        if self.item_start[-1] != self.n_items or self.ivf_offsets[-1] != self.n_entries or np.any(np.diff(self.ivf_offsets) < 0):
            raise FormatError(f"{self.path}: inconsistent offsets")

    def _array(self, name, dtype, count):
        off, length = self.sections[name]
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=off)
        if arr.nbytes != length:
            raise FormatError(f"{self.path}: section {name} has {length} bytes, expected {arr.nbytes}")
        return arr

    def _text(self, section, offsets, i) -> str:
        off, _ = self.sections[section]
        return self.data[off + int(offsets[i]) : off + int(offsets[i + 1])].decode("utf-8")

    def image_id(self, i: int) -> str:
        return self._text("ids", self._id_off, i)

    def metadata(self, i: int):
        text = self._text("metadata", self._meta_off, i)
        return json.loads(text) if text else None

    def live_images(self) -> list:
        """(image number, image id) of the images not removed, in insertion order."""
        return [(i, self.image_id(i)) for i in range(self.n_images) if not self.dead[i]]

    # -- search -----------------------------------------------------------------------------------
    def selectivity(self, s: float) -> float:
        """sigma(s) = sign(s) |s|^alpha if s > tau, else 0."""
        if s > self.tau:
            return s ** self.alpha if s >= 0.0 else -((-s) ** self.alpha)
        return 0.0

    def item_scores(self, words, codes) -> np.ndarray:
        """float64 [n_items]: the score of every item (image or region) for the query.

        words: uint32 [q] ascending visual words of the query; codes: its per-word codes,
        uint8 [q, D/8] packed sign bits (binary kinds) or float32 [q, D] unit residuals.
        """
        words = np.asarray(words, dtype=np.int64)
        scores = np.zeros(self.n_items)
        if self.binary:
            codes = np.asarray(codes, dtype=np.uint8).reshape(len(words), self.payload)
            # What a word adds for Hamming distance h: sigma(1 - 2h / D), one table for all.
            table = np.array([self.selectivity(1.0 - 2.0 * h / self.D) for h in range(self.D + 1)])
        else:
            codes = np.asarray(codes, dtype=np.float32).reshape(len(words), self.D)
            vecs = self.ivf_codes.view("<f4").reshape(self.n_entries, self.D)
        b = self.n_blocks
        for q, w in enumerate(words):
            if w >= self.K:
                raise FormatError(f"query word {w} is not in the codebook (K = {self.K})")
            for blk in range(b):  # the entries of word w: one run per block, items ascending
                lo, hi = self.ivf_offsets[w * b + blk], self.ivf_offsets[w * b + blk + 1]
                if hi == lo:
                    continue
                items = blk * BLOCK + self.ivf_items[lo:hi].astype(np.int64)
                if self.binary:
                    ham = POPCOUNT[np.bitwise_xor(self.ivf_codes[lo:hi], codes[q])].sum(axis=1)
                    scores[items] += table[ham]
                else:
                    dots = vecs[lo:hi].astype(np.float64) @ codes[q].astype(np.float64)
                    scores[items] += [self.selectivity(float(s)) for s in dots]
        return scores

    def search(self, words, codes, top_k: int = 10, normalize: bool | None = None, pooling: str = "max") -> list:
        """The ``top_k`` best live images as (image_id, score, metadata), best first.

        An item with no visual word (or an empty query) scores -1; ``normalize`` (default: the
        file's flag) divides by sqrt(query words x item words). An image scores the max
        (``pooling="max"``) or the mean (``"avg"``) of its items; ties: the image added first.
        """
        scores = self.item_scores(words, codes)
        nq = len(words)
        normalize = self.normalize if normalize is None else normalize
        for i in range(self.n_items):
            n = self.item_words[i]
            if n == 0 or nq == 0:
                scores[i] = -1.0
            elif normalize:
                scores[i] /= np.sqrt(float(nq) * float(n))
        ranked = []
        for img in range(self.n_images):
            a, b = self.item_start[img], self.item_start[img + 1]
            if self.dead[img] or b <= a:
                continue
            if pooling == "avg":
                acc = 0.0
                for t in range(a, b):  # in item order, as the reference sums
                    acc += scores[t]
                s = acc / (b - a)
            else:
                s = float(scores[a:b].max())
            ranked.append((-s, img))
        ranked.sort()
        return [(self.image_id(i), -neg, self.metadata(i)) for neg, i in ranked[:top_k]]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python reader.py INDEX.d2ri", file=sys.stderr)
        return 2
    try:
        idx = IndexReader(argv[0])
    except (OSError, FormatError) as exc:
        print(f"reader: error: {exc}", file=sys.stderr)
        return 1
    print(f"{idx.path}: kind {idx.kind}, K = {idx.K}, D = {idx.D}, alpha {idx.alpha}, tau {idx.tau}, "
          f"{idx.n_images} images ({int(idx.dead.sum())} removed), {idx.n_items} items, {idx.n_entries} entries")
    for i, image_id in idx.live_images():
        print(f"  {image_id}  items {idx.item_start[i + 1] - idx.item_start[i]}  {json.dumps(idx.metadata(i), ensure_ascii=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
