"""Softmax partials: attention over one part of a cache as ``(acc, m, l)``, merged exactly across parts.

For a query row and a set of slots with scores ``s_t`` (invalid slots excluded): ``m = max_t s_t``
(``-inf`` when no slot is valid), ``l = sum_t exp(s_t - m)``, ``acc = sum_t exp(s_t - m) v_t``. Two parts
merge into one softmax over their union, which lets a decode attend the quantised slots (a kernel) and
the model-dtype slots (XLA) separately, and lets a kernel split a long cache into blocks (flash decoding).
Shapes: acc ``[..., hd]`` float32, m / l ``[...]`` float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["Partials", "dense_partials", "merge_partials", "normalize"]

Partials = tuple  # (acc [..., hd], m [...], l [...]) float32


def dense_partials(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, scale: float) -> Partials:
    """The partials of ``q [B, Hkv, G, hd]`` over model-dtype slots ``k``/``v [B, Hkv, C, hd]``, ``valid
    [B, Hkv, C]`` (scores in float32, ``scale`` the softmax scale)."""
    s = jnp.einsum("bhgd,bhcd->bhgc", q, k, preferred_element_type=jnp.float32) * scale
    mask = valid[:, :, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[..., None]), 0.0)
    acc = jnp.einsum("bhgc,bhcd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m, jnp.sum(p, axis=-1)


def merge_partials(parts, axis: int | None = None) -> Partials:
    """One softmax's partials from several: ``parts`` a sequence of partials (``axis=None``), or one partials
    whose fields carry the parts on ``axis`` (of ``m``/``l``; ``acc`` has it at the same position)."""
    if axis is None:
        acc = jnp.stack([p[0] for p in parts])
        m = jnp.stack([p[1] for p in parts])
        l = jnp.stack([p[2] for p in parts])
        axis = 0
    else:
        acc, m, l = parts
        axis = axis % m.ndim
    top = jnp.max(m, axis=axis, keepdims=True)
    w = jnp.where(jnp.isfinite(m), jnp.exp(m - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    return (jnp.sum(acc * w[..., None], axis=axis), jnp.squeeze(top, axis), jnp.sum(l * w, axis=axis))


def normalize(parts: Partials) -> jax.Array:
    """The attention output ``acc / l`` (zero where no slot was valid)."""
    acc, _, l = parts
    return acc / jnp.where(l > 0, l, 1.0)[..., None]
