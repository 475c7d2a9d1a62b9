"""Model speed on the CPU (not a test): ``forward`` and ``generate`` (prefill, decode) and their compile
times, on the tiny Qwen2.5-VL at 2 and 28 layers, text prompts, float32.

One tree:

    JAX_PLATFORMS=cpu python benchmarks/model_speed.py

Two trees side by side (e.g. a ``git worktree`` of the previous commit and this checkout), alternating
fresh processes so that the machine's noise falls on both; prints each tree's medians and the ratios:

    JAX_PLATFORMS=cpu python benchmarks/model_speed.py --trees /tmp/previous . --rounds 3

Every figure is a median: over ``--repeats`` calls inside a process (run times), then over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

LAYERS = (2, 28)
PROMPT = 256
NEW = 32


def measure(repeats: int) -> dict:
    """Medians of this process's tree, keyed ``"<layers>/<what>"`` (seconds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.qwen2_5_vl import forward, init_params, tiny_config
    from purekv_jax import PureKVConfig, generate

    out = {}
    for n_layers in LAYERS:
        config = tiny_config(num_hidden_layers=n_layers)
        params = init_params(config, jax.random.key(0), jnp.float32)
        ids = np.random.default_rng(0).integers(0, 900, size=(1, PROMPT)).astype(np.int32)
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, config, ids))
        out[f"{n_layers}/forward_compile"] = time.perf_counter() - t0
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(params, config, ids))
            runs.append(time.perf_counter() - t0)
        out[f"{n_layers}/forward"] = statistics.median(runs)
        for name, policy in (("full", None), ("purekv", PureKVConfig(budget=0.2))):
            stats = [generate(params, config, ids, policy=policy, max_new_tokens=NEW, eos_token_id=()).stats
                     for _ in range(repeats + 1)]
            out[f"{n_layers}/{name}_compile"] = stats[0]["prefill_compile_s"] + stats[0]["decode_compile_s"]
            out[f"{n_layers}/{name}_prefill"] = statistics.median(s["prefill_s"] for s in stats[1:])
            out[f"{n_layers}/{name}_decode_step"] = statistics.median(
                s["decode_s"] / max(s["decode_steps"], 1) for s in stats[1:])
    return out


def compare(trees: list[str], rounds: int, repeats: int) -> None:
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for r in range(rounds):
        for tree in trees:
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "JAX_PLATFORMS": "cpu"}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", "--repeats", str(repeats)],
                                  cwd=os.path.abspath(tree), env=env, capture_output=True, text=True, check=True)
            results[tree].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{rounds}: {tree} done", file=sys.stderr, flush=True)
    med = {t: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for t, runs in results.items()}
    a, b = trees
    print(f"| measure (median of {rounds} rounds x {repeats} calls) | {a} | {b} | {b} / {a} |")
    print("| --- | ---: | ---: | ---: |")
    for k in med[a]:
        unit, scale = ("ms", 1e3)
        print(f"| {k} | {med[a][k] * scale:.2f} {unit} | {med[b][k] * scale:.2f} {unit} | {med[b][k] / med[a][k]:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs=2, metavar=("A", "B"), help="compare two checkouts side by side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print this tree's medians as one JSON line")
    args = ap.parse_args()
    if args.trees:
        compare(args.trees, args.rounds, args.repeats)
        return
    res = measure(args.repeats)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:<28} {v * 1e3:10.2f} ms")


if __name__ == "__main__":
    main()
