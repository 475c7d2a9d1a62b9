"""Batch inference vs a loop of single-request ``generate`` (not a test): the same requests, one run.

Bench config (as ``kv_budget.py``): Qwen2.5-VL text stack, hidden 512, 8 layers, 8 query / 2 KV heads
(head_dim 64), vocab 8192, random float32 weights. ``--requests`` token-id prompts with lengths drawn
uniformly from ``--min-len``..``--max-len``, ``--new`` tokens each (no EOS, so every request generates
exactly ``--new`` tokens). For each policy (full cache, PureKV 20%):

* loop: ``generate`` on each request alone (batch 1), in input order;
* batch: :func:`purekv_jax.batch.run_batch` on the same requests as a JSONL file (buckets of prompt
  lengths rounded to 64, ``--batch-size`` rows, results appended to a JSONL output).

Each runs twice: the first pass includes compiling (one program per prompt bucket / batch shape), the
second is warm. Throughput = generated tokens / wall time; "agree" is the fraction of generated tokens
equal between the two modes (exact for the full cache up to float ties; with PureKV the fractional budget
is taken of a bucket's longest prompt, so shorter prompts in a batch keep a little more).

    JAX_PLATFORMS=cpu python benchmarks/batch_throughput.py [--requests 16] [--batch-size 8] [--mesh data=8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kv_budget import bench_config  # noqa: E402

from models.qwen2_5_vl.text import init_text_params  # noqa: E402
from purekv_jax import batch as B  # noqa: E402
from purekv_jax import sharding as S  # noqa: E402
from purekv_jax.config import PureKVConfig  # noqa: E402
from purekv_jax.generation import generate  # noqa: E402


def loop(params, config, prompts, policy, new):
    t0 = time.perf_counter()
    toks = [generate(params, config, np.asarray([p], np.int32), policy=policy, max_new_tokens=new,
                     eos_token_id=()).tokens[0] for p in prompts]
    return time.perf_counter() - t0, toks


def batched(params, config, req_path, policy_name, new, batch_size, mesh, tmp):
    out = os.path.join(tmp, f"out-{time.perf_counter_ns()}.jsonl")
    settings = B.BatchSettings(policy=policy_name, budget=0.2, max_new_tokens=new, batch_size=batch_size)
    t0 = time.perf_counter()
    summary = B.run_batch(params, config, None, req_path, out, settings, mesh=mesh, eos=(), progress=False)
    wall = time.perf_counter() - t0
    recs = {r["id"]: r for r in map(json.loads, open(out).read().splitlines())}
    return wall, summary, recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=400)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--mesh", default=None, help="e.g. data=8 (with XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    ap.add_argument("--policies", default="full,purekv")
    args = ap.parse_args()

    config = bench_config(args.vocab)
    params = jax.jit(lambda k: init_text_params(config.text, k))(jax.random.key(0))
    mesh = None
    if args.mesh:
        mesh = S.make_mesh(args.mesh)
        params = S.shard_params(params, config.text, mesh)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.requests)
    prompts = [rng.integers(0, 900, n).tolist() for n in lengths]
    tmp = tempfile.mkdtemp(prefix="purekv-batch-bench-")
    req_path = os.path.join(tmp, "in.jsonl")
    with open(req_path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "input_ids": p}) + "\n")

    n_tok = args.requests * args.new
    print(f"backend={jax.default_backend()} devices={len(jax.devices())} mesh={args.mesh or '-'} "
          f"requests={args.requests} prompt {args.min_len}-{args.max_len} tokens (mean {lengths.mean():.0f}) "
          f"new={args.new} batch_size={args.batch_size} | layers=8 hidden=512 heads=8/2 hd=64 vocab={args.vocab} "
          f"(float32, random weights)")
    head = (f"| {'policy':<10} | {'mode':<14} | {'batches':>7} | {'pad rows':>8} | {'cold s':>7} | {'warm s':>7} | {'warm tok/s':>10} "
            f"| {'warm req/s':>10} | {'speedup':>7} | {'agree':>6} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name in args.policies.split(","):
        policy = None if name == "full" else PureKVConfig(budget=0.2)
        cold_l, _ = loop(params, config, prompts, policy, args.new)
        warm_l, toks_l = loop(params, config, prompts, policy, args.new)
        cold_b, _, _ = batched(params, config, req_path, name, args.new, args.batch_size, mesh, tmp)
        warm_b, summary, recs = batched(params, config, req_path, name, args.new, args.batch_size, mesh, tmp)
        agree = np.mean([np.mean(np.asarray(recs[i]["tokens"]) == toks_l[i]) for i in range(args.requests)])
        for mode, cold, warm, batches, pad, speed, ag in (
                ("loop (B=1)", cold_l, warm_l, args.requests, 0, 1.0, None),
                (f"batch (B<={args.batch_size})", cold_b, warm_b, summary.batches, summary.padded_rows,
                 warm_l / warm_b, agree)):
            print(f"| {name:<10} | {mode:<14} | {batches:>7} | {pad:>8} | {cold:>7.2f} | {warm:>7.2f} | {n_tok / warm:>10.1f} "
                  f"| {args.requests / warm:>10.2f} | {speed:>6.2f}x | {'' if ag is None else f'{ag:.0%}':>6} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
