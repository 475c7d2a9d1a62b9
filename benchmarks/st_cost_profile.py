"""Measures the ST-SpAttn cost model's profile of a block-sparse backend on this machine (not a test) and
stores it in ``purekv_jax/st_sparse/cost_profiles.json``, which ``PureKVConfig(st_select="auto")`` reads to
decide, per layer pattern set, whether block-sparse attention beats the dense prefill path.

    JAX_PLATFORMS=cpu python benchmarks/st_cost_profile.py --backend xla [--reps 5] [--dry-run]

Run it on the machine kind the profile is for (the CPU for ``xla``; a GPU for ``triton`` / ``mosaic_gpu``;
a TPU for ``tpu``); a shared, busy machine inflates every figure alike, the ratios are what decide.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from purekv_jax.st_sparse.cost import PROFILES_FILE, calibrate_profile, load_profiles, save_profiles  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="xla", help="xla, triton, mosaic_gpu or tpu")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="print the profile, do not store it")
    args = ap.parse_args()
    profile = calibrate_profile(args.backend, head_dim=args.head_dim, reps=args.reps)
    for f in dataclasses.fields(profile):
        value = getattr(profile, f.name)
        print(f"{f.name:<14} {value:.4g}" if isinstance(value, float) else f"{f.name:<14} {value}")
    print(f"sparse / flash cost per cell: {profile.sparse_cell_s / profile.flash_cell_s:.2f}, "
          f"per pass: {profile.sparse_pass_s * 1e3:.2f} ms")
    if not args.dry_run:
        save_profiles({**load_profiles(), args.backend: profile})
        print(f"stored in {PROFILES_FILE}")


if __name__ == "__main__":
    main()
