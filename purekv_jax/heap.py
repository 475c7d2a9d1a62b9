"""Giving freed heap memory back to the operating system.

glibc keeps memory that was freed in its arenas, so a process's resident size stays at its high-water mark
after a burst of small allocations: XLA's compiler (tens of MiB per program, freed when it returns) and the
checkpoint writer's threads. :func:`trim_heap` returns it (``malloc_trim(0)``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes


def load_libc():
    """glibc with ``malloc_trim`` typed, or None where there is none (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


LIBC = load_libc()


def trim_heap() -> None:
    """Hands freed heap memory back to the OS (no-op where unavailable)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)
