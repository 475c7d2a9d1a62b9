"""Block tables for block-sparse ST attention (splash-attention style), computed from the layout.

For block sizes (bq, bk) every (query block, key block) pair is classified as empty, partial or
full by COUNTING the allowed (query, key) pairs with interval arithmetic on the O(N) layout: for
each query token and each key block, the allowed keys of a non-video region form one causal
interval, a foreign video is all-or-nothing, and inside the query's own video the spatial keys are
an intersection of place intervals and the temporal keys an intersection of slot intervals, in the
original as well as in the position-major (permuted) order. TEMPORAL_STRICT counts only the own
video's temporal keys in earlier slots (no global keys). No N x N mask is ever built: the work is
O(N * N / bk) integer arithmetic, done in query chunks to bound memory.

A block is empty iff its count is 0 and full iff its count is bq * bk. The counts are the analytic
counterpart of :func:`kernels.block_sparse_attention.mask.element_mask` (the tests check them against it
by brute force).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from kernels.block_sparse_attention.layout import (HeadPattern, LayoutError, STLayout, layout_regions,
                                                   round_up, token_ids)

__all__ = ["BlockSizeError", "BlockTables", "block_counts", "classify_blocks", "block_tables",
           "padded_length", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


class BlockSizeError(ValueError):
    """Block sizes that do not fit the (padded) sequence."""


def padded_length(seq_len: int, block_q: int, block_k: int, padded_len: int | None = None) -> int:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if int(b) < 1:
            raise BlockSizeError(f"{name} must be >= 1, got {b}")
    if padded_len is None:
        return round_up(seq_len, int(np.lcm(block_q, block_k)))
    padded_len = int(padded_len)
    if padded_len < seq_len:
        raise BlockSizeError(f"padded_len {padded_len} is smaller than the sequence length {seq_len}")
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if padded_len % b:
            raise BlockSizeError(f"{name}={b} does not divide the padded length {padded_len} "
                                 f"(sequence length {seq_len}); pad to a multiple of {b}")
    return padded_len


def _cdiv(a, b):
    return -((-a) // b)


def _clip_len(lo, hi):
    return np.maximum(hi - lo, 0)


def _own_video_counts(q: dict, v, o0, o1, pattern: HeadPattern, permuted: bool, radius, window):
    """Allowed keys of the query's own video inside key segments [o0, o1) (video offsets).

    q: dict of [c, 1] int64 query ids (offset, frame, place, row, col); o0, o1: [1, m].
    """
    t, hw, w = v.t, v.hw, v.w
    off, fq, pq, yq, xq = q["off"], q["frame"], q["place"], q["row"], q["col"]
    if pattern is HeadPattern.DENSE:
        if not permuted:
            return _clip_len(o0, np.minimum(o1, off + 1))

        def prefix(x):  # #{permuted offset < x whose original offset <= off}
            big_p, r = x // t, x % t
            full = (fq + 1) * np.minimum(big_p, pq + 1) + fq * np.maximum(big_p - pq - 1, 0)
            part = np.minimum(r, np.where(big_p <= pq, fq + 1, fq))
            return full + part
        return prefix(o1) - prefix(o0)

    total = 0
    if pattern.spatial:
        # place interval [js0, js1) of the query's slot inside the segment
        if permuted:
            js0, js1 = _cdiv(o0 - fq, t), _cdiv(o1 - fq, t)
        else:
            js0, js1 = o0 - fq * hw, o1 - fq * hw
        js0, js1 = np.clip(js0, 0, hw), np.clip(js1, 0, hw)
        if radius is None:
            total = total + _clip_len(js0, np.minimum(js1, pq + 1))
        else:
            xlo = np.maximum(xq - radius, 0)
            for d in range(radius + 1):
                y = yq - d
                xhi = xq if d == 0 else np.minimum(xq + radius, w - 1)
                lo, hi = y * w + xlo, y * w + xhi + 1
                total = total + np.where(y >= 0, _clip_len(np.maximum(js0, lo), np.minimum(js1, hi)), 0)
    if pattern.temporal:
        if permuted:
            jt0, jt1 = o0 - pq * t, o1 - pq * t
        else:
            jt0, jt1 = _cdiv(o0 - pq, hw), _cdiv(o1 - pq, hw)
        f_lo = 0 if window is None else np.maximum(fq - window, 0)
        f_hi = fq if pattern.strict else fq + 1   # strict: earlier slots only
        total = total + _clip_len(np.maximum(jt0, f_lo), np.minimum(jt1, f_hi))
    if pattern.spatial and pattern.temporal:
        own = pq * t + fq if permuted else off
        total = total - ((own >= o0) & (own < o1))
    return total


def block_counts(layout: STLayout, pattern, block_q: int, block_k: int, *, padded_len=None,
                 permuted: bool = False, query_chunk: int = 4096) -> np.ndarray:
    """[nq, nk] int64: the number of allowed (query, key) pairs in each block."""
    pattern = HeadPattern.parse(pattern)
    npad = padded_length(layout.seq_len, block_q, block_k, padded_len)
    nq, nk = npad // block_q, npad // block_k
    ids = token_ids(layout, npad, permuted=permuted)
    regions = layout_regions(layout, npad)
    radius, window = layout.spatial_radius, layout.temporal_window
    out = np.zeros((nq, nk), np.int64)
    chunk = max(block_q, (query_chunk // block_q) * block_q)
    for c0 in range(0, npad, chunk):
        c1 = min(npad, c0 + chunk)
        qidx = ids.index[c0:c1].astype(np.int64)[:, None]
        qvid = ids.video[c0:c1].astype(np.int64)[:, None]
        counts = np.zeros((c1 - c0, nk), np.int64)
        for r0, r1, v in regions:
            kb0, kb1 = r0 // block_k, (r1 - 1) // block_k + 1
            kbs = np.arange(kb0, kb1)
            a = np.maximum(kbs * block_k, r0)[None, :]
            b = np.minimum((kbs + 1) * block_k, r1)[None, :]
            if v is None:  # non-video keys (index == position): causal interval
                if not pattern.strict:
                    counts[:, kb0:kb1] += _clip_len(a, np.minimum(b, qidx + 1))
                continue
            v_num = layout.videos.index(v)
            mine = qvid == v_num
            # queries outside this video: all keys or none (the video lies wholly before or after)
            if not pattern.strict:
                counts[:, kb0:kb1] += np.where(~mine & (qidx >= v.end), b - a, 0)
            rows = np.nonzero(mine[:, 0])[0]
            if rows.size == 0:
                continue
            sl = slice(c0, c1)
            q = {
                "off": qidx[rows] - v.start,
                "frame": ids.frame[sl][rows].astype(np.int64)[:, None],
                "place": ids.place[sl][rows].astype(np.int64)[:, None],
                "row": ids.row[sl][rows].astype(np.int64)[:, None],
                "col": ids.col[sl][rows].astype(np.int64)[:, None],
            }
            counts[rows, kb0:kb1] += _own_video_counts(q, v, a - v.start, b - v.start, pattern,
                                                       permuted, radius, window)
        out[c0 // block_q:c1 // block_q] = counts.reshape(-1, block_q, nk).sum(1)
    return out


def classify_blocks(layout: STLayout, pattern, block_q: int, block_k: int, *, padded_len=None,
                    permuted: bool = False) -> np.ndarray:
    """[nq, nk] int8 with EMPTY (0), PARTIAL (1), FULL (2)."""
    counts = block_counts(layout, pattern, block_q, block_k, padded_len=padded_len, permuted=permuted)
    cls = np.full(counts.shape, PARTIAL, np.int8)
    cls[counts == 0] = EMPTY
    cls[counts == block_q * block_k] = FULL
    return cls


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTables:
    """Per query block, the non-empty key blocks: partial ones first, then full ones.

    kv_index:    [nq, max_blocks] int32, padded by repeating the last valid entry.
    kv_count:    [nq] int32, number of valid entries.
    kv_partial:  [nq] int32, entries [0, kv_partial) are partial (masked), the rest full.
    kv_full:     [nq, max_blocks] int32, 1 where the entry is a full block (0 for padding entries).
    ids:         [8, padded_len] int32 stacked per-token ids in this table's sequence order.
    """

    layout: STLayout
    pattern: HeadPattern
    permuted: bool
    block_q: int
    block_k: int
    padded_len: int
    kv_index: np.ndarray
    kv_count: np.ndarray
    kv_partial: np.ndarray
    kv_full: np.ndarray
    classes: np.ndarray
    ids: np.ndarray

    @property
    def num_q_blocks(self) -> int:
        return self.kv_index.shape[0]

    @property
    def num_k_blocks(self) -> int:
        return self.padded_len // self.block_k

    @property
    def max_blocks(self) -> int:
        return self.kv_index.shape[1]

    @property
    def density(self) -> float:
        """Fraction of all (query block, key block) pairs that are computed."""
        return float(self.kv_count.sum()) / (self.num_q_blocks * self.num_k_blocks)

    @property
    def padded_density(self) -> float:
        """Fraction computed by a kernel that runs max_blocks entries for every query block."""
        return self.max_blocks / self.num_k_blocks

    @property
    def causal_density(self) -> float:
        """Fraction of the causal (lower-triangular) block pairs that are computed."""
        nq, nk = self.num_q_blocks, self.num_k_blocks
        causal = sum(min(nk, ((i + 1) * self.block_q - 1) // self.block_k + 1) for i in range(nq))
        return float(self.kv_count.sum()) / causal


def _build_tables(layout, pattern, block_q, block_k, padded_len, permuted) -> BlockTables:
    cls = classify_blocks(layout, pattern, block_q, block_k, padded_len=padded_len, permuted=permuted)
    nq = cls.shape[0]
    npad = nq * block_q
    lists, n_part = [], []
    for i in range(nq):
        part = np.nonzero(cls[i] == PARTIAL)[0]
        full = np.nonzero(cls[i] == FULL)[0]
        lists.append(np.concatenate([part, full]))
        n_part.append(part.size)
    counts = np.array([len(x) for x in lists], np.int32)
    m = max(1, int(counts.max()))
    kv_index = np.zeros((nq, m), np.int32)
    kv_full = np.zeros((nq, m), np.int32)
    for i, lst in enumerate(lists):
        if lst.size:
            kv_index[i, :lst.size] = lst
            kv_index[i, lst.size:] = lst[-1]
            kv_full[i, n_part[i]:lst.size] = 1
    ids = token_ids(layout, npad, permuted=permuted).stacked()
    for a in (kv_index, counts, kv_full, cls, ids):
        a.setflags(write=False)
    n_part_arr = np.array(n_part, np.int32)
    n_part_arr.setflags(write=False)
    return BlockTables(layout, pattern, permuted, block_q, block_k, npad, kv_index, counts,
                       n_part_arr, kv_full, cls, ids)


@functools.lru_cache(maxsize=64)
def _cached_tables(layout, pattern, block_q, block_k, padded_len, permuted):
    return _build_tables(layout, pattern, block_q, block_k, padded_len, permuted)


def block_tables(layout: STLayout, pattern=HeadPattern.UNION, block_q: int = 128, block_k: int = 128,
                 *, padded_len: int | None = None, permuted: bool | None = None) -> BlockTables:
    """Block tables for one head pattern (cached per static arguments).

    ``permuted=None`` picks the position-major order for TEMPORAL heads and the original order
    otherwise.
    """
    if not isinstance(layout, STLayout):
        raise LayoutError(f"layout must be an STLayout, got {type(layout).__name__}")
    pattern = HeadPattern.parse(pattern)
    if permuted is None:
        permuted = pattern.default_permuted
    npad = padded_length(layout.seq_len, int(block_q), int(block_k), padded_len)
    return _cached_tables(layout, pattern, int(block_q), int(block_k), npad, bool(permuted))
