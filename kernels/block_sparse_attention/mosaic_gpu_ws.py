"""Warp-specialised Pallas Mosaic GPU block-sparse flash attention forward (FlashAttention-3 structure).

The one-warpgroup kernel (``mosaic_gpu.py``) issues its own TMA copies and waits on them between its
matmuls, and one warpgroup per CTA leaves the tensor cores idle during its softmax. This variant
follows jax's Mosaic GPU FlashAttention-3 kernel (``jax/experimental/pallas/ops/gpu/attention_mgpu.py``)
on a block list instead of the causal range:

* three warpgroups per CTA (``plgpu.kernel(num_threads=3, thread_name="wg")``): two **consumer**
  warpgroups, each owning 64 rows of the CTA's 128-row query block (block_q = 128 in the tables), and
  one **producer** warpgroup that only issues TMA copies (and gives its registers to the consumers,
  ``set_max_registers``);
* both consumers walk the *same* key-block list (the 128-row block's: partial blocks, masked per element
  from the per-token ids, then full ones), so every K / V tile is loaded once for 128 query rows;
* the producer streams K^T / V / key-id tiles of list entry j into slot ``j % stages`` of a ring of
  ``stages`` SMEM slots (as many as the SMEM budget allows, up to 4), refilling a slot only once both
  consumers arrived on its "consumed" barriers (K and its ids after the masked scores, V after P V),
  and at the end waits for the last releases, so that every barrier phase is observed (the interpreter
  of jax 0.11 checks this when it frees a barrier);
* optionally (``schedule=True``, the default) the two consumers ping-pong on a schedule barrier, as in
  FA3: one warpgroup's softmax runs while the other's WGMMAs occupy the tensor cores.

Kept from ``mosaic_gpu.py`` so that the same kernel runs in the Mosaic GPU interpreters of jax 0.10 and
0.11 (which model WGMMA operands as SMEM refs only): K is passed transposed ([B, Hkv, D, Np]), P goes
through SMEM (one [64, bk] tile per consumer), P V goes into a fresh accumulator that is added to the
running output. Online softmax in float32 with base-2 exponentials; GQA maps q head h to kv head
h // (Hq // Hkv); rows with no key get output 0 and log-sum-exp -inf.

Inputs: bfloat16 / float16, head_dim in PALLAS_HEAD_DIMS, block_q = 128 (two 64-row consumers),
block_k a multiple of 64 up to 256, SMEM <= 227 KiB with at least two stages.

Validated on the CPU in the Mosaic GPU interpreter (its warpgroups run as concurrent threads with the
real barrier semantics; race detector in one test) against the dense float32 reference, and by
``jax.export(platforms=['cuda'])`` (the Pallas -> Mosaic GPU lowering: layouts, WGMMA / TMA rules, SMEM
budget). Register pressure, PTX / SASS, speed and asynchronous hazards only show on a GPU
(``benchmarks/gpu_kernels.py`` times it beside the one-warpgroup kernel and Triton).
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
from kernels.block_sparse_attention.common import MASK_VALUE
from kernels.block_sparse_attention.layout import HeadPattern
from kernels.block_sparse_attention.mask import element_mask
from kernels.block_sparse_attention.mosaic_gpu import (SMEM_BYTES_MAX, check_mosaic_gpu_inputs, check_table_shapes,
                                                       interpret_params, layout_cast_for, mma_transforms)

__all__ = ["mosaic_gpu_ws_block_sparse", "check_mosaic_gpu_ws_blocks", "ws_stages", "CONSUMER_ROWS",
           "MAX_STAGES"]

CONSUMER_ROWS = 64      # query rows per consumer warpgroup (one WGMMA M tile)
CONSUMERS = 2           # consumer warpgroups per CTA; block_q = CONSUMERS * CONSUMER_ROWS
MAX_STAGES = 4          # deepest K / V ring tried


def _smem_bytes(bk, d, itemsize, stages, lse=False):
    """Two q / out tiles + ``stages`` K and V slots + two P tiles (itemsize) + two query-id and
    ``stages`` key-id tiles (int32) (+ two [64] float32 log-sum-exp tiles)."""
    rows = CONSUMERS * CONSUMER_ROWS
    return ((rows * d + 2 * stages * bk * d + rows * bk) * itemsize + 8 * (rows + stages * bk) * 4
            + (4 * rows if lse else 0))


def ws_stages(bk: int, d: int, itemsize: int = 2, lse: bool = False) -> int:
    """The deepest K / V ring (2..MAX_STAGES) that fits SMEM_BYTES_MAX; 0 when not even two fit."""
    fit = [s for s in range(2, MAX_STAGES + 1) if _smem_bytes(bk, d, itemsize, s, lse) <= SMEM_BYTES_MAX]
    return max(fit, default=0)


def check_mosaic_gpu_ws_blocks(block_q: int, block_k: int):
    if block_q != CONSUMERS * CONSUMER_ROWS:
        raise BlockSizeError(f"the warp-specialised Mosaic GPU kernel needs block_q = "
                             f"{CONSUMERS * CONSUMER_ROWS} ({CONSUMERS} consumer warpgroups of "
                             f"{CONSUMER_ROWS} rows), got {block_q}")
    if block_k % 64 or not 64 <= block_k <= 256:
        raise BlockSizeError(f"the warp-specialised Mosaic GPU kernel needs block_k to be a multiple of 64 "
                             f"in [64, 256], got {block_k}")


def _kernel(kv_index_ref, kv_count_ref, kv_partial_ref, ids_ref, q_ref, kt_ref, v_ref, o_ref, *refs,
            group, scale, pattern, radius, window, cast, return_lse, stages, schedule):
    """GMEM refs: kv_index [nq, m], kv_count / kv_partial [nq], ids [8, Np] int32, q / out [B, Hq, Np, D],
    kt [B, Hkv, D, Np], v [B, Hkv, Np, D] (and lse [B, Hq, Np] float32). SMEM: q_smem [2, 64, D],
    k_smem [S, D, bk], v_smem [S, bk, D], p_smem [2, 64, bk], qid_smem [2, 8, 64], kid_smem [S, 8, bk]
    (and lse_smem [2, 64] float32); barriers: q (2 per consumer), K / V / key-id slots, K / V consumed
    (two arrivals each), the schedule barrier."""
    if return_lse:
        lse_ref, *refs = refs
    (q_smem, k_smem, v_smem, p_smem, qid_smem, kid_smem, *lse_smem, q_bar, k_bar, v_bar, kid_bar,
     k_free, v_free, sched_bar) = refs
    _, bq, d = q_smem.shape
    bk = k_smem.shape[2]
    i, bb, h = lax.axis_index("q"), lax.axis_index("b"), lax.axis_index("h")
    wg = lax.axis_index("wg")
    kvh = lax.div(h, jnp.int32(group))
    n_part, n_all = kv_partial_ref[i], kv_count_ref[i]
    row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def schedule_sync():
        if schedule:
            plgpu.barrier_arrive(sched_bar)
            plgpu.barrier_wait(sched_bar)

    @pl.when(wg < CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        q_tile, qid_tile, p_tile = q_smem.at[wg], qid_smem.at[wg], p_smem.at[wg]
        q_rows = pl.ds(i * (CONSUMERS * bq) + wg * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[bb, h, q_rows], q_tile, q_bar.at[2 * wg])
        plgpu.copy_gmem_to_smem(ids_ref.at[:, q_rows], qid_tile, q_bar.at[2 * wg + 1])
        plgpu.barrier_wait(q_bar.at[2 * wg])
        plgpu.barrier_wait(q_bar.at[2 * wg + 1])
        qk_scale = scale * math.log2(math.e)
        pl.when(wg == 1)(schedule_sync)

        def body(j, carry, masked):
            acc, m_prev, l_prev = carry
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(kid_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot])
                schedule_sync()             # the other consumer's softmax overlaps this WGMMA
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32)) * qk_scale     # [64, bk]
            if masked:
                get_q = lambda f: lax.broadcast_in_dim(cast(qid_tile[f], row), (bq, bk), [0])
                get_k = lambda f: lax.broadcast_in_dim(cast(kid_smem[slot, f], col), (bq, bk), [1])
                s = jnp.where(element_mask(get_q, get_k, pattern, radius, window), s, MASK_VALUE)
                plgpu.commit_smem()   # order these generic reads of the key ids before the next TMA write
            plgpu.barrier_arrive(k_free.at[slot])                                # K and its ids read
            m_next = jnp.maximum(m_prev, s.max(axis=1))
            corr = jnp.exp2(m_prev - m_next)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_next, (bq, bk), [0]))
            l_next = corr * l_prev + p.sum(axis=1)
            p_tile[...] = p.astype(p_tile.dtype)
            plgpu.commit_smem()
            if schedule:
                plgpu.barrier_arrive(sched_bar)   # softmax done
            plgpu.barrier_wait(v_bar.at[slot])
            if schedule:
                plgpu.barrier_wait(sched_bar)     # the tensor cores are free

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_tile, v_smem.at[slot])
                return acc_ref[...]

            o = pl.run_scoped(pv, plgpu.ACC((bq, d), jnp.float32))                 # [64, D]
            plgpu.barrier_arrive(v_free.at[slot])
            return lax.broadcast_in_dim(corr, (bq, d), [0]) * acc + o, m_next, l_next

        carry = (cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
                 cast(jnp.full((bq,), -jnp.inf, jnp.float32), row),
                 cast(jnp.zeros((bq,), jnp.float32), row))
        carry = lax.fori_loop(0, n_part, functools.partial(body, masked=True), carry)
        acc, m, l = lax.fori_loop(n_part, n_all, functools.partial(body, masked=False), carry)
        pl.when(wg == 0)(schedule_sync)
        # rows that saw no key (strict temporal pass): m stays -inf (no block) or at the mask value
        empty = m < 0.5 * MASK_VALUE
        l_safe = jnp.where(empty, 1.0, l)
        inv = jnp.where(empty, 0.0, 1.0 / l_safe)
        q_tile[...] = (acc * lax.broadcast_in_dim(inv, (bq, d), [0])).astype(q_tile.dtype)
        if return_lse:   # natural log: m is in base-2 units of the scaled scores
            lse_smem[0].at[wg][...] = jnp.where(empty, -jnp.inf, m * math.log(2.0) + jnp.log(l_safe))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, o_ref.at[bb, h, q_rows])
        if return_lse:
            plgpu.copy_smem_to_gmem(lse_smem[0].at[wg], lse_ref.at[bb, h, q_rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def fetch_k(j, slot):
            ks = pl.ds(kv_index_ref[i, j] * bk, bk)
            plgpu.copy_gmem_to_smem(kt_ref.at[bb, kvh, :, ks], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(ids_ref.at[:, ks], kid_smem.at[slot], kid_bar.at[slot])

        def fetch_v(j, slot):
            ks = pl.ds(kv_index_ref[i, j] * bk, bk)
            plgpu.copy_gmem_to_smem(v_ref.at[bb, kvh, ks], v_smem.at[slot], v_bar.at[slot])

        def fill(j, _):          # the first `stages` entries: every slot is free
            fetch_k(j, j)
            fetch_v(j, j)

        def refill(j, _):        # later entries: wait until both consumers released the slot
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_free.at[slot])
            fetch_k(j, slot)
            plgpu.barrier_wait(v_free.at[slot])
            fetch_v(j, slot)

        def drain(j, _):         # observe the last releases too: every barrier phase is waited for
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

        lax.fori_loop(0, jnp.minimum(n_all, stages), fill, None)
        lax.fori_loop(stages, n_all, refill, None)
        lax.fori_loop(jnp.maximum(n_all - stages, 0), n_all, drain, None)


def mosaic_gpu_ws_block_sparse(q, k, v, tables: BlockTables, *, scale=None, interpret=False, return_lse=False,
                               schedule=True, stages=None):
    """q [B,Hq,Np,D], k/v [B,Hkv,Np,D] in the tables' order (tables with block_q = 128) -> [B,Hq,Np,D] in
    q.dtype (and the per-row natural log-sum-exp, float32 [B,Hq,Np], with ``return_lse``).

    ``schedule``: the consumers' ping-pong schedule barrier; ``stages``: K / V ring depth (None: the
    deepest that fits SMEM). ``interpret``: False (compile for the GPU), True (Mosaic GPU interpreter on
    the CPU) or an InterpretGPUParams.
    """
    check_table_shapes(q, k, v, tables)
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    check_mosaic_gpu_inputs(q, k, v)
    bq, bk = tables.block_q, tables.block_k
    check_mosaic_gpu_ws_blocks(bq, bk)
    dtype = q.dtype
    itemsize = jnp.dtype(dtype).itemsize
    most = ws_stages(bk, d, itemsize, return_lse)
    stages = most if stages is None else int(stages)
    if not 2 <= stages <= max(most, 1):
        raise BlockSizeError(f"the warp-specialised Mosaic GPU kernel with block_k={bk}, head_dim={d} "
                             f"needs {_smem_bytes(bk, d, itemsize, max(stages, 2), return_lse)} bytes of SMEM "
                             f"for {max(stages, 2)} stages (at most {SMEM_BYTES_MAX}, at least 2 stages); "
                             f"use a smaller block_k")
    scale = d ** -0.5 if scale is None else float(scale)
    if interpret is True:
        interpret = interpret_params()
    lay = tables.layout
    kernel = functools.partial(
        _kernel, group=hq // hkv, scale=scale, pattern=HeadPattern(tables.pattern), radius=lay.spatial_radius,
        window=lay.temporal_window, cast=layout_cast_for(interpret), return_lse=return_lse, stages=stages,
        schedule=schedule)
    tf = mma_transforms(min(d, bk), dtype)
    rows = CONSUMER_ROWS
    scratch = [plgpu.SMEM((CONSUMERS, rows, d), dtype, transforms=tf),
               plgpu.SMEM((stages, d, bk), dtype, transforms=tf),
               plgpu.SMEM((stages, bk, d), dtype, transforms=tf),
               plgpu.SMEM((CONSUMERS, rows, bk), dtype, transforms=tf),
               plgpu.SMEM((CONSUMERS, 8, rows), jnp.int32),
               plgpu.SMEM((stages, 8, bk), jnp.int32),
               *([plgpu.SMEM((CONSUMERS, rows), jnp.float32)] if return_lse else []),
               plgpu.Barrier(num_barriers=2 * CONSUMERS),                         # q tiles, query ids
               plgpu.Barrier(num_barriers=stages),                                # K slots
               plgpu.Barrier(num_barriers=stages),                                # V slots
               plgpu.Barrier(num_barriers=stages),                                # key-id slots
               plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),        # K slot consumed
               plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),        # V slot consumed
               plgpu.Barrier(num_arrivals=CONSUMERS)]                             # schedule (ping-pong)
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
    if return_lse:
        out_type.append(jax.ShapeDtypeStruct(q.shape[:3], jnp.float32))
    call = plgpu.kernel(kernel, out_type=tuple(out_type) if return_lse else out_type[0], scratch_types=scratch,
                        grid=(tables.num_q_blocks, b, hq), grid_names=("q", "b", "h"), num_threads=CONSUMERS + 1,
                        thread_name="wg", interpret=interpret or None)
    outs = call(jnp.asarray(tables.kv_index), jnp.asarray(tables.kv_count), jnp.asarray(tables.kv_partial),
                jnp.asarray(tables.ids), q, jnp.swapaxes(k, 2, 3), v)
    return tuple(outs) if return_lse else outs
