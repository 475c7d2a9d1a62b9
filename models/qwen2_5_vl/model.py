"""The whole Qwen2.5-VL model: the Flax NNX module tree, its pure state, input embedding and the forward pass.

Module tree (the modules ARE the parameters; ``config`` attributes are static)::

    Qwen25VLModel                 config
    ├── text: TextModel           embed, norm, lm_head (absent when tied), config
    │   └── layers: TextDecoderLayers   q_w, k_w, ... stacked on a leading [L] axis
    └── vision: VisionModel       patch_embed, merger_*, config
        └── blocks: VisionBlocks        qkv_w, ... stacked on a leading [depth] axis

The bridge to the pure functions: ``graphdef, state = nnx.split(model)`` (or ``nnx.state(model)``) gives
an ``nnx.State`` with the same attribute paths (``state.text.layers.q_w``), whose ``nnx.Param`` leaves
behave as arrays; :func:`forward`, :func:`embed_inputs` and the text / vision functions take that state
(a valid jit argument, scanned over by ``jax.lax.scan``), and ``nnx.merge(graphdef, state)`` rebuilds the
module (:func:`model_from_state`). :func:`abstract_state` gives the state's shapes without allocating,
which the loaders fill leaf by leaf (:func:`~models.qwen2_5_vl.state.state_from_leaves`).

:func:`forward` keeps Hugging Face's argument names. It is a thin host wrapper: it converts the grids to
static tuples, checks the feature counts, computes the 3-D positions with
:func:`~models.qwen2_5_vl.rope_index.get_rope_index` when none are given, and calls one jitted core
(:func:`forward_core`) keyed on the config and the grids, so repeated calls with the same shapes and
grids reuse the compiled program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from .config import Qwen25VLConfig
from .merge import check_feature_counts, merge_multimodal_embeddings
from .rope_index import get_rope_index
from .state import module_from_arrays, state_from_leaves
from .text import TextModel, decoder_forward, draw_text_arrays, lm_logits
from .vision import GridTHW, VisionModel, draw_vision_arrays, vision_forward


def draw_model_arrays(config: Qwen25VLConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Every random weight of a :class:`Qwen25VLModel`, nested by attribute name: ``key`` split in two,
    the text half as :func:`~models.qwen2_5_vl.text.draw_text_arrays` (default scale), the vision half
    as :func:`~models.qwen2_5_vl.vision.draw_vision_arrays`."""
    k_text, k_vision = jax.random.split(key)
    return {
        "text": draw_text_arrays(config.text, k_text, dtype),
        "vision": draw_vision_arrays(config.vision, k_vision, dtype),
    }


class Qwen25VLModel(nnx.Module):
    """The whole model: ``text`` (:class:`~models.qwen2_5_vl.text.TextModel`), ``vision``
    (:class:`~models.qwen2_5_vl.vision.VisionModel`) and the static ``config``.

    All weights are drawn by :func:`draw_model_arrays` from one key taken from ``rngs``, so the state
    equals ``init_params(config, key)`` for that key.
    """

    def __init__(self, config: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        arrays = draw_model_arrays(config, rngs.params(), dtype)
        self.config = config
        self.text = module_from_arrays(lambda: TextModel(config.text, dtype=dtype, rngs=nnx.Rngs(0)), arrays["text"])
        self.vision = module_from_arrays(
            lambda: VisionModel(config.vision, dtype=dtype, rngs=nnx.Rngs(0)), arrays["vision"]
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        position_ids=None,
    ) -> jax.Array:
        """Logits ``[B, N, V]`` float32: :func:`forward` on ``nnx.state(self)``. A host wrapper (it reads
        the grids and ids on the host), not for use under a trace; text-only training calls ``model.text``."""
        return forward(
            nnx.state(self), self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
            pixel_values_videos, video_grid_thw, second_per_grid_ts, position_ids,
        )


def abstract_state(config: Qwen25VLConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of a :class:`Qwen25VLModel` in ``dtype``, the state's leaves
    ``jax.ShapeDtypeStruct`` (nothing drawn or allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Qwen25VLModel(config, dtype=dtype, rngs=nnx.Rngs(0))))


def init_params(config: Qwen25VLConfig, key: jax.Array, dtype=jnp.float32) -> nnx.State:
    """The pure state of a :class:`Qwen25VLModel` holding :func:`draw_model_arrays` ``(config, key)``
    (jittable: ``jax.jit(lambda k: init_params(config, k))`` compiles the draws once)."""
    _, abstract = abstract_state(config, dtype)
    return state_from_leaves(abstract, flatten_dict(draw_model_arrays(config, key, dtype)))


def model_from_state(config: Qwen25VLConfig, state: nnx.State) -> Qwen25VLModel:
    """The :class:`Qwen25VLModel` holding ``state`` (its arrays, not copies); a leaf missing, unexpected or
    of the wrong shape for ``config`` raises :class:`~models.qwen2_5_vl.state.StateLeafError`."""
    graphdef, abstract = abstract_state(config)
    return nnx.merge(graphdef, state_from_leaves(abstract, flatten_dict(nnx.to_pure_dict(state))))


def text_part(params: nnx.State) -> nnx.State:
    """The text state of a whole-model state (``params.text``), or ``params`` itself when it already is a
    text state (a :class:`~models.qwen2_5_vl.text.TextModel`'s, e.g. from a GGUF file)."""
    return params.text if "text" in params else params


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
    params: nnx.State,
    config: Qwen25VLConfig,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    image_grid_thw: GridTHW | None = None,
    pixel_values_videos: jax.Array | None = None,
    video_grid_thw: GridTHW | None = None,
) -> jax.Array:
    """Token embeddings ``[B, N, D]`` with image / video features placed at their pad tokens (jittable;
    the grids are static tuples). ``params``: a :class:`Qwen25VLModel` state. Counts are not checked here: see :func:`check_feature_counts`."""
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
    params: nnx.State,
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
    params: nnx.State,
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
      params: a :class:`Qwen25VLModel` state (``nnx.state(model)``, :func:`init_params`, a loader).
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
