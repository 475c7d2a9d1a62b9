"""Block-sparse (ST-SpAttn) flash attention: Pallas GPU (Triton, Mosaic GPU) / TPU kernels, XLA
fallback, reference."""

from kernels.block_sparse_attention.api import (DEFAULT_BLOCKS, block_sparse_attention,
                                                normalize_patterns, resolve_backend)
from kernels.block_sparse_attention.common import (BACKENDS, PALLAS_HEAD_DIMS, HeadDimError,
                                                   element_mask)
from kernels.block_sparse_attention.gpu import triton_block_sparse
from kernels.block_sparse_attention.reference import dense_masked_attention, reference_attention
from kernels.block_sparse_attention.xla import xla_block_sparse


def mosaic_gpu_block_sparse(*args, **kwargs):
    from kernels.block_sparse_attention.mosaic_gpu import mosaic_gpu_block_sparse as f
    return f(*args, **kwargs)


def tpu_block_sparse(*args, **kwargs):
    from kernels.block_sparse_attention.tpu import tpu_block_sparse as f
    return f(*args, **kwargs)


__all__ = ["BACKENDS", "DEFAULT_BLOCKS", "PALLAS_HEAD_DIMS", "HeadDimError", "block_sparse_attention",
           "dense_masked_attention", "element_mask", "mosaic_gpu_block_sparse", "normalize_patterns",
           "reference_attention", "resolve_backend", "triton_block_sparse", "tpu_block_sparse",
           "xla_block_sparse"]
