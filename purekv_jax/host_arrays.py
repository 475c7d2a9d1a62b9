"""Device arrays back on the host, in every process of a multi-process job.

A ``jax.Array`` whose shards live on devices of several processes (a batch over a global mesh's ``data``
axis) cannot be read with ``np.asarray`` in one process: each process only holds its own rows.
:func:`host_array` gathers such an array to its full value in every process; any other array is read as
it is. Nothing of the project is imported here, so the cache and the generation code can both use it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def host_array(x) -> np.ndarray:
    """``x`` as a host numpy array holding its global value (same shape as ``x``).

    Single process, or an array every process holds in full (replicated): ``np.asarray``. An array split
    over several processes: :func:`jax.experimental.multihost_utils.process_allgather` (a collective, so
    every process must call it for the same array, in the same order, as the SPMD program does anyway).
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
