"""Ahead-of-time compiled programs, kept per static settings and argument shapes.

``generate`` compiles its prefill once per (plan, prompt bucket, media grids) and its decode once per
(cache capacity, token bucket, sampling settings). Compiling ahead of time (``jit(...).lower().compile()``)
rather than calling a jitted function lets ``generate`` report the compile time and XLA's memory analysis
separately from the run time, and :data:`TRACE_COUNTS` lets tests prove that nothing retraces per call.
After each compile the heap the compiler freed is handed back to the OS (:func:`purekv_jax.heap.trim_heap`),
so a process's resident memory does not keep the compiler's high-water mark.
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
    program = jax.jit(functools.partial(fn, **statics), donate_argnums=donate).lower(*args).compile()
    trim_heap()  # the compiler's freed working memory, else resident until the process ends
    dt = time.perf_counter() - t0
    try:
        memory = program.memory_analysis()
    except Exception:  # pragma: no cover - a backend without memory analysis
        memory = None
    _PROGRAMS[key] = CompiledProgram(program, dt, memory)
    return _PROGRAMS[key]


def peak_bytes(memory) -> int:
    """Arguments + outputs + temporaries - aliased bytes (XLA's compiled memory analysis)."""
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
               - memory.alias_size_in_bytes)
