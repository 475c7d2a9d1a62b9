"""Pallas TPU (Mosaic) block-sparse flash attention with scalar-prefetched block lists.

Grid (batch, q head, query block, list entry). The flattened key-block list, the per-query-block
count and the number of partial entries are scalar-prefetched into SMEM; the key / value / key-id
index maps read the list, so only listed blocks are DMA'd (padding entries repeat the last block,
which Pallas does not re-fetch). Entries [0, n_partial) are masked in-kernel from the per-token ids,
entries [n_partial, count) are full and unmasked, entries >= count are skipped. Online softmax in
float32 with (bq, 128) lane-replicated running max / sum (as splash attention does).

With ``return_lse`` the kernel also writes the per-row natural log-sum-exp, lane-replicated into a
lane-dense float32 [B, Hq, Np, 128] output (as jax's TPU flash attention does for its l / m
residuals: full (bq, 128) tiles, no masked narrow stores), sliced to [B, Hq, Np] outside. Rows that
saw no key (the strict temporal pass) keep the running max at the mask value: output 0, LSE -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.block_sparse_attention.blocks import BlockSizeError, BlockTables
from kernels.block_sparse_attention.common import MASK_VALUE, check_head_dim
from kernels.block_sparse_attention.layout import HeadPattern
from kernels.block_sparse_attention.mask import element_mask

__all__ = ["tpu_block_sparse", "check_tpu_blocks", "check_tpu_inputs"]

LANES = 128


def check_tpu_inputs(q, k, v):
    """q [B,Hq,N,D], k/v [B,Hkv,N,D]: the TPU kernel takes any dtype, head_dim in PALLAS_HEAD_DIMS."""
    check_head_dim(q.shape[-1], "tpu")


def check_tpu_blocks(block_q: int, block_k: int):
    if block_q % 8:
        raise BlockSizeError(f"the TPU kernel needs block_q to be a multiple of 8, got {block_q}")
    if block_k % LANES:
        raise BlockSizeError(f"the TPU kernel needs block_k to be a multiple of {LANES}, "
                             f"got {block_k}")


def _lanes(x, width):
    """(bq, 128) lane-replicated -> (bq, width)."""
    if width % LANES == 0:
        return jnp.tile(x, (1, width // LANES))
    return x[:, :width]


def _kernel(kv_index_ref, kv_count_ref, kv_partial_ref,        # scalar prefetch (SMEM)
            q_ref, k_ref, v_ref, q_ids_ref, k_ids_ref,          # inputs (VMEM blocks)
            o_ref, *rest,                                       # output(s), scratch
            scale, max_blocks, pattern, radius, window):
    lse_ref = rest[0] if len(rest) == 4 else None
    m_ref, l_ref, acc_ref = rest[-3:]
    i, j = pl.program_id(2), pl.program_id(3)
    bq, d = acc_ref.shape
    bk = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked):
        q = q_ref[...]
        k = k_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
        if masked:
            mask = element_mask(lambda f: q_ids_ref[:, f:f + 1], lambda f: k_ids_ref[f:f + 1, :],
                                pattern, radius, window)
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))   # (bq, 128)
        p = jnp.exp(s - _lanes(m_next, bk))
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
        m_ref[...] = m_next
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        acc_ref[...] = _lanes(alpha, d) * acc_ref[...] + pv

    n_part = kv_partial_ref[i]
    n_all = kv_count_ref[i]

    @pl.when(j < n_part)
    def _partial():
        step(True)

    @pl.when(jnp.logical_and(j >= n_part, j < n_all))
    def _full():
        step(False)

    @pl.when(j == max_blocks - 1)
    def _finish():
        m, l = m_ref[...], l_ref[...]                                      # (bq, 128)
        # no key seen: m stays at the mask value (never stepped: l = 0; masked only: l = bk)
        empty = m < 0.5 * MASK_VALUE
        l_safe = jnp.where(empty, 1.0, l)
        inv = jnp.where(empty, 0.0, 1.0 / l_safe)
        o_ref[...] = (acc_ref[...] * _lanes(inv, d)).astype(o_ref.dtype)
        if lse_ref is not None:
            lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def tpu_block_sparse(q, k, v, tables: BlockTables, *, scale=None, interpret=False,
                     return_lse=False):
    """q [B,Hq,Np,D], k/v [B,Hkv,Np,D] in the tables' order -> [B,Hq,Np,D] in q.dtype.

    With ``return_lse`` also the per-row natural log-sum-exp of the scores, float32 [B,Hq,Np]. Rows
    with no key get output 0 and log-sum-exp -inf.
    """
    b, hq, npad, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    check_tpu_inputs(q, k, v)
    bq, bk = tables.block_q, tables.block_k
    check_tpu_blocks(bq, bk)
    nq, m = tables.num_q_blocks, tables.max_blocks
    scale = d ** -0.5 if scale is None else float(scale)
    lay = tables.layout

    def q_map(bb, h, i, j, idx, cnt, npart):
        return bb, h, i, 0

    def kv_map(bb, h, i, j, idx, cnt, npart):
        return bb, lax.div(h, g), idx[i * m + j], 0

    def q_ids_map(bb, h, i, j, idx, cnt, npart):
        return i, 0

    def k_ids_map(bb, h, i, j, idx, cnt, npart):
        return 0, idx[i * m + j]

    def lse_map(bb, h, i, j, idx, cnt, npart):
        return bb, h, i, 0

    out_specs = [pl.BlockSpec((None, None, bq, d), q_map)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if return_lse:
        out_specs.append(pl.BlockSpec((None, None, bq, LANES), lse_map))
        out_shape.append(jax.ShapeDtypeStruct((b, hq, npad, LANES), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, hq, nq, m),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((bq, 8), q_ids_map),
            pl.BlockSpec((8, bk), k_ids_map),
        ],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    kernel = functools.partial(_kernel, scale=scale, max_blocks=m, pattern=HeadPattern(tables.pattern),
                               radius=lay.spatial_radius, window=lay.temporal_window)
    ids = jnp.asarray(tables.ids)
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="st_block_sparse_fwd_tpu_lse" if return_lse else "st_block_sparse_fwd_tpu",
    )(jnp.asarray(tables.kv_index).reshape(-1), jnp.asarray(tables.kv_count),
      jnp.asarray(tables.kv_partial), q, k, v, ids.T, ids)
    return (outs[0], outs[1][..., 0]) if return_lse else outs[0]
