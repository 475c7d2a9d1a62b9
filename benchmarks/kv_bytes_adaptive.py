"""Perplexity at 20 % of a bf16 cache's bytes with 4-bit codes, uniform vs AdaKV per-head budgets, per prompt,
with the bytes each cache holds (counted from its arrays).

SmolLM2-135M, the fidelity harness's windows (6 per length, seed + n, 256 continuation tokens) and its own
functions (``analyse_prompt``, ``policy_cache``, ``continuation_logits``), so the rows are comparable with
docs/kv_bytes.md's tables.

  JAX_PLATFORMS=cpu python benchmarks/kv_bytes_adaptive.py 1024 2048      (prints; writes --out JSON)
"""

import argparse
import json

import jax.numpy as jnp
import numpy as np

from purekv_jax import cache as C
from purekv_jax.config import PureKVConfig
from purekv_jax.fidelity.data import DEFAULT_SOURCES, make_windows
from purekv_jax.fidelity.harness import analyse_prompt, continuation_logits, continuation_metrics, policy_cache
from purekv_jax.fidelity.model import load_model

BYTES_20 = dict(budget=0.2, budget_unit="bytes", kv_bits=4)
VARIANTS = {"int4": PureKVConfig(**BYTES_20), "int4 adaptive": PureKVConfig(**BYTES_20, adaptive_heads=True)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lengths", type=int, nargs="*", default=[1024, 2048])
    ap.add_argument("--out", default="/tmp/kv_bytes_adaptive.json")
    args = ap.parse_args()
    config, params, tok = load_model()
    cfg = config.text
    out = {}
    for n in args.lengths:
        nll = {k: [] for k in ["full", *VARIANTS]}
        held = {k: [] for k in VARIANTS}
        for w in make_windows(tok, n, 256, 6, DEFAULT_SOURCES, seed=n):
            cont, targets = jnp.asarray(w.ids[None, n:n + 256]), jnp.asarray(w.ids[None, n + 1:n + 257])
            an = analyse_prompt(params, cfg, w.ids[:n], list(VARIANTS.values()), jnp.bfloat16)
            ref = continuation_logits(params, policy_cache(an, cfg, None)[0], cont, cfg=cfg)
            nll["full"].append(float(np.asarray(continuation_metrics(ref, ref, targets)[0]).mean()))
            for name, pk in VARIANTS.items():
                cache = policy_cache(an, cfg, pk)[0]
                held[name].append(C.kv_bytes_kept(cache) / C.kv_bytes_full(n, cfg.num_hidden_layers, cache.k.shape[2],
                                                                             cfg.head_dim, an.k.dtype))
                logits = continuation_logits(params, cache, cont, cfg=cfg)
                nll[name].append(float(np.asarray(continuation_metrics(logits, ref, targets)[0]).mean()))
        full = np.exp(np.mean(nll["full"]))
        for name in VARIANTS:
            ppl = np.exp(np.mean(nll[name]))
            per = " ".join(f"{100 * (np.exp(a) / np.exp(f) - 1):+.1f}%" for a, f in zip(nll[name], nll["full"]))
            print(f"N={n} {name:14s} ppl {ppl:.3f} ({100 * (ppl / full - 1):+.2f}% vs full {full:.3f}), bytes "
                  f"{np.mean(held[name]):.3f} of full; per prompt {per}", flush=True)
        out[n] = dict(nll=nll, bytes_fraction=held)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
