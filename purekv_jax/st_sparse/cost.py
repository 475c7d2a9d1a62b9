"""When block-sparse attention pays: a cost model of the prefill's two attention paths, per backend.

ST-SpAttn computes only the blocks its mask allows, but every kernel pass pays for its gathers, its
permutation and its call, and the XLA fallback pads each query block's key list to a length bucket; the
dense path (all N x N scores for short prompts, the causal flash loop above) is one well-tuned program.
Which is faster depends on the backend, the prompt and the head patterns, so the prefill asks this model
for every distinct pattern set before it builds the program (host arithmetic on the block tables, no device
work):

    sparse = sum over row groups, head groups and passes of  rows * heads * head_dim * cells(pass) * sparse_cell_s
             + number of passes * sparse_pass_s
    dense  = rows * heads * head_dim * cells(dense path) * (dense_cell_s or flash_cell_s)

``cells(pass)`` is what the backend computes for one head (``Backend.computed_cells``: listed blocks for the
Pallas kernels, length-bucketed lists for the XLA fallback); the dense path's cells are ``N^2`` (dense) or
the causal blocks (flash). The per-cell and per-pass seconds are measured once per backend
(:func:`calibrate_profile`, run by ``benchmarks/st_cost_profile.py``, stored in ``cost_profiles.json``
beside this module). A pattern set runs block-sparse only where ``sparse < (1 - margin) * dense``; a backend
without a measured profile runs ST-SpAttn wherever the plan asks (and the prefill's stats say so).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention import (STLayout, VideoSpan, block_sparse_attention, block_tables,
                                            head_groups, resolve_backend)

from ..attention import AUTO_DENSE_MAX, FLASH_BLOCK, dense_prefill_attention, flash_prefill_attention

PROFILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_profiles.json")
#: a pattern set runs block-sparse only when predicted at least this much faster than the dense path
DEFAULT_MARGIN = 0.1


@dataclasses.dataclass(frozen=True)
class CostProfile:
    """Measured seconds per unit of work on one backend (a unit: one score cell x one q head x one head_dim
    lane; each path's whole attention: scores, softmax, values).

    dense_cell_s: the dense prefill path (all ``N x N`` cells); flash_cell_s: the flash path (causal
    blocks); sparse_cell_s: the block-sparse kernel (its computed cells); sparse_pass_s: the fixed cost of
    one block-sparse pass (gathers, permutation, padding, the call); source: how it was measured."""

    backend: str
    dense_cell_s: float
    flash_cell_s: float
    sparse_cell_s: float
    sparse_pass_s: float
    source: str = ""


@functools.lru_cache(maxsize=4)
def load_profiles(path: str = PROFILES_FILE) -> dict[str, CostProfile]:
    """The measured profiles by backend name (empty when the file does not exist; read once)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    return {name: CostProfile(backend=name, **fields) for name, fields in doc.get("profiles", {}).items()}


def dense_path_cells(n: int, base) -> tuple[int, str]:
    """``(cells per head, path)`` of the dense prefill attention ``base`` at ``n`` tokens: ``N^2`` for the
    dense path, the causal blocks for flash (``"auto"``: dense up to ``AUTO_DENSE_MAX`` tokens; a registered
    or callable kernel is counted as flash)."""
    if base == "dense" or (base == "auto" and n <= AUTO_DENSE_MAX):
        return n * n, "dense"
    block = min(FLASH_BLOCK, n)
    nb = -(-n // block)
    return nb * (nb + 1) // 2 * block * block, "flash"


def sparse_cells(layout: STLayout, patterns, num_heads: int, backend: str, block_q: int | None,
                 block_k: int | None) -> tuple[int, int]:
    """``(sum over passes of computed cells x heads, number of passes)`` of ``block_sparse_attention`` on
    ``layout`` with per-head ``patterns`` (the same head groups and passes the kernel runs)."""
    kernel = resolve_backend(backend)
    bq, bk = int(block_q or kernel.default_blocks[0]), int(block_k or kernel.default_blocks[1])
    cells, passes = 0, 0
    for group in head_groups(patterns, num_heads):
        for pattern, permuted in group.passes:
            tables = block_tables(layout, pattern, bq, bk, permuted=permuted)
            cells += kernel.computed_cells(tables) * len(group.heads)
            passes += 1
    return cells, passes


@dataclasses.dataclass(frozen=True)
class PathChoice:
    """One distinct pattern set's decision: the predicted seconds of each path (None without a profile)
    and whether it runs block-sparse."""

    patterns: tuple
    sparse_s: float | None
    dense_s: float | None
    sparse: bool


def choose_path(profile: CostProfile | None, patterns: tuple, groups, n: int, num_heads: int, head_dim: int,
                backend: str, block_q, block_k, base, margin: float = DEFAULT_MARGIN) -> PathChoice:
    """Block-sparse or dense for one pattern set. ``groups``: ``(rows, offset, layout)`` of the video rows
    (rows without video run the dense path either way); ``n``: the padded prompt length."""
    if profile is None:
        return PathChoice(patterns, None, None, True)
    rows = sum(len(r) for r, _, _ in groups)
    cells, path = dense_path_cells(n, base)
    dense_s = rows * num_heads * head_dim * cells * (profile.dense_cell_s if path == "dense" else profile.flash_cell_s)
    sparse_s = 0.0
    for r, _, lay in groups:
        c, passes = sparse_cells(lay, patterns, num_heads, backend, block_q, block_k)
        sparse_s += len(r) * head_dim * c * profile.sparse_cell_s + passes * profile.sparse_pass_s
    return PathChoice(patterns, sparse_s, dense_s, sparse_s < (1.0 - margin) * dense_s)


# ------------------------------------------------------------------------------------------ calibration
def _median_time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate_profile(backend: str, *, head_dim: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                      reps: int = 3, seed: int = 0) -> CostProfile:
    """Measures a :class:`CostProfile` on this machine's default device: the dense path at 512 tokens, the
    flash path at 2,048, and the block-sparse kernel on three video layouts of one pass each (spatial heads),
    its per-cell and per-pass costs a least-squares line through the three points."""
    rng = np.random.default_rng(seed)

    def qkv(n):
        shape = lambda h: (1, h, n, head_dim)  # noqa: E731
        return tuple(jnp.asarray(rng.standard_normal(shape(h), np.float32)) for h in (num_heads, num_kv_heads,
                                                                                       num_kv_heads))

    unit = num_heads * head_dim
    q, k, v = qkv(512)
    valid = jnp.ones((1, 512), bool)
    dense_cell = _median_time(jax.jit(dense_prefill_attention), (q, k, v, valid), reps) / (unit * 512 * 512)
    q, k, v = qkv(2048)
    valid = jnp.ones((1, 2048), bool)
    flash_cell = _median_time(jax.jit(flash_prefill_attention), (q, k, v, valid), reps) / (
        unit * dense_path_cells(2048, "flash")[0])
    cells, times = [], []
    for t, h, w in ((2, 8, 8), (4, 16, 16), (8, 16, 16)):
        lay = STLayout(16 + t * h * w, (VideoSpan(8, t, h, w),))
        q, k, v = qkv(lay.seq_len)
        fn = jax.jit(lambda q, k, v, lay=lay: block_sparse_attention(q, k, v, lay, head_patterns="spatial",
                                                                     backend=backend))
        c, _ = sparse_cells(lay, ("spatial",) * num_heads, num_heads, backend, None, None)  # one pass each
        cells.append(c * head_dim)
        times.append(_median_time(fn, (q, k, v), reps))
    cell, per_pass = np.polyfit(np.asarray(cells, np.float64), np.asarray(times, np.float64), 1)
    cell, per_pass = max(float(cell), 0.0), max(float(per_pass), 0.0)
    return CostProfile(backend=backend, dense_cell_s=dense_cell, flash_cell_s=flash_cell, sparse_cell_s=cell,
                       sparse_pass_s=per_pass,
                       source=f"calibrate_profile on {jax.default_backend()} (jax {jax.__version__}), "
                              f"head_dim {head_dim}, {num_heads}/{num_kv_heads} heads")


def save_profiles(profiles: dict[str, CostProfile], path: str = PROFILES_FILE) -> None:
    """Writes the profiles (atomically: a temporary file, then a rename)."""
    doc = {"profiles": {name: {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "backend"}
                        for name, p in profiles.items()}}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


__all__ = ["CostProfile", "PathChoice", "DEFAULT_MARGIN", "PROFILES_FILE", "calibrate_profile", "choose_path",
           "dense_path_cells", "load_profiles", "save_profiles", "sparse_cells"]
