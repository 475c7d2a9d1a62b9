"""The whole VideoLLaMA2 model: the Flax NNX module tree, its pure state, the prompt merge and the forward pass.

Module tree::

    VideoLLaMA2Model              config
    +- text: TextModel            the Mistral / Qwen2 LM (models.qwen2_5_vl.text, 1-D RoPE, q/k/v bias per LM)
    +- vision: VisionTower        CLIP / SigLIP, per frame
    +- connector: Connector       the STC connector

Prompt convention. The release's prompt holds one placeholder per video (``-201``) or image (``-200``); the
model replaces it by the whole feature sequence. Here, as for Qwen2.5-VL's pad tokens, the placeholder is
expanded on the host to one id per feature (:func:`expand_placeholders`), so shapes are known before jit
and the merge (:func:`embed_inputs`) is a jittable gather. Positions are 1-D, ``0 .. N-1`` over the merged
sequence (:func:`text_positions`).

Pixel inputs: ``pixel_values_videos [sum T, C, H, W]`` (every video's frames, video after video) with
``video_grid`` = one ``(T, rows, cols)`` patch grid per video; ``pixel_values [n_images, C, H, W]`` with
``image_grid`` = ``(1, rows, cols)`` per image (each image repeated ``num_frames`` times, as the release does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from models.qwen2_5_vl.merge import merge_multimodal_embeddings
from models.qwen2_5_vl.state import module_from_arrays, state_from_leaves
from models.qwen2_5_vl.text import TextModel, decoder_forward, draw_text_arrays, lm_logits

from .config import VideoLLaMA2Config
from .connector import Connector, connector_forward, draw_connector_arrays
from .vision import VisionTower, draw_tower_arrays, tower_forward

GridTHW = tuple[tuple[int, int, int], ...]


class PromptError(ValueError):
    """A prompt whose placeholders and media do not fit (counts, grids)."""


def draw_model_arrays(config: VideoLLaMA2Config, key: jax.Array, dtype=jnp.float32) -> dict:
    """Every random weight of a :class:`VideoLLaMA2Model`, nested by attribute name."""
    k_text, k_vision, k_conn = jax.random.split(key, 3)
    return {"text": draw_text_arrays(config.text, k_text, dtype),
            "vision": draw_tower_arrays(config.vision, k_vision, dtype),
            "connector": draw_connector_arrays(config.connector, k_conn, dtype)}


class VideoLLaMA2Model(nnx.Module):
    """The whole model (see the module doc); all weights drawn by :func:`draw_model_arrays` from one key of
    ``rngs``, so the state equals ``init_params(config, key)`` for that key."""

    def __init__(self, config: VideoLLaMA2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        arrays = draw_model_arrays(config, rngs.params(), dtype)
        self.config = config
        self.text = module_from_arrays(lambda: TextModel(config.text, dtype=dtype, rngs=nnx.Rngs(0)), arrays["text"])
        self.vision = module_from_arrays(lambda: VisionTower(config.vision, dtype=dtype, rngs=nnx.Rngs(0)),
                                         arrays["vision"])
        self.connector = module_from_arrays(lambda: Connector(config.connector, dtype=dtype, rngs=nnx.Rngs(0)),
                                            arrays["connector"])

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None) -> jax.Array:
        return forward(nnx.state(self), self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                       pixel_values_videos, video_grid_thw)


def abstract_state(config: VideoLLaMA2Config, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of a :class:`VideoLLaMA2Model`, leaves ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: VideoLLaMA2Model(config, dtype=dtype, rngs=nnx.Rngs(0))))


def init_params(config: VideoLLaMA2Config, key: jax.Array, dtype=jnp.float32) -> nnx.State:
    """The pure state of a :class:`VideoLLaMA2Model` holding :func:`draw_model_arrays` ``(config, key)``."""
    _, abstract = abstract_state(config, dtype)
    return state_from_leaves(abstract, flatten_dict(draw_model_arrays(config, key, dtype)))


def model_from_state(config: VideoLLaMA2Config, state: nnx.State) -> VideoLLaMA2Model:
    """The :class:`VideoLLaMA2Model` holding ``state`` (every leaf checked against ``config``)."""
    graphdef, abstract = abstract_state(config)
    return nnx.merge(graphdef, state_from_leaves(abstract, flatten_dict(nnx.to_pure_dict(state))))


# ---------------------------------------------------------------------------------------------- media
def media_tokens(config: VideoLLaMA2Config, grid: GridTHW | None, image: bool) -> int:
    """Tokens the connector makes for the grids (an image counts as ``num_frames`` frames)."""
    if grid is None:
        return 0
    return sum(config.video_tokens(config.num_frames if image else t) for t, _, _ in grid)


def token_grids(config: VideoLLaMA2Config, video_grid: GridTHW | None) -> list[tuple[int, int, int]]:
    """Each video's ``(t', h', w')`` token grid after the connector (frame-major, row, column)."""
    return [config.video_token_grid(t) for t, _, _ in (video_grid or ())]


def check_grid(config: VideoLLaMA2Config, grid: GridTHW | None, what: str) -> None:
    """Host check: each grid's rows and columns are the tower's patch grid."""
    side = config.vision.patches_per_side
    for n, (t, h, w) in enumerate(grid or ()):
        if (h, w) != (side, side) or t < 1:
            raise PromptError(f"{what} {n}: grid (t, h, w) = {(t, h, w)}; the vision tower's frames give "
                              f"({side}, {side}) patches and t >= 1")


def media_features(params: nnx.State, config: VideoLLaMA2Config, pixels: jax.Array, grid: GridTHW,
                   image: bool) -> jax.Array:
    """Frames ``[sum T, C, H, W]`` of the grids' videos (or ``[n, C, H, W]`` images, each repeated
    ``num_frames`` times) -> tokens ``[sum t'*h'*w', D]``, video after video (jittable; ``grid`` static)."""
    feats = tower_forward(params.vision, pixels, config.vision)  # [F, P, Dv]
    side = config.vision.patches_per_side
    feats = feats.reshape(feats.shape[0], side, side, -1)
    out, start = [], 0
    for t, _, _ in grid:
        clip = feats[start:start + t]
        start += t
        if image:
            clip = jnp.broadcast_to(clip, (config.num_frames, *clip.shape[1:]))
        out.append(connector_forward(params.connector, clip[None], config.connector)[0])
    return jnp.concatenate(out, axis=0)


def embed_inputs(params: nnx.State, config: VideoLLaMA2Config, input_ids: jax.Array, pixel_values=None,
                 image_grid: GridTHW | None = None, pixel_values_videos=None, video_grid: GridTHW | None = None
                 ) -> jax.Array:
    """Token embeddings ``[B, N, D]`` with the media tokens placed at their (expanded) placeholders, in
    order (jittable; grids static). Placeholder ids are negative: their embedding lookups read row 0 and
    are replaced."""
    embeds = jnp.take(params.text.embed, jnp.maximum(input_ids, 0), axis=0)
    for pixels, grid, token_id, image in ((pixel_values, image_grid, config.image_token_index, True),
                                          (pixel_values_videos, video_grid, config.video_token_index, False)):
        if pixels is not None:
            embeds = merge_multimodal_embeddings(input_ids, embeds, media_features(params, config, pixels, grid,
                                                                                   image), token_id)
    return embeds


def text_positions(valid: np.ndarray) -> np.ndarray:
    """1-D positions ``[B, N]``: ``0 .. n-1`` over each row's real tokens, 1 at padding (host)."""
    valid = np.asarray(valid, bool)
    return np.where(valid, np.cumsum(valid, axis=1) - 1, 1)


def expand_placeholders(ids, config: VideoLLaMA2Config, image_grid: GridTHW | None = None,
                        video_grid: GridTHW | None = None) -> np.ndarray:
    """The release's prompt (one ``-200`` / ``-201`` per image / video) -> one placeholder per feature token
    (1-D ids in, 1-D ids out; media in order of appearance, images and videos each in their grid order)."""
    ids = np.asarray(ids).reshape(-1)
    queues = {config.image_token_index: [media_tokens(config, (g,), True) for g in image_grid or ()],
              config.video_token_index: [media_tokens(config, (g,), False) for g in video_grid or ()]}
    out = []
    for tok in ids.tolist():
        if tok in queues:
            if not queues[tok]:
                kind = "image" if tok == config.image_token_index else "video"
                raise PromptError(f"the prompt holds more {kind} placeholders ({tok}) than {kind} grids")
            out.extend([tok] * queues[tok].pop(0))
        else:
            out.append(tok)
    left = {k: len(v) for k, v in queues.items() if v}
    if left:
        raise PromptError(f"media grids without a placeholder in the prompt: {left} (placeholder id: count)")
    return np.asarray(out, np.int64)


@functools.partial(jax.jit, static_argnames=("config", "image_grid", "video_grid"))
def forward_core(params, config: VideoLLaMA2Config, input_ids, positions, attention_mask=None, pixel_values=None,
                 image_grid=None, pixel_values_videos=None, video_grid=None) -> jax.Array:
    """Jitted forward with static grids and ``[B, N]`` positions -> logits ``[B, N, V]`` float32."""
    embeds = embed_inputs(params, config, input_ids, pixel_values, image_grid, pixel_values_videos, video_grid)
    hidden = decoder_forward(params.text, embeds, positions, attention_mask, config.text)
    return lm_logits(params.text, hidden)


def static_grid(grid) -> GridTHW | None:
    """``[n, 3]`` array / nested list / None -> a hashable tuple of ``(t, h, w)`` int triples (or None)."""
    if grid is None or np.asarray(grid).size == 0:
        return None
    g = np.asarray(grid)
    if g.ndim not in (1, 2) or g.shape[-1] != 3:
        raise PromptError(f"grid_thw must have shape [n, 3], got {g.shape}")
    return tuple(tuple(int(v) for v in row) for row in g.reshape(-1, 3))


def forward(params: nnx.State, config: VideoLLaMA2Config, input_ids, attention_mask=None, pixel_values=None,
            image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None) -> jax.Array:
    """VideoLLaMA2 forward -> logits ``[B, N, V]`` float32. ``input_ids [B, N]`` with expanded placeholders
    (:func:`expand_placeholders`); ``attention_mask [B, N]`` (1 = token); the pixels and grids as in the
    module doc."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise PromptError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    image_grid, video_grid = static_grid(image_grid_thw), static_grid(video_grid_thw)
    check_grid(config, image_grid, "image")
    check_grid(config, video_grid, "video")
    for kind, token, grid, image in (("image", config.image_token_index, image_grid, True),
                                     ("video", config.video_token_index, video_grid, False)):
        n_tok, n_feat = int((ids == token).sum()), media_tokens(config, grid, image)
        if n_tok != n_feat:
            raise PromptError(f"input_ids hold {n_tok} {kind} placeholders ({token}) but the {kind} grids give "
                              f"{n_feat} tokens")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
    positions = jnp.asarray(text_positions(mask), jnp.int32)
    return forward_core(params, config, jnp.asarray(ids, jnp.int32), positions,
                        None if attention_mask is None else jnp.asarray(mask),
                        None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32), image_grid,
                        None if pixel_values_videos is None else jnp.asarray(pixel_values_videos, jnp.float32),
                        video_grid)
