"""Shared pieces of the block-sparse attention paths: validation, the in-kernel element mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from purekv_jax.st_sparse.layout import HeadPattern

__all__ = ["BACKENDS", "PALLAS_HEAD_DIMS", "MASK_VALUE", "HeadDimError", "element_mask",
           "check_head_dim", "IDX", "VID", "FRM", "PLC", "ROW", "COL"]

BACKENDS = ("auto", "xla", "triton", "mosaic_gpu", "tpu")
# Head dims the Pallas kernels take (Triton needs a power of two >= 16; the TPU kernel tiles by 128
# lanes and takes 64 as a full-extent block).
PALLAS_HEAD_DIMS = (32, 64, 128, 256)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
IDX, VID, FRM, PLC, ROW, COL = range(6)


class HeadDimError(ValueError):
    """head_dim that a kernel cannot take."""


def check_head_dim(d: int, backend: str):
    if backend in ("triton", "tpu", "mosaic_gpu") and d not in PALLAS_HEAD_DIMS:
        raise HeadDimError(f"head_dim {d} is not supported by the {backend!r} block-sparse kernel; "
                           f"supported: {PALLAS_HEAD_DIMS} (backend='xla' takes any head_dim)")


def element_mask(get_q, get_k, pattern: HeadPattern, radius, window):
    """Boolean mask from per-token ids. get_q(field) / get_k(field) return broadcastable int32
    arrays (e.g. [bq, 1] and [1, bk]); only the fields the pattern needs are read."""
    causal = get_k(IDX) <= get_q(IDX)
    if pattern is HeadPattern.DENSE:
        return causal
    qv, kv = get_q(VID), get_k(VID)
    other = (qv < 0) | (kv != qv)
    pat = None
    if pattern.spatial:
        qf, kf = get_q(FRM), get_k(FRM)
        sp = kf == qf
        if radius is not None:
            sp = sp & (jnp.abs(get_k(ROW) - get_q(ROW)) <= radius)
            sp = sp & (jnp.abs(get_k(COL) - get_q(COL)) <= radius)
        pat = sp
    if pattern.temporal:
        tp = get_k(PLC) == get_q(PLC)
        if window is not None:
            tp = tp & (get_q(FRM) - get_k(FRM) <= window)
        if pattern.strict:   # own video only, strictly earlier slots (disjoint from SPATIAL)
            # ``not other`` spelled without a boolean not: Mosaic GPU cannot lower ``~`` on i1
            # ("Register bitwidth in target type must be divisible by 8")
            own = (qv >= 0) & (kv == qv)
            return causal & own & tp & (get_k(FRM) < get_q(FRM))
        pat = tp if pat is None else (pat | tp)
    return causal & (other | pat)
