"""The packed code format the quantised-cache kernels read (the kernel package owns it, as the block-sparse
package owns its mask geometry).

``bits``-wide codes (8, 4 or 2) are packed ``p = 8 // bits`` per byte: code ``p * i + j`` of a row sits in
bits ``[j * bits, (j + 1) * bits)`` of byte ``i`` (4-bit: channel ``2i`` in the low nibble; 8-bit codes are
the bytes themselves). So byte column ``i`` of "phase" ``j`` holds channel ``p * i + j``: a kernel that
shifts and masks a whole row of bytes by ``j * bits`` gets the channels ``j::p`` without any interleaving.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["CODE_BITS", "codes_per_byte", "dequantize_keys", "dequantize_values", "pack_codes", "phase_merge",
           "phase_split", "unpack_codes"]

#: the code widths the format holds.
CODE_BITS = (8, 4, 2)


def codes_per_byte(bits: int) -> int:
    if bits not in CODE_BITS:
        raise ValueError(f"code width bits={bits} is not one of {CODE_BITS}")
    return 8 // bits


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """``[..., p * m]`` uint8 codes in ``[0, 2**bits)`` -> ``[..., m]`` uint8 (the format above)."""
    per = codes_per_byte(bits)
    if per == 1:
        return codes
    parts = codes.reshape(*codes.shape[:-1], -1, per) << (bits * jnp.arange(per, dtype=jnp.uint8))
    return jnp.bitwise_or.reduce(parts, axis=-1)


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: ``[..., m]`` uint8 -> ``[..., p * m]`` uint8."""
    per = codes_per_byte(bits)
    if per == 1:
        return packed
    parts = (packed[..., None] >> (bits * jnp.arange(per, dtype=jnp.uint8))) & jnp.uint8(2**bits - 1)
    return parts.reshape(*packed.shape[:-1], per * packed.shape[-1])


def phase_split(x: jax.Array, bits: int) -> jax.Array:
    """``[..., hd]`` -> ``[..., p, hd / p]``: channel ``p * i + j`` at ``[j, i]`` (the channels each phase of a
    packed row holds)."""
    per = codes_per_byte(bits)
    return jnp.swapaxes(x.reshape(*x.shape[:-1], -1, per), -1, -2)


def phase_merge(x: jax.Array) -> jax.Array:
    """Inverse of :func:`phase_split`: ``[..., p, hd / p]`` -> ``[..., hd]``."""
    return jnp.swapaxes(x, -1, -2).reshape(*x.shape[:-2], -1)


def dequantize_keys(codes: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """Keys stored per channel over groups of slots: ``codes [..., S, hd * bits / 8]`` uint8, ``scale`` /
    ``zero [..., S / g, hd]`` -> ``[..., S, hd]`` float32 (``code * scale + zero``)."""
    *lead, s, _ = codes.shape
    ng, d = scale.shape[-2:]
    x = unpack_codes(codes, bits).astype(jnp.float32).reshape(*lead, ng, s // ng, d)
    return (x * scale.astype(jnp.float32)[..., None, :] + zero.astype(jnp.float32)[..., None, :]).reshape(*lead, s, d)


def dequantize_values(codes: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """Values stored per slot over groups of channels: ``codes [..., S, hd * bits / 8]`` uint8, ``scale`` /
    ``zero [..., S, hd / g]`` -> ``[..., S, hd]`` float32."""
    ng = scale.shape[-1]
    x = unpack_codes(codes, bits).astype(jnp.float32)
    d = x.shape[-1]
    x = x.reshape(*x.shape[:-1], ng, d // ng)
    return (x * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]).reshape(*x.shape[:-2], d)
