"""Giving freed heap memory back to the operating system.

glibc keeps memory that was freed in its arenas, so a process's resident size stays at its high-water mark
after a burst of small allocations: XLA's compiler (tens of MiB per program, freed when it returns) and the
checkpoint writer's threads. :func:`trim_heap` returns it (``malloc_trim(0)``). Large buffers have the same
problem once glibc's adaptive mmap threshold has risen: :func:`map_large_buffers` fixes the threshold so that
each one is mapped on its own and unmapped when freed. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes


def load_libc():
    """glibc with ``malloc_trim`` typed, or None where there is none (macOS, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


LIBC = load_libc()

#: glibc's ``mallopt`` parameter for the mmap threshold (``M_MMAP_THRESHOLD`` in malloc.h).
M_MMAP_THRESHOLD = -3
#: the allocation size from which :func:`map_large_buffers` maps each buffer on its own (bytes).
LARGE_BUFFER_BYTES = 1 << 20


def trim_heap() -> None:
    """Hands freed heap memory back to the OS (no-op where unavailable)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


def map_large_buffers(threshold: int = LARGE_BUFFER_BYTES) -> bool:
    """Makes glibc serve every allocation of ``threshold`` bytes or more from its own memory mapping, returned
    to the OS as soon as it is freed.

    glibc's default threshold adapts: it rises to the largest mapped block freed so far (up to 32 MiB), after
    which XLA's multi-MiB buffers (a program's temporaries and outputs, staged prompt arrays) come from the
    heap and, once freed, stay resident in its holes, so each ``generate`` call can grow the process. A fixed
    threshold also turns the adaptation off. Process-wide and for later allocations: the ``purekv`` command
    calls it first thing. Returns whether it took effect (False without glibc)."""
    if LIBC is None:
        return False
    return bool(LIBC.mallopt(M_MMAP_THRESHOLD, int(threshold)))
