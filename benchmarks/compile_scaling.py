"""Compile time and forward time of the tiny Qwen2.5-VL text model at 2 and 28 layers.

The decoder runs its stacked layers under ``jax.lax.scan``, so the compiled program holds one layer body
whatever the depth: compile time should stay nearly flat while forward time grows with depth. For
contrast the script also compiles the same layers unrolled (a Python loop over layer slices).

    JAX_PLATFORMS=cpu python benchmarks/compile_scaling.py [--tokens 256] [--repeats 3]

Times are medians over ``--repeats`` fresh compiles (trace + lower + compile of a new ``jax.jit``) and
over ``--runs`` forward calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen2_5_vl import get_rope_index, tiny_config
from models.qwen2_5_vl.layers import dense_attention, rms_norm
from models.qwen2_5_vl.text import (
    causal_padding_mask,
    decoder_forward,
    init_text_params,
    layer_out,
    layer_qkv,
    lm_logits,
    mrope_cos_sin,
)


def scanned(params, ids, pos, cfg):
    return lm_logits(params, decoder_forward(params, jnp.take(params.embed, ids, axis=0), pos, None, cfg))


def unrolled(params, ids, pos, cfg):
    x = jnp.take(params.embed, ids, axis=0)
    cos, sin = mrope_cos_sin(pos, cfg)
    mask = causal_padding_mask(None, ids.shape[1])
    for i in range(cfg.num_hidden_layers):
        lp = jax.tree_util.tree_map(lambda a: a[i], params.layers)
        q, k, v = layer_qkv(lp, x, cos, sin, cfg)
        x = layer_out(lp, x, dense_attention(q, k, v, mask), cfg)
    return lm_logits(params, rms_norm(x, params.norm, cfg.rms_norm_eps))


def measure(fn, layers: int, tokens: int, repeats: int, runs: int) -> tuple[float, float]:
    config = tiny_config(num_hidden_layers=layers)
    cfg = config.text
    params = init_text_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 990, (1, tokens)), jnp.int32)
    pos = jnp.asarray(get_rope_index(config, np.asarray(ids))[0])
    compile_times, compiled = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled = jax.jit(lambda p, i, q: fn(p, i, q, cfg)).lower(params, ids, pos).compile()
        compile_times.append(time.perf_counter() - t0)
    compiled(params, ids, pos).block_until_ready()
    run_times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        compiled(params, ids, pos).block_until_ready()
        run_times.append(time.perf_counter() - t0)
    return statistics.median(compile_times), statistics.median(run_times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="fresh compiles per row")
    ap.add_argument("--runs", type=int, default=10, help="timed forward calls per row")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 28])
    ap.add_argument("--no-unrolled", action="store_true", help="skip the unrolled comparison")
    args = ap.parse_args()
    print(f"tiny_config text model, batch 1, {args.tokens} tokens, backend {jax.default_backend()}, "
          f"medians of {args.repeats} compiles / {args.runs} forward calls")
    print(f"| {'variant':8} | {'layers':>6} | {'compile s':>9} | {'forward ms':>10} |")
    print(f"| {'-' * 8} | {'-' * 6:>6} | {'-' * 9:>9} | {'-' * 10:>10} |")
    variants = [("scan", scanned)] + ([] if args.no_unrolled else [("unrolled", unrolled)])
    for name, fn in variants:
        for layers in args.layers:
            c, r = measure(fn, layers, args.tokens, args.repeats, args.runs)
            print(f"| {name:8} | {layers:6d} | {c:9.3f} | {1e3 * r:10.2f} |", flush=True)


if __name__ == "__main__":
    main()
