"""The kept-token map and picture (``purekv_jax.kept_map``, ``purekv_jax.kept_plot``): hand-built keep-sets
whose overlay must land on the right 28x28 patch of the right frame, the text view, and the frames shown being
the ones the model saw."""

from __future__ import annotations

import numpy as np
import pytest

from purekv_jax.kept_map import KeptMapError, kept_fraction, pixel_map, text_positions, video_maps
from purekv_jax.kept_plot import show_kept, text_layout
from purekv_jax.processing.image import VisionSpec, patchify, rescale_normalize, unpatchify

VIDEO, IMAGE = 151656, 151655


def test_kept_fraction_hand_computed():
    # 2 layers x 2 heads of one row over 6 tokens; -1 = empty slot
    idx = np.array([[[[0, 3, -1], [0, 4, 5]]], [[[0, 3, 5], [1, -1, -1]]]], np.int32)  # [2, 1, 2, 3]
    np.testing.assert_array_equal(kept_fraction(idx, 6)[0], [3 / 4, 1 / 4, 0, 2 / 4, 1 / 4, 2 / 4])
    with pytest.raises(KeptMapError, match="token 5, outside a row of n_tokens=5"):
        kept_fraction(idx, 5)


def test_unpatchify_gives_back_the_frames():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    patches, grid = patchify(rescale_normalize(frames))
    np.testing.assert_array_equal(unpatchify(patches, grid), frames)


def video_row(rng, grid=(2, 4, 6), before=3, after=2):
    """Token ids: ``before`` text tokens, the video's merged tokens, ``after`` text tokens; and its patches."""
    n_video = grid[0] * grid[1] * grid[2] // 4
    ids = np.r_[rng.integers(10, 900, before), [VIDEO] * n_video, rng.integers(10, 900, after)]
    frames = rng.integers(0, 256, (2 * grid[0], 14 * grid[1], 14 * grid[2], 3), dtype=np.uint8)
    patches, got = patchify(rescale_normalize(frames))
    assert got == grid
    return ids, patches, frames


def test_a_kept_patch_lights_up_its_own_28x28_block(tmp_path):
    """One video token kept by every layer and head (frame pair t=1, merged row 0, merged column 2), one text
    token by half of them: the heat map holds exactly that patch, at pixels [0:28, 56:84] of the second frame
    shown, and the text strip that token."""
    rng = np.random.default_rng(1)
    ids, patches, frames = video_row(rng)
    target = 3 + 1 * 6 + 0 * 3 + 2  # before + t * (2 x 3 merged) + row * 3 + column
    n_layers, hkv = 3, 2
    kept_index = np.full((n_layers, 1, hkv, 4), -1, np.int32)
    kept_index[:, 0, :, 0] = target
    kept_index[:, 0, 0, 1] = 16  # the last text token, in one head of every layer
    pic = show_kept(kept_index, ids[None], lambda t: f"<{t[0]}>", pixel_values_videos=patches,
                    video_grid_thw=np.array([[2, 4, 6]]), path=str(tmp_path / "kept.png"))
    assert (tmp_path / "kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (heat,) = pic.video_maps
    want = np.zeros((2, 2, 3))
    want[1, 0, 2] = 1
    np.testing.assert_array_equal(heat, want)
    px = pixel_map(heat, 28)
    assert px.shape == (2, 56, 84)
    assert px[1, :28, 56:].min() == 1 and px.sum() == 28 * 28  # only that block
    (shown,) = pic.frames
    np.testing.assert_array_equal(shown, frames[::2])  # the first frame of each temporal patch, as the model saw it
    np.testing.assert_array_equal(pic.text_positions, [0, 1, 2, 15, 16])
    np.testing.assert_array_equal(pic.fraction[pic.text_positions], [0, 0, 0, 0, 0.5])
    assert not list(tmp_path.glob(".kept-*"))  # the temporary file was renamed


def test_text_prompt_is_shaded_token_by_token(tmp_path):
    ids = np.array([[0, 0, 5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1, 1, 1]])  # left padding: real tokens 0..3
    kept_index = np.array([[[[1, 3]]]], np.int32)  # [1, 1, 1, 2]
    words = {5: "The", 6: " code\n", 7: " is", 8: " 4817"}
    pic = show_kept(kept_index, ids, lambda t: words[t[0]], attention_mask=mask, path=str(tmp_path / "k.svg"))
    assert (tmp_path / "k.svg").read_text().lstrip().startswith("<?xml")
    np.testing.assert_array_equal(pic.fraction, [0, 1, 0, 1])
    assert pic.video_maps == () and pic.text_positions.tolist() == [0, 1, 2, 3]
    # a newline ends its line; a token that would pass the line's end starts the next one
    assert text_layout(["The", " code\n", " is", " 4817"]) == [(0, 0, "The"), (3, 0, " code\u21b5"), (0, 1, " is"),
                                                                 (3, 1, " 4817")]
    assert [line for _, line, _ in text_layout(["abcd"] * 5, line_chars=10)] == [0, 0, 1, 1, 2]


def test_maps_refuse_a_grid_that_does_not_match_the_tokens():
    ids = np.r_[[1, 2], [VIDEO] * 6, [IMAGE] * 2]
    with pytest.raises(KeptMapError, match="holds 6 video tokens but video_grid .* needs 12"):
        video_maps(np.zeros(10), ids, VIDEO, [[2, 4, 6]], 2)
    assert [m.shape for m in video_maps(np.zeros(10), ids, VIDEO, [[1, 4, 2], [1, 4, 4]], 2)] == [(1, 2, 1), (1, 2, 2)]
    np.testing.assert_array_equal(text_positions(ids, (VIDEO, IMAGE)), [0, 1])
    with pytest.raises(ValueError, match="do not match grid"):
        unpatchify(np.zeros((5, VisionSpec().patch_dim)), (1, 2, 2))
