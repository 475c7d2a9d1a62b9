"""The model interface the KV-cache method runs on: what ``purekv_jax`` (generate, the prefill, the decode,
ST-SpAttn) needs from a model family, and nothing model-specific beyond it.

A family is a frozen object of functions (hashable, so a config's family is a static value under jit):

* host side, before any device work: ``check_media`` (the prompt's media tokens agree with the media grids),
  ``prompt_positions`` (rotary positions of a left-padded batch and the per-row rope delta the decode adds),
  ``placeholder_ids`` (ids allowed outside the vocabulary: VideoLLaMA2's negative media placeholders),
  ``question_start_id`` (the token after whose last occurrence a media question starts), and the video token
  layout for ST-SpAttn: ``video_token_id`` and ``video_token_grids`` (each video's ``(t, h, w)`` token grid,
  frame-major, row, column, contiguous in the prompt from its first video token);
* device side, jittable: ``embed`` (the prompt's embeddings with the media features merged) and the text
  stack (:class:`TextStack`: rotary tables, one layer's q/k/v and output, the final norm + logits);
* checkpoints: ``abstract_state`` (the state's structure, nothing allocated), ``inspect_checkpoint`` (a
  safetensors folder's config and headers, checked) and ``leaf_specs`` (each state leaf's tensors in the
  folder), which ``purekv convert`` and ``purekv_jax.checkpoint.load_checkpoint`` read leaf by leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class TextStack:
    """A decoder stack's per-layer functions (``lp``: one layer's slice of the stacked state).

    cos_sin(positions [3, B, N] | [B, N], cfg) -> (cos, sin) [B, N, hd] float32;
    layer_qkv(lp, x [B, N, D], cos, sin, cfg) -> q [B, Hq, N, hd], k / v [B, Hkv, N, hd] (rotary applied);
    layer_out(lp, x, attn [B, Hq, N, hd], cfg) -> x [B, N, D];
    final_logits(text, hidden [B, N, D], cfg) -> logits [B, N, V] float32 (final norm applied).
    """

    cos_sin: Callable
    layer_qkv: Callable
    layer_out: Callable
    final_logits: Callable


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family's side of the interface (see the module doc for each function's role).

    embed(params, config, input_ids [B, N], pixel_values, image_grid, pixel_values_videos, video_grid) -> [B, N, D];
    check_media(config, ids [B, N], image_grid, video_grid) -> None (a ValueError subclass on a mismatch);
    prompt_positions(config, ids [B, N], valid [B, N], image_grid, video_grid, second_per_grid_ts)
        -> (positions [3, B, N] int, rope_delta [B] int);
    placeholder_ids(config) -> tuple of ids allowed outside ``[0, vocab)``;
    question_start_id(config) -> int; video_token_id(config) -> int;
    video_token_grids(config, video_grid) -> list of (t, h, w) token grids, one per video;
    abstract_state(config, dtype) -> (graphdef, state of jax.ShapeDtypeStruct);
    inspect_checkpoint(path) -> models.qwen2_5_vl.loader.HFCheckpoint (config + checked headers, no data);
    leaf_specs(config) -> list of models.qwen2_5_vl.loader.HFLeafSpec, one per state leaf.
    """

    name: str
    text: TextStack
    embed: Callable
    check_media: Callable
    prompt_positions: Callable
    placeholder_ids: Callable[[Any], tuple[int, ...]]
    question_start_id: Callable[[Any], int]
    video_token_id: Callable[[Any], int]
    video_token_grids: Callable
    abstract_state: Callable
    inspect_checkpoint: Callable
    leaf_specs: Callable
