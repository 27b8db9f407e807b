"""Posting-list maintenance of the inverted file: grouping new entries by visual word, merging
two inverted files with renumbered items (delta folding, save, compaction) and the full
structural check of a stored one. The layout is described in ``d2r.kernels.similarity``
(section "Inverted-file search").
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def group_by_word(words, n_words_total):
    """Counting sort of entries by visual word, stable: (int64 [K + 1] offsets, int64 [E] order)."""
    counts = np.zeros(n_words_total + 1, dtype=np.int64)
    for e in range(words.shape[0]):
        counts[np.int64(words[e]) + 1] += 1
    for w in range(n_words_total):
        counts[w + 1] += counts[w]
    pos = counts[:-1].copy()
    order = np.empty(words.shape[0], dtype=np.int64)
    for e in range(words.shape[0]):
        w = np.int64(words[e])
        order[pos[w]] = e
        pos[w] += 1
    return counts, order


@njit(cache=True, nogil=True)
def _copy_word(w, offsets, n_blocks, shift, low, codes, item_map, row, out_blocks, out_shift, out_low, out_codes, out_counts, n):
    mask = (np.int64(1) << out_shift) - 1
    for blk in range(n_blocks):
        base = np.int64(blk) << shift
        for e in range(offsets[w * n_blocks + blk], offsets[w * n_blocks + blk + 1]):
            item = base + np.int64(low[e])
            if item >= item_map.shape[0]:
                return -1  # corrupt input: an item out of range
            new = item_map[item]
            if new < 0:
                continue
            if n >= out_low.shape[0]:
                return -1  # more entries than the word counts say
            out_low[n] = new & mask
            out_codes[n, :] = codes[e, :]
            out_counts[row * out_blocks + (new >> out_shift)] += 1
            n += 1
    return n


@njit(cache=True, nogil=True)
def merge_ivf_words(w0, w1, a_offsets, a_blocks, a_shift, a_low, a_codes, b_offsets, b_blocks, b_shift, b_low, b_codes,
                    item_map, out_blocks, out_shift, out_low, out_codes, out_counts):
    """Merge words [w0, w1) of two inverted files (``a`` then ``b``, items of ``b`` after those
    of ``a``) into a new one, renumbering items through ``item_map`` (int64, -1 drops the
    entry). Writes entries to out_low / out_codes (uint8 [E, P]) and adds run lengths to
    out_counts [(w1 - w0) * out_blocks]; returns the number of entries written, or -1 if an
    entry names an item outside item_map or the output is full (corrupt input)."""
    n = 0
    for w in range(w0, w1):
        n = _copy_word(w, a_offsets, a_blocks, a_shift, a_low, a_codes, item_map, w - w0, out_blocks, out_shift, out_low, out_codes, out_counts, n)
        if n < 0:
            return n
        n = _copy_word(w, b_offsets, b_blocks, b_shift, b_low, b_codes, item_map, w - w0, out_blocks, out_shift, out_low, out_codes, out_counts, n)
        if n < 0:
            return n
    return n


@njit(cache=True, nogil=True)
def ivf_check_entries(offsets, n_blocks, shift, low, n_items, item_words):
    """Full structural check of an inverted file: every run strictly ascending, every item
    < n_items, and every item has exactly item_words[item] entries. Returns an error code:
    0 ok, 1 item out of range, 2 run not ascending, 3 entry count differs from item_words."""
    counts = np.zeros(n_items, dtype=np.int64)
    n_runs = offsets.shape[0] - 1
    for run in range(n_runs):
        base = np.int64(run % n_blocks) << shift
        prev = -1
        for e in range(offsets[run], offsets[run + 1]):
            item = base + np.int64(low[e])
            if item >= n_items:
                return 1
            if item <= prev:
                return 2
            prev = item
            counts[item] += 1
    for i in range(n_items):
        if counts[i] != item_words[i]:
            return 3
    return 0


@njit(cache=True, nogil=True)
def ivf_item_entries(offsets, n_blocks, shift, low, items, n_words):
    """Where the entries of a few items lie in an inverted file: int64 [n_words, len(items)],
    entry (w, j) is the index of item ``items[j]``'s entry for word w, or -1 if it has none.

    ``items`` are the inverted file's own item numbers (block << shift | low). One binary search
    per (word, item) in the run (w, block): O(n_words * len(items) * log(run length)), without
    a scan of the file (query expansion reads its top hits through this).
    """
    n_sel = items.shape[0]
    out = np.full((n_words, n_sel), -1, dtype=np.int64)
    if n_blocks == 0:
        return out
    mask = (np.int64(1) << shift) - 1
    for j in range(n_sel):
        item = np.int64(items[j])
        blk = item >> shift
        if blk >= n_blocks:
            continue
        key = item & mask
        for w in range(n_words):
            run = np.int64(w) * n_blocks + blk
            a = np.int64(offsets[run])
            b = np.int64(offsets[run + 1])
            while a < b:  # first entry with low >= key
                mid = (a + b) >> 1
                if np.int64(low[mid]) < key:
                    a = mid + 1
                else:
                    b = mid
            if a < np.int64(offsets[run + 1]) and np.int64(low[a]) == key:
                out[w, j] = a
    return out
