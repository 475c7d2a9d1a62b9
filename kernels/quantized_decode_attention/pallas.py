"""Pallas decode attention over quantised slots: one program per (row, KV head, key group).

Each program reads one key group of ``g`` slots (their packed codes, the group's per-channel key scales
and zeros, the slots' value scales and zeros) and the row's ``G`` query heads of that KV head (padded to :func:`padded_heads`), and writes
the group's softmax partials (flash decoding: the groups are merged outside, exactly, by
:func:`~kernels.quantized_decode_attention.partials.merge_partials`). Codes are never widened into a
dequantised copy in memory: each phase ``j`` of a packed byte row (shift ``j * bits``, mask) holds the
channels ``j::p``, so the query and the key scales are split into the same phases outside the kernel and
every product is a plain 2-D dot. GQA: the ``G`` query heads share the program's codes.

Backends: GPU (Triton lowering; ``interpret=True`` on the CPU for tests) and TPU (Mosaic); every block's
last two dimensions are whole array dimensions, as Mosaic asks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.quantized_decode_attention.codes import codes_per_byte, phase_merge, phase_split
from kernels.quantized_decode_attention.partials import Partials, merge_partials
from kernels.quantized_decode_attention.slots import QuantizedSlots

__all__ = ["padded_heads", "pallas_partials"]


def _kernel(q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref, valid_ref, acc_ref, m_ref, l_ref, *,
            bits: int, value_groups: int):
    f32 = jnp.float32
    per = 8 // bits
    low = 2**bits - 1
    contract_last = (((1,), (1,)), ((), ()))
    kc = kc_ref[...].astype(jnp.int32)  # [g, W] packed key codes
    s = None
    for j in range(per):
        qj = q_ref[j]  # [G, W]: the query's channels of phase j, softmax scale applied
        ks, kz = ks_ref[pl.ds(j, 1), :].astype(f32), kz_ref[pl.ds(j, 1), :].astype(f32)  # [1, W]
        codes = ((kc >> (j * bits)) & low).astype(f32)  # [g, W]
        part = lax.dot_general(qj * ks, codes, contract_last, preferred_element_type=f32)  # [G, g]
        part = part + jnp.sum(qj * kz, axis=1, keepdims=True)
        s = part if s is None else s + part
    valid = valid_ref[...] > 0  # [1, g]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.max(s, axis=1, keepdims=True)  # [G, 1]
    p = jnp.where(valid, jnp.exp(s - jnp.where(m > -jnp.inf, m, 0.0)), 0.0)  # [G, g]
    width = kc.shape[1] // value_groups
    for n in range(value_groups):
        cols = pl.ds(n * width, width)
        vs = jnp.transpose(vs_ref[:, pl.ds(n, 1)].astype(f32))  # [1, g]: the slots' scales of value group n
        vz = jnp.transpose(vz_ref[:, pl.ds(n, 1)].astype(f32))
        weighted = p * vs  # p_t * scale_t
        zero = jnp.sum(p * vz, axis=1, keepdims=True)  # [G, 1]
        packed = vc_ref[:, cols].astype(jnp.int32)  # [g, width]
        for j in range(per):
            codes = ((packed >> (j * bits)) & low).astype(f32)
            acc_ref[j, :, cols] = jnp.dot(weighted, codes, preferred_element_type=f32) + zero
    m_ref[...] = jnp.transpose(m)
    l_ref[...] = jnp.transpose(jnp.sum(p, axis=1, keepdims=True))


def _compiler_params(target: str | None):
    if target is None:
        return None
    if target != "triton":
        raise ValueError(f"quantised decode kernel target={target!r}: None (the platform's default) or 'triton'")
    # imported here: jax deprecates the Pallas Triton backend; a jax without it must still import this module
    from jax.experimental.pallas import triton as pl_triton
    return pl_triton.CompilerParams(num_warps=4, num_stages=2)


def padded_heads(g: int) -> int:
    """Query heads per program, padded: a power of two, at least 16 (Triton's smallest dot)."""
    return max(16, 1 << (g - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "target"))
def pallas_partials(q: jax.Array, slots: QuantizedSlots, scale: float, interpret: bool = False,
                    target: str | None = None) -> Partials:
    """``q [B, Hkv, G, hd]`` over ``slots`` (one layer) -> ``(acc [B, Hkv, G, hd], m, l [B, Hkv, G])`` float32.

    ``target``: ``None`` (the platform's Pallas backend: Mosaic on a TPU) or ``"triton"`` (GPU).
    """
    b, hkv, g_real, d = q.shape
    g = padded_heads(g_real)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, g - g_real), (0, 0)))
    bits, group = slots.bits, slots.group
    per = codes_per_byte(bits)
    width = d // per
    n_groups = slots.slots // group
    n_vgroups = slots.v_scale.shape[-1]
    qp = jnp.swapaxes(phase_split(q.astype(jnp.float32) * scale, bits), 2, 3)  # [B, Hkv, P, G, W]
    ks = phase_split(slots.k_scale, bits)  # [B, Hkv, Q / g, P, W]
    kz = phase_split(slots.k_zero, bits)
    valid = slots.valid.astype(jnp.int32).reshape(b, hkv, n_groups, 1, group)
    row = lambda i, h, c: (i, h, 0, 0, 0)
    per_group = lambda i, h, c: (i, h, c, 0, 0)
    slot_rows = lambda i, h, c: (i, h, c, 0)
    acc, m, l = pl.pallas_call(
        functools.partial(_kernel, bits=bits, value_groups=n_vgroups),
        grid=(b, hkv, n_groups),
        in_specs=[
            pl.BlockSpec((None, None, per, g, width), row),
            pl.BlockSpec((None, None, group, width), slot_rows),
            pl.BlockSpec((None, None, None, per, width), per_group),
            pl.BlockSpec((None, None, None, per, width), per_group),
            pl.BlockSpec((None, None, group, width), slot_rows),
            pl.BlockSpec((None, None, group, n_vgroups), slot_rows),
            pl.BlockSpec((None, None, group, n_vgroups), slot_rows),
            pl.BlockSpec((None, None, None, 1, group), per_group),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, per, g, width), lambda i, h, c: (i, h, c, 0, 0, 0)),
            pl.BlockSpec((None, None, None, 1, g), per_group),
            pl.BlockSpec((None, None, None, 1, g), per_group),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, n_groups, per, g, width), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, n_groups, 1, g), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, n_groups, 1, g), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=_compiler_params(target),
    )(qp, slots.k_codes, ks, kz, slots.v_codes, slots.v_scale, slots.v_zero, valid)
    acc = phase_merge(jnp.swapaxes(acc, 3, 4))  # [B, Hkv, n_groups, G, hd]
    acc, m, l = merge_partials((acc, m[:, :, :, 0], l[:, :, :, 0]), axis=2)
    return acc[:, :, :g_real], m[:, :, :g_real], l[:, :, :g_real]
