"""VideoLLaMA2's side of the model interface (:mod:`models.interface`): 1-D positions over the merged
sequence, the connector's tokens at the expanded placeholders, and the Qwen2 text stack it shares with
Qwen2.5-VL (Mistral: the same stack without q/k/v bias)."""

from __future__ import annotations

import numpy as np

from models.interface import ModelFamily
from models.qwen2_5_vl.family import QWEN2_TEXT

from .config import VideoLLaMA2Config
from .loader import hf_leaf_specs, inspect_checkpoint
from .model import PromptError, abstract_state, check_grid, embed_inputs, media_tokens, text_positions, token_grids


def check_media(config: VideoLLaMA2Config, ids, image_grid, video_grid) -> None:
    """The expanded placeholders agree with the grids' token counts (and the grids with the tower)."""
    check_grid(config, image_grid, "image")
    check_grid(config, video_grid, "video")
    ids = np.asarray(ids)
    for kind, token, grid, image in (("image", config.image_token_index, image_grid, True),
                                     ("video", config.video_token_index, video_grid, False)):
        n_tok, n_feat = int((ids == token).sum()), media_tokens(config, grid, image)
        if n_tok != n_feat:
            raise PromptError(f"{kind} features and {kind} tokens do not match: input_ids hold {n_tok} {kind} "
                              f"placeholders ({token}) but the {kind} grids give {n_feat} tokens")


def prompt_positions(config: VideoLLaMA2Config, ids, valid, image_grid, video_grid, second_per_grid_ts):
    """1-D positions (``0 .. n-1`` over each row's real tokens, the three rotary rows equal) and rope delta 0."""
    pos = text_positions(valid)
    return np.broadcast_to(pos[None], (3, *pos.shape)), np.zeros(ids.shape[0], np.int64)


VIDEOLLAMA2 = ModelFamily(
    name="videollama2",
    text=QWEN2_TEXT,
    embed=embed_inputs,
    check_media=check_media,
    prompt_positions=prompt_positions,
    placeholder_ids=lambda config: (config.image_token_index, config.video_token_index),
    question_start_id=lambda config: config.video_token_index,
    video_token_id=lambda config: config.video_token_index,
    video_token_grids=lambda config, video_grid: token_grids(config, video_grid),
    abstract_state=abstract_state,
    inspect_checkpoint=inspect_checkpoint,
    leaf_specs=hf_leaf_specs,
)
