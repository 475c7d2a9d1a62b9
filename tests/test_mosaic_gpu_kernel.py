"""The Pallas Mosaic GPU block-sparse kernel in the Mosaic GPU interpreter (CPU) against the dense
masked float32 reference, on fresh random bf16 / f16 inputs. Max abs errors are printed (pytest -s).

Tolerance (bf16 / f16 only: the kernel rejects float32). The reference runs in float32 on the same
rounded inputs, so input rounding is no error source; the kernel adds (a) P rounded to the input
dtype before the P V matmul, |dP| <= u P, so |dO| <= u * max|V| per row, and (b) the output rounded
to the input dtype, |dO| <= u |O|, with u the unit roundoff (2^-8 bf16, 2^-11 f16); float32
accumulation adds ~1e-6. Checked elementwise: |out - ref| <= u * (|ref| + max|V|) + 1e-5 (about
0.02 for bf16 with N(0, 1) values, while a wrong or missing block moves outputs by ~0.1-1).
UNION heads through the API run split (SPATIAL + TEMPORAL_STRICT passes merged by log-sum-exp with
weights summing to 1): each partial output carries (a) and its own rounding u |O_part| <= u max|V|,
and the merge rounds once more, so those are checked against u * (|ref| + 2 max|V|) + 1e-5. The
log-sum-exp is float32 throughout (scores from float32 WGMMA accumulation): checked to 1e-5.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_sparse_attention import (BlockSizeError, HeadDimError, STLayout,
                                            block_sparse_attention, block_tables,
                                            dense_masked_attention, mosaic_gpu_block_sparse,
                                            reference_attention, reference_mask)

try:
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
        get_races, reset_gpu_interpret_mode_state)

    from kernels.block_sparse_attention.mosaic_gpu import interpret_params
    interpret_params()
except (ImportError, AttributeError) as e:  # pragma: no cover - jax without the interpreter
    pytest.skip(f"this jax ({jax.__version__}) has no Mosaic GPU interpreter: {e}",
                allow_module_level=True)

# text + video + text + second video + trailing text; 218 tokens (not a multiple of 64)
LAYOUT = STLayout(218, ((9, 3, 4, 5), (80, 4, 5, 6)))
LAYOUT_RW = STLayout(150, ((12, 5, 4, 6),), spatial_radius=1, temporal_window=2)
ERRORS = {}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """The interpreter must be reset after an exception inside a kernel, or later kernels fail."""
    yield
    reset_gpu_interpret_mode_state()


def _inputs(seed, n, hq=4, hkv=2, d=64, b=1, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, hq, n, d), dtype), jax.random.normal(kk, (b, hkv, n, d), dtype),
            jax.random.normal(kv, (b, hkv, n, d), dtype))


def _check(name, out, ref, v, split=False):
    """out [B, Hq, N, D] from the kernel, ref float32 from the same (rounded) inputs; ``split``:
    UNION heads merged from two rounded partial outputs."""
    assert out.dtype == v.dtype
    u = float(jnp.finfo(v.dtype).eps) / 2
    out = out.astype(jnp.float32)
    err = jnp.abs(out - ref)
    vmax = float(jnp.max(jnp.abs(v.astype(jnp.float32))))
    bound = u * (jnp.abs(ref) + (2 if split else 1) * vmax) + 1e-5
    ERRORS[name] = float(jnp.max(err))
    print(f"\n[max abs err] {name}: {ERRORS[name]:.2e} (max allowed {float(jnp.max(bound)):.2e})")
    assert bool(jnp.all(jnp.isfinite(out))), name
    assert bool(jnp.all(err <= bound)), (name, ERRORS[name])


def _api(q, k, v, layout, pats, **kw):
    return block_sparse_attention(q, k, v, layout, head_patterns=pats, backend="mosaic_gpu",
                                  interpret=True, **kw)


@pytest.mark.parametrize("pats,blocks", [
    (("union", "union", "temporal", "temporal"), (64, 64)),   # temporal heads permuted
    (("spatial", "spatial", "dense", "dense"), (64, 128)),
])
def test_patterns_two_videos_text_around(pats, blocks):
    """GQA 4 q / 2 kv heads (whole groups per pattern), 218 tokens padded to 256."""
    q, k, v = _inputs(11 + blocks[1], LAYOUT.seq_len)
    out = _api(q, k, v, LAYOUT, pats, block_q=blocks[0], block_k=blocks[1])
    ref = reference_attention(q, k, v, LAYOUT, pats)
    _check(f"mosaic_gpu {'/'.join(pats)} {blocks}", out, ref, v, split="union" in pats)


def test_radius_window_batch2_temporal_unpermuted_d32():
    """Spatial radius + temporal window, batch 2, head_dim 32 (64-byte swizzle), split GQA groups
    (kv repeated per q head), temporal heads in the original order."""
    q, k, v = _inputs(12, LAYOUT_RW.seq_len, b=2, d=32)
    pats = ("union", "temporal", "spatial", "union")
    out = _api(q, k, v, LAYOUT_RW, pats, block_q=64, block_k=64, permute_temporal=False)
    ref = reference_attention(q, k, v, LAYOUT_RW, pats)
    _check("mosaic_gpu radius/window B=2 D=32", out, ref, v, split=True)


def test_raw_kernel_gqa_float16_skips_empty_blocks():
    """Raw kernel, 4 q / 2 kv heads (q head h reads kv head h // 2), batch 2, float16, with the
    interpreter's race detector on. Spatial on a video-only layout is block-diagonal: NaNs planted
    in the last key/value block, empty for query blocks 0-2, must not reach their rows (empty blocks
    are never read)."""
    lay = STLayout(256, ((0, 4, 8, 8),))
    t = block_tables(lay, "spatial", 64, 64)
    assert (t.kv_count == 1).all() and (t.kv_partial == 1).all()
    q, k, v = _inputs(13, 256, b=2, dtype=jnp.float16)
    ref = reference_attention(q, k, v, lay, "spatial")
    params = dataclasses.replace(interpret_params(), detect_races=True)
    run = jax.jit(functools.partial(mosaic_gpu_block_sparse, tables=t, interpret=params))
    _check("mosaic_gpu raw kernel GQA f16", run(q, k, v), ref, v)
    assert not get_races().races_found
    k_nan, v_nan = k.at[:, :, 192:].set(jnp.nan), v.at[:, :, 192:].set(jnp.nan)
    out = run(q, k_nan, v_nan)
    _check("mosaic_gpu raw kernel, NaN in skipped blocks", out[:, :, :192], ref[:, :, :192], v)
    assert bool(jnp.isnan(out[:, :, 192:]).all())


@pytest.mark.parametrize("pattern,permuted", [("union", False), ("temporal_strict", True)])
def test_raw_kernel_return_lse(pattern, permuted):
    """Output and natural log-sum-exp (float32 [B, Hq, Np]) of the raw kernel == the dense reference
    in the tables' order; strict rows with no key (text, first slot) give output 0 and -inf."""
    t = block_tables(LAYOUT, pattern, 64, 64, permuted=permuted)
    q, k, v = _inputs(17, t.padded_len, d=32)
    mask = reference_mask(LAYOUT, pattern, padded_len=t.padded_len, permuted=permuted)
    ref_o, ref_lse = dense_masked_attention(q, k, v, mask[None], return_lse=True)
    empty = ~mask.any(1)
    assert empty.any() == (pattern == "temporal_strict")
    o, lse = mosaic_gpu_block_sparse(q, k, v, t, interpret=True, return_lse=True)
    _check(f"mosaic_gpu raw {pattern} permuted={permuted} output", o, ref_o, v)
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    assert bool(jnp.all(jnp.isneginf(lse[:, :, empty])))
    assert not bool(jnp.any(o[:, :, empty]))
    err = float(jnp.max(jnp.abs(lse[:, :, ~empty] - ref_lse[:, :, ~empty])))
    ERRORS[f"mosaic_gpu raw {pattern} lse"] = err
    print(f"\n[max abs err] mosaic_gpu raw {pattern} permuted={permuted} lse: {err:.2e}")
    assert err < 1e-5, err


def test_union_split_equals_union_and_one_pass():
    """UNION heads as SPATIAL + TEMPORAL_STRICT (permuted) merged by log-sum-exp == the dense UNION
    reference, as is the one-pass UNION path (split_union=False); GQA with a split group."""
    q, k, v = _inputs(18, LAYOUT.seq_len, d=32)
    pats = ("union", "spatial", "union", "union")
    ref = reference_attention(q, k, v, LAYOUT, pats)
    split = _api(q, k, v, LAYOUT, pats, block_q=64, block_k=64)
    _check("mosaic_gpu union split", split, ref, v, split=True)
    one_pass = _api(q, k, v, LAYOUT, pats, block_q=64, block_k=64, split_union=False)
    _check("mosaic_gpu union one pass", one_pass, ref, v)


def test_full_blocks_text_only_causal():
    """Text only, dense: most blocks full (unmasked path), diagonal blocks partial; block_q 128."""
    lay = STLayout(256)
    t = block_tables(lay, "dense", 128, 64)
    assert (np.asarray(t.kv_count) > np.asarray(t.kv_partial)).any()
    q, k, v = _inputs(14, 256, hq=2, hkv=1)
    t_ = lambda x: x.transpose(0, 2, 1, 3)
    ref = t_(jax.nn.dot_product_attention(t_(q.astype(jnp.float32)), t_(k.astype(jnp.float32)),
                                          t_(v.astype(jnp.float32)), is_causal=True))
    out = _api(q, k, v, lay, "dense", block_q=128, block_k=64)
    _check("mosaic_gpu text-only vs causal", out, ref, v)


def test_bad_inputs():
    q, k, v = _inputs(15, LAYOUT.seq_len, hq=2, hkv=1)
    with pytest.raises(BlockSizeError, match="block_q to be 64 or 128"):
        _api(q, k, v, LAYOUT, "union", block_q=32, block_k=64)
    with pytest.raises(BlockSizeError, match="block_k to be a multiple of 64 in"):
        _api(q, k, v, LAYOUT, "union", block_q=64, block_k=96)
    with pytest.raises(BlockSizeError, match="block_k to be a multiple of 64 in"):
        _api(q, k, v, LAYOUT, "union", block_q=64, block_k=512)
    with pytest.raises(TypeError, match="bfloat16 or float16 q/k/v .* got float32"):
        _api(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), LAYOUT, "union")
    with pytest.raises(TypeError, match="q, k, v of one dtype"):
        _api(q, k.astype(jnp.float16), v, LAYOUT, "union")
    qq = jnp.ones((1, 2, LAYOUT.seq_len, 48), jnp.bfloat16)
    kk = jnp.ones((1, 1, LAYOUT.seq_len, 48), jnp.bfloat16)
    with pytest.raises(HeadDimError, match="head_dim 48 is not supported by the 'mosaic_gpu'"):
        _api(qq, kk, kk, LAYOUT, "union")
    q256, k256, v256 = _inputs(16, LAYOUT.seq_len, hq=2, hkv=1, d=256)
    with pytest.raises(BlockSizeError, match="needs 321536 bytes of SMEM > 232448"):
        _api(q256, k256, v256, LAYOUT, "spatial", block_q=64, block_k=128)
    with pytest.raises(BlockSizeError, match="needs 321792 bytes of SMEM"):   # + [64] f32 LSE tile
        _api(q256, k256, v256, LAYOUT, "union", block_q=64, block_k=128)
    t = block_tables(LAYOUT, "union", 64, 64)
    with pytest.raises(ValueError, match="the tables' padded length 256"):
        mosaic_gpu_block_sparse(q, k, v, t)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 256 - LAYOUT.seq_len), (0, 0)))
    with pytest.raises(ValueError, match=r"k \(1, 1, 256, 64\) and v \(1, 1, 218, 64\) must be"):
        mosaic_gpu_block_sparse(pad(q), pad(k), v, t)
