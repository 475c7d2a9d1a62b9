"""Placing image / video features into the token embeddings at their pad tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen25VLConfig


class FeatureCountError(ValueError):
    """The prompt's image / video pad tokens and the vision features disagree in number."""


def merge_multimodal_embeddings(
    input_ids: jax.Array, embeds: jax.Array, features: jax.Array, token_id: int
) -> jax.Array:
    """Replaces the embeddings of the ``token_id`` tokens with ``features``, in order (jittable).

    ``input_ids [B, N]``, ``embeds [B, N, D]``, ``features [F, D]``: the k-th ``token_id`` token in row-major
    (batch, then sequence) order receives ``features[k]``, as ``masked_scatter`` does in the reference.
    A cumsum over the flattened token mask gives each pad token its feature index; a gather and a ``where``
    do the rest, so shapes stay static. The counts must agree (see :func:`check_feature_counts`, run on
    the host before jit); inside jit, surplus tokens would reuse the last feature.
    """
    if features.shape[0] == 0:
        return embeds
    b, n, d = embeds.shape
    is_tok = input_ids == token_id
    idx = jnp.cumsum(is_tok.reshape(-1).astype(jnp.int32)) - 1
    idx = jnp.clip(idx, 0, features.shape[0] - 1)
    gathered = jnp.take(features, idx, axis=0).reshape(b, n, d).astype(embeds.dtype)
    return jnp.where(is_tok[..., None], gathered, embeds)


def check_feature_counts(
    config: Qwen25VLConfig,
    input_ids,
    n_image_features: int | None,
    n_video_features: int | None,
) -> None:
    """Host-side check: the number of image (video) pad tokens equals the number of image (video) features.

    ``None`` means no pixels of that kind were given, which is only consistent with no pad tokens of that kind.
    Raises :class:`FeatureCountError` naming both counts.
    """
    ids = np.asarray(input_ids)
    for kind, token_id, n_feat in (
        ("image", config.image_token_id, n_image_features),
        ("video", config.video_token_id, n_video_features),
    ):
        n_tok = int((ids == token_id).sum())
        n_feat = 0 if n_feat is None else int(n_feat)
        if n_tok != n_feat:
            raise FeatureCountError(
                f"{kind} features and {kind} tokens do not match: input_ids hold {n_tok} {kind} pad tokens "
                f"(id {token_id}) but the {kind} grids give {n_feat} features"
            )
