"""Building blocks shared by the vision tower and the language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Qwen2 RMSNorm: variance in float32, normalise, cast back to ``x.dtype``, then scale.

    The cast happens *before* the multiply by ``weight``, as in the reference; in bf16 the order
    changes the result.
    """
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + eps)).astype(x.dtype)
    return weight * normed


def rotate_half(x: jax.Array) -> jax.Array:
    """``cat(-x2, x1)`` for the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding computed in float32 and cast back to ``x.dtype``.

    ``x`` is ``[..., seq, head_dim]``; ``cos``/``sin`` broadcast against it.
    """
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    scale: float | None = None,
) -> jax.Array:
    """Plain softmax attention with grouped KV heads.

    Args:
      q: ``[batch, q_heads, q_len, head_dim]``.
      k, v: ``[batch, kv_heads, kv_len, head_dim]``; ``q_heads`` is a multiple of ``kv_heads``.
      mask: boolean, broadcastable to ``[batch, q_heads, q_len, kv_len]``; True = attend.
        A fully masked row yields zeros (not NaN).
      scale: defaults to ``head_dim ** -0.5``.

    Returns:
      ``[batch, q_heads, q_len, head_dim]`` in ``q.dtype``; scores and softmax in float32.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, hkv, groups, n, d)
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, hq) + scores.shape[-2:]).reshape(scores.shape)
        scores = jnp.where(m, scores, -jnp.inf)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        p = jnp.exp(scores - row_max)
        p = jnp.where(m, p, 0.0)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        probs = p / jnp.where(denom > 0, denom, 1.0)
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, hq, n, d).astype(q.dtype)
