"""The KV cache: an immutable pytree with a static capacity and a per-slot validity mask.

Layout: ``k``, ``v`` ``[L, B, Hkv, C, hd]`` (C = static capacity in slots), ``valid`` ``[L, B, Hkv, C]``
(a slot holds a real, kept token; per layer and KV head, so per-head budgets fit), ``length`` ``[B]``
(slots used: the next token is written at slot ``length``), ``next_position`` ``[B]`` (the logical,
unpruned position of the next token among the row's real tokens: the original prompt length plus the
tokens generated so far, never the pruned length) and ``rope_delta`` ``[B]`` (Qwen2.5-VL's M-RoPE offset).
The rotary position of the next token is ``next_position + rope_delta`` (all three M-RoPE rows equal for
text decode).

Rotary embeddings are applied before caching, so pruning never moves a key: slot order is kept order,
and a kept key keeps its original position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


class CacheError(ValueError):
    """A cache operation that does not fit (capacity, shapes)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, Hkv, C, hd]
    v: jax.Array  # [L, B, Hkv, C, hd]
    valid: jax.Array  # [L, B, Hkv, C] bool
    length: jax.Array  # [B] int32, slots used
    next_position: jax.Array  # [B] int32, logical (unpruned) position of the next token
    rope_delta: jax.Array  # [B] int32

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def decode_positions(self) -> jax.Array:
        """``[B]`` rotary position of the next token."""
        return self.next_position + self.rope_delta


def create(
    n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.float32
) -> KVCache:
    """An empty cache (no valid slot, length 0, positions 0)."""
    shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
    zeros_b = jnp.zeros((batch,), jnp.int32)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros(shape[:-1], bool),
        length=zeros_b,
        next_position=zeros_b,
        rope_delta=zeros_b,
    )


def keep_indices(k: jax.Array, v: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gathers ``k``, ``v`` ``[B, Hkv, N, hd]`` at ``idx [B, Hkv, S]`` -> ``[B, Hkv, S, hd]`` each."""
    g = idx[..., None]
    return jnp.take_along_axis(k, g, axis=2), jnp.take_along_axis(v, g, axis=2)


def write_layer(cache: KVCache, layer, k: jax.Array, v: jax.Array, kept: jax.Array) -> KVCache:
    """Writes one layer's kept entries ``k``/``v`` ``[B, Hkv, S, hd]`` (validity ``kept [B, Hkv, S]``)
    into slots ``[0, S)`` of ``layer`` (static or traced). Slots ``>= S`` are left as they are."""
    s = k.shape[2]
    if s > cache.capacity:
        raise CacheError(f"writing {s} slots into a cache of capacity {cache.capacity}")
    zero = jnp.zeros((), jnp.int32)
    at = (jnp.asarray(layer, jnp.int32), zero, zero, zero, zero)
    return dataclasses.replace(
        cache,
        k=jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
        v=jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at),
        valid=jax.lax.dynamic_update_slice(cache.valid, kept[None], at[:-1]),
    )


def from_keep(
    k: jax.Array,
    v: jax.Array,
    idx: jax.Array,
    kept: jax.Array,
    capacity: int,
    next_position: jax.Array,
    rope_delta: jax.Array | None = None,
) -> KVCache:
    """A cache from all layers' full ``k``/``v`` ``[L, B, Hkv, N, hd]`` and keep-sets ``idx``/``kept``
    ``[L, B, Hkv, S]`` (the non-active path, for tests and tools; ``generate`` writes layer by layer)."""
    n_layers, b, h, _, d = k.shape
    s = idx.shape[-1]
    if s > capacity:
        raise CacheError(f"{s} kept slots do not fit a cache of capacity {capacity}")
    kk, vv = jax.vmap(keep_indices)(k, v, idx)
    pad = ((0, 0),) * 3 + ((0, capacity - s),)
    return KVCache(
        k=jnp.pad(kk, pad + ((0, 0),)),
        v=jnp.pad(vv, pad + ((0, 0),)),
        valid=jnp.pad(kept, pad),
        length=jnp.full((b,), s, jnp.int32),
        next_position=jnp.asarray(next_position, jnp.int32).reshape(b),
        rope_delta=jnp.zeros((b,), jnp.int32) if rope_delta is None else jnp.asarray(rope_delta, jnp.int32).reshape(b),
    )


def append(cache: KVCache, layer, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    """Writes one new token's ``k_new``/``v_new`` ``[B, Hkv, hd]`` (or ``[B, Hkv, 1, hd]``) of ``layer``
    at slot ``length[b]`` of each row and marks it valid. Does not advance ``length``: every layer
    appends the same token, then :func:`advance` moves the cache on by one.

    A full cache is a caller error checked on the host (``generate`` sizes the capacity); inside jit the
    write is clamped to the last slot.
    """
    if k_new.ndim == 4:
        k_new, v_new = k_new[:, :, 0], v_new[:, :, 0]
    b = cache.batch
    rows = jnp.arange(b)
    slot = jnp.minimum(cache.length, cache.capacity - 1)
    return dataclasses.replace(
        cache,
        k=cache.k.at[layer, rows, :, slot].set(k_new.astype(cache.k.dtype)),
        v=cache.v.at[layer, rows, :, slot].set(v_new.astype(cache.v.dtype)),
        valid=cache.valid.at[layer, rows, :, slot].set(True),
    )


def advance(cache: KVCache, n: int = 1) -> KVCache:
    """Moves ``length`` and ``next_position`` on by ``n`` tokens (after every layer appended)."""
    return dataclasses.replace(cache, length=cache.length + n, next_position=cache.next_position + n)


# -------------------------------------------------------------------------------------------- bytes
def kv_bytes_kept(cache: KVCache) -> int:
    """Bytes of K and V in valid slots (what the cache really holds), all layers (host int)."""
    per_slot = 2 * cache.k.shape[-1] * jnp.dtype(cache.k.dtype).itemsize
    return int(np.sum(np.asarray(cache.valid), dtype=np.int64)) * per_slot


def kv_bytes_full(n_tokens, n_layers: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> int:
    """Bytes an unpruned cache needs for ``n_tokens`` real tokens per row (int or per-row sequence)."""
    total = int(np.sum(np.asarray(n_tokens)))
    return total * n_layers * n_kv_heads * 2 * head_dim * jnp.dtype(dtype).itemsize


def kv_bytes_allocated(cache: KVCache) -> int:
    """Bytes of the allocated K/V arrays (static capacity, including unused slots)."""
    return int(cache.k.size * cache.k.dtype.itemsize + cache.v.size * cache.v.dtype.itemsize)
