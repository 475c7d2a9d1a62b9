"""The segment path (ST-SpAttn as batched dense attention per frame and per place) against the dense masked
float32 reference on random layouts, and its cell count by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernels.block_sparse_attention import (STLayout, VideoSpan, dense_masked_attention, reference_mask,
                                            resolve_backend, segment_attention, segment_cells)
from kernels.block_sparse_attention import segments

TOL = 2e-5


@st.composite
def layouts(draw):
    """One or two videos with text before, between and after (possibly none), optional radius / window."""
    pos, spans = draw(st.integers(0, 12)), []
    for _ in range(draw(st.integers(1, 2))):
        t, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
        spans.append(VideoSpan(pos, t, h, w))
        pos += t * h * w + draw(st.integers(0, 9))
    radius = draw(st.one_of(st.none(), st.integers(0, 2)))
    window = draw(st.one_of(st.none(), st.integers(0, 2)))
    return STLayout(max(pos, 1), tuple(spans), radius, window)


def _qkv(seed, n, hq, hkv, d=16, b=1):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, hq, n, d)), jax.random.normal(ks[1], (b, hkv, n, d)),
            jax.random.normal(ks[2], (b, hkv, n, d)))


@settings(max_examples=12, deadline=None)
@given(lay=layouts(), pattern=st.sampled_from(["union", "spatial", "temporal", "dense", "temporal_strict"]),
       seed=st.integers(0, 2**16), gqa=st.sampled_from([(2, 1), (4, 2), (2, 2)]))
def test_segment_attention_equals_the_dense_masked_reference(lay, pattern, seed, gqa):
    q, k, v = _qkv(seed, lay.seq_len, *gqa)
    mask = reference_mask(lay, pattern)
    ref_o, ref_lse = jax.jit(lambda q, k, v: dense_masked_attention(q, k, v, mask[None], return_lse=True))(q, k, v)
    o, lse = jax.jit(lambda q, k, v: segment_attention(q, k, v, lay, pattern, return_lse=True))(q, k, v)
    o, lse, ref_o, ref_lse = map(np.asarray, (o, lse, ref_o, ref_lse))
    empty = ~mask.any(1)
    np.testing.assert_allclose(o, ref_o, atol=TOL, rtol=0)
    assert np.isneginf(lse[:, :, empty]).all() and (o[:, :, empty] == 0).all()
    np.testing.assert_allclose(lse[:, :, ~empty], ref_lse[:, :, ~empty], atol=TOL, rtol=0)


def test_long_regions_and_batched_frames(monkeypatch):
    """Text runs longer than a sweep block (several query and key blocks, causal skipping) and frame / place
    batches that do not divide the frame count (the score bound forces batches of 2 of 5 frames)."""
    monkeypatch.setattr(segments, "_MAX_SCORE_BYTES", 2 * 2 * 4 * 36 * 36 * 8)
    lay = STLayout(300 + 5 * 6 * 6 + 170, (VideoSpan(300, 5, 6, 6),))
    q, k, v = _qkv(7, lay.seq_len, 4, 2, b=2)
    for pattern in ("union", "dense"):
        ref = dense_masked_attention(q, k, v, reference_mask(lay, pattern)[None])
        out = jax.jit(lambda q, k, v, p=pattern: segment_attention(q, k, v, lay, p))(q, k, v)
        assert float(jnp.max(jnp.abs(out - ref))) < TOL, pattern


def test_bfloat16_inputs_keep_their_dtype():
    lay = STLayout(8 + 2 * 3 * 3 + 4, (VideoSpan(8, 2, 3, 3),))
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(3, lay.seq_len, 2, 1))
    out = jax.jit(lambda q, k, v: segment_attention(q, k, v, lay, "union"))(q, k, v)
    ref = dense_masked_attention(q, k, v, reference_mask(lay, "union")[None])
    assert out.dtype == jnp.bfloat16 and float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 2e-2


def test_segment_cells_by_hand():
    # 10 text tokens, a 3 x (2 x 4) video, 5 text tokens: 39 tokens
    lay = STLayout(39, (VideoSpan(10, 3, 2, 4),))
    # leading text: rows 0-9 over keys 0-9 (one 16-row block x one 16-key block); trailing text: 5 rows -> a
    # block of 8 rows over keys 0..38 -> 5 key blocks of 8
    text = 16 * 16 + 8 * 5 * 8
    # video rows (24 -> one block of 24) over the 10 global keys (one key block of 16)
    glob = 24 * 16
    spatial, temporal = 3 * 8 * 8, 8 * 3 * 3
    assert segment_cells(lay, "spatial") == text + glob + spatial
    assert segment_cells(lay, "temporal") == text + glob + temporal
    assert segment_cells(lay, "union") == text + glob + spatial + temporal
    assert segment_cells(lay, "temporal_strict") == temporal
    # dense: every region is a causal sweep over all earlier keys
    assert segment_cells(lay, "dense") == 16 * 16 + 24 * 40 + 8 * 5 * 8


@pytest.mark.parametrize("pattern", ["union", "spatial", "temporal", "dense", "temporal_strict"])
def test_segment_cells_cover_every_allowed_pair(pattern):
    lay = STLayout(7 + 4 * 5 * 3 + 30 + 2 * 2 * 2 + 3, (VideoSpan(7, 4, 5, 3), VideoSpan(97, 2, 2, 2)), 1, 2)
    allowed = int(reference_mask(lay, pattern).sum())
    assert allowed <= segment_cells(lay, pattern) < lay.seq_len ** 2 * 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's default backend")
def test_segment_attention_is_the_cpu_default():
    assert resolve_backend("auto").name == "segments"


@pytest.mark.parametrize("radius", [None, 3])
def test_frames_split_into_causal_row_chunks(radius):
    """A 16 x 16 frame is scored in two row chunks (rows 0-127 over keys 0-127, rows 128-255 over all 256): the
    same attention as the dense reference, and 3/4 of the frame's square counted."""
    assert segments.frame_row_splits(256) == [0, 128, 256]
    lay = STLayout(10 + 2 * 16 * 16 + 5, (VideoSpan(10, 2, 16, 16),), spatial_radius=radius)
    q, k, v = _qkv(9, lay.seq_len, 2, 1)
    ref = dense_masked_attention(q, k, v, reference_mask(lay, "spatial")[None])
    out = jax.jit(lambda q, k, v: segment_attention(q, k, v, lay, "spatial"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL, rtol=0)
    # the spatial and temporal counts share the text and global sweeps; they differ by the frames (two chunks
    # per frame, 2 frames) and the places (256 places x 2 x 2 slots)
    frames, places = 2 * (128 * 128 + 128 * 256), 256 * 2 * 2
    assert segment_cells(lay, "spatial") - frames == segment_cells(lay, "temporal") - places
