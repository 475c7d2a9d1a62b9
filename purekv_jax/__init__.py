"""PureKV-JAX: cross-layer KV-cache compression (CLIE) and spatial-temporal sparse prefill (ST-SpAttn)."""

from .attention import register_prefill_attention
from .cache import KVCache
from .config import KVPlan, PureKVConfig, PureKVConfigError
from .generation import GenerateError, GenerateResult, generate
from .presets import PRESETS  # (registers the named policies: PureKVConfig.snapkv(), ...)
from .policies import CLIE, H2O, RandomScore, SnapKV, StreamingLLM, keep_set, pyramid_budgets
from .st_sparse import HeadPattern, STLayout, block_tables, calibrate_head_patterns

__all__ = [
    "CLIE", "H2O", "PRESETS", "GenerateError", "GenerateResult", "HeadPattern", "KVCache", "KVPlan",
    "PureKVConfig", "PureKVConfigError", "RandomScore", "STLayout", "SnapKV", "StreamingLLM",
    "block_tables", "calibrate_head_patterns", "generate", "keep_set", "pyramid_budgets",
    "register_prefill_attention",
]
