"""Measures the ST-SpAttn cost model's profile of a block-sparse backend on this machine (not a test) and
stores it in ``purekv_jax/st_sparse/cost_profiles.json``, which ``PureKVConfig(st_select="auto")`` reads to
decide, per layer pattern set, whether block-sparse attention beats the dense prefill path.

    JAX_PLATFORMS=cpu python benchmarks/st_cost_profile.py --backend segments [--reps 5] [--dry-run]

Run it on the machine kind the profile is for (the CPU for ``segments`` and ``xla``; a GPU for ``triton`` / ``mosaic_gpu``;
a TPU for ``tpu``); a shared, busy machine inflates every figure alike, the ratios are what decide.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from kernels.block_sparse_attention import resolve_backend  # noqa: E402
from purekv_jax.st_sparse.cost import (PROFILES_FILE, calibrate_profile, profile_key, read_profiles,  # noqa: E402
                                       save_profiles)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="segments", help="segments or xla (the CPU), triton, mosaic_gpu or tpu")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="print the profile, do not store it")
    ap.add_argument("--out", default=PROFILES_FILE, help="profiles file to add it to (default: the repository's)")
    args = ap.parse_args()
    backend = resolve_backend(args.backend).name
    profile = calibrate_profile(backend, head_dim=args.head_dim, reps=args.reps)
    for f in dataclasses.fields(profile):
        value = getattr(profile, f.name)
        print(f"{f.name:<14} {value:.4g}" if isinstance(value, float) else f"{f.name:<14} {value}")
    print(f"sparse / flash cost per cell: {profile.sparse_cell_s / profile.flash_cell_s:.2f}, "
          f"per pass: {profile.sparse_pass_s * 1e3:.2f} ms")
    if not args.dry_run:
        key = profile_key(backend, jax.devices()[0].device_kind)
        save_profiles({**read_profiles(args.out), key: profile}, args.out)
        print(f"stored in {args.out} as {key!r}")


if __name__ == "__main__":
    main()
