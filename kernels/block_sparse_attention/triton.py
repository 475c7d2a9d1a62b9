"""Pallas Triton block-sparse flash attention (GPU; the Mosaic GPU kernel is mosaic_gpu.py).

Grid (query block, batch, q head). Each program loads its query block once and walks its key-block
list: first the partial blocks (element mask from the per-token ids), then the full blocks (no mask).
Empty blocks are never visited. Online softmax in float32 (base-2 exponentials), GQA by mapping
q head h to kv head h // (Hq // Hkv).

jax 0.11 deprecates the Pallas Triton backend ('jax-pallas-triton' DeprecationWarning at lowering)
and needs a GPU, or an abstract one (jax.sharding.use_abstract_mesh with an AbstractDevice), to
lower it; it still lowers and runs (H200, jax 0.11.2: benchmarks/results/gpu_kernels.md). The
Mosaic GPU (TMA + WGMMA) version is behind the same switch (backend='mosaic_gpu', mosaic_gpu.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.block_sparse_attention.blocks import BlockSizeError, BlockTables
from kernels.block_sparse_attention.common import MASK_VALUE, check_head_dim
from kernels.block_sparse_attention.layout import HeadPattern
from kernels.block_sparse_attention.mask import element_mask

__all__ = ["triton_block_sparse", "check_triton_blocks", "check_triton_inputs"]


def _triton_compiler_params(num_warps, num_stages):
    # imported here: jax deprecates the Pallas Triton backend, and a jax without it must still
    # import this package (the other backends)
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError as e:  # pragma: no cover - jax without the Triton backend
        raise NotImplementedError(
            "this jax has no Pallas Triton backend (jax.experimental.pallas.triton); use "
            "backend='xla'") from e
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def check_triton_inputs(q, k, v):
    """q [B,Hq,N,D], k/v [B,Hkv,N,D]: the Triton kernel takes any dtype, head_dim in PALLAS_HEAD_DIMS."""
    check_head_dim(q.shape[-1], "triton")


def check_triton_blocks(block_q: int, block_k: int):
    for name, bsz in (("block_q", block_q), ("block_k", block_k)):
        if bsz < 16 or bsz & (bsz - 1):
            raise BlockSizeError(f"the Triton kernel needs {name} to be a power of two >= 16, "
                                 f"got {bsz}")


def _kernel(kv_index_ref, kv_count_ref, kv_partial_ref, ids_ref, q_ref, k_ref, v_ref, o_ref,
            *lse_ref, block_q, block_k, scale, pattern, radius, window):
    i = pl.program_id(0)
    q_start = i * block_q
    q = q_ref[...]                                          # [bq, D]
    d = q.shape[-1]
    qk_scale = scale * math.log2(math.e)

    q_cache = {}

    def get_q(f):
        if f not in q_cache:
            q_cache[f] = ids_ref[f, pl.ds(q_start, block_q)][:, None]
        return q_cache[f]

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        kb = kv_index_ref[i, j]
        k_start = pl.multiple_of(kb * block_k, block_k)
        ks = pl.ds(k_start, block_k)
        k = k_ref[ks, :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * qk_scale
        if masked:
            mask = element_mask(get_q, lambda f: ids_ref[f, ks][None, :], pattern, radius, window)
            s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = corr * l_prev + jnp.sum(p, axis=-1)
        v = v_ref[ks, :]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return corr[:, None] * acc + pv, m_next, l_next

    carry = (jnp.zeros((block_q, d), jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    n_part = kv_partial_ref[i]
    n_all = kv_count_ref[i]
    carry = lax.fori_loop(0, n_part, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(n_part, n_all, functools.partial(body, masked=False), carry)
    acc, m, l = carry
    # rows that saw no key (strict temporal pass): m stays -inf or at the mask value; output 0
    empty = m < 0.5 * MASK_VALUE
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / l_safe[:, None]).astype(o_ref.dtype)
    if lse_ref:   # natural log: m is in base-2 units of the scaled scores
        lse_ref[0][...] = jnp.where(empty, -jnp.inf, m * math.log(2.0) + jnp.log(l_safe))


def triton_block_sparse(q, k, v, tables: BlockTables, *, scale=None, interpret=False, num_warps=None,
                        num_stages=2, return_lse=False):
    """q [B,Hq,Np,D], k/v [B,Hkv,Np,D] in the tables' order -> [B,Hq,Np,D] in q.dtype.

    With ``return_lse`` also the per-row natural log-sum-exp of the scores, float32 [B,Hq,Np]. Rows
    with no key get output 0 and log-sum-exp -inf.
    """
    b, hq, npad, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    check_triton_inputs(q, k, v)
    bq, bk = tables.block_q, tables.block_k
    check_triton_blocks(bq, bk)
    nq = tables.num_q_blocks
    scale = d ** -0.5 if scale is None else float(scale)
    lay = tables.layout
    if num_warps is None:
        num_warps = 4 if d <= 64 and bq <= 64 else 8
    kernel = functools.partial(_kernel, block_q=bq, block_k=bk, scale=scale,
                               pattern=HeadPattern(tables.pattern), radius=lay.spatial_radius,
                               window=lay.temporal_window)
    m = tables.max_blocks
    whole2 = lambda shape: pl.BlockSpec(shape, lambda i, bb, h: (0,) * len(shape))
    in_specs = [
        whole2((nq, m)),                                            # kv_index
        whole2((nq,)),                                              # kv_count
        whole2((nq,)),                                              # kv_partial
        whole2((8, npad)),                                          # ids
        pl.BlockSpec((None, None, bq, d), lambda i, bb, h: (bb, h, i, 0)),
        pl.BlockSpec((None, None, npad, d), lambda i, bb, h: (bb, lax.div(h, g), 0, 0)),
        pl.BlockSpec((None, None, npad, d), lambda i, bb, h: (bb, lax.div(h, g), 0, 0)),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, d), lambda i, bb, h: (bb, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if return_lse:
        out_specs.append(pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)))
        out_shape.append(jax.ShapeDtypeStruct((b, hq, npad), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid=(nq, b, hq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="st_block_sparse_fwd_triton_lse" if return_lse else "st_block_sparse_fwd_triton",
    )(jnp.asarray(tables.kv_index), jnp.asarray(tables.kv_count), jnp.asarray(tables.kv_partial),
      jnp.asarray(tables.ids), q, k, v)
    return tuple(outs) if return_lse else outs[0]

