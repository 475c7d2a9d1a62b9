"""Names and abstract structure of a model's state (the Flax model's parameters, of either model family),
shared by checkpoints and sharding.

A leaf is named by its dotted attribute path in the module tree (``text.layers.q_w``,
``vision.blocks.qkv_w``): the same name for an ``nnx.State`` leaf (whose ``nnx.Param`` wrapper is not part
of the name) and for the nested dict orbax stores, so a checkpoint's leaves and a sharding rule meet by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.family import family_of


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unexpected pytree key {k!r}")


def path_name(path) -> str:
    """A pytree key path (state / dict keys, attributes or sequence indices) as a dotted name; the trailing
    ``.value`` of an ``nnx.Variable`` leaf is left out."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return ".".join(_key_name(k) for k in path)


def leaf_names(tree) -> list[str]:
    """Dotted field paths of a params pytree's leaves (``text.layers.q_w``, ``vision.blocks.qkv_w``, ...),
    in flatten order. Works for the model's ``nnx.State`` and for the nested dicts stored by orbax."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract_params(config, dtype=jnp.float32):
    """The state of ``config``'s model (any family, :func:`models.family.family_of`) with
    ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return family_of(config).abstract_state(config, dtype)[1]
