"""Which model family a config belongs to (:func:`family_of`) and the text stack of a text config
(:func:`text_stack`): the one place that maps configs to the implementations of :mod:`models.interface`."""

from __future__ import annotations

import os

from models.interface import ModelFamily, TextStack
from models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig
from models.qwen2_5_vl.config_fields import ConfigError, read_config_json
from models.qwen2_5_vl.family import QWEN2_TEXT, QWEN25VL
from models.videollama2.config import VideoLLaMA2Config
from models.videollama2.family import VIDEOLLAMA2

FAMILIES: dict[type, ModelFamily] = {Qwen25VLConfig: QWEN25VL, VideoLLaMA2Config: VIDEOLLAMA2}
TEXT_STACKS: dict[type, TextStack] = {TextConfig: QWEN2_TEXT}
#: the config class of each family name (``purekv generate --model-family``, config.json's model_type).
CONFIG_TYPES: dict[str, type] = {"qwen2_5_vl": Qwen25VLConfig, "videollama2": VideoLLaMA2Config}


class UnknownFamilyError(ValueError):
    """A config (object or file) of no known model family."""


def family_of(config) -> ModelFamily:
    """The family of a whole-model config."""
    try:
        return FAMILIES[type(config)]
    except KeyError:
        raise UnknownFamilyError(f"no model family for a config of type {type(config).__name__}; known: "
                                 f"{', '.join(t.__name__ for t in FAMILIES)}") from None


def text_stack(cfg) -> TextStack:
    """The decoder stack functions of a text config."""
    try:
        return TEXT_STACKS[type(cfg)]
    except KeyError:
        raise UnknownFamilyError(f"no text stack for a config of type {type(cfg).__name__}") from None


def family_name_of_file(path: str | os.PathLike) -> str:
    """``"videollama2"`` or ``"qwen2_5_vl"`` from a checkpoint folder's (or file's) ``config.json``
    ``model_type`` / ``architectures``."""
    _, raw = read_config_json(path)
    tag = (str(raw.get("model_type", "")) + " " + " ".join(map(str, raw.get("architectures") or ()))).lower() \
        if isinstance(raw, dict) else ""
    return "videollama2" if "videollama2" in tag else "qwen2_5_vl"


def family_of_file(path: str | os.PathLike) -> ModelFamily:
    """The family a checkpoint folder's (or file's) ``config.json`` names."""
    return FAMILIES[CONFIG_TYPES[family_name_of_file(path)]]


def config_from_json(path: str | os.PathLike):
    """The whole-model config of a checkpoint folder, of whichever family its ``config.json`` names."""
    return CONFIG_TYPES[family_name_of_file(path)].from_json(path)
