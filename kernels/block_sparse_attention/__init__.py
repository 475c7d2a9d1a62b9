"""Block-sparse (ST-SpAttn) flash attention: Pallas GPU (Triton, Mosaic GPU) / TPU kernels, XLA
fallback and the segment path (XLA), reference; and the mask geometry they own (layouts, the element mask, block tables, static
head patterns)."""

from kernels.block_sparse_attention.api import (HeadGroup, backend_head_groups, block_sparse_attention, head_groups,
                                                merge_by_lse, normalize_patterns)
from kernels.block_sparse_attention.backends import (BACKEND_NAMES, BACKENDS, DEFAULT_BLOCKS, Backend,
                                                     KernelOptions, resolve_backend)
from kernels.block_sparse_attention.blocks import (EMPTY, FULL, PARTIAL, BlockSizeError, BlockTables,
                                                   block_counts, block_tables, classify_blocks,
                                                   padded_length)
from kernels.block_sparse_attention.common import PALLAS_HEAD_DIMS, HeadDimError
from kernels.block_sparse_attention.head_patterns import (HEAD_PATTERNS_FORMAT, load_head_patterns,
                                                          normalize_layer_patterns, save_head_patterns)
from kernels.block_sparse_attention.layout import (HeadPattern, LayoutError, STLayout, TokenIds, VideoSpan,
                                                   inverse_permutation, permutation, token_ids)
from kernels.block_sparse_attention.mask import element_mask, reference_mask
from kernels.block_sparse_attention.mosaic_gpu import mosaic_gpu_block_sparse
from kernels.block_sparse_attention.reference import dense_masked_attention, reference_attention
from kernels.block_sparse_attention.segments import segment_attention, segment_cells
from kernels.block_sparse_attention.tpu import tpu_block_sparse
from kernels.block_sparse_attention.triton import triton_block_sparse
from kernels.block_sparse_attention.xla import xla_block_sparse

__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "BlockSizeError", "BlockTables", "DEFAULT_BLOCKS",
           "EMPTY", "FULL", "HEAD_PATTERNS_FORMAT", "HeadDimError", "HeadGroup", "HeadPattern", "KernelOptions",
           "LayoutError", "PALLAS_HEAD_DIMS", "PARTIAL", "STLayout", "TokenIds", "VideoSpan",
           "backend_head_groups", "block_counts", "block_sparse_attention", "block_tables", "classify_blocks",
           "dense_masked_attention", "element_mask", "head_groups", "inverse_permutation", "load_head_patterns",
           "merge_by_lse", "mosaic_gpu_block_sparse", "normalize_layer_patterns", "normalize_patterns",
           "padded_length", "permutation", "reference_attention", "reference_mask", "resolve_backend",
           "save_head_patterns", "segment_attention", "segment_cells", "token_ids", "tpu_block_sparse", "triton_block_sparse",
           "xla_block_sparse"]
