"""Names and abstract structure of the Qwen2.5-VL params pytree, shared by checkpoints and sharding.

A leaf is named by its dotted field path (``text.layers.q_w``, ``vision.blocks.qkv_w``): the same name for
a :class:`~models.qwen2_5_vl.model.Qwen25VLParams` leaf and for the nested dict orbax stores, so a
checkpoint's leaves and a sharding rule meet by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.qwen2_5_vl.config import Qwen25VLConfig
from models.qwen2_5_vl.model import Qwen25VLParams, init_params


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unexpected pytree key {k!r}")


def path_name(path) -> str:
    """A pytree key path (dataclass fields, dict keys or sequence indices) as a dotted name."""
    return ".".join(_key_name(k) for k in path)


def leaf_names(tree) -> list[str]:
    """Dotted field paths of a params pytree's leaves (``text.layers.q_w``, ``vision.blocks.qkv_w``, ...),
    in flatten order. Works for :class:`Qwen25VLParams` and for the nested dicts stored by orbax."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract_params(config: Qwen25VLConfig, dtype=jnp.float32) -> Qwen25VLParams:
    """The params structure as ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))
