"""One ST-SpAttn layer's attention on the CPU: the dense prefill path against the two block-sparse XLA paths
(not a test).

For each merged video grid, a prompt of 48 text tokens + the video + 40 text tokens and the bench model's
attention shape (8 q / 2 KV heads, head_dim 64, float32): the flash prefill attention (what the dense prefill
runs above 512 tokens), the XLA gathered-block fallback (backend ``xla``, union heads split in two passes) and
the segment path (backend ``segments``: union, spatial and temporal heads), each compiled as ``generate``
compiles its programs (the same compiler options); medians of
interleaved repetitions after one compile call, the speed-up over flash, the fraction of the ``N^2`` score
cells each path computes, and what the stored cost profile predicts for it.

    JAX_PLATFORMS=cpu python benchmarks/st_attention_paths.py [--grids 4x12x10,8x16x16,16x24x24] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.block_sparse_attention import STLayout, VideoSpan, block_sparse_attention  # noqa: E402
from purekv_jax.attention import flash_prefill_attention  # noqa: E402
from purekv_jax.compile_cache import compile_lowered  # noqa: E402
from purekv_jax.st_sparse.cost import dense_path_cells, find_profile, load_profiles, sparse_cells  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


#: row name -> (backend, or None for the flash path; head pattern)
PATHS = {"flash (dense path)": (None, None), "xla blocks, union": ("xla", "union"),
         "segments, union": ("segments", "union"), "segments, spatial": ("segments", "spatial"),
         "segments, temporal": ("segments", "temporal")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", default="4x12x10,8x16x16,16x24x24")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    profiles = load_profiles()
    print(f"# One ST layer's attention, CPU (jax {jax.__version__}; {HEADS} q / {KV_HEADS} KV heads, head_dim "
          f"{HEAD_DIM}, float32; median of {args.reps} interleaved calls)\n")
    print("| prompt | path | ms | x flash | cells / N^2 | predicted ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for grid in args.grids.split(","):
        t, h, w = (int(x) for x in grid.split("x"))
        lay = STLayout(48 + t * h * w + 40, (VideoSpan(48, t, h, w),))
        n = lay.seq_len
        q = jnp.asarray(rng.standard_normal((1, HEADS, n, HEAD_DIM), np.float32))
        k, v = (jnp.asarray(rng.standard_normal((1, KV_HEADS, n, HEAD_DIM), np.float32)) for _ in range(2))
        valid = jnp.ones((1, n), bool)
        fns, cells, predicted = {}, {}, {}
        for name, (backend, pattern) in PATHS.items():
            if backend is None:
                fns[name] = jax.jit(lambda q, k, v: flash_prefill_attention(q, k, v, valid))
                c, _ = dense_path_cells(n, "flash")
                cells[name], prof, cell_s, passes = c * HEADS, find_profile(profiles, "segments"), "flash", 0
            else:
                fns[name] = jax.jit(lambda q, k, v, b=backend, p=pattern: block_sparse_attention(
                    q, k, v, lay, head_patterns=p, backend=b))
                cells[name], passes = sparse_cells(lay, (pattern,) * HEADS, HEADS, backend, None, None)
                prof, cell_s = find_profile(profiles, backend), "sparse"
            if prof is None:
                predicted[name] = None
            elif cell_s == "flash":
                predicted[name] = cells[name] * HEAD_DIM * prof.flash_cell_s
            else:
                predicted[name] = cells[name] * HEAD_DIM * prof.sparse_cell_s + passes * prof.sparse_pass_s
            fns[name] = compile_lowered(fns[name].lower(q, k, v), jax.default_backend())   # as generate compiles
            jax.block_until_ready(fns[name](q, k, v))
        times = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["flash (dense path)"])
        for name in fns:
            med = statistics.median(times[name])
            pred = "-" if predicted[name] is None else f"{predicted[name] * 1e3:.0f}"
            print(f"| {n:,} tok ({grid}) | {name} | {med * 1e3:.1f} | {base / med:.2f} | "
                  f"{cells[name] / HEADS / n**2:.3f} | {pred} |", flush=True)


if __name__ == "__main__":
    main()
