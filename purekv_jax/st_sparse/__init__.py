"""ST-SpAttn: layouts (per-token ids), masks and block tables."""

from purekv_jax.st_sparse.layout import (HeadPattern, LayoutError, STLayout, TokenIds, VideoSpan,
                                         inverse_permutation, permutation, reference_mask,
                                         token_ids)
from purekv_jax.st_sparse.blocks import (BlockSizeError, BlockTables, block_counts, block_tables,
                                         classify_blocks, padded_length, EMPTY, PARTIAL, FULL)
from purekv_jax.st_sparse.calibrate import (DEFAULT_CANDIDATES, calibrate_head_patterns,
                                            pattern_errors, sample_video_rows)

__all__ = ["DEFAULT_CANDIDATES", "calibrate_head_patterns", "pattern_errors", "sample_video_rows",
           "HeadPattern", "LayoutError", "STLayout", "TokenIds", "VideoSpan", "inverse_permutation",
           "permutation", "reference_mask", "token_ids", "BlockSizeError", "BlockTables",
           "block_counts", "block_tables", "classify_blocks", "padded_length", "EMPTY", "PARTIAL",
           "FULL"]
