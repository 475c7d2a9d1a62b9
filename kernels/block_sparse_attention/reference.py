"""Dense masked float32 reference (materialises the N x N mask: tests and small sizes only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention.layout import HeadPattern, STLayout
from kernels.block_sparse_attention.mask import reference_mask

__all__ = ["reference_attention", "dense_masked_attention"]


def dense_masked_attention(q, k, v, mask, scale=None, *, return_lse=False):
    """q [B,Hq,N,D], k/v [B,Hkv,N,D], mask [Hq or 1, N, N] bool -> float32 [B,Hq,N,D].

    With ``return_lse`` also the per-row natural log-sum-exp of the masked scores, float32
    [B,Hq,N]. A row with no key gets output 0 and log-sum-exp -inf.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(b, hkv, g, n, d)
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qf, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    mask = jnp.broadcast_to(jnp.asarray(mask), (hq, n, n)).reshape(hkv, g, n, n)
    s = jnp.where(mask[None], s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)          # empty rows: exp(-inf) = 0 everywhere
    p = jnp.exp(s - mx)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST).reshape(b, hq, n, d)
    if not return_lse:
        return o
    return o, (mx + jnp.log(l))[..., 0].reshape(b, hq, n)


def reference_attention(q, k, v, layout: STLayout, head_patterns=HeadPattern.UNION, scale=None, *,
                        return_lse=False):
    """ST-SpAttn attention in original order, straight from the METHOD.md mask definition.

    Returns [B,Hq,N,D] float32 (and the [B,Hq,N] log-sum-exp with ``return_lse``)."""
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
    return dense_masked_attention(q, k, v, np.stack(masks), scale, return_lse=return_lse)
