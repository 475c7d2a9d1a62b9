"""The XLA path: attention over the codes with KIVI's arithmetic (no dequantised copy of the keys or values).

Keys (a scale ``s`` and zero ``z`` per channel and group of slots): ``q . k_t = (q * s_group) . code_t +
q . z_group``; values (per slot and group of channels): ``sum_t p_t v_t = sum_t (p_t * s_t) code_t +
sum_t p_t z_t``. Each call reads the codes once, as floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.quantized_decode_attention.codes import unpack_codes
from kernels.quantized_decode_attention.partials import Partials
from kernels.quantized_decode_attention.slots import QuantizedSlots

__all__ = ["xla_partials"]


def xla_partials(q: jax.Array, slots: QuantizedSlots, scale: float) -> Partials:
    """``q [B, Hkv, G, hd]`` over ``slots`` -> ``(acc [B, Hkv, G, hd], m, l [B, Hkv, G])`` float32."""
    f32 = jnp.float32
    b, hkv, g, d = q.shape
    n_kgroups, n_slots, n_vgroups = slots.k_scale.shape[-2], slots.slots, slots.v_scale.shape[-1]
    qf = q.astype(f32)
    k_codes = unpack_codes(slots.k_codes, slots.bits).astype(f32).reshape(b, hkv, n_kgroups, -1, d)
    k_scale, k_zero = slots.k_scale.astype(f32), slots.k_zero.astype(f32)  # [B, Hkv, Q / group, hd]
    s = (jnp.einsum("bhgnd,bhntd->bhgnt", qf[:, :, :, None] * k_scale[:, :, None], k_codes)
         + jnp.einsum("bhgd,bhnd->bhgn", qf, k_zero)[..., None]).reshape(b, hkv, g, n_slots) * scale
    mask = slots.valid[:, :, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[..., None]), 0.0)
    v_codes = unpack_codes(slots.v_codes, slots.bits).astype(f32).reshape(b, hkv, n_slots, n_vgroups, -1)
    v_scale, v_zero = slots.v_scale.astype(f32), slots.v_zero.astype(f32)  # [B, Hkv, Q, hd / group]
    acc = jnp.einsum("bhgtn,bhtnc->bhgnc", p[..., None] * v_scale[:, :, None], v_codes).reshape(b, hkv, g, d)
    acc = acc + jnp.repeat(jnp.einsum("bhgt,bhtn->bhgn", p, v_zero), d // n_vgroups, axis=-1)
    return acc, m, jnp.sum(p, axis=-1)
