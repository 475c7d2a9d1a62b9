"""KIVI-style quantisation of cached keys and values (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache").

Keys are quantised **per channel**: every ``group`` consecutive cache slots of one channel share a scale and
a zero point (a key's outlier channels keep their own range). Values are quantised **per token**: every
``group`` consecutive channels of one slot share a scale and a zero point (the attention output mixes
values across tokens, so per-token error does not pile up in one channel). The quantisation is asymmetric
(``x ~= code * scale + zero``, ``code`` in ``[0, 2**bits - 1]``), the scales and zero points are stored as
float16 beside the codes, and narrower codes are packed into bytes (:func:`pack_codes`: 4-bit codes two per
byte, channel ``2i`` in the low nibble; 2-bit codes four per byte, lowest bits first).

The stored float16 zero point is rounded down and the stored scale up, and the codes are computed from
the stored values, so no code is clipped and the round trip's error is at most half the stored scale
(plus float32 rounding) for every entry of a group: the bound the tests check against a float64
reference.

Shapes (any leading axes ``...``; ``S`` slots, ``hd`` channels, ``g`` = ``group``):
keys ``[..., S, hd]`` -> codes ``[..., S, hd * bits / 8]`` uint8, scale / zero ``[..., S / g, hd]`` float16;
values ``[..., S, hd]`` -> codes ``[..., S, hd * bits / 8]`` uint8, scale / zero ``[..., S, hd / g]`` float16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.quantized_decode_attention.codes import CODE_BITS, pack_codes

#: the code widths a cache can hold.
KV_BITS = CODE_BITS
#: bytes of one stored scale or zero point (float16).
PARAM_BYTES = 2


@dataclasses.dataclass(frozen=True)
class QuantLayout:
    """How a cache quantises its prompt slots (hashable: part of the static plan).

    bits: code width (:data:`KV_BITS`); group: slots per key scale and channels per value scale; slots: the
    quantised prompt slots per layer and KV head (a multiple of ``group``; the rest of the cache, the most
    recent kept tokens and the decoded ones, stays in the model's dtype).
    """

    bits: int
    group: int
    slots: int

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise ValueError(f"QuantLayout.bits={self.bits} is not one of {KV_BITS}")
        if self.group < 1 or self.slots < 1 or self.slots % self.group:
            raise ValueError(f"QuantLayout.slots={self.slots} must be a positive multiple of group={self.group}")


def token_bytes(head_dim: int, bits: int, group: int) -> float:
    """Bytes one quantised slot costs per KV head: its key and value codes, its value scales and zero points,
    and its share of its key group's scales and zero points."""
    codes = 2 * head_dim * bits / 8
    value_params = 2 * (head_dim // group) * PARAM_BYTES
    key_params = 2 * head_dim * PARAM_BYTES / group
    return codes + value_params + key_params


def _stored_params(lo: jax.Array, hi: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
    """float16 zero point (rounded down from ``lo``) and scale (rounded up), such that ``zero + levels *
    scale >= hi`` in float32; a group of equal entries gets scale 1."""
    zero = lo.astype(jnp.float16)
    zero = jnp.where(zero.astype(jnp.float32) > lo, jnp.nextafter(zero, jnp.float16(-jnp.inf)), zero)
    span = (hi - zero.astype(jnp.float32)) / levels
    scale = span.astype(jnp.float16)
    scale = jnp.where(scale.astype(jnp.float32) < span, jnp.nextafter(scale, jnp.float16(jnp.inf)), scale)
    return zero, jnp.where(span > 0, scale, jnp.float16(1))


def _codes(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    levels = 2**bits - 1
    q = jnp.clip(jnp.round((x - zero.astype(jnp.float32)) / scale.astype(jnp.float32)), 0, levels)
    return pack_codes(q.astype(jnp.uint8), bits)


def quantize_keys(k: jax.Array, valid: jax.Array, bits: int, group: int):
    """Per-channel quantisation of ``k [..., S, hd]`` over groups of ``group`` slots; ``valid [..., S]`` marks
    the slots that take part in a group's range (the others get codes too, but never widen it).
    -> ``(codes [..., S, hd * bits / 8] uint8, scale, zero [..., S / group, hd] float16)``."""
    *lead, s, d = k.shape
    x = k.astype(jnp.float32).reshape(*lead, s // group, group, d)
    m = valid.reshape(*lead, s // group, group, 1)
    lo = jnp.min(jnp.where(m, x, jnp.inf), axis=-2)
    hi = jnp.max(jnp.where(m, x, -jnp.inf), axis=-2)
    empty = ~jnp.any(m, axis=-2)
    lo, hi = jnp.where(empty, 0.0, lo), jnp.where(empty, 0.0, hi)
    zero, scale = _stored_params(lo, hi, 2**bits - 1)
    codes = _codes(x, scale[..., None, :], zero[..., None, :], bits)
    return codes.reshape(*lead, s, -1), scale, zero


def quantize_values(v: jax.Array, bits: int, group: int):
    """Per-token quantisation of ``v [..., S, hd]`` over groups of ``group`` channels
    -> ``(codes [..., S, hd * bits / 8] uint8, scale, zero [..., S, hd / group] float16)``."""
    *lead, d = v.shape
    x = v.astype(jnp.float32).reshape(*lead, d // group, group)
    zero, scale = _stored_params(jnp.min(x, axis=-1), jnp.max(x, axis=-1), 2**bits - 1)
    codes = _codes(x, scale[..., None], zero[..., None], bits)
    return codes.reshape(*lead, -1), scale, zero
