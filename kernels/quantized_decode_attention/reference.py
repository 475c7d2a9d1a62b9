"""The dense float32 twin: dequantise every slot, then one masked softmax (what every backend must match)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.quantized_decode_attention.codes import dequantize_keys, dequantize_values
from kernels.quantized_decode_attention.partials import Partials
from kernels.quantized_decode_attention.slots import QuantizedSlots

__all__ = ["reference_partials"]


def reference_partials(q: jax.Array, slots: QuantizedSlots, scale: float) -> Partials:
    """``q [B, Hkv, G, hd]`` over the dequantised slots -> ``(acc [B, Hkv, G, hd], m, l [B, Hkv, G])``."""
    f32 = jnp.float32
    k = dequantize_keys(slots.k_codes, slots.k_scale, slots.k_zero, slots.bits)
    v = dequantize_values(slots.v_codes, slots.v_scale, slots.v_zero, slots.bits)
    s = jnp.einsum("bhgd,bhtd->bhgt", q.astype(f32), k, precision="highest") * scale
    mask = slots.valid[:, :, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[..., None]), 0.0)
    return jnp.einsum("bhgt,bhtd->bhgd", p, v, precision="highest"), m, jnp.sum(p, axis=-1)
