"""ST-SpAttn for users: the layout, mask and block-table names of the kernels (which own them), the
static head-pattern files, and head calibration. The prefill integration is
:mod:`purekv_jax.st_sparse.prefill`."""

from kernels.block_sparse_attention import (EMPTY, FULL, HEAD_PATTERNS_FORMAT, PARTIAL, BlockSizeError,
                                            BlockTables, HeadPattern, LayoutError, STLayout, TokenIds,
                                            VideoSpan, block_counts, block_tables, classify_blocks,
                                            inverse_permutation, load_head_patterns,
                                            normalize_layer_patterns, padded_length, permutation,
                                            reference_mask, save_head_patterns, token_ids)
from purekv_jax.st_sparse.calibrate import (DEFAULT_CANDIDATES, calibrate_head_patterns,
                                            pattern_errors, sample_video_rows)

__all__ = ["DEFAULT_CANDIDATES", "calibrate_head_patterns", "pattern_errors", "sample_video_rows",
           "HeadPattern", "LayoutError", "STLayout", "TokenIds", "VideoSpan", "inverse_permutation",
           "permutation", "reference_mask", "token_ids", "BlockSizeError", "BlockTables",
           "block_counts", "block_tables", "classify_blocks", "padded_length", "EMPTY", "PARTIAL",
           "FULL", "HEAD_PATTERNS_FORMAT", "load_head_patterns", "normalize_layer_patterns",
           "save_head_patterns"]
