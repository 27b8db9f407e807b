"""The index file (``.d2ri``, docs/index-format.md): header, sections, checksums, writer and reader.

A file holds one *base* segment: the directory sections (item ranges, per-item word counts,
tombstones, ids, metadata) and the inverted file (offsets, items, codes, and since version 2 a
crc32 per visual word). :func:`write` writes one atomically; :func:`read` maps (or reads) one
and runs the eager checks (header, directory sections, every offset), so that no corruption
can make a search read out of bounds; :meth:`IndexFile.verify` is the full check and
:class:`WordCheck` the lazy one (the crc32 of a visual word's entries when a search first
reads it).

This module knows nothing of search (tests/test_layout.py checks it).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .. import kernels
from .._files import atomic_file, clean_stale
from ..codebook import Codebook
from ..errors import IndexFormatError, InputError
from .postings import BLOCK_SHIFT, IndexParams, Postings, payload_bytes

_KIND_CODES = {"asmk": 0, "asmk_star": 1, "rasmk": 2, "rasmk_star": 3, "naive_rasmk": 4}
_CODE_KINDS = {v: k for k, v in _KIND_CODES.items()}

MAGIC = b"D2RINDEX"
# Version 2 adds section 10, a crc32 per visual word of its inverted-file entries (verified when
# a search first touches the word). Version 1 files (10 sections) are still read.
VERSION = 2
# Section boundaries are aligned so that every array view is aligned for its dtype (and for
# the uint64 view of the codes).
ALIGN = 64
# Index.open(verify=None) checks the full sha256 of files up to this size; larger files get the
# eager checks (header, directory sections, all offsets) and the crc32 of each visual word's
# entries the first time a search (or a save) reads them.
VERIFY_AUTO_MAX_BYTES = 64 * 1024 * 1024

# magic, version, header size, K, D, kind, flags, alpha, tau, codebook sha256, images, items,
# entries, blocks, payload bytes per entry, number of sections.
_HEADER = struct.Struct("<8sIIIIII dd 32s QQQQ II")
_SECTION = struct.Struct("<QQ32s")  # offset, length, sha256
_SECTIONS = (
    "image_item_start",  # uint64 [M + 1]
    "item_words",  # uint32 [n_items]
    "tombstones",  # uint8 [ceil(M / 8)], bit i (LSB first) = image i removed
    "id_offsets",  # uint64 [M + 1]
    "ids",  # utf-8 image ids, concatenated
    "metadata_offsets",  # uint64 [M + 1]
    "metadata",  # utf-8 JSON texts, concatenated ("" = no metadata)
    "ivf_offsets",  # uint64 [K * n_blocks + 1]
    "ivf_items",  # uint16 [E]
    "ivf_codes",  # uint8 [E, payload]
    "ivf_word_crc32",  # uint32 [K]: crc32 of word w's ivf_items bytes followed by its ivf_codes bytes (v2)
)
_SECTIONS_V1 = _SECTIONS[:10]
# The directory sections: what the in-memory builder writes besides the inverted file.
DIRECTORY_SECTIONS = _SECTIONS[:7]
_LAZY_SECTIONS = ("ivf_items", "ivf_codes")  # covered by the per-word crc32 and idx.verify(), not by open
_FLAG_NORMALIZE = 1


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# -- writing --------------------------------------------------------------------------------------
def check_index_target(path) -> None:
    """Refuse to replace what is not a d2r index: ``path`` may be missing, an empty file or an
    index file (magic ``D2RINDEX``). Raises :class:`d2r.IndexFormatError` naming it."""
    path = Path(path)
    if os.path.islink(path):
        raise IndexFormatError(f"{path}: is a symbolic link; d2r does not replace it by an index (save to the file it points to)")
    if not os.path.lexists(path):
        return
    if not path.is_file():
        raise IndexFormatError(f"{path}: exists and is not a file (a folder?); d2r does not replace it by an index")
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError as exc:
        raise IndexFormatError(f"{path}: exists and cannot be read ({exc.strerror or exc}); not replacing it") from exc
    if head and head != MAGIC:
        raise IndexFormatError(f"{path}: exists and is not a d2r index; d2r does not overwrite it "
                               "(remove it or choose another name)")


def _word_crcs(low: memoryview, codes: memoryview, per_word: np.ndarray, payload: int, out: np.ndarray) -> None:
    """out[j] = crc32 of word j's item bytes (uint16 each) followed by its code bytes, for the
    consecutive words of one chunk with ``per_word`` entries each."""
    ends = np.cumsum(per_word).tolist()
    a = 0
    for j, e in enumerate(ends):
        if e > a:
            out[j] = zlib.crc32(codes[a * payload : e * payload], zlib.crc32(low[2 * a : 2 * e]))
        a = e


def write(path: Path, params: IndexParams, directory: dict, n_images: int, n_items: int, n_entries: int, n_blocks: int,
          chunks: Iterable) -> None:
    """Write an index file to ``path`` atomically (temporary file in the same folder, fsync, rename).

    directory: the arrays of :data:`DIRECTORY_SECTIONS`; chunks: the inverted file by runs of
    consecutive visual words, ``(low uint16 [e], codes uint8 [e, P], counts int64
    [(w1 - w0) * n_blocks], w0)``, in word order (``n_entries`` entries in all). The caller
    checks ``path`` first (:func:`check_index_target`); an exception raised by ``chunks``
    leaves no file behind.
    """
    k, payload = params.k, params.payload
    lengths = {name: directory[name].nbytes for name in DIRECTORY_SECTIONS}
    lengths["ivf_offsets"] = 8 * (k * n_blocks + 1)
    lengths["ivf_items"] = 2 * n_entries
    lengths["ivf_codes"] = payload * n_entries
    lengths["ivf_word_crc32"] = 4 * k
    header_size = _HEADER.size + _SECTION.size * len(_SECTIONS)
    pos = _align(header_size)
    offsets = {}
    for name in _SECTIONS:
        offsets[name] = pos
        pos = _align(pos + lengths[name])
    end = pos
    hashes = {}
    with atomic_file(path) as fh:
        fh.truncate(end + 32)
        for name in DIRECTORY_SECTIONS:
            data = np.ascontiguousarray(directory[name]).view(np.uint8)
            fh.seek(offsets[name])
            fh.write(data.data)
            hashes[name] = hashlib.sha256(data.data).digest()
        h_low, h_codes = hashlib.sha256(), hashlib.sha256()
        p_low, p_codes = offsets["ivf_items"], offsets["ivf_codes"]
        counts = []
        word_crc = np.zeros(k, dtype="<u4")
        for low, codes, c, w0 in chunks:
            bl = low.astype("<u2").view(np.uint8).data
            bc = np.ascontiguousarray(codes).reshape(-1).data
            if n_blocks:
                _word_crcs(bl, bc, c.reshape(-1, n_blocks).sum(axis=1), payload, word_crc[w0:])
            fh.seek(p_low)
            fh.write(bl)
            fh.seek(p_codes)
            fh.write(bc)
            h_low.update(bl)
            h_codes.update(bc)
            p_low += len(bl)
            p_codes += len(bc)
            counts.append(c)
        ivf_offsets = np.zeros(k * n_blocks + 1, dtype="<u8")
        if counts:
            np.cumsum(np.concatenate(counts), out=ivf_offsets[1:])
        fh.seek(offsets["ivf_offsets"])
        fh.write(ivf_offsets.data.cast("B"))
        hashes["ivf_offsets"] = hashlib.sha256(ivf_offsets.data.cast("B")).digest()
        hashes["ivf_items"] = h_low.digest()
        hashes["ivf_codes"] = h_codes.digest()
        fh.seek(offsets["ivf_word_crc32"])
        fh.write(word_crc.data.cast("B"))
        hashes["ivf_word_crc32"] = hashlib.sha256(word_crc.data.cast("B")).digest()
        header = _HEADER.pack(MAGIC, VERSION, header_size, k, params.dim, _KIND_CODES[params.kind],
                              _FLAG_NORMALIZE if params.normalize else 0, params.alpha, params.tau,
                              bytes.fromhex(params.checksum), n_images, n_items, n_entries, n_blocks,
                              payload, len(_SECTIONS))
        header += b"".join(_SECTION.pack(offsets[n], lengths[n], hashes[n]) for n in _SECTIONS)
        fh.seek(0)
        fh.write(header)
        fh.seek(end)
        fh.write(hashlib.sha256(header).digest())


# -- reading --------------------------------------------------------------------------------------
class IndexFile:
    """An index file opened by :func:`read`: its parameters, the base segment as views of the
    file (``postings`` and the ``directory`` arrays) and its integrity checks."""

    def __init__(self, path: Path, data: np.ndarray, head: dict):
        self.path = path
        self.data: np.ndarray | None = data
        self.size = int(data.shape[0])
        self.version = head["version"]
        self.params = IndexParams(head["K"], head["D"], head["kind"], head["alpha"], head["tau"], head["normalize"],
                                  head["checksum"])
        self.n_entries = head["n_entries"]
        self.sections = head["section_table"]
        sec = head["sections"]
        self.directory = {
            "image_item_start": sec["image_item_start"].view("<u8"),
            "item_words": sec["item_words"].view("<u4"),
            "tombstones": sec["tombstones"],
            "id_offsets": sec["id_offsets"].view("<u8"),
            "ids": sec["ids"],
            "metadata_offsets": sec["metadata_offsets"].view("<u8"),
            "metadata": sec["metadata"],
        }
        self.postings = Postings(sec["ivf_offsets"].view("<i8"), head["n_blocks"], BLOCK_SHIFT, sec["ivf_items"].view("<u2"),
                                 sec["ivf_codes"].reshape(head["n_entries"], head["payload"]))
        crc = sec.get("ivf_word_crc32")
        self._word_crc = None if crc is None else crc.view("<u4")

    def check_at_open(self, verify: bool | None) -> str:
        """What ``Index.open(verify=...)`` checks beyond the eager checks: ``full``
        (:meth:`verify`), ``lazy`` (:meth:`word_check`) or ``none``."""
        if verify or (verify is None and (self.size <= VERIFY_AUTO_MAX_BYTES or self._word_crc is None)):
            return "full"
        if verify is None and self.n_entries:
            return "lazy"
        return "none"

    def word_check(self) -> WordCheck:
        """A fresh lazy check of the inverted file (nothing checked yet); version 2 files only."""
        if self._word_crc is None:
            raise IndexFormatError(f"{self.path}: a version {self.version} index file has no crc32 per visual word")
        return WordCheck(self.path, self.postings, self.params.payload, self._word_crc)

    def verify(self) -> None:
        """Full check: sha256 of the inverted file, and every entry in range, ascending, and
        counted in its item's word count. Raises :class:`d2r.IndexFormatError`."""
        data = self.data
        if data is None:
            raise InputError(f"{self.path}: the index is closed")
        for name in _LAZY_SECTIONS:
            off, length, digest = self.sections[name]
            h = hashlib.sha256()
            step = 1 << 26
            for a in range(off, off + length, step):
                h.update(data[a : min(a + step, off + length)].data)
            if h.digest() != digest:
                raise IndexFormatError(f"{self.path}: checksum mismatch in section {name} (the file is corrupt)")
        b = self.postings
        n_items = int(self.directory["image_item_start"][-1])
        item_words = self.directory["item_words"].astype(np.int64)
        err = kernels.ivf_check_entries(b.offsets, b.n_blocks, b.shift, b.low, n_items, item_words)
        if err:
            what = {1: "an entry names an item beyond the stored items", 2: "a posting list is not in ascending item order",
                    3: "posting lists disagree with the per-item word counts"}[int(err)]
            raise IndexFormatError(f"{self.path}: inconsistent inverted file: {what}")

    def close(self) -> None:
        self.data = None


class WordCheck:
    """The lazy check of a stored inverted file opened without the full check: the crc32 of
    each visual word's entries (section ivf_word_crc32), checked the first time a search (or a
    save) reads the word. ``ok``: bool [K], the words that passed."""

    def __init__(self, path: Path, postings: Postings, payload: int, crc: np.ndarray):
        self.path, self.postings, self.payload, self.crc = path, postings, payload, crc
        self.ok = np.zeros(crc.shape[0], dtype=np.bool_)

    def check(self, words) -> None:
        """Check the crc32 of the stored entries of every visual word in ``words`` not checked yet.

        Raises :class:`d2r.IndexFormatError` naming the file and the word. Safe from several
        threads at once: a word is marked as checked only after it passed, so at worst two
        threads check the same word."""
        ok = self.ok
        words = np.asarray(words, dtype=np.int64)
        todo = words[~ok[words]]
        if not todo.size:
            return
        b = self.postings
        nb = b.n_blocks
        todo = np.unique(todo)
        if nb:
            starts, ends = b.offsets[todo * nb].tolist(), b.offsets[(todo + 1) * nb].tolist()
        else:
            starts = ends = [0] * todo.size
        expected = self.crc[todo].tolist()
        p, q = b.low.dtype.itemsize, self.payload
        low = np.ascontiguousarray(b.low).view(np.uint8).data
        codes = b.codes.reshape(-1).data
        for w, a, e, crc in zip(todo.tolist(), starts, ends, expected):
            if (zlib.crc32(codes[a * q : e * q], zlib.crc32(low[a * p : e * p])) if e > a else 0) != crc:
                raise IndexFormatError(f"{self.path}: checksum mismatch in the inverted file of visual word {w} "
                                       "(sections ivf_items / ivf_codes: the file is corrupt)")
        ok[todo] = True


def read(path, mmap: bool = True, codebook: Codebook | None = None) -> IndexFile:
    """Open an index file: map it (``mmap``, numpy.memmap: shared between processes, nothing
    copied into RAM) or read it, and run the eager checks. ``codebook``: if given, its K, D and
    checksum must match the file's.

    Raises :class:`d2r.IndexFormatError` naming the file and the problem. Temporary files
    that an interrupted save of ``path`` left behind are removed.
    """
    path = Path(path)
    clean_stale(path)
    if codebook is not None and not isinstance(codebook, Codebook):
        raise InputError(f"codebook: expected a d2r.Codebook, got {type(codebook).__name__}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise IndexFormatError(f"{path}: cannot read index file ({exc.strerror or exc})") from exc
    if size < _HEADER.size + 32:
        raise IndexFormatError(f"{path}: not a d2r index (file too short: {size} bytes)")
    try:
        if mmap:
            data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
        else:
            data = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: cannot read index file ({exc})") from exc
    if data.shape[0] != size:
        raise IndexFormatError(f"{path}: file changed while opening it")
    return IndexFile(path, data, _parse_header(path, data, codebook))


def _parse_header(path, data: np.ndarray, codebook):
    """Eager checks of a mapped index file; returns its header fields and section views."""
    size = data.shape[0]

    def bad(msg):
        return IndexFormatError(f"{path}: {msg}")

    raw = data[: _HEADER.size].tobytes()
    (magic, version, header_size, k, dim, kind_code, flags, alpha, tau, cb_sha, n_images, n_items, n_entries, n_blocks,
     payload, n_sections) = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise bad(f"not a d2r index (bad magic {magic!r})")
    if version > VERSION:
        raise bad(f"index format version {version} is newer than this d2r supports ({VERSION}); upgrade d2r")
    if version < 1:
        raise bad(f"invalid index format version {version}")
    names = _SECTIONS if version >= 2 else _SECTIONS_V1
    if n_sections != len(names) or header_size != _HEADER.size + _SECTION.size * n_sections:
        raise bad(f"invalid header (size {header_size}, {n_sections} sections)")
    if header_size + 32 > size:
        raise bad(f"truncated index file ({size} bytes)")
    header = data[:header_size].tobytes()
    if hashlib.sha256(header).digest() != data[size - 32 :].tobytes():
        raise bad("header checksum mismatch at the end of the file (truncated or corrupt file)")
    if kind_code not in _CODE_KINDS:
        raise bad(f"unknown index kind code {kind_code}")
    kind = _CODE_KINDS[kind_code]
    if not (1 <= k <= 1 << 31 and 1 <= dim <= 1 << 16):
        raise bad(f"invalid codebook size or dimension in header (K = {k}, D = {dim})")
    if payload != payload_bytes(kind, dim):
        raise bad(f"payload of {payload} bytes per entry does not match kind {kind} with D = {dim}")
    if not (math.isfinite(alpha) and math.isfinite(tau)):
        raise bad(f"alpha/tau not finite ({alpha}, {tau})")
    if n_items < n_images or n_blocks != -(-n_items // (1 << BLOCK_SHIFT)) or n_items >= 1 << 32:
        raise bad(f"inconsistent counts (images {n_images}, items {n_items}, blocks {n_blocks})")
    checksum = cb_sha.hex()
    if codebook is not None:
        if codebook.dim != dim:
            raise bad(f"built for descriptors of D = {dim}, the codebook given has D = {codebook.dim}")
        if codebook.size != k or codebook.checksum != checksum:
            raise bad(f"built with another codebook (K = {k}, sha256 {checksum[:12]}...), "
                      f"not the one given (K = {codebook.size}, sha256 {codebook.checksum[:12]}...)")
    expected = {
        "image_item_start": 8 * (n_images + 1),
        "item_words": 4 * n_items,
        "tombstones": (n_images + 7) // 8,
        "id_offsets": 8 * (n_images + 1),
        "metadata_offsets": 8 * (n_images + 1),
        "ivf_offsets": 8 * (k * n_blocks + 1),
        "ivf_items": 2 * n_entries,
        "ivf_codes": payload * n_entries,
        "ivf_word_crc32": 4 * k,
    }
    table = {}
    sections = {}
    pos = _align(header_size)
    gaps = [(header_size, pos)]
    for i, name in enumerate(names):
        off, length, digest = _SECTION.unpack_from(header, _HEADER.size + i * _SECTION.size)
        if off != pos or (name in expected and length != expected[name]) or off + length > size - 32:
            raise bad(f"section {name} at offset {off} with {length} bytes is out of place (truncated or corrupt file)")
        pos = _align(off + length)
        gaps.append((off + length, pos))
        table[name] = (off, length, digest)
        sections[name] = data[off : off + length]
    if pos + 32 != size:
        raise bad(f"file is {size} bytes, its sections say {pos + 32}")
    # Alignment padding is covered by no checksum: it must be zero.
    if any(data[a:b].any() for a, b in gaps):
        raise bad("non-zero bytes in the padding between sections (corrupt file)")
    for name in names:
        if name not in _LAZY_SECTIONS:
            if hashlib.sha256(sections[name].data).digest() != table[name][2]:
                raise bad(f"checksum mismatch in section {name} (the file is corrupt)")
    # Structure: every offset in range and monotone, so that no later access can go out of bounds.
    start = sections["image_item_start"].view("<u8")
    if start[0] != 0 or start[-1] != n_items or np.any(np.diff(start.astype(np.int64)) < 1 if n_images else False):
        raise bad("image item ranges are inconsistent (every image needs at least one item)")
    words = sections["item_words"].view("<u4")
    if n_items and (int(words.max()) > k or int(words.astype(np.int64).sum()) != n_entries):
        raise bad("per-item word counts are inconsistent with the inverted file")
    if n_items == 0 and n_entries != 0:
        raise bad("entries without items")
    for off_name, blob_name in (("id_offsets", "ids"), ("metadata_offsets", "metadata")):
        o = sections[off_name].view("<u8").astype(np.int64)
        if o[0] != 0 or o[-1] != sections[blob_name].shape[0] or np.any(np.diff(o) < 0):
            raise bad(f"{off_name} are inconsistent")
    if n_images and np.any(np.diff(sections["id_offsets"].view("<u8").astype(np.int64)) < 1):
        raise bad("an image id is empty")
    ivo = sections["ivf_offsets"].view("<u8")
    if ivo[0] != 0 or ivo[-1] != n_entries or np.any(ivo[1:] < ivo[:-1]):
        raise bad("inverted-file offsets are inconsistent")
    tomb = sections["tombstones"]
    if n_images % 8 and tomb[-1] >> (n_images % 8):
        raise bad("tombstone padding bits are set")
    return {
        "K": k, "D": dim, "kind": kind, "alpha": alpha, "tau": tau, "normalize": bool(flags & _FLAG_NORMALIZE),
        "checksum": checksum, "n_blocks": n_blocks, "n_entries": n_entries, "payload": payload,
        "sections": sections, "section_table": table, "version": version,
    }
