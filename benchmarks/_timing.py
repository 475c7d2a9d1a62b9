"""Shared timing helper for the benchmark scripts (imported from the scripts' own folder)."""

import statistics
import time

import jax


def median_ms(f, args, reps, warmup=1):
    """Median wall time in ms of f(*args) over reps runs, after `warmup` untimed runs (compile)."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)
