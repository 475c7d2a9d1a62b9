"""Where a decode token's time goes: XLA:CPU's per-op times of the decode program alone (not a test).

Runs ``decode_program`` (the generate's decode) on the bench-small text stack with a random full cache of
``prompt`` valid slots, once to compile and once under ``jax.profiler.trace``, and sums the trace's per-op
events (XLA:CPU emits one per executed HLO instruction when ``--xla_cpu_enable_xprof_traceme`` is set) by
instruction name without its ``.N`` suffix, per generated token. Tracing slows every op, so read the shares,
not the absolute times. Run with either checkout on ``PYTHONPATH`` to compare:

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true PYTHONPATH=. taskset -c 0 \\
        python benchmarks/decode_profile.py 2138
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import ProfileData

from models.qwen2_5_vl.text import init_text_params
from purekv_jax import cache as C
from purekv_jax.decode import SamplingSettings, decode_program
from purekv_jax.speed.model import bench_small_config


def random_cache(cfg, n: int, capacity: int) -> C.KVCache:
    """A cache whose first ``n`` slots hold random K/V, the rest free (what a full-cache prefill leaves)."""
    rng = np.random.default_rng(0)
    shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, capacity, cfg.head_dim)
    valid = np.broadcast_to(np.arange(capacity) < n, shape[:4])
    return dataclasses.replace(C.create(*shape[:4], cfg.head_dim),
                               k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                               v=jnp.asarray(rng.standard_normal(shape), jnp.float32), valid=jnp.asarray(valid),
                               length=jnp.full((1,), n, jnp.int32), next_position=jnp.full((1,), n, jnp.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", type=int, nargs="?", default=2138)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args()
    cfg = bench_small_config().text
    params = init_text_params(cfg, jax.random.key(0))
    capacity = -(-(args.prompt + args.new) // 32) * 32
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, cfg.vocab_size)), jnp.float32)
    sampling = SamplingSettings(n_tokens=args.new, eos=())

    def program():
        return decode_program(params, random_cache(cfg, args.prompt, capacity), logits, args.new, 0, cfg=cfg,
                              sampling=sampling)

    prog, call = program()
    jax.block_until_ready(prog.run(*call))
    _, call = program()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(prog.run(*call))
        total, count = collections.Counter(), collections.Counter()
        for plane in ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]).planes:
            for line in plane.lines:
                for ev in line.events:
                    name = re.sub(r"\.\d+$", "", ev.name)
                    if line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient")) and not name.startswith(("end:", "ThunkExecutor")):
                        total[name] += ev.duration_ns
                        count[name] += 1
    steps = args.new - 1
    print(f"prompt {args.prompt}, capacity {capacity}: traced ms per token by HLO instruction name "
          f"(loops include what they run)\n\n| instruction | ms/token | runs/token |\n| --- | ---: | ---: |")
    for name, ns in total.most_common(args.top):
        print(f"| {name} | {ns / 1e6 / steps:.2f} | {count[name] / steps:.0f} |")


if __name__ == "__main__":
    main()
