"""CPU benchmark: the prefill's attention paths, dense masked softmax vs the causal-skipping flash path.

Prints one markdown table: for each prompt length, the median time of ``dense_prefill_attention`` (all
N x N scores, the upper triangle masked) and ``flash_prefill_attention`` (query block i visits key blocks
0..i), their ratio, the fraction of the N x N score blocks the flash path computes, and the max abs
difference between the two (float32). Shapes of the bench model (8 query heads, 2 KV heads, head_dim 64),
one row left-padded by 37 tokens as ``generate`` pads it.

    JAX_PLATFORMS=cpu python benchmarks/prefill_attention.py [--lengths 1024 2048 4096 --reps 5]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_ms  # noqa: E402
from purekv_jax.attention import FLASH_BLOCK, dense_prefill_attention, flash_prefill_attention  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    dense, flash = jax.jit(dense_prefill_attention), jax.jit(flash_prefill_attention)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, heads {a.heads}/{a.kv_heads}, "
          f"head_dim {a.head_dim}, flash block {FLASH_BLOCK}, median of {a.reps}\n")
    print("| tokens | dense ms | flash ms | dense / flash | blocks computed | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in a.lengths:
        kq, kk, kv = jax.random.split(jax.random.key(n), 3)
        q = jax.random.normal(kq, (1, a.heads, n, a.head_dim), jnp.float32)
        k = jax.random.normal(kk, (1, a.kv_heads, n, a.head_dim), jnp.float32)
        v = jax.random.normal(kv, (1, a.kv_heads, n, a.head_dim), jnp.float32)
        valid = jnp.ones((1, n), bool).at[0, :37].set(False)
        args = (q, k, v, valid)
        t_dense, t_flash = median_ms(dense, args, a.reps), median_ms(flash, args, a.reps)
        nb = -(-n // min(FLASH_BLOCK, n))
        err = float(jnp.abs(flash(*args) - dense(*args))[:, :, 37:].max())
        print(f"| {n:,} | {t_dense:.1f} | {t_flash:.1f} | {t_dense / t_flash:.2f}x | "
              f"{nb * (nb + 1) // 2}/{nb * nb} | {err:.1e} |")


if __name__ == "__main__":
    main()
