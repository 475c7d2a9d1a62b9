"""``purekv batch`` on 1 process x 8 CPU devices vs 2 processes x 4 CPU devices (not a test): the same
requests, the same global mesh ``data=8``, so the difference is the cost of the multi-controller path
(gloo collectives between the processes, each host feeding its own rows, the tokens gathered to every
host, the per-batch agreement through the coordination service).

Model: the tiny checkpoint of ``purekv demo`` (:func:`purekv_jax.commands.tiny.write_tiny_model`, hidden
64, ``--layers`` layers, the real Qwen tokenizer, random weights). Requests: ``--requests`` token-id prompts
of ``--min-len``..``--max-len`` tokens (uniform), ``--new`` tokens each (no EOS), policies alternating
full cache / PureKV 20%. Every configuration first runs once to fill a persistent compilation cache (not
timed), then ``--repeats`` times, the two configurations alternating so that load changes hit both;
each run is a fresh ``purekv batch`` command on a fresh output file. Reported per configuration: the
median of the run's own requests/s (``run_batch``'s wall time, weights already loaded; programs from the
cache), its median compile / cache-load seconds, and the median wall time of the whole command (start,
imports, joining the job, loading, the run).

Then the latency of one collective, the unit cost behind the gap: a jitted sum of an ``[8]`` float32
array sharded over ``data=8`` (an all-reduce over every device), median of 50 calls, in both
configurations.

    python benchmarks/multiprocess_throughput.py [--requests 32] [--repeats 3] [--layers 4] [--only-latency]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from purekv_jax import sharding as S  # noqa: E402
from purekv_jax.commands.tiny import write_tiny_model  # noqa: E402
from purekv_jax.launcher import free_port, process_env  # noqa: E402

CONFIGS = {
    "1 process x 8 devices": dict(processes=None, devices=8),
    "2 processes x 4 devices": dict(processes=2, devices=4),
}


def run_once(name: str, model: str, requests: str, folder: str, args, cache: str) -> dict:
    """One ``purekv batch`` command -> its summary (+ ``command_s``)."""
    cfg = CONFIGS[name]
    out = os.path.join(folder, f"out-{time.perf_counter_ns()}.jsonl")
    summary = out + ".summary.json"
    argv = [sys.executable, "-m", "purekv_jax.cli", "batch", "--model", model, "--requests", requests, "--out", out,
            "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.new), "--mesh", "data=8",
            "--window", "8", "--sink", "2", "--anchors", "0", "--summary-json", summary, "-q"]
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cfg["processes"] is None:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cfg['devices']}".strip()
    else:
        argv += ["--processes", str(cfg["processes"]), "--devices-per-process", str(cfg["devices"])]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    command_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: status {proc.returncode}\n{proc.stderr[-3000:]}")
    with open(summary) as f:
        result = json.load(f)
    result["command_s"] = command_s
    return result


def collective_latency_worker() -> None:
    """In each process of a configuration: the median time of one all-reduce over ``data=8`` (printed by
    process 0 as ``LATENCY_MS <value>``)."""
    S.initialize_distributed()
    mesh = S.make_mesh("data=8")
    x = S.put(np.arange(8, dtype=np.float32), NamedSharding(mesh, P("data")))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    total(x).block_until_ready()
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    if jax.process_index() == 0:
        print(f"LATENCY_MS {statistics.median(times) * 1e3:.3f}", flush=True)


def collective_latency(name: str) -> float:
    """Runs :func:`collective_latency_worker` in configuration ``name`` -> milliseconds."""
    cfg = CONFIGS[name]
    base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--latency-worker"]
    if cfg["processes"] is None:
        envs = [dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={cfg['devices']}")]
    else:
        port = free_port()
        envs = [process_env(i, cfg["processes"], port, cfg["devices"], base) for i in range(cfg["processes"])]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for env in envs]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    line = next(l for out in outs for l in out.splitlines() if l.startswith("LATENCY_MS "))
    return float(line.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only-latency", action="store_true", help="only the collective latency table")
    ap.add_argument("--latency-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.latency_worker:
        return collective_latency_worker()
    if not args.only_latency:
        throughput(args)
    latencies = {name: collective_latency(name) for name in CONFIGS}
    print("\none all-reduce over data=8 (jitted sum of a sharded [8] float32), median of 50 calls:")
    print("| configuration            | latency ms |")
    print("|--------------------------|------------|")
    for name, ms in latencies.items():
        print(f"| {name:<24} | {ms:>10.2f} |")


def throughput(args) -> None:
    """The throughput table (see the module doc)."""
    folder = tempfile.mkdtemp(prefix="purekv-mp-bench-")
    model = write_tiny_model(os.path.join(folder, "tiny"), seed=0, num_hidden_layers=args.layers)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.requests)
    requests = os.path.join(folder, "in.jsonl")
    with open(requests, "w") as f:
        for i, n in enumerate(lengths):
            policy = "full" if i % 2 == 0 else "purekv"
            f.write(json.dumps({"id": i, "input_ids": rng.integers(0, 150_000, n).tolist(), "policy": policy}) + "\n")
    cache = os.path.join(folder, "jax-cache")
    for name in CONFIGS:  # fills the compilation cache; not timed
        run_once(name, model, requests, folder, args, cache)
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name in CONFIGS:
            runs[name].append(run_once(name, model, requests, folder, args, cache))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"purekv batch, CPU, mesh data=8 | tiny model: {args.layers} layers, hidden 64, random weights | "
          f"{args.requests} token-id requests of {args.min_len}-{args.max_len} tokens (mean {lengths.mean():.0f}), "
          f"{args.new} new tokens, full / purekv 20% alternating, batch size {args.batch_size} | medians of "
          f"{args.repeats} runs after a cache-filling run | load average {load:.1f} at the end")
    head = (f"| {'configuration':<24} | {'req/s (run)':>11} | {'tok/s (run)':>11} | {'run s':>6} | {'compile s':>9} "
            f"| {'command s':>9} | {'batches':>7} | {'ratio req/s':>11} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    base = None
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs)
               for k in ("requests_per_s", "tokens_per_s", "wall_s", "compile_s", "command_s")}
        base = base or med["requests_per_s"]
        print(f"| {name:<24} | {med['requests_per_s']:>11.2f} | {med['tokens_per_s']:>11.1f} | {med['wall_s']:>6.1f} "
              f"| {med['compile_s']:>9.1f} | {med['command_s']:>9.1f} | {rs[0]['batches']:>7} "
              f"| {med['requests_per_s'] / base:>10.2f}x |")
    for name, rs in runs.items():
        print(f"{name}, each run (req/s): " + ", ".join(f"{r['requests_per_s']:.2f}" for r in rs))


if __name__ == "__main__":
    main()
