"""Qwen2.5-VL in JAX with Flax NNX: config, modules, their pure state, loader and forward pass (Hugging Face
argument names).

The modules (:class:`Qwen25VLModel` > :class:`TextModel` > :class:`TextDecoderLayers`, and
:class:`VisionModel` > :class:`VisionBlocks`) are the parameters; ``nnx.split`` / ``nnx.state`` give their
pure state, on which the pure functions (:func:`forward`, :func:`embed_inputs`, the text and vision
functions) run. See :mod:`models.qwen2_5_vl.model`.
"""

from .config import ConfigError, Qwen25VLConfig, tiny_config
from .loader import CheckpointError, load_hf_checkpoint, params_from_hf, params_to_hf, save_hf_checkpoint
from .merge import FeatureCountError
from .model import (
    Qwen25VLModel,
    abstract_state,
    embed_inputs,
    forward,
    init_params,
    model_from_state,
    text_part,
)
from .rope_index import get_rope_index
from .state import StateLeafError, state_from_leaves
from .text import TextDecoderLayers, TextModel, abstract_text_state, init_text_params, text_params_from_hf
from .vision import VisionBlocks, VisionModel, init_vision_params, vision_params_from_hf

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FeatureCountError",
    "Qwen25VLConfig",
    "Qwen25VLModel",
    "StateLeafError",
    "TextDecoderLayers",
    "TextModel",
    "VisionBlocks",
    "VisionModel",
    "abstract_state",
    "abstract_text_state",
    "embed_inputs",
    "forward",
    "get_rope_index",
    "init_params",
    "init_text_params",
    "init_vision_params",
    "load_hf_checkpoint",
    "model_from_state",
    "params_from_hf",
    "params_to_hf",
    "save_hf_checkpoint",
    "state_from_leaves",
    "text_params_from_hf",
    "text_part",
    "tiny_config",
    "vision_params_from_hf",
]
