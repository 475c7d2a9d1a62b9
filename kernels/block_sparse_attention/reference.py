"""Dense masked float32 reference (materialises the N x N mask: tests and small sizes only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from purekv_jax.st_sparse.layout import HeadPattern, STLayout, reference_mask

__all__ = ["reference_attention", "dense_masked_attention"]


def dense_masked_attention(q, k, v, mask, scale=None):
    """q [B,Hq,N,D], k/v [B,Hkv,N,D], mask [Hq or 1, N, N] bool -> float32 [B,Hq,N,D]."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(b, hkv, g, n, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qf, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    mask = jnp.broadcast_to(jnp.asarray(mask), (hq, n, n)).reshape(hkv, g, n, n)
    s = jnp.where(mask[None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, hq, n, d)


def reference_attention(q, k, v, layout: STLayout, head_patterns=HeadPattern.UNION, scale=None):
    """ST-SpAttn attention in original order, straight from the METHOD.md mask definition."""
    hq = q.shape[1]
    if isinstance(head_patterns, (HeadPattern, str, int)):
        head_patterns = (head_patterns,) * hq
    pats = [HeadPattern.parse(p) for p in head_patterns]
    cache = {}
    masks = []
    for p in pats:
        if p not in cache:
            cache[p] = reference_mask(layout, p)
        masks.append(cache[p])
    return dense_masked_attention(q, k, v, np.stack(masks), scale)
