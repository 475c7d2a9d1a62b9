"""Cost of the cross-layer carries: one layer's scoring + keep-set, each carry against today's default.

Per prompt length, SmolLM2-135M's layer shapes (9 query / 3 KV heads, head_dim 64, 30 layers, batch 1),
fresh random q / k / v: one jitted program per policy runs one layer's ``prefill.carried_score`` (the
default's own SnapKV window score, or the carry's rule on top of it) and ``policies.keep_set`` at a 20%
budget, the layer kind the carry adds most work to (``owned`` for the re-ranking anchors, ``own``
otherwise). Median wall time of interleaved calls, and XLA's FLOP count of the compiled program
(``cost_analysis``), each as a ratio to the default measured in the same run.

    JAX_PLATFORMS=cpu python benchmarks/carry_cost.py --lengths 1024 2048 --reps 30 \\
        --out benchmarks/results/carry_cost_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen2_5_vl import tiny_config
from purekv_jax import policies as P
from purekv_jax.prefill import carried_score, initial_carry
from purekv_jax.presets import preset, presets_in

DEFAULT = "purekv"
SHAPES = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim_override=64,
              hidden_size=576, mrope_section=(16, 8, 8))


def layer_program(name: str, n: int, cfg):
    """``(jitted f(q, k, v, carried, window_len) -> (idx, kept, carry), plan, kind)`` for policy ``name``."""
    pk = preset(name).make(0.2, cfg.num_hidden_layers)
    plan = pk.resolve(cfg, n)
    kind = "owned" if "owned" in plan.layer_kinds else "own"
    layer = plan.layer_kinds.index(kind)

    def step(q, k, v, carried, window_len):
        valid = jnp.ones((q.shape[0], n), bool)
        own = lambda: plan.base.score(P.ScoreContext(q=q, k=k, v=v, valid=valid, layer=layer, window_len=window_len))
        score, budget, carried = carried_score(plan, kind, layer, own, carried, v, plan.budgets[layer])
        idx, kept = P.keep_set(score, valid, slots=plan.slots, budget=budget, window=plan.keep_window(window_len),
                               sink=plan.sink)
        return idx, kept, carried

    return jax.jit(step), plan, kind


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = dataclasses.replace(tiny_config().text, **SHAPES)
    names = (DEFAULT, *(p.name for p in presets_in("carry")))
    lines = ["| N | policy | layer kind | median ms | x default | GFLOP | x default |", "| --- |" + " --- |" * 6]
    for n in a.lengths:
        rng = np.random.default_rng(n)
        q = jnp.asarray(rng.standard_normal((1, 9, n, 64)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((1, 3, n, 64)), jnp.float32) for _ in range(2))
        wl = jnp.asarray([24], jnp.int32)
        progs = {}
        for name in names:
            f, plan, kind = layer_program(name, n, cfg)
            carried = jnp.asarray(rng.random(initial_carry(plan, 1, 3, n).shape), jnp.float32)
            args = (q, k, v, carried, wl)
            flops = f.lower(*args).compile().cost_analysis()
            flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
            jax.block_until_ready(f(*args))
            progs[name] = (f, args, kind, flops, [])
        for _ in range(a.reps):  # interleaved, so load changes hit every policy alike
            for name, (f, args, _, _, ts) in progs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts.append((time.perf_counter() - t0) * 1e3)
        base_ms, base_flops = statistics.median(progs[DEFAULT][4]), progs[DEFAULT][3]
        for name, (_, _, kind, flops, ts) in progs.items():
            ms = statistics.median(ts)
            lines.append(f"| {n} | {name} | {kind} | {ms:.2f} | {ms / base_ms:.2f} | {flops / 1e9:.3f} | "
                         f"{flops / base_flops:.2f} |")
    md = "\n".join(lines)
    print(md)
    if a.out:
        cmd = "JAX_PLATFORMS=cpu python benchmarks/carry_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(f"# Carry cost per layer (CPU, {os.cpu_count()} cores, shared)\n\n`{cmd}`\n\n{md}\n")
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
