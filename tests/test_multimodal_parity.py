"""Full-model parity with transformers on prompts with images and videos (float32 logits within 1e-4).

Positions come from our get_rope_index (original Qwen2.5-VL rule) and are passed to the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.qwen2_5_vl import FeatureCountError, forward, get_rope_index

from conftest import random_text_ids, reference_logits

ATOL = 1e-4


def _block(config, token_id, grid):
    t, h, w = grid
    return [config.vision_start_token_id] + [token_id] * (t * h * w // config.vision.merge_unit) + [config.vision_end_token_id]


def _pixels(rng, grids, config):
    rows = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((rows, config.vision.patch_dim)).astype(np.float32)


def _check(model, ref_model, ids, mask=None, images=None, videos=None, seconds=None, rng=None):
    config, params = model.config, model.params
    pix = None if images is None else _pixels(rng, images, config)
    vid = None if videos is None else _pixels(rng, videos, config)
    pos, _ = get_rope_index(config, ids, images, videos, seconds, mask)
    ours = np.asarray(
        forward(params, config, ids, attention_mask=mask, pixel_values=pix, image_grid_thw=images,
                pixel_values_videos=vid, video_grid_thw=videos, second_per_grid_ts=seconds)
    )
    ref = reference_logits(
        ref_model, input_ids=ids, attention_mask=mask, pixel_values=pix, image_grid_thw=images,
        pixel_values_videos=vid, video_grid_thw=videos, position_ids=pos,
    )
    real = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
    return pos


@pytest.mark.hf
@pytest.mark.parametrize(
    "grid",
    [
        (1, 8, 8),  # merged 4x4: exactly one 4x4 window (the pad adds a whole empty window)
        (1, 10, 14),  # merged 5x7: windows do not divide it
    ],
    ids=["divides_window", "uneven_10x14"],
)
def test_one_image(tiny_untied, hf_tiny, grid):
    config = tiny_untied.config
    rng = np.random.default_rng(sum(grid))
    ids = np.array([list(random_text_ids(rng, (5,), config)) + _block(config, config.image_token_id, grid)
                    + list(random_text_ids(rng, (6,), config))])
    pos = _check(tiny_untied, hf_tiny, ids, images=[list(grid)], rng=rng)
    # The image starts at position 6 (5 text tokens + vision start); text resumes at 6 + max(H, W).
    image = np.flatnonzero(ids[0] == config.image_token_id)
    assert pos[:, 0, image[0]].tolist() == [6, 6, 6]
    assert pos[:, 0, image[-1] + 1].tolist() == [6 + max(grid[1:]) // 2] * 3


@pytest.mark.hf
def test_video_several_temporal_slots(tiny_untied, hf_tiny):
    config = tiny_untied.config
    rng = np.random.default_rng(21)
    grid = (4, 8, 12)  # 4 temporal slots of merged 4x6
    ids = np.array([list(random_text_ids(rng, (3,), config)) + _block(config, config.video_token_id, grid)
                    + list(random_text_ids(rng, (4,), config))])
    pos = _check(tiny_untied, hf_tiny, ids, videos=[list(grid)], seconds=[1.5], rng=rng)
    # t rows of the video: start 4 + floor(arange(4) * 1.5 * 2) = 4 + (0, 3, 6, 9); text resumes at 14.
    video = ids[0] == config.video_token_id
    assert sorted(set(pos[0, 0][video].tolist())) == [4, 7, 10, 13]
    assert pos[0, 0][np.flatnonzero(video)[-1] + 1] == 14


@pytest.mark.hf
def test_image_and_video_in_one_prompt_padded_batch(tiny_untied, hf_tiny):
    config = tiny_untied.config
    rng = np.random.default_rng(22)
    images = [[1, 6, 4], [1, 4, 10]]
    videos = [[2, 4, 6], [3, 6, 4]]
    text = lambda k: list(random_text_ids(rng, (k,), config))  # noqa: E731
    row0 = (text(3) + _block(config, config.image_token_id, images[0]) + text(2)
            + _block(config, config.video_token_id, videos[0]) + text(4))
    row1 = (text(2) + _block(config, config.video_token_id, videos[1]) + text(1)
            + _block(config, config.image_token_id, images[1]) + text(3))
    n = max(len(row0), len(row1))
    ids = np.full((2, n), 3, np.int32)
    mask = np.zeros((2, n), np.int32)
    for r, toks in enumerate((row0, row1)):  # left padding
        ids[r, n - len(toks):] = toks
        mask[r, n - len(toks):] = 1
    assert mask.sum(1).min() < n
    _check(tiny_untied, hf_tiny, ids, mask=mask, images=images, videos=videos, seconds=[0.5, 2.0], rng=rng)


def test_feature_count_mismatch_names_both_counts(tiny_untied):
    config, params = tiny_untied.config, tiny_untied.params
    rng = np.random.default_rng(23)
    grid = [[1, 8, 8]]  # 16 features
    ids = np.array([[5, config.vision_start_token_id] + [config.image_token_id] * 15 + [config.vision_end_token_id]])
    with pytest.raises(FeatureCountError, match=r"image .* 15 image pad tokens .* give 16 features"):
        forward(params, config, ids, pixel_values=_pixels(rng, grid, config), image_grid_thw=grid)
    vids = np.array([[5, config.vision_start_token_id] + [config.video_token_id] * 20 + [config.vision_end_token_id]])
    with pytest.raises(FeatureCountError, match=r"video .* 20 video pad tokens .* give 24 features"):
        forward(params, config, vids, pixel_values_videos=_pixels(rng, [[2, 4, 12]], config),
                video_grid_thw=[[2, 4, 12]], second_per_grid_ts=[1.0])
    # Pad tokens without any pixels at all.
    with pytest.raises(FeatureCountError, match=r"15 image pad tokens .* give 0 features"):
        forward(params, config, ids)


def test_merge_is_jittable_and_fills_in_row_major_order():
    import jax
    import jax.numpy as jnp

    from models.qwen2_5_vl.merge import merge_multimodal_embeddings

    ids = jnp.array([[1, 9, 9, 2], [9, 3, 4, 9]])
    embeds = jnp.arange(8 * 2, dtype=jnp.float32).reshape(2, 4, 2)
    feats = -jnp.arange(1, 9, dtype=jnp.float32).reshape(4, 2)  # rows -1,-2 / -3,-4 / -5,-6 / -7,-8
    out = jax.jit(merge_multimodal_embeddings, static_argnums=3)(ids, embeds, feats, 9)
    np.testing.assert_array_equal(
        out,
        [[[0, 1], [-1, -2], [-3, -4], [6, 7]], [[-5, -6], [10, 11], [12, 13], [-7, -8]]],
    )
