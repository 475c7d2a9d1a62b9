"""Host-only: block density of a UNION head in one pass vs split (SPATIAL + TEMPORAL_STRICT).

Density = computed (query block, key block) pairs / all pairs, from the block tables (no kernel
runs). Grids: the CPU benchmark's (text 48 + video + text 40) and the H200 benchmark's (text 200 +
video of 24x24 slots + text 56, N ~ 8k / 16k / 32k).

    python benchmarks/union_split_density.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels.block_sparse_attention import STLayout, block_tables  # noqa: E402

# (t, h, w), text before, text after, (block_q, block_k)
CASES = [((8, 16, 16), 48, 40, (128, 128)), ((16, 24, 24), 48, 40, (128, 128))] + [
    ((t, 24, 24), 200, 56, blk) for blk in ((128, 64), (128, 128)) for t in (13, 28, 56)]
PASSES = (("union", False), ("spatial", False), ("temporal_strict", True), ("temporal", True))


def main():
    print("| grid t x h x w | N | blocks | union one pass | spatial | strict temporal "
          "(position-major) | split = spatial + strict | split / union | temporal (position-major) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (t, h, w), before, after, (bq, bk) in CASES:
        n = before + t * h * w + after
        lay = STLayout(n, ((before, t, h, w),))
        dens = {p: block_tables(lay, p, bq, bk, permuted=perm).density for p, perm in PASSES}
        split = dens["spatial"] + dens["temporal_strict"]
        print(f"| {t}x{h}x{w} | {n} | {bq}x{bk} | {dens['union']:.3f} | {dens['spatial']:.3f} | "
              f"{dens['temporal_strict']:.3f} | {split:.3f} | {split / dens['union']:.2f} | "
              f"{dens['temporal']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
