"""Ahead-of-time compiled programs, kept per static settings and argument shapes.

``generate`` compiles its prefill once per (plan, prompt bucket, media grids) and its decode once per
(cache capacity, token bucket, sampling settings). Compiling ahead of time (``jit(...).lower().compile()``)
rather than calling a jitted function lets ``generate`` report the compile time and XLA's memory analysis
separately from the run time, and :data:`TRACE_COUNTS` lets tests prove that nothing retraces per call.
After each compile the heap the compiler freed is handed back to the OS (:func:`purekv_jax.heap.trim_heap`),
so a process's resident memory does not keep the compiler's high-water mark.

The compiler's working memory is a process's peak on a small model, so each backend's programs compile with
the options in :data:`COMPILER_OPTIONS`: on the CPU, XLA's LLVM fusion emitters instead of its MLIR ones,
which need several times less memory (and time) to compile the same programs, which run as fast
(``benchmarks/speed_memory.py``, ``docs/speed.md``). An XLA that no longer knows an option compiles with its
defaults.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable

import jax

from .heap import trim_heap

#: how often each program name was traced (== compiled) since the last :func:`clear_compile_cache`.
TRACE_COUNTS: collections.Counter = collections.Counter()
_PROGRAMS: dict = {}

#: XLA compile options per backend platform for every program compiled here.
COMPILER_OPTIONS: dict[str, dict[str, Any]] = {"cpu": {"xla_cpu_use_fusion_emitters": False}}
#: options this XLA refused ("No such compile option"), left out of later compiles.
UNKNOWN_OPTIONS: set[str] = set()


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """A compiled program, the seconds its compilation took (0.0 when it came from the cache) and XLA's
    memory analysis of it (``None`` on a backend without one)."""

    run: Callable
    compile_s: float
    memory: Any


def clear_compile_cache() -> None:
    """Forgets every compiled program and resets :data:`TRACE_COUNTS`."""
    _PROGRAMS.clear()
    TRACE_COUNTS.clear()


def compiled_programs() -> dict[str, list[CompiledProgram]]:
    """The programs compiled since the last :func:`clear_compile_cache`, by name (for inspection: their
    HLO is ``program.run.as_text()``)."""
    out: dict[str, list[CompiledProgram]] = {}
    for key, program in _PROGRAMS.items():
        out.setdefault(key[0], []).append(program)
    return out


def count_trace(name: str) -> None:
    """Called at the top of a traced function body: one more trace of ``name``."""
    TRACE_COUNTS[name] += 1


def compiled(name: str, fn: Callable, statics: dict, args: tuple, donate: tuple[int, ...] = ()) -> CompiledProgram:
    """``fn(*args, **statics)`` compiled once per (name, statics, argument structure, shapes, dtypes and
    shardings: params on a mesh compile anew)."""
    leaves, treedef = jax.tree.flatten(args)
    key = (name, tuple(sorted(statics.items())), treedef,
           tuple((leaf.shape, str(leaf.dtype), getattr(leaf, "sharding", None)) for leaf in leaves))
    hit = _PROGRAMS.get(key)
    if hit is not None:
        return dataclasses.replace(hit, compile_s=0.0)
    t0 = time.perf_counter()
    lowered = jax.jit(functools.partial(fn, **statics), donate_argnums=donate).lower(*args)
    program = compile_lowered(lowered, platform_of(leaves))
    del lowered  # its MLIR module: freed before the heap is trimmed
    trim_heap()  # the compiler's freed working memory, else resident until the process ends
    dt = time.perf_counter() - t0
    try:
        memory = program.memory_analysis()
    except Exception:  # pragma: no cover - a backend without memory analysis
        memory = None
    _PROGRAMS[key] = CompiledProgram(program, dt, memory)
    return _PROGRAMS[key]


def platform_of(leaves) -> str:
    """The platform of the first device array among ``leaves`` (where the program will run), else jax's
    default backend."""
    for leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return next(iter(sharding.device_set)).platform
    return jax.default_backend()


def compile_lowered(lowered, platform: str):
    """``lowered.compile`` with :data:`COMPILER_OPTIONS` for ``platform``; an option this XLA does not know
    is dropped (remembered in ``UNKNOWN_OPTIONS``) and the compile retried."""
    while True:
        options = {k: v for k, v in COMPILER_OPTIONS.get(platform, {}).items() if k not in UNKNOWN_OPTIONS}
        try:
            return lowered.compile(compiler_options=options or None)
        except jax.errors.JaxRuntimeError as e:
            refused = [k for k in options if f"No such compile option: '{k}'" in str(e)]
            if not refused:
                raise
            UNKNOWN_OPTIONS.update(refused)


def peak_bytes(memory) -> int:
    """Arguments + outputs + temporaries - aliased bytes (XLA's compiled memory analysis)."""
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
               - memory.alias_size_in_bytes)
