"""Decode cost per token as process CPU time (not a test), on the bench-small text stack, full cache.

On a shared machine wall-clock decode rates swing several-fold with the other jobs; the CPU time this
process spends per generated token is far steadier. Per token = (CPU time of ``generate`` with 64 new tokens
- the same with 2) / 62, median of ``--reps``. Compare two checkouts by running it with each on PYTHONPATH,
alternating:

    for t in /tmp/before .; do PYTHONPATH=$t taskset -c 0 python benchmarks/decode_cpu_time.py 2138; done
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from models.qwen2_5_vl.text import init_text_params
from purekv_jax.config import PureKVConfig
from purekv_jax.generation import generate
from purekv_jax.speed.model import bench_small_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", type=int, nargs="?", default=2138)
    ap.add_argument("--budget", type=float, default=None, help="PureKV's budget (default: the full cache)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cfg = bench_small_config()
    params = init_text_params(cfg.text, jax.random.key(0))
    policy = None if args.budget is None else PureKVConfig(budget=args.budget)
    ids = np.random.default_rng(0).integers(0, 900, (1, args.prompt)).astype(np.int32)

    def cpu(new: int) -> float:
        t0 = time.process_time()
        generate(params, cfg, ids, policy=policy, max_new_tokens=new, eos_token_id=())
        return time.process_time() - t0

    cpu(64), cpu(2)  # compile both programs
    per_token = [(cpu(64) - cpu(2)) / 62 * 1e3 for _ in range(args.reps)]
    print(f"prompt {args.prompt}: decode CPU ms/token {' '.join(f'{t:.2f}' for t in per_token)} "
          f"median {statistics.median(per_token):.2f}")


if __name__ == "__main__":
    main()
