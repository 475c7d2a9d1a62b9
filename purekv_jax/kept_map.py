"""Which prompt tokens the compressed cache kept: per-token fractions and their place in a video's patch grid.

``generate`` records every kept prompt entry's original token index per layer and KV head
(``GenerateResult.kept_index [L, B, Hkv, S]``, ``-1`` for an empty slot). :func:`kept_fraction` turns it into
"the fraction of the ``L x Hkv`` (layer, KV head) caches that hold token ``j``" per row; :func:`video_maps`
lays a row's fractions over each video's merged patch grid (one value per 28 x 28 pixel block of a pair of
frames, as the vision tower merges them); :func:`text_positions` are the row's other tokens. Host numpy only:
the picture (:mod:`purekv_jax.kept_plot`) and tests read these.
"""

from __future__ import annotations

import numpy as np


class KeptMapError(ValueError):
    """A kept-index array, token row or video grid that does not fit together (shapes, counts)."""


def kept_fraction(kept_index: np.ndarray, n_tokens: int) -> np.ndarray:
    """``kept_index [L, B, Hkv, S]`` (token indices, ``-1`` empty) -> ``[B, n_tokens]`` float64: the fraction
    of the ``L * Hkv`` caches of each row that hold token ``j`` (``j`` counts the row's real tokens from 0).
    A (layer, head) cache holds a token at most once, so the fraction lies in ``[0, 1]``."""
    idx = np.asarray(kept_index)
    if idx.ndim != 4:
        raise KeptMapError(f"kept_index must be [layers, batch, kv_heads, slots], got shape {idx.shape}")
    if idx.size and int(idx.max(initial=-1)) >= n_tokens:
        raise KeptMapError(f"kept_index holds token {int(idx.max())}, outside a row of n_tokens={n_tokens}")
    n_layers, b, hkv, _ = idx.shape
    out = np.zeros((b, n_tokens), np.float64)
    for row in range(b):
        held = idx[:, row][idx[:, row] >= 0]
        out[row] = np.bincount(held, minlength=n_tokens)[:n_tokens] / (n_layers * hkv)
    return out


def video_maps(fraction: np.ndarray, ids: np.ndarray, video_token_id: int, video_grid, merge_size: int
               ) -> list[np.ndarray]:
    """One row's kept fractions over each video's merged patch grid.

    Args:
      fraction: ``[N]`` the row's per-token kept fraction (:func:`kept_fraction`).
      ids: ``[N]`` the row's real token ids (video tokens: ``video_token_id``, videos in order).
      video_grid: ``[n_videos, 3]`` each video's ``(t, h, w)`` in patches (``video_grid_thw``).
      merge_size: the vision tower's spatial merge (one video token = ``merge_size x merge_size`` patches).

    Returns:
      one ``[t, h / merge_size, w / merge_size]`` array per video: the fraction of each merged token, in the
      vision tower's order (time, then rows, then columns).
    """
    fraction, ids = np.asarray(fraction), np.asarray(ids)
    if fraction.shape != ids.shape:
        raise KeptMapError(f"fraction {fraction.shape} and ids {ids.shape} must both be [N] for one row")
    grid = np.asarray(video_grid).reshape(-1, 3)
    shapes = [(int(t), int(h) // merge_size, int(w) // merge_size) for t, h, w in grid]
    values = fraction[ids == video_token_id]
    if values.size != sum(int(np.prod(s)) for s in shapes):
        raise KeptMapError(f"the row holds {values.size} video tokens but video_grid {grid.tolist()} (merged by "
                           f"{merge_size}) needs {sum(int(np.prod(s)) for s in shapes)}")
    out, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(values[at:at + size].reshape(shape))
        at += size
    return out


def pixel_map(tokens_map: np.ndarray, patch_pixels: int) -> np.ndarray:
    """A ``[t, gh, gw]`` merged-token map spread over pixels: ``[t, gh * patch_pixels, gw * patch_pixels]``
    (each merged token covers ``patch_pixels`` = patch size x merge size pixels square, 28 for Qwen2.5-VL)."""
    return np.repeat(np.repeat(np.asarray(tokens_map), patch_pixels, axis=1), patch_pixels, axis=2)


def text_positions(ids: np.ndarray, media_token_ids) -> np.ndarray:
    """``[n]`` int: the positions of a row's tokens that are not image / video placeholders."""
    ids = np.asarray(ids)
    return np.flatnonzero(~np.isin(ids, np.asarray(list(media_token_ids))))
