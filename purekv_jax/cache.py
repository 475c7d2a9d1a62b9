"""The KV cache: an immutable pytree with a static capacity and a per-slot validity mask.

Layout: ``k``, ``v`` ``[L, B, Hkv, C, hd]`` (C = static capacity in slots), ``valid`` ``[L, B, Hkv, C]``
(a slot holds a real, kept token; per layer and KV head, so per-head budgets fit), ``length`` ``[B]``
(slots used: the next token is written at slot ``length``), ``next_position`` ``[B]`` (the logical,
unpruned position of the next token among the row's real tokens: the original prompt length plus the
tokens generated so far, never the pruned length) and ``rope_delta`` ``[B]`` (Qwen2.5-VL's M-RoPE offset).
The rotary position of the next token is ``next_position + rope_delta`` (all three M-RoPE rows equal for
text decode).

Rotary embeddings are applied before caching, so pruning never moves a key: slot order is kept order,
and a kept key keeps its original position. Attention over the cache is a masked softmax over its slots,
so the order of slots never matters to it.

Quantised cache (``quant``, a :class:`QuantizedKV`; ``None`` = every slot in the model's dtype): the
prefill's kept entries, less the most recent ones, are stored as KIVI codes (:mod:`purekv_jax.kv_quant`) in
``quant``'s ``Q`` slots per layer and KV head; ``k``/``v`` then hold the most recent kept prompt entries
and the decoded tokens in the model's dtype, and ``length`` counts only those slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import kv_quant as Q


class CacheError(ValueError):
    """A cache operation that does not fit (capacity, shapes)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """Quantised cache slots (``Q`` per layer and KV head, ``g`` = the group, :mod:`purekv_jax.kv_quant`).

    k_codes / v_codes ``[L, B, Hkv, Q, hd * bits / 8]`` uint8; k_scale / k_zero ``[L, B, Hkv, Q / g, hd]``
    float16 (per channel, per group of ``g`` slots); v_scale / v_zero ``[L, B, Hkv, Q, hd / g]`` float16 (per
    slot, per group of ``g`` channels); valid ``[L, B, Hkv, Q]`` bool; bits: the code width (static). A
    layer's slice (every field without its leading ``L``) is a ``QuantizedKV`` too.
    """

    k_codes: jax.Array
    k_scale: jax.Array
    k_zero: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_zero: jax.Array
    valid: jax.Array
    bits: int = dataclasses.field(metadata=dict(static=True), default=8)

    @property
    def slots(self) -> int:
        return self.valid.shape[-1]

    @property
    def group(self) -> int:
        return self.slots // self.k_scale.shape[-2]

    def layer(self, layer) -> "QuantizedKV":
        """Layer ``layer``'s slice (static or traced index)."""
        return jax.tree.map(lambda a: a[layer], self)

    def dequantized(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``(k, v [..., Q, hd])`` in ``dtype``."""
        k = Q.dequantize_keys(self.k_codes, self.k_scale, self.k_zero, self.bits)
        v = Q.dequantize_values(self.v_codes, self.v_scale, self.v_zero, self.bits)
        return k.astype(dtype), v.astype(dtype)


def quantize_entries(k: jax.Array, v: jax.Array, valid: jax.Array, bits: int, group: int) -> QuantizedKV:
    """Quantises ``k``/``v [..., Q, hd]`` (``valid [..., Q]``; ``Q`` a multiple of ``group``): the one quantise
    function of the project (``generate``'s prefill and the fidelity harnesses' caches call it)."""
    kc, ks, kz = Q.quantize_keys(k, valid, bits, group)
    vc, vs, vz = Q.quantize_values(v, bits, group)
    return QuantizedKV(kc, ks, kz, vc, vs, vz, valid, bits)


def split_recent(k: jax.Array, v: jax.Array, kept: jax.Array, n_quant: int):
    """Splits one layer's kept entries ``k``/``v [B, Hkv, S, hd]`` (``kept [B, Hkv, S]``: the kept slots first,
    in ascending position, as ``policies.keep_set`` returns them) into the ``n_quant`` slots to quantise and
    the ``S - n_quant`` most recent kept entries, which stay in the model's dtype.

    Returns ``(qk, qv [B, Hkv, n_quant, hd], q_valid, rk, rv [B, Hkv, S - n_quant, hd], r_valid)``: a row and
    head keeping ``c`` entries holds its last ``min(c, S - n_quant)`` in the recent slots and the others in
    the first quantised slots.
    """
    s = k.shape[2]
    n_recent = s - n_quant
    count = jnp.sum(kept, axis=-1, dtype=jnp.int32)[..., None]  # [B, Hkv, 1]
    start = jnp.maximum(count - n_recent, 0)
    src = start + jnp.arange(n_recent, dtype=jnp.int32)
    r_valid = src < count
    g = jnp.minimum(src, s - 1)[..., None]
    rk, rv = jnp.take_along_axis(k, g, axis=2), jnp.take_along_axis(v, g, axis=2)
    q_valid = jnp.arange(n_quant, dtype=jnp.int32) < start
    return k[:, :, :n_quant], v[:, :, :n_quant], q_valid, rk, rv, r_valid


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, Hkv, C, hd] (model dtype)
    v: jax.Array  # [L, B, Hkv, C, hd]
    valid: jax.Array  # [L, B, Hkv, C] bool
    length: jax.Array  # [B] int32, slots of k / v used
    next_position: jax.Array  # [B] int32, logical (unpruned) position of the next token
    rope_delta: jax.Array  # [B] int32
    quant: QuantizedKV | None = None  # the quantised prompt slots (None: nothing quantised)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        """Slots in the model's dtype (``k``/``v``; the decoded tokens go there)."""
        return self.k.shape[3]

    @property
    def quantized_slots(self) -> int:
        """Quantised slots per layer and KV head (0 without quantisation)."""
        return 0 if self.quant is None else self.quant.slots

    def decode_positions(self) -> jax.Array:
        """``[B]`` rotary position of the next token."""
        return self.next_position + self.rope_delta


def create(
    n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype=jnp.float32,
    quant: Q.QuantLayout | None = None,
) -> KVCache:
    """An empty cache (no valid slot, length 0, positions 0) of ``capacity`` slots per layer and KV head;
    with ``quant``, ``quant.slots`` of them quantised and the rest in ``dtype``."""
    n_quant = 0 if quant is None else quant.slots
    if capacity < n_quant:
        raise CacheError(f"a cache of capacity {capacity} cannot hold {n_quant} quantised slots")
    shape = (n_layers, batch, n_kv_heads, capacity - n_quant, head_dim)
    zeros_b = jnp.zeros((batch,), jnp.int32)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros(shape[:-1], bool),
        length=zeros_b,
        next_position=zeros_b,
        rope_delta=zeros_b,
        quant=None if quant is None else empty_quantized(shape[:3], n_quant, head_dim, quant),
    )


def empty_quantized(lead: tuple[int, ...], slots: int, head_dim: int, layout: Q.QuantLayout) -> QuantizedKV:
    """Zero codes, unit scales, no valid slot: ``lead + (slots, ...)`` per field."""
    if head_dim % layout.group or head_dim % (8 // layout.bits):
        raise CacheError(f"head_dim {head_dim} does not split into groups of {layout.group} channels "
                         f"(and bytes of {8 // layout.bits} codes)")
    width = head_dim * layout.bits // 8
    ones = lambda *s: jnp.ones(lead + s, jnp.float16)
    zeros = lambda *s: jnp.zeros(lead + s, jnp.float16)
    codes = jnp.zeros(lead + (slots, width), jnp.uint8)
    return QuantizedKV(codes, ones(slots // layout.group, head_dim), zeros(slots // layout.group, head_dim), codes,
                       ones(slots, head_dim // layout.group), zeros(slots, head_dim // layout.group),
                       jnp.zeros(lead + (slots,), bool), layout.bits)


def keep_indices(k: jax.Array, v: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gathers ``k``, ``v`` ``[B, Hkv, N, hd]`` at ``idx [B, Hkv, S]`` -> ``[B, Hkv, S, hd]`` each."""
    g = idx[..., None]
    return jnp.take_along_axis(k, g, axis=2), jnp.take_along_axis(v, g, axis=2)


def write_layer(cache: KVCache, layer, k: jax.Array, v: jax.Array, kept: jax.Array) -> KVCache:
    """Writes one layer's kept entries ``k``/``v`` ``[B, Hkv, S, hd]`` (validity ``kept [B, Hkv, S]``)
    into slots ``[0, S)`` of ``layer`` (static or traced). Slots ``>= S`` are left as they are.

    A quantised cache (``Q`` quantised slots) quantises all but the ``S - Q`` most recent kept entries
    (:func:`split_recent`, :func:`quantize_entries`) and writes those into slots ``[0, S - Q)`` of ``k``/``v``.
    """
    if cache.quant is not None:
        qk, qv, q_valid, k, v, kept = split_recent(k, v, kept, cache.quant.slots)
        layer_q = quantize_entries(qk, qv, q_valid, cache.quant.bits, cache.quant.group)
        at = jnp.asarray(layer, jnp.int32)
        quant = jax.tree.map(lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x, at, 0), cache.quant, layer_q)
        cache = dataclasses.replace(cache, quant=quant)
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
    quant: Q.QuantLayout | None = None,
) -> KVCache:
    """A cache from all layers' full ``k``/``v`` ``[L, B, Hkv, N, hd]`` and keep-sets ``idx``/``kept``
    ``[L, B, Hkv, S]`` (the non-active path, for tests and tools; ``generate`` writes layer by layer), with
    ``capacity`` slots per layer and KV head (``quant.slots`` of them quantised, as :func:`write_layer`)."""
    n_layers, b, h, _, d = k.shape
    s = idx.shape[-1]
    if s > capacity:
        raise CacheError(f"{s} kept slots do not fit a cache of capacity {capacity}")
    kk, vv = jax.vmap(keep_indices)(k, v, idx)
    quantized = None
    if quant is not None:
        split = lambda a, b, c: split_recent(a, b, c, quant.slots)
        qk, qv, q_valid, kk, vv, kept = jax.vmap(split)(kk, vv, kept)
        quantized = quantize_entries(qk, qv, q_valid, quant.bits, quant.group)
        s, capacity = s - quant.slots, capacity - quant.slots
    pad = ((0, 0),) * 3 + ((0, capacity - s),)
    return KVCache(
        k=jnp.pad(kk, pad + ((0, 0),)),
        v=jnp.pad(vv, pad + ((0, 0),)),
        valid=jnp.pad(kept, pad),
        length=jnp.full((b,), s, jnp.int32),
        next_position=jnp.asarray(next_position, jnp.int32).reshape(b),
        rope_delta=jnp.zeros((b,), jnp.int32) if rope_delta is None else jnp.asarray(rope_delta, jnp.int32).reshape(b),
        quant=quantized,
    )


def layer_entries(k: jax.Array, v: jax.Array, valid: jax.Array, quant: QuantizedKV | None):
    """Every slot of a cache (or of one layer: ``k``/``v [..., C, hd]``, ``valid [..., C]``, ``quant`` the
    matching slice) in the model's dtype: the dequantised slots first, then ``k``/``v``'s
    -> ``(k, v [..., Q + C, hd], valid [..., Q + C])``; without ``quant``: the arrays themselves."""
    if quant is None:
        return k, v, valid
    qk, qv = quant.dequantized(k.dtype)
    return (jnp.concatenate([qk, k], axis=-2), jnp.concatenate([qv, v], axis=-2),
            jnp.concatenate([quant.valid, valid], axis=-1))


def materialized(cache: KVCache) -> KVCache:
    """The same cache with its quantised slots dequantised into the model's dtype (slots ``[0, Q)``, then the
    model-dtype slots; ``length`` moved on by ``Q``): the reference the quantised decode is checked against."""
    if cache.quant is None:
        return cache
    k, v, valid = layer_entries(cache.k, cache.v, cache.valid, cache.quant)
    return dataclasses.replace(cache, k=k, v=v, valid=valid, length=cache.length + cache.quant.slots, quant=None)


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


def append_layers(cache: KVCache, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    """Writes one new token's entries of every layer, ``k_new``/``v_new [L, B, Hkv, hd]``, at slot ``length[b]``
    of each row and marks them valid (:func:`append` for all layers at once: one write per step instead of
    one per layer). Does not advance ``length``; inside jit a full cache's write is clamped to the last slot.
    """
    rows = jnp.arange(cache.batch)
    slot = jnp.minimum(cache.length, cache.capacity - 1)
    rows_first = lambda a: jnp.swapaxes(a, 0, 1)  # [L, B, ...] -> [B, L, ...], as the index below orders them
    return dataclasses.replace(
        cache,
        k=cache.k.at[:, rows, :, slot].set(rows_first(k_new).astype(cache.k.dtype)),
        v=cache.v.at[:, rows, :, slot].set(rows_first(v_new).astype(cache.v.dtype)),
        valid=cache.valid.at[:, rows, :, slot].set(True),
    )


def advance(cache: KVCache, n: int = 1) -> KVCache:
    """Moves ``length`` and ``next_position`` on by ``n`` tokens (after every layer appended)."""
    return dataclasses.replace(cache, length=cache.length + n, next_position=cache.next_position + n)


# -------------------------------------------------------------------------------------------- bytes
def kv_bytes_kept(cache: KVCache) -> int:
    """Bytes of K and V in valid slots (what the cache really holds), all layers (host int). Quantised slots
    count their codes and value scales / zero points, and every key group holding a valid slot its key
    scales and zero points."""
    per_slot = 2 * cache.k.shape[-1] * jnp.dtype(cache.k.dtype).itemsize
    held = int(np.sum(np.asarray(cache.valid), dtype=np.int64)) * per_slot
    if cache.quant is not None:
        q = cache.quant
        valid = np.asarray(q.valid)
        per_slot = q.k_codes.shape[-1] + q.v_codes.shape[-1] + 2 * q.v_scale.shape[-1] * Q.PARAM_BYTES
        groups = valid.reshape(*valid.shape[:-1], -1, q.group).any(-1)
        held += int(valid.sum(dtype=np.int64)) * per_slot
        held += int(groups.sum(dtype=np.int64)) * 2 * q.k_scale.shape[-1] * Q.PARAM_BYTES
    return held


def kv_tokens_kept(cache: KVCache) -> int:
    """Entries held in valid slots, quantised or not, all layers and KV heads (host int)."""
    held = int(np.sum(np.asarray(cache.valid), dtype=np.int64))
    return held + (0 if cache.quant is None else int(np.sum(np.asarray(cache.quant.valid), dtype=np.int64)))


def kv_bytes_full(n_tokens, n_layers: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32) -> int:
    """Bytes an unpruned cache needs for ``n_tokens`` real tokens per row (int or per-row sequence)."""
    total = int(np.sum(np.asarray(n_tokens)))
    return total * n_layers * n_kv_heads * 2 * head_dim * jnp.dtype(dtype).itemsize


def kv_bytes_allocated(cache: KVCache) -> int:
    """Bytes of the allocated K/V arrays (static capacity, including unused slots; with quantisation the
    codes, scales and zero points too)."""
    arrays = [cache.k, cache.v]
    if cache.quant is not None:
        q = cache.quant
        arrays += [q.k_codes, q.k_scale, q.k_zero, q.v_codes, q.v_scale, q.v_zero]
    return int(sum(a.size * a.dtype.itemsize for a in arrays))
