"""Per-layer views of a text state's stacked decoder weights, read in place by the decode on a CPU.

XLA on the CPU materialises every slice of a stacked array that a dot reads: a decode that scans over the
stacked ``[L, ...]`` layer weights copies each layer's weights out before its matrix-vector products, so per
token it writes about as many bytes as the layers' weights it reads. On a CPU a jax array can wrap host
memory without a copy, so each layer's slice of a stacked leaf (a numpy view of the leaf's own buffer) becomes
a jax array of its own over the same bytes (:func:`per_layer`); no memory is added. The decode's layer scan
keeps one body for every layer (compile time and compiler memory flat in depth): each matrix product in it is
a ``lax.switch`` on the layer index whose branch ``i`` multiplies by layer ``i``'s view, and a conditional's
branch reads its operand buffers in place (:func:`switched_layer`).

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


class SwitchedMatrix:
    """One weight matrix of layer ``layer`` (traced) as the right operand of ``x @ w``: a ``lax.switch`` whose
    branch ``i`` multiplies by layer ``i``'s view ``views[i] [in, out]``, so the dot reads that buffer where it
    lies. It supports ``@`` only (what the text stack's layers do with their matrices); anything else is a
    TypeError at trace time."""

    def __init__(self, views: tuple[jax.Array, ...], layer: jax.Array):
        self.views, self.layer = views, layer

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        return jax.lax.switch(self.layer, [lambda x, w=w: x @ w for w in self.views], x)


def switched_layer(stacked, views: tuple, layer: jax.Array):
    """Layer ``layer`` (traced) of the stacked layer state ``stacked`` for a scan body: each matrix (a leaf
    ``[L, in, out]``) a :class:`SwitchedMatrix` over its per-layer views (``views``: :func:`per_layer` of
    ``stacked``), the vectors (norms, biases: a few KiB) sliced from the stacked leaves."""
    return jax.tree.map(lambda whole, *per: SwitchedMatrix(per, layer) if whole.ndim == 3
                        else jax.lax.dynamic_index_in_dim(whole, layer, 0, keepdims=False), stacked, *views)
