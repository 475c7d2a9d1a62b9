"""Decode cost per token as process CPU time and as wall time (not a test), on the bench-small text stack.

On a shared machine wall-clock decode rates swing several-fold with the other jobs; the CPU time this
process spends per generated token is far steadier. Per token: CPU = (CPU time of ``generate`` with 64 new
tokens - the same with 2) / 62; wall = the 64-token call's ``decode_s / decode_steps`` (the decode program
alone); medians of ``--reps``. ``--json`` prints one JSON line (what ``benchmarks/decode_ab.py`` reads to
compare two checkouts alternating in one run):

    PYTHONPATH=. taskset -c 0 python benchmarks/decode_cpu_time.py 2138
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = ap.parse_args()
    cfg = bench_small_config()
    params = init_text_params(cfg.text, jax.random.key(0))
    policy = None if args.budget is None else PureKVConfig(budget=args.budget)
    ids = np.random.default_rng(0).integers(0, 900, (1, args.prompt)).astype(np.int32)

    def run(new: int) -> tuple[float, float]:
        t0 = time.process_time()
        stats = generate(params, cfg, ids, policy=policy, max_new_tokens=new, eos_token_id=()).stats
        return time.process_time() - t0, stats["decode_s"] / max(stats["decode_steps"], 1)

    run(64), run(2)  # compile both programs
    cpu, wall = [], []
    for _ in range(args.reps):
        long_cpu, long_wall = run(64)
        cpu.append((long_cpu - run(2)[0]) / 62 * 1e3)
        wall.append(long_wall * 1e3)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "cpu_ms": cpu, "wall_ms": wall}))
        return
    print(f"prompt {args.prompt}: decode CPU ms/token {' '.join(f'{t:.2f}' for t in cpu)} "
          f"median {statistics.median(cpu):.2f}; wall ms/token median {statistics.median(wall):.2f}")


if __name__ == "__main__":
    main()
