"""Host arrays that become device arrays without a copy on the CPU, for the loaders.

A loader reads each leaf of a checkpoint into a host array and hands it to jax. On the CPU backend
``jax.device_put`` takes a host array whose data starts on XLA's alignment boundary as it is (the device
array holds the host buffer), where an unaligned one, or ``jnp.asarray``, is copied: one more copy of each
leaf while it is moved, and freed host memory that the allocator may keep. :func:`aligned_empty` allocates
a leaf so that it qualifies and :func:`to_device` moves it (on other backends it is copied to the device as
usual and the host array freed by the caller).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: XLA's minimum alignment of a CPU buffer that it may use in place (bytes).
XLA_CPU_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous host array of ``shape`` and ``dtype`` whose data starts on a
    :data:`XLA_CPU_ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + XLA_CPU_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % XLA_CPU_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def to_device(host: np.ndarray, dtype) -> jax.Array:
    """``host`` as a jax array of ``dtype``: without a copy when it already has that dtype and is aligned
    (the caller must not write to ``host`` afterwards), else a converted copy."""
    if host.dtype == np.dtype(dtype):
        return jax.device_put(host)
    return jnp.asarray(host, dtype)
