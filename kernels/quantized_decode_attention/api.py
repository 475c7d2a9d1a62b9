"""Decode attention over a cache layer whose older slots are quantised: one entry point, a backend switch.

``backend``: ``"xla"`` (KIVI's arithmetic on the codes, :mod:`.xla`), ``"pallas"`` (the Pallas kernel,
:mod:`.pallas`: Triton on a GPU, Mosaic on a TPU, ``interpret=True`` on the CPU) or ``"reference"`` (the
dense float32 twin).
"""

from __future__ import annotations

import jax

from kernels.quantized_decode_attention.pallas import pallas_partials
from kernels.quantized_decode_attention.partials import Partials, dense_partials, merge_partials, normalize
from kernels.quantized_decode_attention.reference import reference_partials
from kernels.quantized_decode_attention.slots import QuantizedSlots
from kernels.quantized_decode_attention.xla import xla_partials

__all__ = ["DECODE_BACKENDS", "quantized_partials", "quantized_decode_attention"]

#: the backends :func:`quantized_partials` takes.
DECODE_BACKENDS = ("xla", "pallas", "reference")


def quantized_partials(q: jax.Array, slots: QuantizedSlots, *, scale: float | None = None, backend: str = "xla",
                       interpret: bool = False) -> Partials:
    """Softmax partials of ``q [B, Hkv, G, hd]`` (G query heads per KV head) over one layer's quantised
    ``slots`` (``[B, Hkv, Q, ...]``) -> ``(acc [B, Hkv, G, hd], m, l [B, Hkv, G])`` float32."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"quantised decode backend={backend!r} is not one of {DECODE_BACKENDS}")
    if q.ndim != 4 or slots.k_codes.shape[:2] != q.shape[:2]:
        raise ValueError(f"q must be [B, Hkv, G, hd] matching the slots' [B, Hkv] = {slots.k_codes.shape[:2]}, "
                         f"got q {q.shape}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "pallas":
        target = "triton" if jax.default_backend() == "gpu" and not interpret else None
        return pallas_partials(q, slots, scale, interpret=interpret, target=target)
    if backend == "reference":
        return reference_partials(q, slots, scale)
    return xla_partials(q, slots, scale)


def quantized_decode_attention(q: jax.Array, slots: QuantizedSlots, k: jax.Array, v: jax.Array, valid: jax.Array,
                               *, scale: float | None = None, backend: str = "xla", interpret: bool = False
                               ) -> jax.Array:
    """One softmax of ``q [B, Hkv, G, hd]`` over a layer's quantised ``slots`` and its model-dtype slots
    ``k``/``v [B, Hkv, C, hd]`` (``valid [B, Hkv, C]``) -> ``[B, Hkv, G, hd]`` float32 (zero for a row and
    head with no valid slot)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    coded = quantized_partials(q, slots, scale=scale, backend=backend, interpret=interpret)
    return normalize(merge_partials([coded, dense_partials(q, k, v, valid, scale)]))
