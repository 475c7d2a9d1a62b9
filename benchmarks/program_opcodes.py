"""Opcode histograms of ``generate``'s compiled prefill and decode programs (not a test): two checkouts that
print the same histograms compile the same programs, so a refactor that keeps them cannot change the
device time. Uses ``benchmarks/kv_budget.py``'s bench model and 2,000-token prompt.

    JAX_PLATFORMS=cpu PYTHONPATH=/path/to/checkout python benchmarks/program_opcodes.py > a.json
"""

from __future__ import annotations

import collections
import json
import re

import jax
import numpy as np

from models.qwen2_5_vl.config import TextConfig, tiny_config
from models.qwen2_5_vl.text import init_text_params
from purekv_jax import generation as G
from purekv_jax.config import PureKVConfig

OLD = hasattr(G, "_COMPILED")  # checkouts from before compile_cache.py kept the programs in generation.py
if not OLD:
    from purekv_jax import compile_cache


def clear_programs() -> None:
    (G if OLD else compile_cache).clear_compile_cache()


def programs() -> dict[str, object]:
    """Program name -> the compiled object (``.as_text()``), in this checkout's own bookkeeping."""
    if OLD:
        return {key[0]: value[0] for key, value in G._COMPILED.items()}
    if hasattr(compile_cache, "compiled_programs"):
        return {name: progs[0].run for name, progs in compile_cache.compiled_programs().items()}
    return {key[0]: value.run for key, value in compile_cache._PROGRAMS.items()}


def histogram(hlo: str) -> dict[str, int]:
    return dict(sorted(collections.Counter(m.group(1) for m in re.finditer(r"=\s*\S+\s+([a-z][a-z0-9-]*)\(", hlo))
                       .items()))


def main() -> None:
    import dataclasses

    text = TextConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                      max_position_embeddings=32768)
    config = dataclasses.replace(tiny_config(), text=text)
    params = init_text_params(config.text, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 900, size=(1, 2000)).astype(np.int32)
    out = {}
    for name, policy, fused in (("full", None, False), ("purekv20", PureKVConfig(budget=0.2), False),
                                ("paper20", PureKVConfig.paper(0.2), False), ("paper20_fused", PureKVConfig.paper(0.2), True)):
        clear_programs()
        G.generate(params, config, ids, policy=policy, max_new_tokens=64, eos_token_id=(), fused_prefill=fused)
        for program, compiled in programs().items():
            out[f"{name}/{program}"] = histogram(compiled.as_text())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
