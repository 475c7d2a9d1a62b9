"""Decode speed per KV code width (not a test): the full cache and the default scoring at a token budget and
at a byte budget, the cache in the model's dtype or as 8 / 4 / 2-bit KIVI codes, side by side in one run.

Model: SmolLM2-135M-Instruct from its GGUF (``purekv_jax.fidelity.load_model``; 30 layers, 3 KV heads of 64,
float32), one prompt of ``--prompt`` random token ids. Per row: the tokens and bytes the prompt's cache
holds (of the full cache's, in the model's dtype: ``generate``'s stats), and the decode time per token
(``stats["decode_s"] / decode steps``, the median over ``--repeats`` calls after one that compiles; the
rows take turns). The
``tokens`` rows keep the same tokens at every width (what dequantising costs); the ``bytes`` rows keep what
the bytes hold (what a byte budget buys).

    JAX_PLATFORMS=cpu python benchmarks/kv_quant_decode.py [--prompt 1024] [--new 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

from purekv_jax.config import PureKVConfig
from purekv_jax.fidelity import load_model
from purekv_jax.generation import generate


def rows(budget: float):
    yield "full", None
    for bits in (None, 8, 4, 2):
        yield f"{budget:.0%} tokens", PureKVConfig(budget=budget, kv_bits=bits)
    for bits in (None, 8, 4, 2):
        yield f"{budget:.0%} bytes", PureKVConfig(budget=budget, budget_unit="bytes", kv_bits=bits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.2)
    args = ap.parse_args()

    config, params, _ = load_model()
    ids = np.random.default_rng(0).integers(100, 40000, size=(1, args.prompt)).astype(np.int32)
    print(f"backend={jax.default_backend()} prompt={args.prompt} new={args.new} repeats={args.repeats} "
          f"model=SmolLM2-135M float32")
    calls = {}
    for label, pk in rows(args.budget):  # compile every row first
        call = lambda pk=pk: generate(params, config, ids, policy=pk, max_new_tokens=args.new, eos_token_id=-1)
        calls[(label, pk)] = (call, call().stats, [])
    for _ in range(args.repeats):  # round-robin, so that a busy moment of the machine hits every row alike
        for call, _, per_token in calls.values():
            s = call().stats
            per_token.append(s["decode_s"] / max(s["decode_steps"], 1))
    print("| budget | kv bits | tokens kept | bytes kept | decode ms / token (median) | tokens / s |")
    print("| --- | --- | --- | --- | --- | --- |")
    full_tokens = args.prompt * config.text.num_hidden_layers * config.text.num_key_value_heads
    for (label, _), (_, st, per_token) in calls.items():
        ms = 1e3 * statistics.median(per_token)
        print(f"| {label} | {st['kv_bits'] or '--'} | {st['kv_tokens_kept'] / full_tokens:.1%} | "
              f"{st['kv_bytes_kept'] / st['kv_bytes_full']:.1%} | {ms:.2f} | {1e3 / ms:.1f} |")

if __name__ == "__main__":
    main()
