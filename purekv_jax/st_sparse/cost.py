"""When block-sparse attention pays: a cost model of the prefill's two attention paths, per backend and per
head group.

ST-SpAttn computes only the cells its mask allows, but every kernel pass pays for its own overheads (the
XLA block fallback gathers key blocks and pads each query block's list to a length bucket; the segment path
scores whole frames and places; a Pallas kernel pays its launch and its partial blocks), while the dense
path (all N x N scores for short prompts, the causal flash loop above) is one well-tuned program. Which is
faster depends on the backend, the prompt and the head patterns, so the prefill asks this model for every
distinct pattern set before it builds the program (host arithmetic on the layout, no device work):

    sparse(group) = sum over row groups and the group's passes of
                    rows * heads * head_dim * cells(pass) * sparse_cell_s + sparse_pass_s
    dense(group)  = rows * heads * head_dim * cells(dense path) * (dense_cell_s or flash_cell_s)

``cells(pass)`` is what the backend computes for one head (``Backend.computed_cells``: listed blocks for the
Pallas kernels, length-bucketed lists for the XLA block fallback, whole frames and places for the segment
path); the dense path's cells are ``N^2`` (dense) or the causal blocks (flash). The per-cell and per-pass
seconds are measured once per backend (:func:`calibrate_profile`, run by ``benchmarks/st_cost_profile.py``,
stored in ``cost_profiles.json`` beside this module, or by ``purekv calibrate --cost-profile`` in the user's
profiles file, keyed by backend and device kind). Each head group runs its pattern or, where that costs
more, as DENSE heads in the same kernel call; the layer runs the kernel only where that plan is predicted
``margin`` faster than the dense path. Without a measured profile for the backend and device the layer keeps
the dense path (``st_select="always"`` runs ST-SpAttn wherever the plan asks), and the prefill's stats say so.
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

from kernels.block_sparse_attention import (HeadGroup, HeadPattern, STLayout, VideoSpan, backend_head_groups,
                                            block_sparse_attention, resolve_backend)

from ..attention import AUTO_DENSE_MAX, FLASH_BLOCK, dense_prefill_attention, flash_prefill_attention
from ..compile_cache import compile_lowered

#: the profiles measured for this repository (the CPU's; GPU / TPU ones as sessions on those machines add them)
PROFILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_profiles.json")
#: environment variable naming the user's own profiles file (default: ``~/.cache/purekv/cost_profiles.json``),
#: written by ``purekv calibrate --cost-profile`` and read over the repository's
USER_PROFILES_ENV = "PUREKV_COST_PROFILES"
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


def user_profiles_file() -> str:
    """The user's profiles file: ``$PUREKV_COST_PROFILES``, or ``~/.cache/purekv/cost_profiles.json``."""
    return os.environ.get(USER_PROFILES_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "purekv",
                                                              "cost_profiles.json")


@functools.lru_cache(maxsize=8)
def read_profiles(path: str) -> dict[str, CostProfile]:
    """The profiles in one file by key (empty when the file does not exist; read once per path; a file that
    is not a profiles file raises ValueError naming it)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            doc = json.load(f)
        return {key: CostProfile(backend=key.split("@")[0], **fields) for key, fields in doc["profiles"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"cost profiles file {path} is not a purekv cost profiles file: {err}") from None


def load_profiles() -> dict[str, CostProfile]:
    """The repository's profiles, overridden by the user's file (:func:`user_profiles_file`)."""
    return {**read_profiles(PROFILES_FILE), **read_profiles(user_profiles_file())}


def profile_key(backend: str, device_kind: str) -> str:
    """A profile's key: ``backend@device kind`` (``triton@NVIDIA H200``), plain ``backend`` on a CPU."""
    return backend if device_kind.lower() == "cpu" else f"{backend}@{device_kind}"


def find_profile(profiles: dict[str, CostProfile], backend: str, device_kind: str | None = None) -> CostProfile | None:
    """The profile for ``backend`` on this device kind (default: the first device's), else the backend's
    generic one, else None."""
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    return profiles.get(profile_key(backend, kind)) or profiles.get(backend)


def dense_path_cells(n: int, base) -> tuple[int, str]:
    """``(cells per head, path)`` of the dense prefill attention ``base`` at ``n`` tokens: ``N^2`` for the
    dense path, the causal blocks for flash (``"auto"``: dense up to ``AUTO_DENSE_MAX`` tokens; a registered
    or callable kernel is counted as flash)."""
    if base == "dense" or (base == "auto" and n <= AUTO_DENSE_MAX):
        return n * n, "dense"
    block = min(FLASH_BLOCK, n)
    nb = -(-n // block)
    return nb * (nb + 1) // 2 * block * block, "flash"


def _blocks(kernel, block_q, block_k) -> tuple[int, int]:
    return int(block_q or kernel.default_blocks[0]), int(block_k or kernel.default_blocks[1])


def group_cells(layout: STLayout, group: HeadGroup, kernel, block_q: int, block_k: int) -> tuple[int, int]:
    """``(computed cells x the group's heads, passes)`` of one head group on ``kernel``."""
    cells = sum(kernel.computed_cells(layout, pattern, permuted, block_q, block_k) for pattern, permuted in group.passes)
    return cells * len(group.heads), len(group.passes)


def sparse_cells(layout: STLayout, patterns, num_heads: int, backend: str, block_q: int | None,
                 block_k: int | None) -> tuple[int, int]:
    """``(sum over passes of computed cells x heads, number of passes)`` of ``block_sparse_attention`` on
    ``layout`` with per-head ``patterns`` (the same head groups and passes the kernel runs)."""
    kernel = resolve_backend(backend)
    bq, bk = _blocks(kernel, block_q, block_k)
    cells, passes = 0, 0
    for group in backend_head_groups(patterns, num_heads, kernel):
        c, p = group_cells(layout, group, kernel, bq, bk)
        cells, passes = cells + c, passes + p
    return cells, passes


@dataclasses.dataclass(frozen=True)
class GroupChoice:
    """One head group's prices: ``sparse_s`` its pattern on the block-sparse backend, ``dense_s`` the dense
    prefill path for its heads, ``in_kernel_dense_s`` a DENSE pass on the backend (what it costs to keep the
    group dense while the layer's other groups run block-sparse); ``sparse``: the choice."""

    heads: tuple[int, ...]
    pattern: HeadPattern
    sparse_s: float
    dense_s: float
    in_kernel_dense_s: float
    sparse: bool


@dataclasses.dataclass(frozen=True)
class PathChoice:
    """One distinct pattern set's decision. ``patterns``: the requested per-head patterns; ``chosen``: the
    per-head patterns the layer runs block-sparse (``HeadPattern.DENSE`` for a head group kept dense), or
    ``None`` when the whole layer takes the dense prefill path; ``sparse_s`` / ``dense_s``: predicted seconds
    per layer of every group block-sparse / the dense path (None without a profile), ``chosen_s`` of the
    choice; ``groups``: the per-group prices (empty without a profile); ``note``: why, when not priced."""

    patterns: tuple
    chosen: tuple | None
    sparse_s: float | None
    dense_s: float | None
    chosen_s: float | None = None
    groups: tuple[GroupChoice, ...] = ()
    note: str = ""

    @property
    def sparse(self) -> bool:
        """Whether the layer runs the block-sparse kernel (for some or all of its heads)."""
        return self.chosen is not None

    @property
    def path(self) -> str:
        """``"sparse"``, ``"dense"`` or ``"mixed"`` (some head groups block-sparse, the rest DENSE in it)."""
        if self.chosen is None:
            return "dense"
        return "mixed" if any(p is HeadPattern.DENSE and q is not HeadPattern.DENSE
                              for p, q in zip(self.chosen, self.patterns)) else "sparse"


def choose_path(profile: CostProfile | None, patterns: tuple, groups, n: int, num_heads: int, head_dim: int,
                backend: str, block_q, block_k, base, margin: float = DEFAULT_MARGIN) -> PathChoice:
    """Block-sparse, dense, or per head group, for one pattern set. ``groups``: ``(rows, offset, layout)`` of
    the video rows (rows without video run the dense path either way); ``n``: the padded prompt length.

    Each head group is priced with its pattern and as DENSE heads on the backend; the kernel plan runs every
    group on its cheaper pass, and is taken only when it beats the whole layer on the dense path by
    ``margin``."""
    patterns = tuple(HeadPattern.parse(p) for p in patterns)
    kernel = resolve_backend(backend)
    if profile is None:   # nothing measured: the dense path, never slower than itself
        return PathChoice(patterns, None, None, None,
                          note=f"no measured cost profile for backend {kernel.name!r} on this device "
                               f"(`purekv calibrate --cost-profile` measures one): dense path")
    bq, bk = _blocks(kernel, block_q, block_k)
    rows = sum(len(r) for r, _, _ in groups)
    cells, path = dense_path_cells(n, base)
    dense_cell = (profile.dense_cell_s if path == "dense" else profile.flash_cell_s) * head_dim * cells * rows

    def kernel_s(group: HeadGroup) -> float:
        total = 0.0
        for r, _, lay in groups:
            c, passes = group_cells(lay, group, kernel, bq, bk)
            total += len(r) * head_dim * c * profile.sparse_cell_s + passes * profile.sparse_pass_s
        return total

    priced = []
    for group in backend_head_groups(patterns, num_heads, kernel):
        (pattern,) = {patterns[h] for h in group.heads}
        dense_group = HeadGroup(group.heads, ((HeadPattern.DENSE, False),))
        sparse_s, dense_s = kernel_s(group), dense_cell * len(group.heads)
        priced.append((group, pattern, sparse_s, dense_s, kernel_s(dense_group)))
    all_dense = sum(p[3] for p in priced)
    all_sparse = sum(p[2] for p in priced)
    best = sum(min(p[2], p[4]) for p in priced)   # each group on its cheaper pass
    # the kernel runs only for a plan with some group block-sparse that beats the dense path by the margin
    choose_sparse = best < (1.0 - margin) * all_dense and any(p[2] <= p[4] for p in priced)
    per_head = list(patterns)
    chosen_groups = []
    for group, pattern, sparse_s, dense_s, in_kernel_s in priced:
        keep_sparse = choose_sparse and sparse_s <= in_kernel_s
        if choose_sparse and not keep_sparse:
            for h in group.heads:
                per_head[h] = HeadPattern.DENSE
        chosen_groups.append(GroupChoice(group.heads, pattern, sparse_s, dense_s, in_kernel_s, keep_sparse))
    return PathChoice(patterns, tuple(per_head) if choose_sparse else None, all_sparse, all_dense,
                      best if choose_sparse else all_dense, tuple(chosen_groups))


# ------------------------------------------------------------------------------------------ calibration
def _median_time(fn, args, reps: int) -> float:
    """Median seconds of the jitted ``fn`` on ``args``, compiled as ``generate`` compiles its programs (the
    same compiler options), after one warm-up call."""
    fn = compile_lowered(fn.lower(*args), jax.default_backend())
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: the layouts and patterns the block-sparse side of a profile is fitted on
CALIBRATION_GRIDS = ((2, 8, 8), (4, 16, 16), (8, 16, 16))
CALIBRATION_PATTERNS = ("spatial", "temporal", "union")


def calibrate_profile(backend: str, *, head_dim: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                      reps: int = 3, seed: int = 0) -> CostProfile:
    """Measures a :class:`CostProfile` on this machine's default device: the dense path at 512 tokens, the
    flash path at 2,048, and the block-sparse backend on :data:`CALIBRATION_GRIDS` x
    :data:`CALIBRATION_PATTERNS` (every head one pattern), its per-cell and per-pass costs a non-negative
    least-squares fit of the times on (cells x head_dim, passes)."""
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
    work, times = [], []
    for t, h, w in CALIBRATION_GRIDS:
        lay = STLayout(16 + t * h * w, (VideoSpan(8, t, h, w),))
        q, k, v = qkv(lay.seq_len)
        for pattern in CALIBRATION_PATTERNS:
            fn = jax.jit(lambda q, k, v, lay=lay, pattern=pattern: block_sparse_attention(
                q, k, v, lay, head_patterns=pattern, backend=backend))
            c, passes = sparse_cells(lay, (pattern,) * num_heads, num_heads, backend, None, None)
            work.append((c * head_dim, passes))
            times.append(_median_time(fn, (q, k, v), reps))
    cell, per_pass = _nonnegative_fit(np.asarray(work, np.float64), np.asarray(times, np.float64))
    return CostProfile(backend=backend, dense_cell_s=dense_cell, flash_cell_s=flash_cell, sparse_cell_s=cell,
                       sparse_pass_s=per_pass,
                       source=f"calibrate_profile on {jax.default_backend()} (jax {jax.__version__}), "
                              f"head_dim {head_dim}, {num_heads}/{num_kv_heads} heads, "
                              f"{len(times)} (grid, pattern) points")


def _nonnegative_fit(work: np.ndarray, times: np.ndarray) -> tuple[float, float]:
    """``times ~ work @ (cell, per_pass)`` with both coefficients >= 0 (a negative one is dropped and the
    other refitted alone)."""
    coef, *_ = np.linalg.lstsq(work, times, rcond=None)
    if (coef >= 0).all():
        return float(coef[0]), float(coef[1])
    col = work[:, 0]
    return max(float(col @ times / (col @ col)), 0.0), 0.0


def save_profiles(profiles: dict[str, CostProfile], path: str = PROFILES_FILE) -> None:
    """Writes the profiles by key (atomically: a temporary file, then a rename; the folder is created)."""
    doc = {"profiles": {key: {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "backend"}
                        for key, p in profiles.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    read_profiles.cache_clear()


__all__ = ["CALIBRATION_GRIDS", "CALIBRATION_PATTERNS", "CostProfile", "DEFAULT_MARGIN", "GroupChoice", "PROFILES_FILE",
           "PathChoice", "USER_PROFILES_ENV", "calibrate_profile", "choose_path", "dense_path_cells", "find_profile",
           "group_cells", "load_profiles", "profile_key", "read_profiles", "save_profiles", "sparse_cells",
           "user_profiles_file"]
