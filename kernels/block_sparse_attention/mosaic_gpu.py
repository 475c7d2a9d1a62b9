"""Pallas Mosaic GPU (Hopper: TMA + WGMMA) block-sparse flash attention forward.

``plgpu.kernel`` over the grid (query block, batch, q head), one warpgroup per program. The program
TMA-copies its query block and query ids to SMEM, reads its key-block count and list with scalar
loads straight from GMEM (Mosaic GPU has no scalar prefetch) and walks the list with two
``fori_loop``s: first the partial blocks (element mask from the per-token ids), then the full ones
(no mask). The key / value / key-id tiles of list entry j are TMA-copied with the dynamic slice
``pl.ds(kv_index[i, j] * block_k, block_k)`` into one of two SMEM slots (double buffering: entry
j + 1 is in flight while entry j is computed), each slot with its own TMA barriers. S = Q K^T and
P V are WGMMAs with both operands in SMEM (P is stored to SMEM as bf16/f16); online softmax in
float32 with base-2 exponentials; GQA maps q head h to kv head h // (Hq // Hkv). Empty blocks are
never read. With ``return_lse`` the per-row natural log-sum-exp (float32 [B, Hq, Np]; -inf and
output 0 for rows with no key) goes from the WGMMA row layout to a [bq] float32 SMEM tile and by a
1-D TMA to GMEM (as jax's FA3 kernel writes its residuals).

Choices made so that the same kernel runs in the Mosaic GPU interpreters of jax 0.10 and 0.11
(which model WGMMA operands as SMEM refs only, and jax 0.10's cannot read a transposed SMEM ref):
K is passed transposed, [B, Hkv, D, Np] (one XLA transpose of K per call), so the Q K^T WGMMA reads
a plain SMEM tile; P goes through SMEM rather than registers; P V goes into a fresh WGMMA
accumulator that is then added to the running output (the interpreters have no rule for the
in-place ``pl.run_state(...)(plgpu.ACC.init(acc))`` that jax's own FA3 kernel uses: one more
bq x D float32 register tile). All WGMMA operands share one swizzle (lhs and rhs must match).

Inputs: bfloat16 or float16 (WGMMA operands; float32 would mean TF32 matmuls, ~1e-3 error, and is
rejected), head_dim in PALLAS_HEAD_DIMS, block_q in {64, 128} (one warpgroup holds the bq x bk
scores and two bq x D float32 accumulators in registers), block_k a multiple of 64 up to 256 (WGMMA
N <= 256), SMEM use <= 227 KiB (H100 / H200). Default blocks 64 x 128 (not timed on hardware yet).

Tested on the CPU in the Mosaic GPU interpreter (``interpret=True`` -> InterpretGPUParams: it
simulates GMEM / SMEM, TMA, barriers; WGMMA is a synchronous numpy matmul there) on jax 0.10.2 and
0.11.2. ``jax.export`` for platforms=['cuda'] lowers from a CPU-only machine on both versions (a
``mosaic_gpu_v2`` custom call, no disabled safety check, no abstract device needed): the Pallas ->
Mosaic GPU lowering (layouts, WGMMA / TMA shape rules, SMEM budget) is checked there; PTX / SASS
generation, register pressure, speed and asynchronous hazards are only checked on a GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.block_sparse_attention.blocks import BlockSizeError, BlockTables
from kernels.block_sparse_attention.common import MASK_VALUE, check_head_dim
from kernels.block_sparse_attention.layout import HeadPattern
from kernels.block_sparse_attention.mask import element_mask

__all__ = ["mosaic_gpu_block_sparse", "check_mosaic_gpu_blocks", "check_mosaic_gpu_dtype",
           "check_mosaic_gpu_inputs", "check_table_shapes", "interpret_params", "layout_cast_for",
           "mma_transforms", "MOSAIC_GPU_DTYPES", "SMEM_BYTES_MAX"]

MOSAIC_GPU_DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_BYTES_MAX = 232448          # 227 KiB: dynamic shared memory per block on H100 / H200


def interpret_params():
    """Mosaic GPU interpret-mode parameters (exported by plgpu from jax 0.11, private in 0.10)."""
    try:
        return plgpu.InterpretGPUParams()
    except AttributeError:   # jax 0.10: only in a private module
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        return InterpretGPUParams()


def check_mosaic_gpu_blocks(block_q: int, block_k: int):
    if block_q not in (64, 128):
        raise BlockSizeError(f"the Mosaic GPU kernel needs block_q to be 64 or 128 (one warpgroup "
                             f"per query block), got {block_q}")
    if block_k % 64 or not 64 <= block_k <= 256:
        raise BlockSizeError(f"the Mosaic GPU kernel needs block_k to be a multiple of 64 in "
                             f"[64, 256], got {block_k}")


def check_mosaic_gpu_dtype(q, k, v):
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"the Mosaic GPU kernel needs q, k, v of one dtype, got q {q.dtype}, "
                        f"k {k.dtype}, v {v.dtype}")
    if q.dtype not in MOSAIC_GPU_DTYPES:
        raise TypeError(f"the Mosaic GPU kernel takes bfloat16 or float16 q/k/v (WGMMA operands), "
                        f"got {q.dtype}; cast, or use backend='triton' / 'xla' for float32")


def check_mosaic_gpu_inputs(q, k, v):
    """q [B,Hq,N,D], k/v [B,Hkv,N,D]: one dtype, bfloat16 or float16; head_dim in PALLAS_HEAD_DIMS."""
    check_head_dim(q.shape[-1], "mosaic_gpu")
    check_mosaic_gpu_dtype(q, k, v)


def check_table_shapes(q, k, v, tables: BlockTables):
    """q [B,Hq,Np,D], k / v [B,Hkv,Np,D] with Np the tables' padded length (raises ValueError)."""
    b, hq, npad, d = q.shape
    if npad != tables.padded_len:
        raise ValueError(f"q {q.shape} must be [B, Hq, Np, D] with Np = the tables' padded length "
                         f"{tables.padded_len}")
    if k.shape != v.shape or k.ndim != 4 or (k.shape[0], k.shape[2:]) != (b, (npad, d)):
        raise ValueError(f"k {k.shape} and v {v.shape} must be [B={b}, Hkv, Np={npad}, D={d}]")
    if hq % k.shape[1]:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")


def _smem_bytes(bq, bk, d, itemsize, lse=False):
    """q/out tile + 2 K slots + 2 V slots + P tile (itemsize) + query / 2 key id tiles (int32)
    (+ the [bq] float32 log-sum-exp tile)."""
    return ((bq * d + 4 * bk * d + bq * bk) * itemsize + 8 * (bq + 2 * bk) * 4
            + (4 * bq if lse else 0))


def _check_smem(bq, bk, d, itemsize, lse=False):
    need = _smem_bytes(bq, bk, d, itemsize, lse)
    if need > SMEM_BYTES_MAX:
        raise BlockSizeError(f"the Mosaic GPU kernel with block_q={bq}, block_k={bk}, head_dim={d} "
                             f"needs {need} bytes of SMEM > {SMEM_BYTES_MAX}; use a smaller block_k")


def layout_cast_for(interpret):
    """``plgpu.layout_cast``, or the identity under jax 0.10's Mosaic GPU interpreter (it has no rule for
    layout_cast; 0.11's treats it as the no-op it is for values). Layouts only matter to the real
    lowering."""
    if bool(interpret) and jax.__version_info__ < (0, 11):
        return lambda x, layout: x
    return plgpu.layout_cast


def mma_transforms(minor: int, dtype):
    """Tiling + swizzle of the WGMMA SMEM operands (one swizzle for all: lhs and rhs must match)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(kv_index_ref, kv_count_ref, kv_partial_ref, ids_ref, q_ref, kt_ref, v_ref, o_ref,
            *refs, group, scale, pattern, radius, window, cast, return_lse):
    """GMEM refs: kv_index [nq, m], kv_count / kv_partial [nq], ids [8, Np] int32, q / out
    [B, Hq, Np, D], kt [B, Hkv, D, Np], v [B, Hkv, Np, D] (and lse [B, Hq, Np] float32 with
    ``return_lse``). SMEM: q_smem [bq, D], k_smem [2, D, bk], v_smem [2, bk, D], p_smem [bq, bk],
    qid_smem [8, bq], kid_smem [2, 8, bk] (and lse_smem [bq] float32)."""
    if return_lse:
        lse_ref, *refs = refs
    (q_smem, k_smem, v_smem, p_smem, qid_smem, kid_smem, *lse_smem, q_bar, k_bar, v_bar,
     kid_bar) = refs
    bq, d = q_smem.shape
    bk = k_smem.shape[2]
    i, bb, h = lax.axis_index("q"), lax.axis_index("b"), lax.axis_index("h")
    kvh = lax.div(h, jnp.int32(group))
    q_rows = pl.ds(i * bq, bq)
    qk_scale = scale * math.log2(math.e)
    row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    plgpu.copy_gmem_to_smem(q_ref.at[bb, h, q_rows], q_smem, q_bar.at[0])
    plgpu.copy_gmem_to_smem(ids_ref.at[:, q_rows], qid_smem, q_bar.at[1])
    n_part, n_all = kv_partial_ref[i], kv_count_ref[i]

    def fetch(j, slot):
        ks = pl.ds(kv_index_ref[i, j] * bk, bk)
        plgpu.copy_gmem_to_smem(kt_ref.at[bb, kvh, :, ks], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bb, kvh, ks], v_smem.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(ids_ref.at[:, ks], kid_smem.at[slot], kid_bar.at[slot])

    @pl.when(n_all > 0)
    def _():
        fetch(0, 0)

    plgpu.barrier_wait(q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[1])

    def matmul(a_smem, b_smem, n):
        def run(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b_smem)
            return acc_ref[...]
        return pl.run_scoped(run, plgpu.ACC((bq, n), jnp.float32))

    def body(j, carry, masked):
        acc, m_prev, l_prev = carry
        slot = lax.rem(j, 2)

        @pl.when(j + 1 < n_all)
        def _():
            fetch(j + 1, 1 - slot)

        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(kid_bar.at[slot])
        s = matmul(q_smem, k_smem.at[slot], bk) * qk_scale            # [bq, bk]
        if masked:
            get_q = lambda f: lax.broadcast_in_dim(cast(qid_smem[f], row), (bq, bk), [0])
            get_k = lambda f: lax.broadcast_in_dim(cast(kid_smem[slot, f], col), (bq, bk), [1])
            s = jnp.where(element_mask(get_q, get_k, pattern, radius, window), s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_next, (bq, bk), [0]))
        l_next = corr * l_prev + p.sum(axis=1)
        p_smem[...] = p.astype(p_smem.dtype)
        plgpu.commit_smem()
        plgpu.barrier_wait(v_bar.at[slot])
        pv = matmul(p_smem, v_smem.at[slot], d)                        # [bq, D]
        return lax.broadcast_in_dim(corr, (bq, d), [0]) * acc + pv, m_next, l_next

    carry = (cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
             cast(jnp.full((bq,), -jnp.inf, jnp.float32), row),
             cast(jnp.zeros((bq,), jnp.float32), row))
    carry = lax.fori_loop(0, n_part, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(n_part, n_all, functools.partial(body, masked=False), carry)
    acc, m, l = carry
    # rows that saw no key (strict temporal pass): m stays -inf (no block) or at the mask value
    # (masked blocks only); output 0 and log-sum-exp -inf
    empty = m < 0.5 * MASK_VALUE
    l_safe = jnp.where(empty, 1.0, l)
    inv = jnp.where(empty, 0.0, 1.0 / l_safe)
    q_smem[...] = (acc * lax.broadcast_in_dim(inv, (bq, d), [0])).astype(q_smem.dtype)
    if return_lse:   # natural log: m is in base-2 units of the scaled scores
        lse_smem[0][...] = jnp.where(empty, -jnp.inf, m * math.log(2.0) + jnp.log(l_safe))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bb, h, q_rows])
    if return_lse:
        plgpu.copy_smem_to_gmem(lse_smem[0], lse_ref.at[bb, h, q_rows])
    plgpu.wait_smem_to_gmem(0)


def mosaic_gpu_block_sparse(q, k, v, tables: BlockTables, *, scale=None, interpret=False,
                            return_lse=False):
    """q [B,Hq,Np,D], k/v [B,Hkv,Np,D] in the tables' order -> [B,Hq,Np,D] in q.dtype.

    With ``return_lse`` also the per-row natural log-sum-exp of the scores, float32 [B,Hq,Np]
    (written from a [bq] float32 SMEM tile by a 1-D TMA, as jax's FA3 kernel does). Rows with no
    key get output 0 and log-sum-exp -inf.

    ``interpret``: False (compile for the GPU), True (Mosaic GPU interpreter on the CPU, default
    InterpretGPUParams) or an InterpretGPUParams.
    """
    check_table_shapes(q, k, v, tables)
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    check_mosaic_gpu_inputs(q, k, v)
    bq, bk = tables.block_q, tables.block_k
    check_mosaic_gpu_blocks(bq, bk)
    dtype = q.dtype
    _check_smem(bq, bk, d, jnp.dtype(dtype).itemsize, return_lse)
    scale = d ** -0.5 if scale is None else float(scale)
    if interpret is True:
        interpret = interpret_params()
    lay = tables.layout
    kernel = functools.partial(
        _kernel, group=hq // hkv, scale=scale, pattern=HeadPattern(tables.pattern),
        radius=lay.spatial_radius, window=lay.temporal_window,
        cast=layout_cast_for(interpret), return_lse=return_lse)
    tf = mma_transforms(min(d, bk), dtype)
    scratch = [plgpu.SMEM((bq, d), dtype, transforms=tf),
               plgpu.SMEM((2, d, bk), dtype, transforms=tf),
               plgpu.SMEM((2, bk, d), dtype, transforms=tf),
               plgpu.SMEM((bq, bk), dtype, transforms=tf),
               plgpu.SMEM((8, bq), jnp.int32),
               plgpu.SMEM((2, 8, bk), jnp.int32),
               *([plgpu.SMEM((bq,), jnp.float32)] if return_lse else []),
               plgpu.Barrier(num_barriers=2),                 # query tile, query ids
               plgpu.Barrier(num_barriers=2),                 # K slots
               plgpu.Barrier(num_barriers=2),                 # V slots
               plgpu.Barrier(num_barriers=2)]                 # key-id slots
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
    if return_lse:
        out_type.append(jax.ShapeDtypeStruct(q.shape[:3], jnp.float32))
    call = plgpu.kernel(kernel, out_type=tuple(out_type) if return_lse else out_type[0],
                        scratch_types=scratch, grid=(tables.num_q_blocks, b, hq),
                        grid_names=("q", "b", "h"), interpret=interpret or None)
    outs = call(jnp.asarray(tables.kv_index), jnp.asarray(tables.kv_count),
                jnp.asarray(tables.kv_partial), jnp.asarray(tables.ids), q, jnp.swapaxes(k, 2, 3), v)
    return tuple(outs) if return_lse else outs
