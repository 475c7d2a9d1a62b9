"""Qwen2.5-VL in functional JAX: config, params, loader and forward pass (Hugging Face argument names)."""

from .config import ConfigError, Qwen25VLConfig, tiny_config
from .loader import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from .merge import FeatureCountError
from .model import Qwen25VLParams, embed_inputs, forward, init_params
from .rope_index import get_rope_index

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FeatureCountError",
    "Qwen25VLConfig",
    "Qwen25VLParams",
    "embed_inputs",
    "forward",
    "get_rope_index",
    "init_params",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
    "tiny_config",
]
