"""Qwen2.5-VL's side of the model interface (:mod:`models.interface`): M-RoPE positions from
:func:`~models.qwen2_5_vl.rope_index.get_rope_index`, features at the image / video pad tokens, and the
Qwen2 text stack (:data:`QWEN2_TEXT`) that VideoLLaMA2's LM shares."""

from __future__ import annotations

import numpy as np

from models.interface import ModelFamily, TextStack

from .config import Qwen25VLConfig, TextConfig
from .layers import rms_norm
from .loader import hf_leaf_specs, inspect_hf_checkpoint
from .merge import check_feature_counts
from .model import abstract_state, embed_inputs, n_vision_features
from .rope_index import get_rope_index
from .text import layer_out, layer_qkv, lm_logits, mrope_cos_sin


class GridError(ValueError):
    """A video grid that does not fit the vision tower's merge."""


def final_logits(text, hidden, cfg: TextConfig):
    """The final RMSNorm and the head: ``hidden [B, N, D]`` -> logits ``[B, N, V]`` float32."""
    return lm_logits(text, rms_norm(hidden, text.norm, cfg.rms_norm_eps))


#: the Qwen2 decoder stack (q/k/v bias per ``TextConfig.attention_bias``; M-RoPE, or 1-D RoPE with
#: ``mrope_section = (head_dim / 2, 0, 0)``).
QWEN2_TEXT = TextStack(cos_sin=mrope_cos_sin, layer_qkv=layer_qkv, layer_out=layer_out, final_logits=final_logits)


def check_media(config: Qwen25VLConfig, ids, image_grid, video_grid) -> None:
    check_feature_counts(config, ids, n_vision_features(image_grid, config), n_vision_features(video_grid, config))


def prompt_positions(config: Qwen25VLConfig, ids, valid, image_grid, video_grid, second_per_grid_ts):
    """M-RoPE positions ``[3, B, N]`` of a left-padded batch and the rope delta ``[B]`` the decode adds to
    the row's token count (text-only rows: ``0 .. n-1`` and delta 0)."""
    lengths = valid.sum(axis=1)
    if image_grid is not None or video_grid is not None:
        pos, deltas = get_rope_index(config, ids, image_grid, video_grid, second_per_grid_ts, valid.astype(np.int32))
        return pos, deltas[:, 0].astype(np.int64) + ids.shape[1] - lengths
    pos = np.where(valid, np.cumsum(valid, axis=1) - 1, 1)
    return np.broadcast_to(pos[None], (3, *pos.shape)), np.zeros_like(lengths)


def video_token_grids(config: Qwen25VLConfig, video_grid) -> list[tuple[int, int, int]]:
    """Each video's merged token grid ``(t, h / merge, w / merge)``."""
    m = config.vision.spatial_merge_size
    out = []
    for n, (t, h, w) in enumerate(video_grid or ()):
        if h % m or w % m:
            raise GridError(f"video {n}: grid (t, h, w) = {(t, h, w)} is not divisible by the spatial merge "
                            f"size {m}")
        out.append((int(t), int(h) // m, int(w) // m))
    return out


QWEN25VL = ModelFamily(
    name="qwen2_5_vl",
    text=QWEN2_TEXT,
    embed=embed_inputs,
    check_media=check_media,
    prompt_positions=prompt_positions,
    placeholder_ids=lambda config: (),
    question_start_id=lambda config: config.vision_end_token_id,
    video_token_id=lambda config: config.video_token_id,
    video_token_grids=video_token_grids,
    abstract_state=abstract_state,
    inspect_checkpoint=inspect_hf_checkpoint,
    leaf_specs=hf_leaf_specs,
)
