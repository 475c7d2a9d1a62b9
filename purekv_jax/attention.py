"""Prefill and decode attention paths used by ``generate``.

The prefill's non-scoring layers call the implementation :func:`prefill_attention_impl` picks, which never
hands probabilities to anyone: ``"dense"`` is the reference's masked softmax (identical numerics to the
model's forward), ``"flash"`` a blocked online softmax that skips the blocks above the causal diagonal
(O(block^2) score memory per head, never the ``[N, N]`` matrix), ``"cudnn"`` cuDNN's fused flash attention
through ``jax.nn.dot_product_attention`` (padding by per-row lengths, no mask tensor; the flash / dense
path where cuDNN does not apply). ``"auto"`` is cuDNN on a GPU, dense / flash elsewhere.
Other implementations (e.g. the block-sparse ST-SpAttn kernel) plug in with
:func:`register_prefill_attention`; they receive the layer index so they can apply per-layer patterns.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kernels.quantized_decode_attention import quantized_decode_attention as kernel_decode_attention
from models.qwen2_5_vl.layers import dense_attention

from . import cache as C

#: ``fn(q [B,Hq,N,hd], k [B,Hkv,N,hd], v, valid [B,N], layer) -> [B,Hq,N,hd]`` (causal, padding-aware).
PrefillAttention = Callable[..., jax.Array]

#: key block of the flash-style path; "auto" uses the dense path up to AUTO_DENSE_MAX tokens (off a GPU).
FLASH_BLOCK = 128
AUTO_DENSE_MAX = 512
#: what cuDNN's fused flash attention takes (sm80 and later): these dtypes, head_dim a multiple of 8 up to
#: CUDNN_HEAD_DIM_MAX (Hopper takes 256; 128 holds on every generation)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_HEAD_DIM_MAX = 128
GPU_BACKENDS = ("gpu", "cuda")


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


def xla_prefill_attention(q, k, v, valid, layer=None):
    """The XLA path for ``N`` tokens: :func:`dense_prefill_attention` up to :data:`AUTO_DENSE_MAX`,
    :func:`flash_prefill_attention` above."""
    fn = dense_prefill_attention if q.shape[2] <= AUTO_DENSE_MAX else flash_prefill_attention
    return fn(q, k, v, valid, layer)


def right_aligned(x, shift):
    """``x [B, H, N, D]`` with row ``b`` moved ``shift[b]`` places towards the front (cyclically), laid out
    ``[B, N, H, D]`` for ``jax.nn.dot_product_attention``: a left-padded row becomes a right-padded one.
    One gather; XLA fuses the layout transpose into it."""
    n = x.shape[2]
    src = (jnp.arange(n)[None] + shift[:, None]) % n  # [B, N]: new position i reads old i + shift
    return jnp.take_along_axis(x, src[:, None, :, None], axis=2).transpose(0, 2, 1, 3)


def sdpa_prefill_attention(q, k, v, valid, layer=None, implementation=None):
    """Causal attention of left-padded rows through ``jax.nn.dot_product_attention`` with per-row lengths.

    ``q [B, Hq, N, hd]``, ``k, v [B, Hkv, N, hd]``, ``valid [B, N]`` (a row's real tokens are its last
    ones: ``generate`` left-pads) -> ``[B, Hq, N, hd]``, padding query rows 0. cuDNN (and the XLA
    implementation) express padding as per-row lengths of a right-padded batch, without an ``[N, N]`` mask
    tensor; so each row is rotated so that its real tokens come first, attended with
    ``query_seq_lengths = key_value_seq_lengths = `` its real count and ``is_causal`` (cuDNN's
    PADDING_CAUSAL mask), and rotated back. Causality among the real tokens is unchanged by the rotation.
    ``implementation``: ``"cudnn"``, ``"xla"`` or None (jax's default, XLA).
    """
    n = q.shape[2]
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    shift = n - lengths
    out = jax.nn.dot_product_attention(
        right_aligned(q, shift), right_aligned(k, shift), right_aligned(v, shift), is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
    back = (jnp.arange(n)[None] - shift[:, None]) % n  # [B, N]: old position p reads new p - shift
    out = jnp.take_along_axis(out, back[:, :, None, None], axis=1).transpose(0, 2, 1, 3)
    return jnp.where(valid[:, None, :, None], out, 0).astype(q.dtype)


def cudnn_applies(q) -> bool:
    """Whether cuDNN's fused attention takes ``q [B, Hq, N, hd]`` here: a GPU backend, a dtype in
    :data:`CUDNN_DTYPES`, ``hd`` a multiple of 8 up to :data:`CUDNN_HEAD_DIM_MAX` (static: decided at trace
    time)."""
    d = q.shape[-1]
    return (jax.default_backend() in GPU_BACKENDS and q.dtype in CUDNN_DTYPES and d % 8 == 0
            and d <= CUDNN_HEAD_DIM_MAX)


def cudnn_prefill_attention(q, k, v, valid, layer=None):
    """:func:`sdpa_prefill_attention` on cuDNN where :func:`cudnn_applies`, else
    :func:`xla_prefill_attention` (the flash scan above :data:`AUTO_DENSE_MAX` tokens)."""
    if cudnn_applies(q):
        return sdpa_prefill_attention(q, k, v, valid, layer, implementation="cudnn")
    return xla_prefill_attention(q, k, v, valid, layer)


_PREFILL_IMPLS: dict[str, PrefillAttention] = {
    "dense": dense_prefill_attention,
    "flash": flash_prefill_attention,
    "cudnn": cudnn_prefill_attention,
}


def register_prefill_attention(name: str, fn: PrefillAttention) -> None:
    """Makes ``fn`` selectable as ``generate(..., attention=name)`` (e.g. a block-sparse kernel)."""
    _PREFILL_IMPLS[name] = fn


def prefill_attention_impl(name: "str | PrefillAttention", n: int) -> PrefillAttention:
    """The implementation called ``name`` (or ``name`` itself when it is a callable, e.g. a kernel closed
    over a static per-prompt layout); ``"auto"`` is ``"cudnn"`` on a GPU (which falls back to the XLA path
    for what cuDNN does not take), elsewhere dense up to :data:`AUTO_DENSE_MAX` tokens and flash above.

    Note for layout-aware kernels: ``generate`` runs the prefill left-padded to a bucket of ``N`` tokens,
    so a row with ``n`` real tokens occupies positions ``[N - n, N)``.
    """
    if callable(name):
        return name
    if name == "auto":
        if jax.default_backend() in GPU_BACKENDS:
            return cudnn_prefill_attention
        name = "dense" if n <= AUTO_DENSE_MAX else "flash"
    if name not in _PREFILL_IMPLS:
        raise ValueError(f"attention={name!r} is not one of {sorted(_PREFILL_IMPLS) + ['auto']}")
    return _PREFILL_IMPLS[name]


def decode_attention(q, k_cache, v_cache, valid):
    """One new query per row over the cache: ``q [B,Hq,1,hd]``, ``k_cache``/``v_cache`` ``[B,Hkv,C,hd]``,
    ``valid [B,Hkv,C]`` (per KV head) -> ``[B,Hq,1,hd]``; float32 scores and softmax, a row with no valid slot
    gives zeros (as the model's ``dense_attention`` under the same mask).

    Laid out for the dots of a single query: the query heads of a KV group are one operand ``[B,Hkv,G,hd]``
    (K/V never repeated per query head, the mask broadcast over the group), and the keys are the scores' left
    operand (``[C, hd] x [hd, G]`` per KV head), which a dot reads as the cache stores them; with the keys on
    the right, XLA on the CPU first copies each layer's keys transposed."""
    b, hq, _, d = q.shape
    hkv = k_cache.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    scores = jnp.einsum("bhcd,bhgd->bhcg", k_cache, qg, preferred_element_type=jnp.float32) * d**-0.5
    mask = valid[..., None]  # [B, Hkv, C, 1]
    scores = jnp.where(mask, scores, -jnp.inf)
    top = jnp.max(scores, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(mask, jnp.exp(scores - top), 0.0)
    denom = jnp.sum(p, axis=2, keepdims=True)
    probs = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhcg,bhcd->bhgd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, hq, 1, d).astype(q.dtype)


def cache_decode_attention(q, cache: C.KVCache, layer, kv_decode: str = "xla"):
    """:func:`decode_attention` of ``q [B,Hq,1,hd]`` over layer ``layer`` (static or traced) of ``cache``: its
    model-dtype slots, and with a quantised cache its codes too (:func:`quantized_decode_attention`, read by
    the ``kv_decode`` path)."""
    k, v, valid = cache.k[layer], cache.v[layer], cache.valid[layer]
    if cache.quant is None:
        return decode_attention(q, k, v, valid)
    return quantized_decode_attention(q, cache.quant.layer(layer), k, v, valid, kv_decode)


def quantized_decode_attention(q, quant: C.QuantizedKV, k, v, valid, kv_decode: str = "xla"):
    """One new query per row over one layer's quantised slots (``quant``: ``[B,Hkv,Q,...]``) and model-dtype
    slots ``k``/``v [B,Hkv,C,hd]``, ``valid [B,Hkv,C]`` -> ``[B,Hq,1,hd]``: one float32 softmax over both, as
    :func:`decode_attention` over the dequantised cache. The codes are never dequantised into a copy: the
    ``kv_decode`` path (``"xla"``: KIVI's arithmetic, scales and zero points moved to the other operand;
    ``"pallas"``: the kernel) reads them as they are (:mod:`kernels.quantized_decode_attention`)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    out = kernel_decode_attention(q.reshape(b, hkv, hq // hkv, d), quant, k, v, valid, backend=kv_decode,
                                  interpret=jax.default_backend() == "cpu")
    return out.reshape(b, hq, 1, d).astype(q.dtype)
