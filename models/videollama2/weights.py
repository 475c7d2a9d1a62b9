"""Random weights from a shape table, and a module whose weights are the table's entries.

VideoLLaMA2's vision tower and connector are described by shape tables (weight name -> shape, in our
layout); :func:`draw_arrays` draws a table's weights and :class:`TableModule` holds them as ``nnx.Param``
attributes of those names, so a module's state paths are the table's names.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def is_norm_scale(name: str) -> bool:
    """LayerNorm scales (``*ln*_w``): drawn near one, everything else near zero."""
    return "ln" in name and name.endswith("_w")


def draw_arrays(shapes: Mapping[str, tuple[int, ...]], key: jax.Array, dtype=jnp.float32, std: float = 0.02
                ) -> dict[str, jax.Array]:
    """One array per entry of ``shapes`` (one key each, in table order): LayerNorm scales
    ``1 + normal(0, 0.1)``, every other weight and bias ``normal(0, std)`` (biases too, so bias bugs show)."""
    keys = jax.random.split(key, max(len(shapes), 1))
    out = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        x = jax.random.normal(k, shape, jnp.float32)
        out[name] = (1.0 + 0.1 * x if is_norm_scale(name) else std * x).astype(dtype)
    return out


class TableModule(nnx.Module):
    """A module holding one ``nnx.Param`` per entry of ``arrays`` (attribute = the entry's name)."""

    def __init__(self, arrays: Mapping[str, jax.Array]):
        for name, value in arrays.items():
            setattr(self, name, nnx.Param(value))
