"""VideoLLaMA2 / VideoLLaMA2.1 in JAX with Flax NNX: config, the per-frame vision tower (CLIP / SigLIP), the
STC connector, the Mistral / Qwen2 language model (the Qwen2.5-VL text stack with 1-D RoPE), the prompt merge
and the loader in the release's key layout. See :mod:`models.videollama2.model`."""

from .config import (IMAGE_TOKEN_INDEX, VIDEO_TOKEN_INDEX, ConnectorConfig, VideoLLaMA2Config, VisionTowerConfig,
                     tiny_config)
from .connector import Connector, connector_forward
from .loader import inspect_checkpoint, load_checkpoint, params_to_hf, save_checkpoint
from .model import (PromptError, VideoLLaMA2Model, abstract_state, embed_inputs, expand_placeholders, forward,
                    init_params, model_from_state)
from .vision import VisionTower, tower_forward

__all__ = [
    "IMAGE_TOKEN_INDEX", "VIDEO_TOKEN_INDEX", "Connector", "ConnectorConfig", "PromptError", "VideoLLaMA2Config",
    "VideoLLaMA2Model", "VisionTower", "VisionTowerConfig", "abstract_state", "connector_forward", "embed_inputs",
    "expand_placeholders", "forward", "init_params", "inspect_checkpoint", "load_checkpoint", "model_from_state",
    "params_to_hf", "save_checkpoint", "tiny_config", "tower_forward",
]
