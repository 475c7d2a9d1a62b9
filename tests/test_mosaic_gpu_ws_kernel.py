"""The warp-specialised Mosaic GPU block-sparse kernel (``mosaic_gpu_ws``: a producer warpgroup streaming
K / V through a ring of SMEM slots, two consumer warpgroups sharing them, a ping-pong schedule barrier) in
the Mosaic GPU interpreter (its warpgroups run as concurrent threads with real barrier semantics) against
the dense masked float32 reference, and its CUDA lowering from the CPU.

Tolerance as in ``test_mosaic_gpu_kernel.py`` (same arithmetic: P rounded to the input dtype before P V,
the output rounded once): |out - ref| <= u * (|ref| + max|V|) + 1e-5, u the unit roundoff; the float32
log-sum-exp to 1e-5. The interpreter is slow (three threads per program), so the sizes are the smallest
that still give each consumer partial and full blocks, an empty row set and a ring that wraps."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_sparse_attention import (BlockSizeError, STLayout, block_sparse_attention, block_tables,
                                            dense_masked_attention, reference_mask)
from kernels.block_sparse_attention.mosaic_gpu_ws import mosaic_gpu_ws_block_sparse, ws_stages

try:
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (get_races,
                                                                            reset_gpu_interpret_mode_state)

    from kernels.block_sparse_attention.mosaic_gpu import interpret_params
    interpret_params()
except (ImportError, AttributeError) as e:  # pragma: no cover - jax without the interpreter
    pytest.skip(f"this jax ({jax.__version__}) has no Mosaic GPU interpreter: {e}", allow_module_level=True)

# text, a 6 x 4 x 8 video, text: 250 tokens padded to 256 (two 128-row query blocks)
LAYOUT = STLayout(250, ((40, 6, 4, 8),))


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    yield
    reset_gpu_interpret_mode_state()


def _inputs(seed, n, hq, hkv, d, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, (1, h, n, d), dtype) for key, h in ((kq, hq), (kk, hkv), (kv, hkv)))


def _bound(ref, v):
    u = float(jnp.finfo(v.dtype).eps) / 2
    return u * (jnp.abs(ref) + float(jnp.max(jnp.abs(v.astype(jnp.float32))))) + 1e-5


@pytest.mark.parametrize("pattern, permuted", [
    ("temporal_strict", True),
    pytest.param("dense", False, marks=pytest.mark.skipif(
        jax.__version_info__ < (0, 11), reason="jax 0.10's interpreter needs ~90 s per call; 0.11's ~5 s"))])
def test_raw_kernel_matches_reference(pattern, permuted):
    """Raw kernel, GQA 2 q / 1 kv head, block_k 64, two stages (the ring wraps: up to 4 listed blocks),
    with return_lse; race detector on for the strict pass. Strict rows with no key (text, the first
    slot) give output 0 and log-sum-exp -inf; the dense (causal) pass has full blocks too."""
    tables = block_tables(LAYOUT, pattern, 128, 64, permuted=permuted)
    assert int(tables.kv_count.max()) > 2 and (pattern == "temporal_strict" or
                                              (tables.kv_count > tables.kv_partial).any())
    q, k, v = _inputs(hash(pattern) % 1000, tables.padded_len, 2, 1, 32)
    mask = reference_mask(LAYOUT, pattern, padded_len=tables.padded_len, permuted=permuted)
    ref, ref_lse = dense_masked_attention(q, k, v, mask[None], return_lse=True)
    params = dataclasses.replace(interpret_params(), detect_races=pattern == "temporal_strict")
    run = jax.jit(functools.partial(mosaic_gpu_ws_block_sparse, tables=tables, interpret=params,
                                    return_lse=True, stages=2))
    out, lse = run(q, k, v)
    if pattern == "temporal_strict":
        assert not get_races().races_found
    assert out.dtype == q.dtype and lse.shape == q.shape[:3]
    err = jnp.abs(out.astype(jnp.float32) - ref)
    print(f"\n[max abs err] mosaic_gpu_ws {pattern}: {float(jnp.max(err)):.2e}")
    assert bool(jnp.all(err <= _bound(ref, v)))
    empty = ~mask.any(1)
    assert empty.any() == (pattern == "temporal_strict")
    assert bool(jnp.all(jnp.isneginf(lse[:, :, empty]))) and not bool(jnp.any(out[:, :, empty]))
    assert float(jnp.max(jnp.abs(lse[:, :, ~empty] - ref_lse[:, :, ~empty]))) < 1e-5


def test_blocks_and_stages():
    """block_q must be 128 (two 64-row consumers); the ring is as deep as SMEM allows, at least 2."""
    assert ws_stages(128, 128) == 2 and ws_stages(64, 128) == 4 and ws_stages(256, 256) == 0
    q, k, v = _inputs(3, LAYOUT.seq_len, 2, 1, 32)
    with pytest.raises(BlockSizeError, match="needs block_q = 128"):
        block_sparse_attention(q, k, v, LAYOUT, head_patterns="spatial", backend="mosaic_gpu_ws", block_q=64)
    q, k, v = _inputs(4, 256, 2, 1, 256)
    with pytest.raises(BlockSizeError, match="at least 2 stages"):
        mosaic_gpu_ws_block_sparse(q, k, v, block_tables(STLayout(256), "dense", 128, 256))


@pytest.mark.parametrize("split_union", [True, False])
def test_exports_for_cuda_without_gpu(split_union):
    """The 7B head shapes (28 / 4 heads, head_dim 128, bf16, 128 x 128 blocks) lower to a Mosaic GPU custom
    call for CUDA from the CPU, also with return_lse (the split union head)."""
    lay = STLayout(1000, ((40, 4, 12, 16),))
    fn = functools.partial(block_sparse_attention, layout=lay, head_patterns="union", backend="mosaic_gpu_ws",
                           interpret=False, split_union=split_union)
    q = jax.ShapeDtypeStruct((1, 28, lay.seq_len, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 4, lay.seq_len, 128), jnp.bfloat16)
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"])(q, kv, kv)
    assert "mosaic_gpu_v2" in exp.mlir_module() and exp.platforms == ("cuda",)
