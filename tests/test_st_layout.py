"""ST-SpAttn layout, element mask and block tables against brute force (METHOD.md definition)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jax.numpy as jnp

from kernels.block_sparse_attention import (EMPTY, FULL, PARTIAL, BlockSizeError, HeadPattern,
                                            LayoutError, STLayout, block_counts, block_tables,
                                            classify_blocks, element_mask, inverse_permutation,
                                            padded_length, permutation, reference_mask, token_ids)

PATTERNS = list(HeadPattern)


def methodmd_mask(seq_len, videos, pattern, radius=None, window=None, npad=None):
    """Explicit N x N mask written straight from METHOD.md with python loops over (f, y, x)."""
    npad = seq_len if npad is None else npad
    where = {}  # original index -> (video number, start, f, y, x)
    for n, (s, t, h, w) in enumerate(videos):
        for f in range(t):
            for y in range(h):
                for x in range(w):
                    where[s + f * h * w + y * w + x] = (n, f, y, x)
    m = np.zeros((npad, npad), bool)
    for i in range(npad):
        for j in range(i + 1):
            if i not in where or j not in where or where[j][0] != where[i][0]:
                # non-video query, or a key outside the query's video: global (the strict temporal
                # part of UNION has no global keys)
                m[i, j] = pattern is not HeadPattern.TEMPORAL_STRICT
                continue
            _, fi, yi, xi = where[i]
            _, fj, yj, xj = where[j]
            sp = fi == fj and (radius is None or (abs(yi - yj) <= radius and abs(xi - xj) <= radius))
            tp = (yi, xi) == (yj, xj) and (window is None or fi - fj <= window)
            m[i, j] = {HeadPattern.DENSE: True, HeadPattern.SPATIAL: sp, HeadPattern.TEMPORAL: tp,
                       HeadPattern.UNION: sp or tp, HeadPattern.TEMPORAL_STRICT: tp and fj < fi,
                       }[pattern]
    return m


CASES = {
    "one_video": (40, [(6, 3, 2, 5)], None, None),
    "two_videos": (70, [(3, 2, 3, 3), (30, 4, 2, 4)], None, None),
    "video_after_image_text": (60, [(25, 3, 3, 3)], None, None),   # tokens 0..24: text + image
    "text_only": (37, [], None, None),
    "radius_window": (75, [(5, 5, 3, 4)], 1, 2),
    "video_at_start_and_end": (36, [(0, 2, 2, 3), (24, 2, 3, 2)], None, 0),
}


def _layout(case):
    n, vids, r, w = CASES[case]
    return STLayout(n, tuple(vids), spatial_radius=r, temporal_window=w), vids


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_element_mask_matches_methodmd(case, pattern):
    lay, vids = _layout(case)
    npad = padded_length(lay.seq_len, 16, 16)        # lengths are not multiples of 16
    want = methodmd_mask(lay.seq_len, vids, pattern, lay.spatial_radius, lay.temporal_window, npad)
    # numpy mask from ids
    assert (reference_mask(lay, pattern, padded_len=npad) == want).all()
    # the jnp element mask the kernels apply, original and permuted order
    for permuted in (False, True):
        ids = jnp.asarray(token_ids(lay, npad, permuted=permuted).stacked())
        got = np.asarray(element_mask(lambda f: ids[f][:, None], lambda f: ids[f][None, :], pattern,
                                      lay.spatial_radius, lay.temporal_window))
        if permuted:
            p = permutation(lay, npad)
            assert (got == want[np.ix_(p, p)]).all()
        else:
            assert (got == want).all()
    # every row sees at least itself (no empty softmax rows); strict rows never do (f_j < f_i)
    if pattern is HeadPattern.TEMPORAL_STRICT:
        assert not want.diagonal().any()
    else:
        assert want.diagonal().all()


@pytest.mark.parametrize("case", list(CASES))
def test_spatial_and_strict_temporal_partition_union(case):
    """UNION = SPATIAL | TEMPORAL_STRICT with the two disjoint (the union-split identity)."""
    lay, vids = _layout(case)
    sp, strict, union = (methodmd_mask(lay.seq_len, vids, p, lay.spatial_radius, lay.temporal_window)
                         for p in (HeadPattern.SPATIAL, HeadPattern.TEMPORAL_STRICT, HeadPattern.UNION))
    assert not (sp & strict).any()
    assert ((sp | strict) == union).all()


def test_permutation_is_position_major():
    lay = STLayout(30, ((4, 2, 2, 3),))
    p = permutation(lay)
    inv = inverse_permutation(lay)
    assert (p[inv] == np.arange(30)).all() and (inv[p] == np.arange(30)).all()
    assert (p[:4] == np.arange(4)).all() and (p[16:] == np.arange(16, 30)).all()
    ids = token_ids(lay, permuted=True)
    # permuted video block: place-major, frame-minor
    assert ids.place[4:16].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert ids.frame[4:16].tolist() == [0, 1] * 6
    assert (ids.index == p).all()


def brute_block_counts(lay, pattern, bq, bk, permuted, npad=None):
    npad = padded_length(lay.seq_len, bq, bk, npad)
    m = reference_mask(lay, pattern, padded_len=npad, permuted=permuted)
    return m.reshape(npad // bq, bq, npad // bk, bk).sum((1, 3))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("blocks", [(8, 8), (16, 8), (8, 32), (12, 20)])
def test_block_classification_matches_brute_force(case, blocks):
    lay, _ = _layout(case)
    bq, bk = blocks
    for pattern in PATTERNS:
        for permuted in (False, True):
            want = brute_block_counts(lay, pattern, bq, bk, permuted)
            got = block_counts(lay, pattern, bq, bk, permuted=permuted)
            assert (got == want).all(), (pattern, permuted)
            cls = classify_blocks(lay, pattern, bq, bk, permuted=permuted)
            assert ((cls == EMPTY) == (want == 0)).all()
            assert ((cls == FULL) == (want == bq * bk)).all()


def test_block_tables_lists():
    lay = STLayout(150, ((10, 4, 4, 5), (100, 2, 3, 4)), temporal_window=1)
    for pattern in PATTERNS:
        for permuted in (False, True):
            t = block_tables(lay, pattern, 16, 32, permuted=permuted)
            cls = t.classes
            assert t.kv_index.shape == (t.num_q_blocks, t.max_blocks)
            for i in range(t.num_q_blocks):
                c, npart = t.kv_count[i], t.kv_partial[i]
                lst = t.kv_index[i, :c]
                assert sorted(lst.tolist()) == np.nonzero(cls[i] != EMPTY)[0].tolist()
                assert (cls[i, lst[:npart]] == PARTIAL).all() and (cls[i, lst[npart:]] == FULL).all()
                assert (t.kv_full[i, :c] == (np.arange(c) >= npart)).all()
                if c:   # strict tables have empty rows (text, first-slot query blocks)
                    assert (t.kv_index[i, c:] == lst[-1]).all()
            assert 0 < t.density <= 1 and t.padded_density >= t.density
    # temporal heads are far sparser in the position-major order
    a = block_tables(lay, "temporal", 16, 16, permuted=False)
    b = block_tables(lay, "temporal", 16, 16, permuted=True)
    assert b.kv_partial.sum() < a.kv_partial.sum()


@st.composite
def layouts(draw):
    pos, vids = 0, []
    for _ in range(draw(st.integers(0, 2))):
        pos += draw(st.integers(0, 12))
        t, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
        vids.append((pos, t, h, w))
        pos += t * h * w
    n = max(1, pos + draw(st.integers(0, 12)))
    radius = draw(st.one_of(st.none(), st.integers(0, 2)))
    window = draw(st.one_of(st.none(), st.integers(0, 2)))
    return STLayout(n, tuple(vids), spatial_radius=radius, temporal_window=window)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lay=layouts(), pattern=st.sampled_from(PATTERNS), permuted=st.booleans(),
       bq=st.sampled_from([1, 4, 8, 16]), bk=st.sampled_from([1, 4, 8, 16]))
def test_property_block_counts(lay, pattern, permuted, bq, bk):
    want = brute_block_counts(lay, pattern, bq, bk, permuted)
    assert (block_counts(lay, pattern, bq, bk, permuted=permuted) == want).all()


@settings(max_examples=30, deadline=None)
@given(lay=layouts(), pattern=st.sampled_from(PATTERNS))
def test_property_mask_matches_methodmd(lay, pattern):
    vids = [(v.start, v.t, v.h, v.w) for v in lay.videos]
    want = methodmd_mask(lay.seq_len, vids, pattern, lay.spatial_radius, lay.temporal_window)
    assert (reference_mask(lay, pattern) == want).all()


@settings(max_examples=40, deadline=None)
@given(lay=layouts())
def test_property_spatial_and_strict_temporal_partition_union(lay):
    sp, strict, union = (reference_mask(lay, p) for p in
                         (HeadPattern.SPATIAL, HeadPattern.TEMPORAL_STRICT, HeadPattern.UNION))
    assert not (sp & strict).any()
    assert ((sp | strict) == union).all()
    perm = permutation(lay)
    assert (reference_mask(lay, HeadPattern.TEMPORAL_STRICT, permuted=True)
            == strict[np.ix_(perm, perm)]).all()


def test_bad_layouts_and_block_sizes():
    with pytest.raises(LayoutError, match=r"grid \(t, h, w\) = \(2, 3, 4\) gives 24 tokens.*20"):
        STLayout.from_prompt(50, [5], [(2, 3, 4)], video_token_counts=[20])
    with pytest.raises(LayoutError, match="needs 24 tokens"):
        STLayout(20, ((0, 2, 3, 4),))
    with pytest.raises(LayoutError, match="non-overlapping"):
        STLayout(100, ((0, 2, 2, 2), (5, 1, 2, 2)))
    with pytest.raises(LayoutError, match="2 video runs but 1 grids"):
        STLayout.from_token_mask([0, 1, 1, 0, 1, 1, 0], [(1, 1, 2)])
    lay = STLayout.from_token_mask([0, 1, 1, 1, 1, 0], [(1, 2, 2)])
    assert lay.videos[0].start == 1 and lay.videos[0].length == 4
    with pytest.raises(BlockSizeError, match="block_k=48 does not divide the padded length 64"):
        block_tables(STLayout(60), "union", 16, 48, padded_len=64)
    with pytest.raises(BlockSizeError, match="smaller than"):
        block_tables(STLayout(60), "union", 16, 16, padded_len=48)
    with pytest.raises(ValueError, match="unknown head pattern"):
        HeadPattern.parse("diagonal")


def test_calibration_picks_the_pattern_that_matches_the_data():
    """Heads whose true attention is spatial (keys in the same slot dominate) or temporal (keys at the
    same place dominate) are recognised from sampled rows; errors are computed without N x N."""
    import jax
    from purekv_jax.st_sparse.calibrate import calibrate_head_patterns, sample_video_rows

    lay = STLayout(6 + 4 * 3 * 4 + 4, ((6, 4, 3, 4),))
    n, d = lay.seq_len, 16
    ids = token_ids(lay)
    rng = np.random.default_rng(0)
    # head 0: q/k encode the slot (spatial), head 1: q/k encode the place (temporal)
    q = np.zeros((1, 2, n, d), np.float32)
    k = np.zeros((1, 2, n, d), np.float32)
    vid = ids.video >= 0
    q[0, 0, vid, ids.frame[vid]] = 20.0
    k[0, 0, vid, ids.frame[vid]] = 20.0
    q[0, 1, vid, ids.place[vid]] = 20.0
    k[0, 1, vid, ids.place[vid]] = 20.0
    v = rng.normal(size=(1, 2, n, d)).astype(np.float32)
    pats, errs = calibrate_head_patterns(jax.numpy.asarray(q), jax.numpy.asarray(k),
                                         jax.numpy.asarray(v), lay, num_rows=32,
                                         candidates=("spatial", "temporal"))
    assert pats == (HeadPattern.SPATIAL, HeadPattern.TEMPORAL), errs
    assert errs.shape == (2, 2)
    assert len(sample_video_rows(lay, 10)) == 10
    assert (sample_video_rows(STLayout(10), 10) == np.zeros(0)).all()
