"""Every block-sparse path (the segment path, XLA fallback, Pallas Triton + TPU kernels in interpret mode) against the
dense masked float32 reference (outputs, and the per-row log-sum-exp of the split-union passes), on
fresh random inputs. Max abs errors are printed (pytest -s)."""

import functools

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from kernels.block_sparse_attention import (BlockSizeError, HeadDimError, HeadPattern, LayoutError,
                                            STLayout, block_sparse_attention, block_tables,
                                            dense_masked_attention, merge_by_lse, reference_attention,
                                            reference_mask, tpu_block_sparse, triton_block_sparse,
                                            xla_block_sparse)

TOL = 2e-5
# text + video + text + second video + trailing text; 218 tokens (not a multiple of any block size)
LAYOUT = STLayout(218, ((9, 3, 4, 5), (80, 4, 5, 6)))
LAYOUT_RW = STLayout(150, ((12, 5, 4, 6),), spatial_radius=1, temporal_window=2)
MIXED = ("union", "temporal", "spatial", "dense", "temporal", "temporal", "union", "spatial")
BLOCKS = {"xla": (32, 32), "triton": (32, 32), "tpu": (32, 128), "segments": (32, 32)}
ERRORS = {}


def _inputs(seed, n, hq=8, hkv=4, d=32, b=1, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, hq, n, d), dtype), jax.random.normal(kk, (b, hkv, n, d), dtype),
            jax.random.normal(kv, (b, hkv, n, d), dtype))


def _check(name, out, ref):
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    ERRORS[name] = err
    print(f"\n[max abs err] {name}: {err:.2e}")
    assert err < TOL, (name, err)


@pytest.mark.parametrize("backend", ["segments", "xla", "triton", "tpu"])
def test_mixed_patterns_gqa(backend):
    """GQA 8 q / 4 kv heads, all four patterns, TEMPORAL heads on the permuted layout, two videos."""
    q, k, v = _inputs(1, LAYOUT.seq_len)
    bq, bk = BLOCKS[backend]
    f = jax.jit(functools.partial(block_sparse_attention, layout=LAYOUT, head_patterns=MIXED,
                                  backend=backend, block_q=bq, block_k=bk, interpret=True))
    _check(f"{backend} mixed GQA", f(q, k, v), reference_attention(q, k, v, LAYOUT, MIXED))


@pytest.mark.parametrize("backend", ["segments", "xla", "triton", "tpu"])
def test_radius_window_batch2(backend):
    q, k, v = _inputs(2, LAYOUT_RW.seq_len, hq=4, hkv=2, b=2, d=64)
    pats = ("union", "temporal", "spatial", "union")
    bq, bk = BLOCKS[backend]
    out = block_sparse_attention(q, k, v, LAYOUT_RW, head_patterns=pats, backend=backend,
                                 block_q=bq, block_k=bk, interpret=True)
    _check(f"{backend} radius/window B=2 D=64", out, reference_attention(q, k, v, LAYOUT_RW, pats))


@pytest.mark.parametrize("backend", ["segments", "xla", "triton"])
def test_temporal_unpermuted_and_split_groups(backend):
    # temporal heads in the original order; patterns that split GQA groups (kv repeated per head)
    q, k, v = _inputs(3, LAYOUT.seq_len, hq=4, hkv=2)
    pats = ("temporal", "spatial", "temporal", "temporal")
    out = block_sparse_attention(q, k, v, LAYOUT, head_patterns=pats, backend=backend,
                                 block_q=32, block_k=32, interpret=True, permute_temporal=False)
    _check(f"{backend} temporal unpermuted split groups", out,
           reference_attention(q, k, v, LAYOUT, pats))


@pytest.mark.parametrize("backend", ["xla", "triton", "tpu"])
@pytest.mark.parametrize("case", ["two_videos_gqa", "radius_window_b2", "split_groups_unpermuted"])
def test_union_split_equals_union(backend, case):
    """UNION heads as SPATIAL + TEMPORAL_STRICT merged by log-sum-exp == the dense UNION reference
    == the one-pass UNION path; text around two videos, 218 / 150 tokens (not block multiples)."""
    lay, hq, hkv, b, d, pats, perm = {
        "two_videos_gqa": (LAYOUT, 8, 2, 1, 32, "union", True),
        "radius_window_b2": (LAYOUT_RW, 4, 2, 2, 64, ("union", "union", "temporal", "union"), True),
        "split_groups_unpermuted": (LAYOUT, 4, 2, 1, 32, ("union", "spatial", "union", "union"),
                                    False),
    }[case]
    q, k, v = _inputs(11, lay.seq_len, hq=hq, hkv=hkv, b=b, d=d)
    bq, bk = BLOCKS[backend]
    kw = dict(layout=lay, head_patterns=pats, backend=backend, block_q=bq, block_k=bk,
              interpret=True, permute_temporal=perm)
    split = jax.jit(functools.partial(block_sparse_attention, **kw))(q, k, v)
    _check(f"{backend} union split {case}", split, reference_attention(q, k, v, lay, pats))
    one_pass = block_sparse_attention(q, k, v, split_union=False, **kw)
    _check(f"{backend} union split vs one pass {case}", split, one_pass.astype(jnp.float32))


@pytest.mark.parametrize("pattern,permuted", [("union", False), ("temporal_strict", True),
                                              ("temporal_strict", False)])
def test_raw_kernels_return_lse(pattern, permuted):
    """Output and natural log-sum-exp of the raw kernels == the dense reference in the tables'
    order; strict rows with no key (text, first slot) give 0 and -inf."""
    for name, fn in (("xla", xla_block_sparse),
                     ("triton", functools.partial(triton_block_sparse, interpret=True)),
                     ("tpu", functools.partial(tpu_block_sparse, interpret=True))):
        t = block_tables(LAYOUT, pattern, *BLOCKS[name], permuted=permuted)
        q, k, v = _inputs(12, t.padded_len, hq=4, hkv=2)
        mask = reference_mask(LAYOUT, pattern, padded_len=t.padded_len, permuted=permuted)
        ref_o, ref_lse = dense_masked_attention(q, k, v, mask[None], return_lse=True)
        empty = ~mask.any(1)
        assert empty.any() == (pattern == "temporal_strict")
        o, lse = fn(q, k, v, t, return_lse=True)
        assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
        _check(f"{name} {pattern} permuted={permuted} output", o, ref_o)
        assert bool(jnp.all(jnp.isneginf(lse[:, :, empty])))
        _check(f"{name} {pattern} permuted={permuted} lse", lse[:, :, ~empty], ref_lse[:, :, ~empty])


def test_merge_by_lse_handles_empty_rows():
    o_a, o_b = jnp.ones((1, 1, 3, 2)), jnp.full((1, 1, 3, 2), 3.0)
    lse_a = jnp.array([[[0.0, 0.0, -jnp.inf]]])
    lse_b = jnp.array([[[-jnp.inf, 0.0, -jnp.inf]]])
    out = merge_by_lse(o_a, lse_a, o_b, lse_b)
    assert out[0, 0, :, 0].tolist() == [1.0, 2.0, 0.0]


def test_text_only_dense_equals_causal():
    lay = STLayout(100)
    q, k, v = _inputs(4, 100, hq=2, hkv=1)
    ref = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                       v.transpose(0, 2, 1, 3), is_causal=True).transpose(0, 2, 1, 3)
    out = block_sparse_attention(q, k, v, lay, head_patterns="union", backend="xla", block_q=32,
                                 block_k=32)
    _check("xla text-only vs causal", out, ref)
    out = block_sparse_attention(q, k, v, lay, head_patterns="dense", backend="triton", block_q=32,
                                 block_k=16, interpret=True)
    _check("triton text-only vs causal", out, ref)


def test_kernel_level_entry_points_skip_empty_blocks():
    """Raw kernels on padded inputs; NaNs planted in the last key/value block, which is empty for
    query blocks 0-2, must not reach their rows (empty blocks are never read)."""
    lay = STLayout(128, ((0, 4, 4, 8),))             # video only: spatial = block-diagonal frames
    t = block_tables(lay, "spatial", 32, 32)
    assert (t.kv_count == 1).all() and t.density == 0.25
    q, k, v = _inputs(5, 128, hq=2, hkv=1)
    ref = reference_attention(q, k, v, lay, "spatial")
    k_nan, v_nan = k.at[:, :, 96:].set(jnp.nan), v.at[:, :, 96:].set(jnp.nan)
    for name, fn in (("xla", xla_block_sparse),
                     ("triton", functools.partial(triton_block_sparse, interpret=True))):
        _check(f"{name} raw kernel spatial", fn(q, k, v, t), ref)
        out = fn(q, k_nan, v_nan, t)
        _check(f"{name} raw kernel, NaN in skipped blocks", out[:, :, :96], ref[:, :, :96])
        assert bool(jnp.isnan(out[:, :, 96:]).all())


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 6),
       pre=st.integers(0, 20), post=st.integers(0, 20), pattern=st.sampled_from([p for p in HeadPattern if not p.strict]))
def test_property_xla_random_layouts(seed, t, h, w, pre, post, pattern):
    lay = STLayout(pre + t * h * w + post, ((pre, t, h, w),))
    q, k, v = _inputs(seed, lay.seq_len, hq=2, hkv=1, d=16)
    out = block_sparse_attention(q, k, v, lay, head_patterns=pattern, backend="xla", block_q=16,
                                 block_k=16)
    _check(f"xla random layout {lay} {pattern.name}", out,
           reference_attention(q, k, v, lay, pattern))


def test_bad_inputs():
    q, k, v = _inputs(6, LAYOUT.seq_len, hq=2, hkv=1)
    with pytest.raises(HeadDimError, match="head_dim 48 is not supported by the 'triton'"):
        qq = jnp.zeros((1, 2, LAYOUT.seq_len, 48))
        kk = jnp.zeros((1, 1, LAYOUT.seq_len, 48))
        block_sparse_attention(qq, kk, kk, LAYOUT, backend="triton")
    with pytest.raises(BlockSizeError, match="power of two >= 16"):
        block_sparse_attention(q, k, v, LAYOUT, backend="triton", block_q=24, block_k=32)
    with pytest.raises(BlockSizeError, match="block_k to be a multiple of 128"):
        block_sparse_attention(q, k, v, LAYOUT, backend="tpu", block_q=32, block_k=64)
    with pytest.raises(LayoutError, match="hold 200 tokens but the layout describes 218"):
        block_sparse_attention(q[:, :, :200], k[:, :, :200], v[:, :, :200], LAYOUT, backend="xla")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        block_sparse_attention(q, jnp.concatenate([k] * 3, 1), jnp.concatenate([v] * 3, 1), LAYOUT)
    with pytest.raises(ValueError, match="head_patterns has 3 entries"):
        block_sparse_attention(q, k, v, LAYOUT, head_patterns=("union",) * 3, backend="xla")
    with pytest.raises(ValueError, match="temporal_strict is the internal"):
        block_sparse_attention(q, k, v, LAYOUT, head_patterns="temporal_strict", backend="xla")
    with pytest.raises(ValueError, match="unknown backend"):
        block_sparse_attention(q, k, v, LAYOUT, backend="cuda")
