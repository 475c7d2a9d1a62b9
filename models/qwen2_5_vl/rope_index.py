"""3-D (t, h, w) M-RoPE position ids for Qwen2.5-VL, with the rule the released checkpoints were trained with.

Per batch row, over its non-padding tokens (``attention_mask == 1``):

* a text run advances all three rows together, starting at (previous max position + 1);
* a vision block whose merged grid is ``(T, H, W)`` (``H = grid_h // spatial_merge``, same for W) gets
  ``t = floor(arange(T) * second_per_grid_t * tokens_per_second)`` (images: ``t = 0``),
  ``h = arange(H)``, ``w = arange(W)``, all offset by the block's start position;
* the text after a vision block resumes at (max vision position + 1), i.e. ``start + max(t_max, H-1, W-1) + 1``.

Padding positions are set to 1 (as the reference does). ``rope_deltas[b] = max position + 1 - N`` (``N`` the
padded sequence length), so decode positions are ``cache_position + rope_delta``.

A vision block is found by a ``vision_start`` token followed by an image or video pad token; the grids are
consumed in order across the whole batch (images and videos separately).

This runs on the host with numpy: the grids are static (they fix the shapes of the vision tower's output),
the loop is data-dependent, and the result is an input to the jitted forward.

transformers 5.24's ``get_rope_index`` resumes text after a video at ``start + max(H, W)`` instead (it
ignores the temporal extent); for images the two rules agree.
"""

from __future__ import annotations

import numpy as np

from .config import Qwen25VLConfig


def _as_grids(grid_thw, what: str) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3) if np.size(grid_thw) else np.zeros((0, 3), np.int64)
    if (g <= 0).any():
        raise ValueError(f"{what} must hold positive (t, h, w) entries, got {g.tolist()}")
    return g


def get_rope_index(
    config: Qwen25VLConfig,
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids ``[3, B, N]`` int32 and rope deltas ``[B, 1]`` int32 (host numpy arrays).

    Args:
      config: the model config (token ids, ``spatial_merge_size``, ``tokens_per_second``).
      input_ids: ``[B, N]`` token ids.
      image_grid_thw / video_grid_thw: ``[n, 3]`` patch grids (before the spatial merge), in prompt order.
      second_per_grid_ts: ``[n_videos]`` seconds per temporal grid slot (default 1.0 each).
      attention_mask: ``[B, N]``, 1 for real tokens, 0 for padding (left or right).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    b, n = ids.shape
    mask = np.ones((b, n), dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    images = _as_grids(image_grid_thw, "image_grid_thw")
    videos = _as_grids(video_grid_thw, "video_grid_thw")
    if second_per_grid_ts is None:
        seconds = np.ones((len(videos),), dtype=np.float32)
    else:
        seconds = np.asarray(second_per_grid_ts, dtype=np.float32).reshape(-1)
        if len(seconds) != len(videos):
            raise ValueError(
                f"second_per_grid_ts has {len(seconds)} entries but video_grid_thw has {len(videos)} videos"
            )
    merge = config.vision.spatial_merge_size
    tps = np.float32(config.vision.tokens_per_second)

    position_ids = np.ones((3, b, n), dtype=np.int64)
    deltas = np.zeros((b, 1), dtype=np.int64)
    next_image = next_video = 0
    for row in range(b):
        tokens = ids[row][mask[row]]
        pieces: list[np.ndarray] = []
        start = 0  # next position to assign
        i = 0  # cursor in tokens
        while i < len(tokens):
            is_vision = (
                tokens[i] in (config.image_token_id, config.video_token_id)
                and i > 0
                and tokens[i - 1] == config.vision_start_token_id
            )
            if not is_vision:
                j = i + 1
                while j < len(tokens) and not (
                    tokens[j] in (config.image_token_id, config.video_token_id)
                    and tokens[j - 1] == config.vision_start_token_id
                ):
                    j += 1
                pieces.append(np.broadcast_to(np.arange(start, start + j - i), (3, j - i)))
                start += j - i
                i = j
                continue
            if tokens[i] == config.image_token_id:
                if next_image >= len(images):
                    raise ValueError(
                        f"input_ids hold more image blocks than image_grid_thw has grids ({len(images)})"
                    )
                (t, h, w), spg = images[next_image], np.float32(0.0)
                next_image += 1
            else:
                if next_video >= len(videos):
                    raise ValueError(
                        f"input_ids hold more video blocks than video_grid_thw has grids ({len(videos)})"
                    )
                (t, h, w), spg = videos[next_video], seconds[next_video]
                next_video += 1
            h, w = h // merge, w // merge
            pad = tokens[i]
            span = tokens[i : i + t * h * w]
            if len(span) != t * h * w or (span != pad).any():
                kind = "image" if pad == config.image_token_id else "video"
                found = int(np.argmax(np.append(span != pad, True)))
                raise ValueError(
                    f"batch row {row}: a {kind} block of merged grid (t={t}, h={h}, w={w}) needs {t * h * w} "
                    f"consecutive {kind} pad tokens (id {pad}) but the prompt has {found} there"
                )
            # float32, in the reference's order: (arange * second_per_grid_t) * tokens_per_second, truncated.
            t_idx = ((np.arange(t, dtype=np.float32) * spg) * tps).astype(np.int64)
            block = np.stack(
                [
                    np.repeat(t_idx, h * w),
                    np.tile(np.repeat(np.arange(h), w), t),
                    np.tile(np.arange(w), t * h),
                ]
            ) + start
            pieces.append(block)
            start = int(block.max()) + 1
            i += t * h * w
        if pieces:
            positions = np.concatenate(pieces, axis=1)
            position_ids[:, row, mask[row]] = positions
            deltas[row, 0] = positions.max() + 1 - n
        else:  # an all-padding row: every position is the fill value 1, as in the reference's text branch
            deltas[row, 0] = 2 - n
    if next_image != len(images) or next_video != len(videos):
        raise ValueError(
            f"image_grid_thw has {len(images)} grids and video_grid_thw {len(videos)}, but input_ids hold "
            f"{next_image} image and {next_video} video blocks (vision_start followed by a pad token)"
        )
    return position_ids.astype(np.int32), deltas.astype(np.int32)
