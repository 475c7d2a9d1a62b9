"""The whole Qwen2.5-VL model: params, input embedding (tokens + vision features) and the forward pass.

:func:`forward` keeps Hugging Face's argument names. It is a thin host wrapper: it converts the grids to
static tuples, checks the feature counts, computes the 3-D positions with
:func:`~models.qwen2_5_vl.rope_index.get_rope_index` when none are given, and calls one jitted core
(:func:`forward_core`) keyed on the config and the grids, so repeated calls with the same shapes and
grids reuse the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen25VLConfig
from .merge import check_feature_counts, merge_multimodal_embeddings
from .rope_index import get_rope_index
from .text import TextParams, decoder_forward, init_text_params, lm_logits
from .vision import GridTHW, VisionParams, init_vision_params, vision_forward


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Qwen25VLParams:
    """The whole model's weights: the language model and the vision tower."""

    text: TextParams
    vision: VisionParams


def init_params(config: Qwen25VLConfig, key: jax.Array, dtype=jnp.float32) -> Qwen25VLParams:
    """Fresh random weights for both halves (see :func:`init_text_params`, :func:`init_vision_params`)."""
    k_text, k_vision = jax.random.split(key)
    return Qwen25VLParams(
        text=init_text_params(config.text, k_text, dtype),
        vision=init_vision_params(config.vision, k_vision, dtype),
    )


def static_grid(grid_thw) -> GridTHW | None:
    """``[n, 3]`` array / nested list / None -> a hashable tuple of ``(t, h, w)`` int triples (or None)."""
    if grid_thw is None:
        return None
    g = np.asarray(grid_thw)
    if g.size == 0:
        return None
    if g.ndim not in (1, 2) or g.shape[-1] != 3:
        raise ValueError(f"grid_thw must have shape [n, 3], got {g.shape}")
    return tuple(tuple(int(v) for v in row) for row in g.reshape(-1, 3))


def n_vision_features(grid: GridTHW | None, config: Qwen25VLConfig) -> int | None:
    """Number of merged vision features (= pad tokens the prompt must hold) for the patch grids ``grid``:
    ``sum(t * h * w) / merge_unit``; None when there is no grid (no images / no video)."""
    if grid is None:
        return None
    return sum(t * h * w for t, h, w in grid) // config.vision.merge_unit


def embed_inputs(
    params: Qwen25VLParams,
    config: Qwen25VLConfig,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    image_grid_thw: GridTHW | None = None,
    pixel_values_videos: jax.Array | None = None,
    video_grid_thw: GridTHW | None = None,
) -> jax.Array:
    """Token embeddings ``[B, N, D]`` with image / video features placed at their pad tokens (jittable;
    the grids are static tuples). Counts are not checked here: see :func:`check_feature_counts`."""
    embeds = jnp.take(params.text.embed, input_ids, axis=0)
    for pixels, grid, token_id in (
        (pixel_values, image_grid_thw, config.image_token_id),
        (pixel_values_videos, video_grid_thw, config.video_token_id),
    ):
        if pixels is not None:
            feats = vision_forward(params.vision, pixels, grid, config.vision)
            embeds = merge_multimodal_embeddings(input_ids, embeds, feats, token_id)
    return embeds


@functools.partial(jax.jit, static_argnames=("config", "image_grid_thw", "video_grid_thw"))
def forward_core(
    params: Qwen25VLParams,
    config: Qwen25VLConfig,
    input_ids: jax.Array,
    position_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    pixel_values: jax.Array | None = None,
    image_grid_thw: GridTHW | None = None,
    pixel_values_videos: jax.Array | None = None,
    video_grid_thw: GridTHW | None = None,
) -> jax.Array:
    """Jitted forward with static grids and explicit ``[3, B, N]`` positions -> logits ``[B, N, V]`` float32."""
    embeds = embed_inputs(params, config, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    hidden = decoder_forward(params.text, embeds, position_ids, attention_mask, config.text)
    return lm_logits(params.text, hidden)


def forward(
    params: Qwen25VLParams,
    config: Qwen25VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    position_ids=None,
) -> jax.Array:
    """Qwen2.5-VL forward pass -> logits ``[B, N, V]`` float32 (Hugging Face argument names).

    Args:
      input_ids: ``[B, N]`` token ids (image / video pad tokens where features go).
      attention_mask: ``[B, N]``, 1 = token, 0 = padding (left or right); None = no padding.
      pixel_values / pixel_values_videos: ``[P, patch_dim]`` processor patches, grid after grid.
      image_grid_thw / video_grid_thw: ``[n, 3]`` patch grids (host values; they fix shapes).
      second_per_grid_ts: ``[n_videos]`` seconds per temporal grid slot (for the positions).
      position_ids: ``[3, B, N]`` (or ``[B, N]`` for plain text positions); computed with :func:`get_rope_index` when None.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    image_grid, video_grid = static_grid(image_grid_thw), static_grid(video_grid_thw)
    if (pixel_values is None) != (image_grid is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    if (pixel_values_videos is None) != (video_grid is None):
        raise ValueError("pixel_values_videos and video_grid_thw must be given together")
    check_feature_counts(config, ids, n_vision_features(image_grid, config), n_vision_features(video_grid, config))
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask).astype(np.int32)
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids shape {ids.shape}")
    if position_ids is None:
        position_ids, _ = get_rope_index(
            config, ids, image_grid, video_grid, second_per_grid_ts, attention_mask
        )
    position_ids = jnp.asarray(position_ids, dtype=jnp.int32)
    if position_ids.shape == ids.shape:  # [B, N] text positions: the three rows are equal
        position_ids = jnp.broadcast_to(position_ids[None], (3, *ids.shape))
    if position_ids.shape != (3, *ids.shape):
        raise ValueError(f"position_ids must have shape (3, {ids.shape[0]}, {ids.shape[1]}), got {position_ids.shape}")
    return forward_core(
        params,
        config,
        jnp.asarray(ids, dtype=jnp.int32),
        position_ids,
        None if attention_mask is None else jnp.asarray(attention_mask),
        None if pixel_values is None else jnp.asarray(pixel_values, dtype=jnp.float32),
        image_grid,
        None if pixel_values_videos is None else jnp.asarray(pixel_values_videos, dtype=jnp.float32),
        video_grid,
    )
