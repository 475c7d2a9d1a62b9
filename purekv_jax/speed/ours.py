"""Our side of ``purekv bench speed``: one configuration in this (fresh) process.

    python -m purekv_jax.speed.ours '{"config": "purekv", "checkpoint": DIR, "prompt": FILE.npz, ...}'

Configurations: ``dense`` (the full cache), ``purekv`` (PureKV at ``budget``), ``purekv_st`` (the same with
ST-SpAttn, the cost model choosing each layer's path; calibrated per-head patterns when ``patterns`` names a
file). Loads the checkpoint with ``load_hf_checkpoint``, runs ``generate`` once (compile) and ``reps`` timed
times, and prints one JSON line. ``prefill_s`` is the time to the first token: the ``generate`` call's wall
time less its decode loop (host preparation and the cost model included, as transformers' figure includes its
own); decode tokens/s is ``decode_steps / decode_s``.
"""

from __future__ import annotations

import json
import sys
import time

import jax

from models.qwen2_5_vl import load_hf_checkpoint
from purekv_jax.config import PureKVConfig
from purekv_jax.generation import generate
from purekv_jax.heap import map_large_buffers

from .standalone import emit, load_prompt, memory_status, pin_to


def policy_for(spec: dict) -> PureKVConfig | None:
    """The spec's KV policy (``None``: the full cache)."""
    name = spec["config"]
    if name == "dense":
        return None
    if name == "purekv":
        return PureKVConfig(budget=spec["budget"])
    return PureKVConfig(budget=spec["budget"], st_sparse=True, head_patterns_file=spec.get("patterns"))


def run_ours(spec: dict) -> dict:
    """Loads ``spec["checkpoint"]`` and times ``generate`` on ``spec["prompt"]`` under the spec's policy."""
    pin_to(spec.get("cpus"))  # before the backend starts (jax creates its CPU client lazily)
    map_large_buffers()  # as the purekv command does
    prompt = load_prompt(spec["prompt"])
    ids = prompt.pop("input_ids")
    jax.devices()  # the backend's own memory counts before loading
    before = memory_status()
    t0 = time.perf_counter()
    config, params = load_hf_checkpoint(spec["checkpoint"])
    load_s = time.perf_counter() - t0
    loaded = memory_status()
    policy = policy_for(spec)

    def once():
        t0 = time.perf_counter()
        res = generate(params, config, ids, policy=policy, max_new_tokens=spec["new"], eos_token_id=(), **prompt)
        wall = time.perf_counter() - t0
        s = res.stats
        return s, dict(prefill_s=wall - s["decode_s"], decode_s=s["decode_s"], decode_tokens=s["decode_steps"])

    first, warm = once()
    runs = [once()[1] for _ in range(spec["reps"])]
    return dict(
        rss_imports=before["VmRSS"], rss_loaded=loaded["VmRSS"], load_s=load_s,
        compile_s=first["prefill_compile_s"] + first["decode_compile_s"],
        first_call_s=warm["prefill_s"] + warm["decode_s"], runs=runs, prompt_len=first["prompt_len"],
        kv_bytes_kept=first["kv_bytes_kept"], kv_bytes_allocated=first["kv_bytes_allocated"],
        prefill_program_peak=first["prefill_peak_bytes"], st_paths=first["st_paths"],
        weights_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
    )


if __name__ == "__main__":
    SPEC = json.loads(sys.argv[1])
    emit(SPEC, run_ours(SPEC))
