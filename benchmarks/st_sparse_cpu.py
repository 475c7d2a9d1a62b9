"""CPU benchmark: XLA block-sparse fallback vs dense causal attention at ST-SpAttn densities.

Prints one markdown table: for video grids 8x16x16 and 16x24x24 with short text before and after,
per head pattern, the block density (non-empty blocks / all blocks), the FLOP ratio of the XLA
fallback (it runs max_blocks entries for every query block) against dense attention (which computes
all N x N scores), and the median CPU time of each. ``union`` is the one-pass UNION head
(``split_union=False``); ``union-split`` the same head as SPATIAL + TEMPORAL_STRICT (position-major)
passes merged by log-sum-exp (densities and FLOP ratios: the sum of the two passes).

    JAX_PLATFORMS=cpu python benchmarks/st_sparse_cpu.py [--heads 4 --kv-heads 2 --head-dim 64]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_ms  # noqa: E402
from kernels.block_sparse_attention import STLayout, block_sparse_attention, block_tables  # noqa: E402
from kernels.block_sparse_attention.xla import xla_flop_ratio  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--text-before", type=int, default=48)
    ap.add_argument("--text-after", type=int, default=40)
    ap.add_argument("--grids", default="8x16x16,16x24x24")
    ap.add_argument("--patterns", default="spatial,temporal,union,union-split")
    args = ap.parse_args(argv)

    hq, hkv, d, blk = args.heads, args.kv_heads, args.head_dim, args.block
    rows = []
    print(f"# ST-SpAttn CPU benchmark (jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"B=1, Hq={hq}, Hkv={hkv}, D={d}, float32, blocks {blk}x{blk}, median of {args.reps})\n")
    print("| grid t x h x w | N | pattern | density (blocks computed / all) | of causal blocks | "
          "XLA FLOP ratio vs dense | dense ms | XLA sparse ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for grid in args.grids.split(","):
        t, h, w = (int(x) for x in grid.split("x"))
        n = args.text_before + t * h * w + args.text_after
        lay = STLayout(n, ((args.text_before, t, h, w),))
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (1, hq, n, d), jnp.float32)
        k = jax.random.normal(kk, (1, hkv, n, d), jnp.float32)
        v = jax.random.normal(kv, (1, hkv, n, d), jnp.float32)

        @jax.jit
        def dense(q, k, v):
            t_ = lambda x: x.transpose(0, 2, 1, 3)
            return t_(jax.nn.dot_product_attention(t_(q), t_(k), t_(v), is_causal=True))

        dense_ms = median_ms(dense, (q, k, v), args.reps)
        for pat in args.patterns.split(","):
            tbs, head_pat, split, label = pattern_passes(lay, pat, blk)
            f = jax.jit(functools.partial(block_sparse_attention, layout=lay, head_patterns=head_pat,
                                          backend="xla", block_q=blk, block_k=blk,
                                          split_union=split))
            ms = median_ms(f, (q, k, v), args.reps)
            density = sum(tb.density for tb in tbs)
            causal = sum(tb.causal_density for tb in tbs)
            flops = sum(xla_flop_ratio(tb) for tb in tbs)
            rows.append((grid, n, pat, density, ms, dense_ms))
            print(f"| {grid} | {n} | {label} | {density:.3f} | {causal:.3f} | {flops:.3f} | "
                  f"{dense_ms:.1f} | {ms:.1f} | {dense_ms / ms:.2f}x |", flush=True)
    return rows


def pattern_passes(lay: STLayout, pat: str, blk: int):
    """(block tables of each pass, head pattern, split_union, row label) for a --patterns entry."""
    if pat == "union-split":
        tbs = [block_tables(lay, "spatial", blk, blk),
               block_tables(lay, "temporal_strict", blk, blk, permuted=True)]
        return tbs, "union", True, "union split: spatial + strict temporal (position-major)"
    tb = block_tables(lay, pat, blk, blk)
    label = pat + (" (position-major)" if tb.permuted else "") + (" one pass" if pat == "union" else "")
    return [tb], pat, False, label


if __name__ == "__main__":
    main()
