"""Vision attention: the dense ``[P, P]``-mask reference vs the padded segment batches, one block.

Real Qwen2.5-VL-7B vision dims (hidden 1280, 16 heads, MLP 3420, window 112 px) with random weights,
a single block (so it fits on a CPU). For each grid and block kind (window / full attention) it
prints the compiled temp memory (``memory_analysis().temp_size_in_bytes``) and the median time of

* ``block``: the whole vision block (norms, qkv, rotary, attention, proj, MLP);
* ``attn``:  attention alone (``q, k, v [P, 16, 80]`` -> ``[P, 16, 80]``).

The dense path is the same computation for both kinds (only the mask values differ).

    JAX_PLATFORMS=cpu python benchmarks/vision_attention.py                # grids (1,32,32) (4,32,32)
    python benchmarks/vision_attention.py --grids 1,32,32 8,32,32 --reps 10 --tower  # on an accelerator

``--tower`` also times the whole 32-block tower (batched path only) per grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from models.qwen2_5_vl.config import VisionConfig  # noqa: E402
from models.qwen2_5_vl.vision import (  # noqa: E402
    _vision_forward,
    init_vision_params,
    batched_segment_attention,
    segment_attention,
    vision_block,
    vision_layout,
    vision_rotary_cos_sin,
)

# Qwen2.5-VL-7B-Instruct vision_config; depth 2 so the layout has one window and one full block.
CFG_7B = VisionConfig(depth=2, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                      fullatt_block_indexes=(1,))


def random_block(cfg: VisionConfig, dtype, seed: int = 0) -> nnx.State:
    """One vision block's weights as the state the pure block function takes (``VisionBlocks`` sliced)."""
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size

    def w(i, o):
        return jnp.asarray(rng.standard_normal((i, o), np.float32) / np.sqrt(i), dtype)

    def b(n, base=0.0):
        return jnp.asarray(base + 0.1 * rng.standard_normal(n, np.float32), dtype)

    return nnx.State(dict(norm1=b(d, 1.0), qkv_w=w(d, 3 * d), qkv_b=b(3 * d), proj_w=w(d, d), proj_b=b(d),
                             norm2=b(d, 1.0), gate_w=w(d, f), gate_b=b(f), up_w=w(d, f), up_b=b(f),
                             down_w=w(f, d), down_b=b(d)))


def measure(fn, args, reps: int) -> tuple[int, float]:
    """(compiled temp bytes, median seconds over ``reps`` runs after one warm-up)."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return temp, statistics.median(times)


def run(grids, reps: int, dtype) -> list[dict]:
    cfg = CFG_7B
    bp = random_block(cfg, dtype)
    rows = []
    for grid in grids:
        lay = vision_layout((grid,), cfg)
        n = lay.row_perm.shape[0]
        key = jax.random.PRNGKey(n)
        x = jax.random.normal(key, (n, cfg.hidden_size), jnp.float32).astype(dtype)
        q, k, v = jax.random.normal(key, (3, n, cfg.num_heads, cfg.head_dim), jnp.float32).astype(dtype)
        cos, sin = vision_rotary_cos_sin(jnp.asarray(lay.rotary_ids), cfg)
        for layer, kind in ((0, "window"), (1, "full")):
            batches = lay.full_batches if lay.full_layers[layer] else lay.window_batches
            ids = jnp.asarray(lay.layer_segments[layer])
            shapes = "+".join(f"{g.shape[0]}x{g.shape[1]}" for g, _ in batches.buckets)
            t = lambda a: a.swapaxes(0, 1)
            paths = {
                "dense": (lambda bp, x, ids: vision_block(bp, x, cos, sin, ids, cfg), (bp, x, ids),
                          lambda q, k, v, ids: t(segment_attention(t(q), t(k), t(v), ids)), (q, k, v, ids)),
                "batched": (lambda bp, x: vision_block(bp, x, cos, sin, batches, cfg), (bp, x),
                            lambda q, k, v: batched_segment_attention(q, k, v, batches), (q, k, v)),
            }
            for path, (block_fn, block_args, attn_fn, attn_args) in paths.items():
                block_mem, block_s = measure(block_fn, block_args, reps)
                attn_mem, attn_s = measure(attn_fn, attn_args, reps)
                rows.append(dict(grid=grid, P=n, kind=kind, path=path, batches=shapes if path == "batched" else f"1x{n}x{n}",
                                 block_mem=block_mem, block_s=block_s, attn_mem=attn_mem, attn_s=attn_s))
                print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'grid':<10} {'P':>5} {'kind':<6} {'path':<7} {'layout [S x L]':<14} "
          f"{'block temp MiB':>14} {'block ms':>9} {'attn temp MiB':>13} {'attn ms':>8}")


def format_row(r: dict) -> str:
    grid = "(" + ",".join(map(str, r["grid"])) + ")"
    mib = 1 << 20
    return (f"{grid:<10} {r['P']:>5} {r['kind']:<6} {r['path']:<7} {r['batches']:<14} "
            f"{r['block_mem'] / mib:>14.1f} {r['block_s'] * 1e3:>9.1f} {r['attn_mem'] / mib:>13.1f} {r['attn_s'] * 1e3:>8.1f}")


def run_tower(grids, reps: int, dtype) -> None:
    cfg = dataclasses.replace(CFG_7B, depth=32, fullatt_block_indexes=(7, 15, 23, 31))
    params = init_vision_params(cfg, jax.random.PRNGKey(0), dtype)
    print(f"{'grid':<10} {'P':>5} {'tower temp MiB':>14} {'tower ms':>9}")
    for grid in grids:
        n = grid[0] * grid[1] * grid[2]
        pixels = jax.random.normal(jax.random.PRNGKey(1), (n, cfg.patch_dim), dtype)
        mem, sec = measure(lambda p, x: _vision_forward(p, x, (grid,), cfg), (params, pixels), reps)
        print(f"{'(' + ','.join(map(str, grid)) + ')':<10} {n:>5} {mem / (1 << 20):>14.1f} {sec * 1e3:>9.1f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", nargs="+", default=["1,32,32", "4,32,32"], help="t,h,w patch grids")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--tower", action="store_true", help="also time the whole 32-block tower")
    args = ap.parse_args(argv)
    grids = [tuple(int(v) for v in g.split(",")) for g in args.grids]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; hidden {CFG_7B.hidden_size}, "
          f"{CFG_7B.num_heads} heads, {args.dtype}, median of {args.reps}")
    print(HEADER, flush=True)
    run(grids, args.reps, jnp.dtype(args.dtype))
    if args.tower:
        run_tower(grids, args.reps, jnp.dtype(args.dtype))


if __name__ == "__main__":
    main()
