"""The backend table: per block-sparse backend, how to run it, what it accepts and its default blocks.

One :class:`Backend` per kernel in :data:`BACKENDS` (as splash attention keeps its kernel choices in
one place); :func:`resolve_backend` maps a name (or ``"auto"``: the platform's default) to its entry,
and :data:`BACKEND_NAMES` is the list every caller validates against.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from kernels.block_sparse_attention.mosaic_gpu import (check_mosaic_gpu_blocks, check_mosaic_gpu_inputs,
                                                       mosaic_gpu_block_sparse)
from kernels.block_sparse_attention.mosaic_gpu_ws import check_mosaic_gpu_ws_blocks, mosaic_gpu_ws_block_sparse
from kernels.block_sparse_attention.tpu import check_tpu_blocks, check_tpu_inputs, tpu_block_sparse
from kernels.block_sparse_attention.triton import (check_triton_blocks, check_triton_inputs,
                                                   triton_block_sparse)
from kernels.block_sparse_attention.blocks import block_tables
from kernels.block_sparse_attention.segments import segment_attention, segment_cells
from kernels.block_sparse_attention.xla import xla_block_sparse, xla_flop_ratio

__all__ = ["Backend", "KernelOptions", "BACKENDS", "BACKEND_NAMES", "DEFAULT_BLOCKS", "resolve_backend"]


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Per-call kernel settings: softmax ``scale`` (None: head_dim ** -0.5), ``interpret`` (Pallas
    interpret mode: a bool, or for mosaic_gpu also an InterpretGPUParams), ``num_warps`` /
    ``num_stages`` (Triton only)."""

    scale: float | None = None
    interpret: Any = False
    num_warps: int | None = None
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class Backend:
    """One block-sparse backend.

    run: a block-table kernel (``native_patterns`` False) is ``run(q, k, v, tables, options, return_lse)`` with
      q [B,Hq,Np,D], k/v [B,Hkv,Np,D] padded and in the tables' order (permuted for temporal passes); a
      native-pattern backend is ``run(q, k, v, layout, pattern, options, return_lse)`` on the original order,
      unpadded (N = layout.seq_len), any pattern in one pass. Either returns [B,Hq,N(p),D] (and the float32
      [B,Hq,N(p)] log-sum-exp with ``return_lse``).
    check_blocks(block_q, block_k) / check_inputs(q, k, v): raise for what the kernel cannot take.
    default_blocks: (block_q, block_k) when the caller gives none.
    computed_cells(layout, pattern, permuted, block_q, block_k): the (query, key) score cells the kernel
      computes for one head of one pass (its work: what a cost model counts).
    native_patterns: computes every pattern in the original order itself (no block tables, no permutation,
      no union split).
    """

    name: str
    run: Callable
    check_blocks: Callable[[int, int], None]
    check_inputs: Callable
    default_blocks: tuple[int, int]
    computed_cells: Callable[..., int]
    native_patterns: bool = False


def _listed_cells(layout, pattern, permuted, block_q, block_k) -> int:
    """The Pallas kernels visit each query block's listed key blocks."""
    tables = block_tables(layout, pattern, block_q, block_k, permuted=permuted)
    return int(tables.kv_count.sum()) * tables.block_q * tables.block_k


def _bucketed_cells(layout, pattern, permuted, block_q, block_k) -> int:
    """The XLA fallback pads each query block's list to its length bucket."""
    tables = block_tables(layout, pattern, block_q, block_k, permuted=permuted)
    return int(round(xla_flop_ratio(tables) * tables.num_q_blocks * tables.num_k_blocks)) * tables.block_q \
        * tables.block_k


def _segment_cells(layout, pattern, permuted, block_q, block_k) -> int:
    """The segment path computes whole frames and places (blocks and order do not apply)."""
    return segment_cells(layout, pattern)


def _run_xla(q, k, v, tables, options: KernelOptions, return_lse: bool):
    return xla_block_sparse(q, k, v, tables, scale=options.scale, return_lse=return_lse)


def _run_triton(q, k, v, tables, options: KernelOptions, return_lse: bool):
    return triton_block_sparse(q, k, v, tables, scale=options.scale, interpret=options.interpret,
                               num_warps=options.num_warps, num_stages=options.num_stages,
                               return_lse=return_lse)


def _run_tpu(q, k, v, tables, options: KernelOptions, return_lse: bool):
    return tpu_block_sparse(q, k, v, tables, scale=options.scale, interpret=options.interpret,
                            return_lse=return_lse)


def _run_mosaic_gpu(q, k, v, tables, options: KernelOptions, return_lse: bool):
    return mosaic_gpu_block_sparse(q, k, v, tables, scale=options.scale, interpret=options.interpret,
                                   return_lse=return_lse)


def _run_mosaic_gpu_ws(q, k, v, tables, options: KernelOptions, return_lse: bool):
    return mosaic_gpu_ws_block_sparse(q, k, v, tables, scale=options.scale, interpret=options.interpret,
                                      return_lse=return_lse)


def _run_segments(q, k, v, layout, pattern, options: KernelOptions, return_lse: bool):
    return segment_attention(q, k, v, layout, pattern, scale=options.scale, return_lse=return_lse)


def _accept_any(*_) -> None:
    """The XLA path takes any block sizes, head_dim and dtype."""


# triton 128 x 128: the best (or tied) of the sizes compared on an H200
# (benchmarks/results/gpu_kernels.md). mosaic_gpu 64 x 128: one warpgroup per query block holds the
# 64 x 128 scores and two 64 x D accumulators in registers (not timed yet). mosaic_gpu_ws 128 x 128:
# two consumer warpgroups of 64 rows share each K / V tile, FA3's tile (not timed yet)
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("xla", _run_xla, _accept_any, _accept_any, (128, 128), _bucketed_cells),
    Backend("triton", _run_triton, check_triton_blocks, check_triton_inputs, (128, 128), _listed_cells),
    Backend("mosaic_gpu", _run_mosaic_gpu, check_mosaic_gpu_blocks, check_mosaic_gpu_inputs, (64, 128),
            _listed_cells),
    Backend("mosaic_gpu_ws", _run_mosaic_gpu_ws, check_mosaic_gpu_ws_blocks, check_mosaic_gpu_inputs, (128, 128),
            _listed_cells),
    Backend("tpu", _run_tpu, check_tpu_blocks, check_tpu_inputs, (128, 128), _listed_cells),
    Backend("segments", _run_segments, _accept_any, _accept_any, (128, 128), _segment_cells, native_patterns=True),
)}
BACKEND_NAMES = ("auto", *BACKENDS)
DEFAULT_BLOCKS = {name: b.default_blocks for name, b in BACKENDS.items()}
# "auto": the platform's kernel (jax.default_backend() names), the segment path elsewhere (the CPU)
_AUTO = {"gpu": "triton", "cuda": "triton", "tpu": "tpu"}


def resolve_backend(name: str) -> Backend:
    """The table entry for ``name`` (one of BACKEND_NAMES; ``"auto"``: tpu on TPU, triton on GPU, segments
    elsewhere)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    if name == "auto":
        name = _AUTO.get(jax.default_backend(), "segments")
    return BACKENDS[name]
