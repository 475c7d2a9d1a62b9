"""ST-SpAttn layout: where the videos are in a prompt, and the O(N) per-token ids derived from it.

A :class:`STLayout` is a static, hashable description (tuples of ints) so it can be a static argument
of ``jax.jit``. Everything here is host numpy (layout bookkeeping, see docs/DESIGN.md). The mask these
ids define is in :mod:`kernels.block_sparse_attention.mask`.

Padding tokens (positions >= seq_len) behave like non-video tokens placed after the prompt: causality
on their index keeps them invisible to every real query.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

__all__ = [
    "HeadPattern",
    "VideoSpan",
    "STLayout",
    "LayoutError",
    "TokenIds",
    "ID_FIELDS",
    "NUM_ID_ROWS",
    "IDX",
    "VID",
    "FRM",
    "PLC",
    "ROW",
    "COL",
    "token_ids",
    "permutation",
    "inverse_permutation",
    "round_up",
    "layout_regions",
]


class LayoutError(ValueError):
    """A layout that does not match its tokens (or is otherwise inconsistent)."""


class HeadPattern(enum.IntEnum):
    """Per-head ST-SpAttn pattern."""

    DENSE = 0
    SPATIAL = 1
    TEMPORAL = 2
    UNION = 3
    TEMPORAL_STRICT = 4   # internal: the temporal part of UNION that SPATIAL does not cover

    @classmethod
    def parse(cls, value) -> "HeadPattern":
        if isinstance(value, HeadPattern):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown head pattern {value!r}; expected one of "
                                 f"{[p.name.lower() for p in cls]}") from None
        return cls(int(value))

    @property
    def spatial(self) -> bool:
        return self in (HeadPattern.SPATIAL, HeadPattern.UNION)

    @property
    def temporal(self) -> bool:
        return self in (HeadPattern.TEMPORAL, HeadPattern.UNION, HeadPattern.TEMPORAL_STRICT)

    @property
    def strict(self) -> bool:
        """Only the own video's strictly earlier temporal keys: no global keys, rows may be empty."""
        return self is HeadPattern.TEMPORAL_STRICT

    @property
    def default_permuted(self) -> bool:
        """Temporal-only heads are cheap in the position-major order (METHOD.md)."""
        return self in (HeadPattern.TEMPORAL, HeadPattern.TEMPORAL_STRICT)


@dataclasses.dataclass(frozen=True)
class VideoSpan:
    """One video: its first token's sequence offset and its merged grid (t, h, w)."""

    start: int
    t: int
    h: int
    w: int

    @property
    def hw(self) -> int:
        return self.h * self.w

    @property
    def length(self) -> int:
        return self.t * self.h * self.w

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass(frozen=True)
class STLayout:
    """Static description of a prompt for ST-SpAttn.

    Attributes:
      seq_len: number of prompt tokens N.
      videos: the video spans, sorted by start, non-overlapping.
      spatial_radius: if set, spatial keys must satisfy |dy| <= r and |dx| <= r.
      temporal_window: if set, temporal keys must satisfy f_q - f_k <= T.
    """

    seq_len: int
    videos: tuple[VideoSpan, ...] = ()
    spatial_radius: int | None = None
    temporal_window: int | None = None

    def __post_init__(self):
        vids = tuple(v if isinstance(v, VideoSpan) else VideoSpan(*v) for v in self.videos)
        object.__setattr__(self, "videos", vids)
        if int(self.seq_len) < 1:
            raise LayoutError(f"seq_len must be >= 1, got {self.seq_len}")
        prev_end = 0
        for n, v in enumerate(vids):
            if min(v.t, v.h, v.w) < 1:
                raise LayoutError(f"video {n}: grid (t, h, w) = {(v.t, v.h, v.w)} must be positive")
            if v.start < prev_end:
                raise LayoutError(f"video {n} starts at {v.start}, before the previous span ends "
                                  f"({prev_end}); videos must be sorted and non-overlapping")
            if v.end > self.seq_len:
                raise LayoutError(
                    f"video {n}: grid (t, h, w) = {(v.t, v.h, v.w)} needs {v.length} tokens from offset "
                    f"{v.start} (up to {v.end}) but the prompt has only {self.seq_len} tokens")
            prev_end = v.end
        for name in ("spatial_radius", "temporal_window"):
            val = getattr(self, name)
            if val is not None and int(val) < 0:
                raise LayoutError(f"{name} must be >= 0 or None, got {val}")

    @classmethod
    def from_prompt(cls, seq_len: int, video_starts, video_grids, *, spatial_radius=None,
                    temporal_window=None, video_token_counts=None) -> "STLayout":
        """Build from per-video starts and merged grids ((t, h, w) each).

        ``video_token_counts`` (optional) are the numbers of video tokens actually present for each
        video in the prompt; a grid that does not match its count raises :class:`LayoutError`.
        """
        starts = [int(s) for s in np.asarray(video_starts).reshape(-1)]
        grids = [tuple(int(g) for g in grid) for grid in np.asarray(video_grids).reshape(-1, 3)]
        if len(starts) != len(grids):
            raise LayoutError(f"{len(starts)} video starts but {len(grids)} video grids")
        if video_token_counts is not None:
            counts = [int(c) for c in np.asarray(video_token_counts).reshape(-1)]
            if len(counts) != len(grids):
                raise LayoutError(f"{len(counts)} video token counts but {len(grids)} video grids")
            for n, (g, c) in enumerate(zip(grids, counts)):
                if math.prod(g) != c:
                    raise LayoutError(f"video {n}: merged grid (t, h, w) = {g} gives {math.prod(g)} "
                                      f"tokens but the prompt holds {c} video tokens")
        vids = tuple(VideoSpan(s, *g) for s, g in sorted(zip(starts, grids)))
        return cls(int(seq_len), vids, spatial_radius, temporal_window)

    @classmethod
    def from_token_mask(cls, is_video, video_grids, **kw) -> "STLayout":
        """Build from a boolean [N] video-token mask: each maximal run of video tokens is one video."""
        m = np.asarray(is_video, dtype=bool).reshape(-1)
        grids = [tuple(int(g) for g in grid) for grid in np.asarray(video_grids).reshape(-1, 3)]
        d = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
        starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
        if len(starts) != len(grids):
            raise LayoutError(f"the token mask holds {len(starts)} video runs but {len(grids)} grids "
                              f"were given")
        return cls.from_prompt(m.shape[0], starts, grids, video_token_counts=ends - starts, **kw)

    @property
    def num_video_tokens(self) -> int:
        return sum(v.length for v in self.videos)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def layout_regions(layout: STLayout, npad: int | None = None) -> list[tuple[int, int, "VideoSpan | None"]]:
    """``(start, end, video or None)`` covering ``[0, npad)`` (default ``seq_len``) in order: each video's span
    and the non-video runs between (text, image or padding tokens). The same spans in original and permuted
    order (the permutation moves tokens only inside a video)."""
    npad = layout.seq_len if npad is None else int(npad)
    out, pos = [], 0
    for v in layout.videos:
        if v.start > pos:
            out.append((pos, v.start, None))
        out.append((v.start, v.end, v))
        pos = v.end
    if pos < npad:
        out.append((pos, npad, None))
    return out


# Rows of the stacked per-token id array. Padded to 8 rows (a TPU sublane tile).
ID_FIELDS = ("index", "video", "frame", "place", "row", "col")
NUM_ID_ROWS = 8
IDX, VID, FRM, PLC, ROW, COL = range(6)   # row of each field in the stacked array


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Per-token int32 ids in some sequence order (original or permuted), padded to ``padded_len``."""

    index: np.ndarray   # original sequence index (padding: seq_len, seq_len + 1, ...)
    video: np.ndarray   # video number, -1 for non-video tokens
    frame: np.ndarray   # temporal slot f (0 for non-video)
    place: np.ndarray   # y * w + x (0 for non-video)
    row: np.ndarray     # y
    col: np.ndarray     # x

    def stacked(self) -> np.ndarray:
        """[NUM_ID_ROWS, N] int32 (rows 6, 7 are zero)."""
        n = self.index.shape[0]
        out = np.zeros((NUM_ID_ROWS, n), np.int32)
        for r, name in enumerate(ID_FIELDS):
            out[r] = getattr(self, name)
        return out

    def take(self, perm: np.ndarray) -> "TokenIds":
        return TokenIds(*(getattr(self, f)[perm] for f in ID_FIELDS))


def token_ids(layout: STLayout, padded_len: int | None = None, *, permuted: bool = False) -> TokenIds:
    """O(N) per-token ids, in original order or in the position-major (permuted) order."""
    n = layout.seq_len
    npad = n if padded_len is None else int(padded_len)
    if npad < n:
        raise LayoutError(f"padded_len {npad} is smaller than seq_len {n}")
    index = np.arange(npad, dtype=np.int32)
    video = np.full(npad, -1, np.int32)
    frame = np.zeros(npad, np.int32)
    place = np.zeros(npad, np.int32)
    for v_id, v in enumerate(layout.videos):
        off = np.arange(v.length, dtype=np.int32)
        video[v.start:v.end] = v_id
        frame[v.start:v.end] = off // v.hw
        place[v.start:v.end] = off % v.hw
    row = np.zeros(npad, np.int32)
    col = np.zeros(npad, np.int32)
    for v in layout.videos:
        row[v.start:v.end] = place[v.start:v.end] // v.w
        col[v.start:v.end] = place[v.start:v.end] % v.w
    ids = TokenIds(index, video, frame, place, row, col)
    if permuted:
        ids = ids.take(permutation(layout, npad))
    return ids


def permutation(layout: STLayout, padded_len: int | None = None) -> np.ndarray:
    """perm[p] = original position of the token at permuted position p.

    Video tokens go from frame-major (f, y, x) to position-major ((y, x), f); non-video and padding
    tokens stay where they are. ``x_perm = x[perm]``; ``x = x_perm[inverse_permutation(...)]``.
    """
    npad = layout.seq_len if padded_len is None else int(padded_len)
    perm = np.arange(npad, dtype=np.int32)
    for v in layout.videos:
        # permuted offset q = place * t + f  holds original offset f * hw + place
        q = np.arange(v.length, dtype=np.int32)
        plc, f = q // v.t, q % v.t
        perm[v.start:v.end] = v.start + f * v.hw + plc
    return perm


def inverse_permutation(layout: STLayout, padded_len: int | None = None) -> np.ndarray:
    perm = permutation(layout, padded_len)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=np.int32)
    return inv
