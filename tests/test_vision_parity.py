"""Vision tower: window index by hand, HF name round trip, and parity with transformers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl.config import tiny_config
from models.qwen2_5_vl.vision import (
    VisionInputError,
    VisionWeightsError,
    batched_segment_attention,
    init_vision_params,
    segment_attention,
    segment_batches,
    vision_block,
    vision_forward,
    vision_hf_shapes,
    vision_layout,
    vision_params_from_hf,
    vision_params_to_hf,
    vision_rotary_cos_sin,
    vision_window_index,
)

# depth 4 with full attention at 1 and 3: both block kinds run with a block of the other kind after them.
CFG = dataclasses.replace(tiny_config(vision_depth=4).vision, fullatt_block_indexes=(1, 3))


# ----------------------------------------------------------------------------- window index by hand
def test_window_index_hand_worked_uneven():
    # 6x6 patches -> 3x3 merged tokens, window 56 px = 2 merged tokens per side; pad 2 - 3 % 2 = 1.
    #   0 1 | 2      windows: [0 1 3 4] [2 5] [6 7] [8]
    #   3 4 | 5
    #   ----+--
    #   6 7 | 8
    idx, cu = vision_window_index(((1, 6, 6),), spatial_merge_size=2, window_size=56, patch_size=14)
    np.testing.assert_array_equal(idx, [0, 1, 3, 4, 2, 5, 6, 7, 8])
    np.testing.assert_array_equal(cu, [0, 16, 24, 32, 36])  # lengths 4, 2, 2, 1 merged tokens * 4 rows


def test_window_index_hand_worked_even_pads_whole_window_and_multi_grid():
    # Second grid: t=2, 4x8 patches -> 2x4 merged; 2 divides both sides, so the pad adds a whole empty
    # window column and row (2x3 windows, 4 empty) whose zero lengths are de-duplicated away.
    #   t=0 (offset 9):  9 10 | 11 12      t=1 (offset 17): 17 18 | 19 20
    #                   13 14 | 15 16                       21 22 | 23 24
    idx, cu = vision_window_index(((1, 6, 6), (2, 4, 8)), spatial_merge_size=2, window_size=56, patch_size=14)
    np.testing.assert_array_equal(
        idx,
        [0, 1, 3, 4, 2, 5, 6, 7, 8]
        + [9, 10, 13, 14, 11, 12, 15, 16]
        + [17, 18, 21, 22, 19, 20, 23, 24],
    )
    np.testing.assert_array_equal(cu, [0, 16, 24, 32, 36, 52, 68, 84, 100])


def test_layout_real_window_and_segments():
    # The real window (112 px -> 4 merged per side) on 16x16 patches = 8x8 merged: four full windows
    # (plus five empty padding windows that vanish).
    idx, cu = vision_window_index(((1, 16, 16),), 2, 112, 14)
    np.testing.assert_array_equal(cu, [0, 64, 128, 192, 256])
    np.testing.assert_array_equal(idx[:16], [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27])
    np.testing.assert_array_equal(np.sort(idx), np.arange(64))

    # 4x4 patches -> 2x2 merged (one window); t=2 of 4x12 patches -> 2x6 merged per slice, cut into a
    # 2x4 window (8 merged = 32 rows) and a 2x2 window (16 rows).
    lay = vision_layout(((1, 4, 4), (2, 4, 12)), CFG)
    full = np.repeat([0, 1, 2], [16, 48, 48])  # one segment per temporal slice
    win = np.repeat([0, 1, 2, 3, 4], [16, 32, 16, 32, 16])
    for layer, expected in enumerate([win, full, win, full]):
        np.testing.assert_array_equal(lay.layer_segments[layer], expected)
    np.testing.assert_array_equal(lay.cu_window_seqlens, [0, 16, 48, 64, 96, 112])
    # rows move in whole merge groups
    np.testing.assert_array_equal(lay.row_perm.reshape(-1, 4) % 4, np.tile(np.arange(4), (28, 1)))


# ----------------------------------------------------------------------------- padded segment batches
def test_segment_batches_hand_worked():
    # Unordered, non-contiguous ids: segment 0 = rows 2, 6; segment 1 = rows 3, 4, 5; segment 2 = rows 0, 1.
    b = segment_batches([2, 2, 0, 1, 1, 1, 0])
    assert len(b.buckets) == 1 and not b.identity
    gather, valid = b.buckets[0]
    np.testing.assert_array_equal(gather, [[2, 6, 2], [3, 4, 5], [0, 1, 0]])  # padding repeats the first row
    np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(b.scatter, [6, 7, 0, 3, 4, 5, 1])
    assert segment_batches(np.repeat([0, 1, 2], 4)).identity


def test_segment_batches_split_long_from_short():
    # Lengths 300, 100, 290, 40: 290 >= 300 / 2 shares the first bucket; 100 opens a second one, which
    # 40 joins (its longest segment, 100, is short enough that padding beats another batch).
    ids = np.repeat([0, 1, 2, 3], [300, 100, 290, 40])
    b = segment_batches(ids)
    assert [g.shape for g, _ in b.buckets] == [(2, 300), (2, 100)]
    assert [int(v.sum()) for _, v in b.buckets] == [590, 140]
    flat = np.concatenate([g.reshape(-1) for g, _ in b.buckets])
    np.testing.assert_array_equal(flat[b.scatter], np.arange(ids.size))  # scatter inverts gather


def _batched_vs_dense_cases():
    # (grid, forced query chunk budget or None): edge windows, several grids of unequal slice sizes
    # (two full-attention buckets), and chunked queries.
    return [
        (((1, 10, 14), (2, 8, 8)), None),
        (((1, 20, 36), (2, 16, 16)), None),
        (((1, 20, 36), (2, 16, 16)), 5000),
        (((3, 8, 12),), 3000),
    ]


@pytest.mark.parametrize("grid,max_scores", _batched_vs_dense_cases())
def test_batched_attention_matches_dense_reference(grid, max_scores):
    lay = vision_layout(grid, CFG)
    n, h, hd = lay.row_perm.shape[0], CFG.num_heads, CFG.head_dim
    q, k, v = jax.random.normal(jax.random.PRNGKey(n), (3, n, h, hd))
    t = lambda a: a.swapaxes(0, 1)
    kw = {} if max_scores is None else {"max_scores": max_scores}
    for layer in (0, 1):  # a window block, a full-attention block
        batches = lay.full_batches if lay.full_layers[layer] else lay.window_batches
        got = jax.jit(lambda q, k, v: batched_segment_attention(q, k, v, batches, **kw))(q, k, v)
        ref = t(segment_attention(t(q), t(k), t(v), jnp.asarray(lay.layer_segments[layer])))
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=1e-5)
    if grid == ((1, 20, 36), (2, 16, 16)):  # slices of 720 and 256 rows: two buckets, not 3 x 720
        assert [g.shape for g, _ in lay.full_batches.buckets] == [(1, 720), (2, 256)]
        assert max(g.shape[1] for g, _ in lay.window_batches.buckets) == 64


def test_vision_block_batched_equals_dense():
    params = init_vision_params(CFG, jax.random.PRNGKey(8))
    bp = jax.tree_util.tree_map(lambda a: a[0], params.blocks)
    grid = ((1, 10, 14), (2, 8, 8))
    lay = vision_layout(grid, CFG)
    n = lay.row_perm.shape[0]
    x = jax.random.normal(jax.random.PRNGKey(9), (n, CFG.hidden_size))
    cos, sin = vision_rotary_cos_sin(jnp.asarray(lay.rotary_ids), CFG)
    block = jax.jit(lambda x, segments: vision_block(bp, x, cos, sin, segments, CFG))
    for layer, batches in ((0, lay.window_batches), (1, lay.full_batches)):
        got = jax.jit(lambda x: vision_block(bp, x, cos, sin, batches, CFG))(x)
        ref = block(x, jnp.asarray(lay.layer_segments[layer]))
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_window_block_memory_is_linear_in_patches():
    # 64 x 64 patches = 4096 rows: the dense reference holds [heads, P, P] float32 scores (128 MiB);
    # the window batches hold [64 windows, heads, 64, 64] (2 MiB).
    grid = ((1, 64, 64),)
    lay = vision_layout(grid, CFG)
    n = lay.row_perm.shape[0]
    bp = jax.tree_util.tree_map(lambda a: a[0], init_vision_params(CFG, jax.random.PRNGKey(10)).blocks)
    x = jnp.zeros((n, CFG.hidden_size))
    cos, sin = vision_rotary_cos_sin(jnp.asarray(lay.rotary_ids), CFG)

    def temp_bytes(segments):
        f = jax.jit(lambda x: vision_block(bp, x, cos, sin, segments, CFG))
        return f.lower(x).compile().memory_analysis().temp_size_in_bytes

    dense_scores = CFG.num_heads * n * n * 4
    assert temp_bytes(jnp.asarray(lay.layer_segments[0])) >= dense_scores
    assert temp_bytes(lay.window_batches) < dense_scores / 16


# ----------------------------------------------------------------------------- HF names
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hf_round_trip_exact(dtype):
    p = init_vision_params(CFG, jax.random.PRNGKey(1), dtype)
    hf = vision_params_to_hf(p, CFG)
    shapes = vision_hf_shapes(CFG)
    assert set(hf) == set(shapes)
    assert {k: v.shape for k, v in hf.items()} == shapes
    assert shapes["visual.patch_embed.proj.weight"] == (32, 3, 2, 14, 14)
    q = vision_params_from_hf(hf, CFG, dtype)
    flat_p, tree_p = jax.tree_util.tree_flatten(p)
    flat_q, tree_q = jax.tree_util.tree_flatten(q)
    assert tree_p == tree_q
    for a, b in zip(flat_p, flat_q):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hf_load_errors_name_the_tensor():
    hf = vision_params_to_hf(init_vision_params(CFG, jax.random.PRNGKey(2)), CFG)
    bad = dict(hf)
    del bad["visual.blocks.2.attn.qkv.bias"]
    with pytest.raises(VisionWeightsError, match=r"visual\.blocks\.2\.attn\.qkv\.bias"):
        vision_params_from_hf(bad, CFG)
    bad = dict(hf)
    bad["visual.merger.mlp.2.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(VisionWeightsError, match=r"visual\.merger\.mlp\.2\.weight.*\(64, 128\)"):
        vision_params_from_hf(bad, CFG)


def test_bad_pixel_shape_and_grid():
    p = init_vision_params(CFG, jax.random.PRNGKey(3))
    with pytest.raises(VisionInputError, match=r"\(16, 1176\)"):
        vision_forward(p, jnp.zeros((15, CFG.patch_dim)), ((1, 4, 4),), CFG)
    with pytest.raises(VisionInputError, match="multiples of spatial_merge_size"):
        vision_forward(p, jnp.zeros((15, CFG.patch_dim)), ((1, 3, 5),), CFG)


# ----------------------------------------------------------------------------- parity with transformers
@pytest.fixture(scope="module")
def hf_tower():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    hf_cfg = Qwen2_5_VLVisionConfig(
        depth=CFG.depth,
        hidden_size=CFG.hidden_size,
        num_heads=CFG.num_heads,
        intermediate_size=CFG.intermediate_size,
        out_hidden_size=CFG.out_hidden_size,
        patch_size=CFG.patch_size,
        spatial_merge_size=CFG.spatial_merge_size,
        temporal_patch_size=CFG.temporal_patch_size,
        window_size=CFG.window_size,
        fullatt_block_indexes=list(CFG.fullatt_block_indexes),
        in_channels=CFG.in_channels,
        hidden_act="silu",
    )
    hf_cfg._attn_implementation = "eager"
    model = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg).eval().float()
    params = init_vision_params(CFG, jax.random.PRNGKey(0), jnp.float32)
    state = {k.removeprefix("visual."): torch.from_numpy(v.copy()) for k, v in vision_params_to_hf(params, CFG).items()}
    model.load_state_dict(state, strict=True)
    return torch, model, params


PARITY_GRIDS = {
    "even_16x16_pads_whole_window": ((1, 16, 16),),
    "uneven_10x14": ((1, 10, 14),),
    "video_t3_8x12": ((3, 8, 12),),
    "image_and_video": ((1, 10, 14), (2, 8, 8)),
}


@pytest.mark.hf
@pytest.mark.parametrize("name", list(PARITY_GRIDS))
def test_parity_with_transformers(hf_tower, name):
    torch, model, params = hf_tower
    grid = PARITY_GRIDS[name]
    n = sum(t * h * w for t, h, w in grid)
    pixels = np.random.default_rng(len(name)).standard_normal((n, CFG.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy()
    out = np.asarray(vision_forward(params, jnp.asarray(pixels), grid, CFG))
    assert out.shape == (n // 4, CFG.out_hidden_size) == ref.shape
    err = float(np.max(np.abs(out - ref)))
    print(f"vision parity {name}: max abs err {err:.2e} (ref max {np.abs(ref).max():.2f})")
    assert err < 1e-4, err


def test_vision_forward_inside_outer_jit():
    params = init_vision_params(CFG, jax.random.PRNGKey(4))
    grid = ((1, 4, 8),)
    x = jax.random.normal(jax.random.PRNGKey(5), (32, CFG.patch_dim))
    f = jax.jit(lambda p, x: vision_forward(p, x, grid, CFG))
    np.testing.assert_allclose(np.asarray(f(params, x)), np.asarray(vision_forward(params, x, grid, CFG)), atol=1e-5)


def test_bf16_runs_and_tracks_float32():
    p32 = init_vision_params(CFG, jax.random.PRNGKey(6))
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p32)
    grid = ((2, 4, 8),)
    x = jax.random.normal(jax.random.PRNGKey(7), (64, CFG.patch_dim))
    out16 = vision_forward(p16, x, grid, CFG)
    out32 = vision_forward(p32, x, grid, CFG)
    assert out16.dtype == jnp.bfloat16 and out16.shape == (16, CFG.out_hidden_size)
    rel = float(jnp.linalg.norm(out16.astype(jnp.float32) - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05, rel
