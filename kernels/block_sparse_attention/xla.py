"""XLA fallback: per query block, gather only the listed key blocks and do a masked softmax over them.

Work per query block is max_blocks * block_k keys instead of N, so it beats dense attention whenever
the padded density (max_blocks / num_k_blocks) is well below 1. Query blocks are processed in
batches with ``lax.map`` to bound the memory of the gathered scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention.blocks import BlockTables
from kernels.block_sparse_attention.mask import element_mask

__all__ = ["xla_block_sparse", "bucket_query_blocks", "xla_flop_ratio"]


def _bucket_width(c: int) -> int:
    """Smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is >= c (at most 1.5x waste)."""
    w = 1
    while w < c:
        w = w + (w + 1) // 2 if w & (w - 1) == 0 else (w // 3) * 4
    return w


def bucket_query_blocks(kv_count, max_blocks: int):
    """Group query blocks by list length: [(query block indices, list width)], so that the text rows
    that attend densely do not pad every other query block's list to the full length."""
    kv_count = np.asarray(kv_count)
    widths = np.array([min(_bucket_width(int(c)), max_blocks) for c in kv_count])
    return [(np.nonzero(widths == w)[0], int(w)) for w in np.unique(widths)]


def xla_flop_ratio(tables: BlockTables) -> float:
    """Fraction of the dense N x N score FLOPs that xla_block_sparse computes."""
    cells = sum(len(qi) * w for qi, w in bucket_query_blocks(tables.kv_count, tables.max_blocks))
    return cells / (tables.num_q_blocks * tables.num_k_blocks)


def xla_block_sparse(q, k, v, tables: BlockTables, *, scale=None, max_score_bytes=256 << 20,
                     return_lse=False):
    """q [B,Hq,Np,D], k/v [B,Hkv,Np,D] in the tables' order, Np = tables.padded_len.

    Returns [B,Hq,Np,D] in q.dtype; with ``return_lse`` also the per-row natural log-sum-exp of
    the scores, float32 [B,Hq,Np]. Rows with no key get output 0 and log-sum-exp -inf.
    """
    b, hq, npad, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    bq, bk = tables.block_q, tables.block_k
    nq, nk, m = tables.num_q_blocks, tables.num_k_blocks, tables.max_blocks
    scale = d ** -0.5 if scale is None else scale
    lay, pat = tables.layout, tables.pattern

    ids = jnp.asarray(tables.ids)                            # [8, Np]
    q_ids = ids.reshape(8, nq, bq).transpose(1, 0, 2)        # [nq, 8, bq]
    k_ids = ids.reshape(8, nk, bk)                           # [8, nk, bk]

    qb = q.reshape(b, hkv, g, nq, bq, d).transpose(3, 0, 1, 2, 4, 5)   # [nq, b, hkv, g, bq, d]
    kb = k.reshape(b, hkv, nk, bk, d)
    vb = v.reshape(b, hkv, nk, bk, d)

    def one(args):
        qi, idx, val, fl, qid = args                         # [b,hkv,g,bq,d], [W], [W], [W], [8,bq]
        wdt = idx.shape[0]
        kg = jnp.take(kb, idx, axis=2)                       # [b,hkv,W,bk,d]
        vg = jnp.take(vb, idx, axis=2)
        kid = jnp.take(k_ids, idx, axis=1)                   # [8,W,bk]
        s = jnp.einsum("bhgqd,bhmkd->bhgqmk", qi, kg, preferred_element_type=jnp.float32) * scale
        mask = element_mask(lambda f: qid[f][:, None, None], lambda f: kid[f][None], pat,
                            lay.spatial_radius, lay.temporal_window)   # [bq,W,bk]
        mask = (mask | fl[None, :, None]) & val[None, :, None]
        s = jnp.where(mask[None, None, None], s, -jnp.inf)
        s = s.reshape(*s.shape[:4], wdt * bk)
        mx = jnp.max(s, axis=-1, keepdims=True)
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)    # rows with no key: p = 0, lse = -inf
        p = jnp.exp(s - mx)
        l = jnp.sum(p, axis=-1, keepdims=True)
        p = (p / jnp.where(l > 0, l, 1.0)).reshape(*p.shape[:4], wdt, bk)
        o = jnp.einsum("bhgqmk,bhmkd->bhgqd", p.astype(vg.dtype), vg,
                       preferred_element_type=jnp.float32).astype(q.dtype)
        return o, (mx + jnp.log(l))[..., 0]              # [b,hkv,g,bq,d], [b,hkv,g,bq]

    outs, lses, order = [], [], []
    for qsel, wdt in bucket_query_blocks(tables.kv_count, m):
        idx = tables.kv_index[qsel, :wdt]
        val = np.arange(wdt)[None, :] < tables.kv_count[qsel, None]
        full = tables.kv_full[qsel, :wdt].astype(bool)
        per_block = b * hq * bq * wdt * bk * 4 * 3
        batch = int(max(1, min(len(qsel), max_score_bytes // max(per_block, 1))))
        xs = (qb[qsel], jnp.asarray(idx), jnp.asarray(val), jnp.asarray(full), q_ids[qsel])
        o, lse = jax.lax.map(one, xs, batch_size=batch)      # [n_sel,b,hkv,g,bq,(d)]
        outs.append(o)
        lses.append(lse)
        order.append(qsel)
    out, lse = jnp.concatenate(outs, axis=0), jnp.concatenate(lses, axis=0)
    order = np.concatenate(order)
    if (order != np.arange(nq)).any():
        inv = np.empty(nq, np.int64)
        inv[order] = np.arange(nq)
        out, lse = out[inv], lse[inv]
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, hq, npad, d)
    if not return_lse:
        return out
    return out, lse.transpose(1, 2, 3, 0, 4).reshape(b, hq, npad)
