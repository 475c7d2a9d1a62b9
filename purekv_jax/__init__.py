"""PureKV-JAX: cross-layer KV-cache compression (CLIE) and spatial-temporal sparse prefill (ST-SpAttn)."""

from .attention import register_prefill_attention
from .cache import KVCache
from .config import KVPlan, PureKVConfig, PureKVConfigError
from .decode_budget import DecodeBudget
from .generation import GenerateError, GenerateResult, generate
from .presets import PRESETS  # (registers the named policies: PureKVConfig.snapkv(), ...)
from .prompt_state import PromptState, answer, prefill_prompt
from .prompt_state_files import load_state, save_state
from .policies import CLIE, H2O, RandomScore, SnapKV, StreamingLLM, keep_set, pyramid_budgets
from .st_sparse import HeadPattern, STLayout, block_tables, calibrate_head_patterns

__all__ = [
    "CLIE", "DecodeBudget", "H2O", "PRESETS", "GenerateError", "GenerateResult", "HeadPattern", "KVCache", "KVPlan",
    "PromptState", "PureKVConfig", "PureKVConfigError", "RandomScore", "STLayout", "SnapKV", "StreamingLLM",
    "answer", "block_tables", "calibrate_head_patterns", "generate", "keep_set", "load_state", "prefill_prompt",
    "pyramid_budgets", "register_prefill_attention", "save_state",
]
