"""get_rope_index: hand-worked cases (original Qwen2.5-VL rule) and transformers' own for images."""

from __future__ import annotations

import numpy as np
import pytest

from models.qwen2_5_vl import get_rope_index, tiny_config

CFG = tiny_config()  # spatial_merge 2, tokens_per_second 2; vision start 1000, end 1001, image 1003, video 1004
VS, VE, IMG, VID = 1000, 1001, 1003, 1004


def test_text_only_and_padding_fill():
    ids = np.array([[5, 6, 7, 8, 9], [0, 0, 5, 6, 7]])
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    pos, delta = get_rope_index(CFG, ids, attention_mask=mask)
    assert pos.shape == (3, 2, 5) and pos.dtype == np.int32
    for r in range(3):
        np.testing.assert_array_equal(pos[r], [[0, 1, 2, 3, 4], [1, 1, 0, 1, 2]])  # padding = 1
    np.testing.assert_array_equal(delta, [[0], [-2]])  # max + 1 - padded length


def test_text_image_text_2x4_merged_grid():
    # grid (1, 4, 8) patches -> merged 2 x 4 = 8 tokens, starting at position 3.
    ids = np.array([[11, 12, VS] + [IMG] * 8 + [VE, 13, 14]])
    pos, delta = get_rope_index(CFG, ids, image_grid_thw=[[1, 4, 8]])
    expected = [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 7, 8, 9],
        [0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 7, 8, 9],
        [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8, 9],
    ]
    np.testing.assert_array_equal(pos[:, 0], expected)
    np.testing.assert_array_equal(delta, [[10 - 14]])


@pytest.mark.parametrize(
    "seconds, t_offsets, resume",
    [
        # t = floor(arange(3) * second_per_grid_t * tokens_per_second(2)); text resumes at max + 1
        (1.0, [0, 2, 4], 7),
        (2.0, [0, 4, 8], 11),
        (0.75, [0, 1, 3], 6),  # 0, 1.5, 3.0 truncated
        (0.25, [0, 0, 1], 4),  # max(t, h, w) = max(1, 1, 1) offset -> resume at 2 + 1 + 1
    ],
)
def test_video_three_temporal_slots(seconds, t_offsets, resume):
    # grid (3, 4, 4) -> merged T=3, H=2, W=2: 12 tokens starting at position 2.
    ids = np.array([[21, VS] + [VID] * 12 + [VE, 22]])
    pos, delta = get_rope_index(CFG, ids, video_grid_thw=[[3, 4, 4]], second_per_grid_ts=[seconds])
    t = [0, 1] + [2 + o for o in t_offsets for _ in range(4)] + [resume, resume + 1]
    h = [0, 1] + [2, 2, 3, 3] * 3 + [resume, resume + 1]
    w = [0, 1] + [2, 3, 2, 3] * 3 + [resume, resume + 1]
    np.testing.assert_array_equal(pos[:, 0], [t, h, w])
    np.testing.assert_array_equal(delta, [[resume + 2 - 16]])


def test_video_default_seconds_is_one():
    ids = np.array([[VS] + [VID] * 12 + [VE]])
    with_default, _ = get_rope_index(CFG, ids, video_grid_thw=[[3, 4, 4]])
    explicit, _ = get_rope_index(CFG, ids, video_grid_thw=[[3, 4, 4]], second_per_grid_ts=[1.0])
    np.testing.assert_array_equal(with_default, explicit)


def test_image_then_video_batch_with_left_padding():
    # Row 0: [VS IMG*4 VE] image grid (1, 4, 4) -> 2x2 at start 1; then text; row 1 (left padded 3):
    # [t VS VID*8 VE] video grid (2, 4, 4) -> T=2 (seconds 1.5 -> t = 0, 3), 2x2 at start 2.
    row0 = [30, VS, IMG, IMG, IMG, IMG, VE, 31, 32, 33, 34, 35, 36]
    row1 = [0, 0, 0, 40, VS] + [VID] * 8
    ids = np.array([row0, row1])
    mask = np.array([[1] * 13, [0, 0, 0] + [1] * 10])
    pos, delta = get_rope_index(
        CFG, ids, image_grid_thw=[[1, 4, 4]], video_grid_thw=[[2, 4, 4]], second_per_grid_ts=[1.5], attention_mask=mask
    )
    np.testing.assert_array_equal(
        pos[:, 0],
        [
            [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 8, 9, 10],
            [0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10],
            [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        ],
    )
    np.testing.assert_array_equal(
        pos[:, 1],
        [
            [1, 1, 1, 0, 1, 2, 2, 2, 2, 5, 5, 5, 5],
            [1, 1, 1, 0, 1, 2, 2, 3, 3, 2, 2, 3, 3],
            [1, 1, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3],
        ],
    )
    np.testing.assert_array_equal(delta, [[11 - 13], [6 - 13]])


def test_errors_name_counts():
    ids = np.array([[VS] + [IMG] * 4 + [VE]])
    with pytest.raises(ValueError, match="more image blocks than image_grid_thw has grids"):
        get_rope_index(CFG, ids)
    with pytest.raises(ValueError, match=r"needs 8 consecutive image pad tokens .* has 4"):
        get_rope_index(CFG, ids, image_grid_thw=[[1, 4, 8]])
    with pytest.raises(ValueError, match="image_grid_thw has 2 grids"):
        get_rope_index(CFG, ids, image_grid_thw=[[1, 4, 4], [1, 4, 4]])
    vids = np.array([[VS] + [VID] * 4 + [VE]])
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 entries but video_grid_thw has 1"):
        get_rope_index(CFG, vids, video_grid_thw=[[1, 4, 4]], second_per_grid_ts=[1.0, 2.0])


# ----------------------------------------------------------------------------- transformers, images
def _random_image_prompt(rng, grids):
    toks = []
    for t, h, w in grids:
        toks += list(rng.integers(0, 900, rng.integers(0, 5))) + [VS] + [IMG] * (t * h * w // 4) + [VE]
    return toks + list(rng.integers(0, 900, rng.integers(1, 5)))


@pytest.mark.hf
def test_images_match_transformers(hf_tiny):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    for _ in range(5):
        grids = [[1, 2 * int(rng.integers(1, 6)), 2 * int(rng.integers(1, 6))] for _ in range(4)]
        rows = [_random_image_prompt(rng, grids[:2]), _random_image_prompt(rng, grids[2:])]
        n = max(map(len, rows))
        ids = np.zeros((2, n), np.int64)
        mask = np.zeros((2, n), np.int64)
        for r, toks in enumerate(rows):  # left-pad
            ids[r, n - len(toks) :] = toks
            mask[r, n - len(toks) :] = 1
        pos, delta = get_rope_index(CFG, ids, image_grid_thw=grids, attention_mask=mask)
        ref_pos, ref_delta = hf_tiny.model.get_rope_index(
            torch.from_numpy(ids),
            mm_token_type_ids=torch.from_numpy((ids == IMG).astype(np.int64)),
            image_grid_thw=torch.tensor(grids),
            attention_mask=torch.from_numpy(mask),
        )
        real = mask.astype(bool)
        np.testing.assert_array_equal(pos[:, real], ref_pos.numpy()[:, real])
        # transformers 5.24 subtracts the unpadded length; the original rule the padded one.
        np.testing.assert_array_equal(delta[:, 0], ref_delta.numpy()[:, 0] - (n - mask.sum(1)))
