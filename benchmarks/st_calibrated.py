"""What calibration costs and what calibrated head patterns buy in the prefill (not a test).

On the bench-small Qwen2.5-VL (random weights, float32) and a synthetic video prompt per grid: the time of
``calibrate_model`` (what ``purekv calibrate`` runs per video: a dense prefill layer by layer and row-sampled
pattern errors; first call with its compiles, then warm) next to one warm full-cache prefill, the head patterns
it picks (``--rel-tol``: the cheapest candidate within that relative error of the best; one per KV head's q
heads unless ``--per-q-head``), and the prefill time
(``stats["prefill_s"]``, medians of interleaved rounds) of: the full cache; PureKV at 20 %; PureKV + ST-SpAttn
with the default union heads; PureKV + ST-SpAttn with the calibrated patterns file. Random weights make every
head's attention diffuse, so the patterns here say what calibration costs and how the prefill follows a file,
not which patterns a trained model has.

    JAX_PLATFORMS=cpu python benchmarks/st_calibrated.py --grids 8x16x16,16x24x24 [--reps 3] [--rel-tol 0.1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from models.qwen2_5_vl import init_params  # noqa: E402
from purekv_jax import generation as G  # noqa: E402
from purekv_jax.config import PureKVConfig  # noqa: E402
from purekv_jax.speed.model import bench_small_config, parse_grid, video_prompt  # noqa: E402
from purekv_jax.st_sparse import save_head_patterns  # noqa: E402
from purekv_jax.st_sparse.prefill import calibrate_model, choose_patterns  # noqa: E402


def pattern_counts(patterns) -> str:
    counts: dict[str, int] = {}
    for layer in patterns:
        for p in layer or ():
            counts[p.name.lower()] = counts.get(p.name.lower(), 0) + 1
    return ", ".join(f"{n} {c}" for n, c in sorted(counts.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", default="8x16x16,16x24x24", help="merged video grids T x H x W, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rel-tol", type=float, default=0.1)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--per-q-head", action="store_true", help="one pattern per q head (default: per KV group)")
    args = ap.parse_args(argv)
    config = bench_small_config(1024)
    params = init_params(config, jax.random.key(0))
    print(f"# Calibration time and calibrated ST-SpAttn patterns (jax {jax.__version__}, {jax.default_backend()})\n")
    print("| prompt | calibrate s (first / warm) | one full prefill s | patterns (rel-tol "
          f"{args.rel_tol}) | full s | PureKV s | PureKV + ST union s | PureKV + ST calibrated s | "
          "ST union x full | ST calibrated x full |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for grid in (parse_grid(g) for g in args.grids.split(",")):
        prompt = video_prompt(config, grid)
        ids, mm = prompt.input_ids, prompt.media()
        t0 = time.perf_counter()
        res = calibrate_model(params, config, ids, **mm)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        calibrate_model(params, config, ids, **mm)
        warm = time.perf_counter() - t0
        text = config.text
        group = 1 if args.per_q_head else text.num_attention_heads // text.num_key_value_heads
        pats = choose_patterns(res.errors, res.candidates, args.rel_tol, group_size=group)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "patterns.json")
            save_head_patterns(path, pats, errors=res.errors, candidates=res.candidates)
            policies = {"full": None, "purekv": PureKVConfig(budget=args.budget),
                        "union": PureKVConfig(budget=args.budget, st_sparse=True),
                        "calibrated": PureKVConfig(budget=args.budget, st_sparse=True, head_patterns_file=path)}
            for pol in policies.values():   # compile every program first
                G.generate(params, config, ids, policy=pol, max_new_tokens=1, **mm)
            times: dict[str, list[float]] = {name: [] for name in policies}
            for _ in range(args.reps):
                for name, pol in policies.items():
                    out = G.generate(params, config, ids, policy=pol, max_new_tokens=1, **mm)
                    times[name].append(out.stats["prefill_s"])
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"| {ids.shape[1]:,} tok ({'x'.join(map(str, grid))}) | {first:.1f} / {warm:.1f} | "
              f"{min(times['full']):.2f} | {pattern_counts(pats)} | {med['full']:.2f} | {med['purekv']:.2f} | "
              f"{med['union']:.2f} | {med['calibrated']:.2f} | {med['full'] / med['union']:.2f} | "
              f"{med['full'] / med['calibrated']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
