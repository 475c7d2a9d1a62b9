"""Host reference of ``purekv_jax.policies.keep_set`` (independent of the jitted code under test)."""

import numpy as np


def keep_set_reference(score: np.ndarray, valid: np.ndarray, budget: int, window: int, sink: int) -> list:
    """Host reference of :func:`keep_set` for one ``[N]`` row / head: the sorted list of kept indices."""
    idx = np.flatnonzero(valid)
    forced = set(idx[:sink].tolist()) | set(idx[max(len(idx) - window, 0) :].tolist())
    rest = [int(i) for i in idx if int(i) not in forced]
    rest.sort(key=lambda i: (-float(score[i]), i))
    return sorted(list(forced) + rest[: max(budget - len(forced), 0)])
