"""Quantised cache slots, as the cache stores them and the kernels read them."""

from __future__ import annotations

import dataclasses

import jax

from kernels.quantized_decode_attention.codes import dequantize_keys, dequantize_values

__all__ = ["QuantizedSlots"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedSlots:
    """``Q`` quantised slots per row and KV head: keys per channel over groups of ``g`` slots, values per slot
    over groups of ``g`` channels, in the format of :mod:`kernels.quantized_decode_attention.codes`.

    k_codes / v_codes ``[..., Q, hd * bits / 8]`` uint8; k_scale / k_zero ``[..., Q / g, hd]``; v_scale /
    v_zero ``[..., Q, hd / g]`` (float16 as stored); valid ``[..., Q]`` bool; bits: the code width (static).
    ``...`` is ``[B, Hkv]`` for one layer (what the kernels take) and ``[L, B, Hkv]`` for a whole cache.
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
        """Slots per key scale."""
        return self.slots // self.k_scale.shape[-2]

    def layer(self, layer) -> "QuantizedSlots":
        """The slice at ``layer`` of the leading axis (static or traced index)."""
        return jax.tree.map(lambda a: a[layer], self)

    def dequantized(self, dtype) -> tuple[jax.Array, jax.Array]:
        """``(k, v [..., Q, hd])`` in ``dtype``."""
        k = dequantize_keys(self.k_codes, self.k_scale, self.k_zero, self.bits)
        v = dequantize_values(self.v_codes, self.v_scale, self.v_zero, self.bits)
        return k.astype(dtype), v.astype(dtype)
