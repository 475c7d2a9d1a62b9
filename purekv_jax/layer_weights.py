"""Per-layer views of a text state's stacked decoder weights, for the decode on a CPU.

XLA on the CPU materialises every slice of a stacked array that a dot reads: a decode that scans over the
stacked ``[L, ...]`` layer weights copies each layer's weights out before its matrix-vector products, so per
token it writes about as many bytes as the layers' weights it reads. On a CPU a jax array can wrap host
memory without a copy, so each layer's slice of a stacked leaf (a numpy view of the leaf's own buffer) becomes
a jax array of its own over the same bytes; the decode's unrolled layer loop hands those to its dots, which
read them where they lie. No memory is added.

The views alias the stacked leaves: they are made for one decode call and dropped with its arguments; the
stacked weights are never donated (nothing in ``generate`` donates parameters).
"""

from __future__ import annotations

import jax
import numpy as np


def per_layer(layers) -> tuple | None:
    """The stacked layer state ``layers`` (every leaf ``[L, ...]``) as ``L`` states of the same structure, each
    leaf a zero-copy view of one layer; None unless every leaf lives on one CPU device and every view shares
    its leaf's buffer (a slice whose offset the CPU client cannot wrap comes back copied), so a caller never
    holds the weights twice."""
    leaves, treedef = jax.tree.flatten(layers)
    if not leaves or not all(on_one_cpu(leaf) for leaf in leaves):
        return None
    per_leaf = []
    for leaf in leaves:
        host = np.asarray(leaf)  # on a CPU: the leaf's buffer itself
        base = leaf.unsafe_buffer_pointer()
        if host.ctypes.data != base:
            return None
        views = [jax.device_put(host[i], leaf.sharding) for i in range(leaf.shape[0])]
        if any(v.unsafe_buffer_pointer() != base + i * host[i].nbytes for i, v in enumerate(views)):
            return None
        per_leaf.append(views)
    return tuple(jax.tree.unflatten(treedef, layer) for layer in zip(*per_leaf))


def on_one_cpu(leaf) -> bool:
    """A committed jax array on a single CPU device (what :func:`per_layer` can view without copying)."""
    return (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and len(leaf.sharding.device_set) == 1
            and next(iter(leaf.sharding.device_set)).platform == "cpu" and leaf.ndim >= 1)
