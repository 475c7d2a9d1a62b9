"""The ST-SpAttn element mask: one definition for the kernels (jnp), the reference and calibration (numpy).

Mask (METHOD.md, ST-SpAttn) for query i and key j, on original sequence indices:

    j <= i  AND  ( query i is not a video token
                   OR key j is not in i's video          # everything before the video start is global
                   OR pattern(i, j) )                    # same video
    SPATIAL : same temporal slot f (optionally |dy| <= spatial_radius and |dx| <= spatial_radius)
    TEMPORAL: same place (y, x)   (optionally f_i - f_j <= temporal_window, i.e. the query's own slot
              plus the `temporal_window` slots before it)
    UNION   : SPATIAL or TEMPORAL
    DENSE   : always (plain causal attention)

TEMPORAL_STRICT is an internal pattern, not one of the alternatives above: the temporal keys of a video
query in strictly earlier slots (same video, same place, f_j < f_i, f_i - f_j <= temporal_window),
with no global keys. SPATIAL and TEMPORAL_STRICT are disjoint and their union is UNION, so a UNION
head is computed exactly as two passes merged by log-sum-exp (the strict one on the cheap
position-major order). Rows with no key (non-video queries, first-slot queries) are empty.

:func:`element_mask` uses plain Python operators only (``abs``, comparisons, ``&``, ``|``; no ``~``:
Mosaic GPU cannot lower a boolean not), so the same code runs on jnp values inside every kernel and on
numpy arrays on the host. :mod:`kernels.block_sparse_attention.blocks` counts the same mask per block
analytically.
"""

from __future__ import annotations

import numpy as np

from kernels.block_sparse_attention.layout import (COL, FRM, IDX, PLC, ROW, VID, HeadPattern, STLayout,
                                                   token_ids)

__all__ = ["element_mask", "reference_mask"]


def element_mask(get_q, get_k, pattern: HeadPattern, radius, window):
    """Boolean mask from per-token ids. get_q(field) / get_k(field) return broadcastable int32
    arrays (jnp or numpy; e.g. [bq, 1] and [1, bk]) of the field's row in the stacked ids (IDX, VID,
    FRM, PLC, ROW, COL); only the fields the pattern needs are read."""
    causal = get_k(IDX) <= get_q(IDX)
    if pattern is HeadPattern.DENSE:
        return causal
    qv, kv = get_q(VID), get_k(VID)
    if pattern.strict:   # own video only, strictly earlier slots (disjoint from SPATIAL)
        own = (qv >= 0) & (kv == qv)
        return causal & own & _temporal(get_q, get_k, window) & (get_k(FRM) < get_q(FRM))
    other = (qv < 0) | (kv != qv)   # not the query's video: global
    pat = None
    if pattern.spatial:
        pat = get_k(FRM) == get_q(FRM)
        if radius is not None:
            pat = pat & (abs(get_k(ROW) - get_q(ROW)) <= radius)
            pat = pat & (abs(get_k(COL) - get_q(COL)) <= radius)
    if pattern.temporal:
        tp = _temporal(get_q, get_k, window)
        pat = tp if pat is None else (pat | tp)
    return causal & (other | pat)


def _temporal(get_q, get_k, window):
    """Same place, within ``window`` slots before the query's own (any slot when None)."""
    tp = get_k(PLC) == get_q(PLC)
    if window is not None:
        tp = tp & (get_q(FRM) - get_k(FRM) <= window)
    return tp


def reference_mask(layout: STLayout, pattern=HeadPattern.UNION, *, padded_len=None,
                   permuted: bool = False, rows=None) -> np.ndarray:
    """Explicit boolean mask from the ids: [N, N], or [len(rows), N] for the query rows ``rows``
    (positions in the chosen order) over every key. Host numpy: TESTS, CALIBRATION ROWS AND SMALL
    SIZES ONLY."""
    pattern = HeadPattern.parse(pattern)
    ids = token_ids(layout, padded_len, permuted=permuted).stacked()
    q_ids = ids if rows is None else ids[:, np.asarray(rows)]
    return element_mask(lambda f: q_ids[f][:, None], lambda f: ids[f][None, :], pattern,
                        layout.spatial_radius, layout.temporal_window)
