"""Prefill and decode attention paths used by ``generate``.

The prefill's non-scoring layers call :func:`prefill_attention`, which never hands probabilities to
anyone: ``"dense"`` is the reference's masked softmax (identical numerics to the model's forward),
``"flash"`` a blocked online softmax that skips the blocks above the causal diagonal (O(block^2) score
memory per head, never the ``[N, N]`` matrix).
Other implementations (e.g. the block-sparse ST-SpAttn kernel) plug in with
:func:`register_prefill_attention`; they receive the layer index so they can apply per-layer patterns.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from models.qwen2_5_vl.layers import dense_attention

from . import cache as C
from . import kv_quant as Q

#: ``fn(q [B,Hq,N,hd], k [B,Hkv,N,hd], v, valid [B,N], layer) -> [B,Hq,N,hd]`` (causal, padding-aware).
PrefillAttention = Callable[..., jax.Array]

#: key block of the flash-style path; "auto" uses the dense path up to AUTO_DENSE_MAX tokens.
FLASH_BLOCK = 128
AUTO_DENSE_MAX = 512


def dense_prefill_attention(q, k, v, valid, layer=None):
    """Causal, padding-aware dense attention (the model's own ``dense_attention``)."""
    n = q.shape[2]
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None] & valid[:, None, None, :]
    return dense_attention(q, k, v, mask)


def flash_prefill_attention(q, k, v, valid, layer=None, block: int | None = None):
    """Causal, padding-aware attention as an online softmax over key blocks (float32 statistics).

    ``q [B, Hq, N, hd]``, ``k, v [B, Hkv, N, hd]``, ``valid [B, N]`` -> ``[B, Hq, N, hd]``. Query block ``i``
    (``lax.map``) visits key blocks ``0..i`` only (``fori_loop`` with a traced trip count): the blocks above
    the causal diagonal are never computed, about half the work of a full key sweep (timings against the
    full sweep and the dense path: ``benchmarks/results/prefill_attention_cpu.md``). Memory O(block^2) per
    head for the scores; the probabilities are never materialised.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    block = min(FLASH_BLOCK if block is None else block, n)
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        p4 = ((0, 0), (0, 0), (0, pad), (0, 0))
        q, k, v = jnp.pad(q, p4), jnp.pad(k, p4), jnp.pad(v, p4)
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    qb = q.reshape(b, hkv, g, nb, block, d).transpose(3, 0, 1, 2, 4, 5)  # [nb, B, Hkv, G, block, hd]
    kb = k.reshape(b, hkv, nb, block, d).transpose(2, 0, 1, 3, 4)  # [nb, B, Hkv, block, hd]
    vb = v.reshape(b, hkv, nb, block, d).transpose(2, 0, 1, 3, 4)
    validb = valid.reshape(b, nb, block).transpose(1, 0, 2)  # [nb, B, block]
    offs = jnp.arange(block)
    scale = d**-0.5

    def query_block(xs):
        i, qi = xs
        qpos = i * block + offs

        def body(j, carry):
            m, l, acc = carry
            kj, vj, valj = kb[j], vb[j], validb[j]
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale
            mask = ((j * block + offs)[None, :] <= qpos[:, None])[None, None, None] & valj[:, None, None, None, :]
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.where(mask, jnp.exp(s - m_safe[..., None]), 0.0)
            alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bhgqk,bhkd->bhgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
            )
            return m_new, l, acc

        init = (
            jnp.full((b, hkv, g, block), -jnp.inf, jnp.float32),
            jnp.zeros((b, hkv, g, block), jnp.float32),
            jnp.zeros((b, hkv, g, block, d), jnp.float32),
        )
        _, l, acc = jax.lax.fori_loop(0, i + 1, body, init)
        return acc / jnp.where(l > 0, l, 1.0)[..., None]

    out = jax.lax.map(query_block, (jnp.arange(nb), qb))  # [nb, B, Hkv, G, block, hd]
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, hq, nb * block, d)[:, :, :n]
    return out.astype(q.dtype)


_PREFILL_IMPLS: dict[str, PrefillAttention] = {
    "dense": dense_prefill_attention,
    "flash": flash_prefill_attention,
}


def register_prefill_attention(name: str, fn: PrefillAttention) -> None:
    """Makes ``fn`` selectable as ``generate(..., attention=name)`` (e.g. a block-sparse kernel)."""
    _PREFILL_IMPLS[name] = fn


def prefill_attention_impl(name: "str | PrefillAttention", n: int) -> PrefillAttention:
    """The implementation called ``name`` (or ``name`` itself when it is a callable, e.g. a kernel closed
    over a static per-prompt layout); ``"auto"`` is dense up to :data:`AUTO_DENSE_MAX` tokens, flash above.

    Note for layout-aware kernels: ``generate`` runs the prefill left-padded to a bucket of ``N`` tokens,
    so a row with ``n`` real tokens occupies positions ``[N - n, N)``.
    """
    if callable(name):
        return name
    if name == "auto":
        name = "dense" if n <= AUTO_DENSE_MAX else "flash"
    if name not in _PREFILL_IMPLS:
        raise ValueError(f"attention={name!r} is not one of {sorted(_PREFILL_IMPLS) + ['auto']}")
    return _PREFILL_IMPLS[name]


def masked_softmax(scores, mask):
    """Softmax of float32 ``scores`` over the last axis where ``mask`` (broadcastable) holds; a fully masked
    row gives zeros, not NaN (the model's ``dense_attention`` numerics)."""
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def decode_attention(q, k_cache, v_cache, valid, k_new=None, v_new=None):
    """One new query per row over the cache: ``q [B,Hq,1,hd]``, ``k_cache``/``v_cache`` ``[B,Hkv,C,hd]``,
    ``valid [B,Hkv,C]`` (per KV head) -> ``[B,Hq,1,hd]``; with ``k_new``/``v_new [B,Hkv,1,hd]`` (the step's
    own entry, not written into the cache yet) one softmax over the valid slots and that entry."""
    if k_new is None:
        g = q.shape[1] // k_cache.shape[1]
        return dense_attention(q, k_cache, v_cache, jnp.repeat(valid, g, axis=1)[:, :, None, :])
    b, hq, _, d = q.shape
    hkv = k_cache.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    scores = jnp.concatenate([jnp.einsum("bhgd,bhcd->bhgc", qg, k_cache, preferred_element_type=jnp.float32),
                              jnp.einsum("bhgd,bhcd->bhgc", qg, k_new, preferred_element_type=jnp.float32)], -1)
    mask = jnp.concatenate([valid, jnp.ones(valid.shape[:2] + (1,), bool)], -1)[:, :, None, :]
    p = masked_softmax(scores * d**-0.5, mask).astype(v_cache.dtype)
    out = jnp.einsum("bhgc,bhcd->bhgd", p[..., :-1], v_cache, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bhgc,bhcd->bhgd", p[..., -1:], v_new, preferred_element_type=jnp.float32)
    return out.reshape(b, hq, 1, d).astype(q.dtype)


def cache_decode_attention(q, cache: C.KVCache, layer, k_new=None, v_new=None):
    """:func:`decode_attention` of ``q [B,Hq,1,hd]`` over layer ``layer`` (static or traced) of ``cache``: its
    model-dtype slots, with a quantised cache its codes too (:func:`quantized_decode_attention`), and the
    step's own entry ``k_new``/``v_new [B,Hkv,1,hd]`` when given. Taking the new entry apart lets the decode
    read each layer's cache without writing it inside its layer loop (it appends every layer's entry once,
    after the loop: :func:`purekv_jax.cache.append_layers`)."""
    k, v, valid = cache.k[layer], cache.v[layer], cache.valid[layer]
    if cache.quant is None:
        return decode_attention(q, k, v, valid, k_new, v_new)
    if k_new is not None:
        k, v = jnp.concatenate([k, k_new.astype(k.dtype)], 2), jnp.concatenate([v, v_new.astype(v.dtype)], 2)
        valid = jnp.concatenate([valid, jnp.ones(valid.shape[:2] + (1,), bool)], -1)
    return quantized_decode_attention(q, cache.quant.layer(layer), k, v, valid)


def quantized_decode_attention(q, quant: C.QuantizedKV, k, v, valid):
    """One new query per row over one layer's quantised slots (``quant``: ``[B,Hkv,Q,...]``, the layout of
    :class:`~purekv_jax.cache.QuantizedKV`) and model-dtype slots ``k``/``v [B,Hkv,C,hd]``, ``valid
    [B,Hkv,C]`` -> ``[B,Hq,1,hd]``: one softmax over both (float32), as :func:`decode_attention` over the
    dequantised cache.

    The codes are never dequantised: the scales and zero points move to the other operand (KIVI's
    arithmetic). Keys (a scale ``s`` and zero ``z`` per channel and group of slots):
    ``q . k_t = (q * s_group) . code_t + q . z_group``; values (per slot and group of channels):
    ``sum_t p_t v_t = sum_t (p_t * s_t) code_t + sum_t p_t z_t``. Each step reads the codes once, as
    floats, instead of writing and reading dequantised keys and values.
    """
    f32 = jnp.float32
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g, d)
    n_kgroups, n_quant, n_vgroups = quant.k_scale.shape[-2], quant.slots, quant.v_scale.shape[-1]
    k_codes = Q.unpack_codes(quant.k_codes, quant.bits).astype(f32).reshape(b, hkv, n_kgroups, -1, d)
    k_scale, k_zero = quant.k_scale.astype(f32), quant.k_zero.astype(f32)  # [B, Hkv, Q / group, hd]
    scores_q = (jnp.einsum("bhgnd,bhntd->bhgnt", qg.astype(f32)[:, :, :, None] * k_scale[:, :, None], k_codes)
                + jnp.einsum("bhgd,bhnd->bhgn", qg.astype(f32), k_zero)[..., None]).reshape(b, hkv, g, n_quant)
    scores_f = jnp.einsum("bhgd,bhcd->bhgc", qg, k, preferred_element_type=f32)
    scores = jnp.concatenate([scores_q, scores_f], axis=-1) * d**-0.5
    p = masked_softmax(scores, jnp.concatenate([quant.valid, valid], axis=-1)[:, :, None, :])
    p_q, p_f = p[..., :n_quant], p[..., n_quant:]
    v_codes = Q.unpack_codes(quant.v_codes, quant.bits).astype(f32).reshape(b, hkv, n_quant, n_vgroups, -1)
    v_scale, v_zero = quant.v_scale.astype(f32), quant.v_zero.astype(f32)  # [B, Hkv, Q, hd / group]
    out = jnp.einsum("bhgtn,bhtnc->bhgnc", p_q[..., None] * v_scale[:, :, None], v_codes).reshape(b, hkv, g, d)
    out = out + jnp.repeat(jnp.einsum("bhgt,bhtn->bhgn", p_q, v_zero), d // n_vgroups, axis=-1)
    out = out + jnp.einsum("bhgc,bhcd->bhgd", p_f.astype(v.dtype), v, preferred_element_type=f32)
    return out.reshape(b, hq, 1, d).astype(q.dtype)
