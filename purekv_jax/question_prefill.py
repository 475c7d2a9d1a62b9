"""The append-prefill: a block of new tokens (a question, or a turn of a conversation) run over a kept cache.

Each of the ``T`` new tokens attends to every valid slot of the cache and, causally, to the block's own
earlier tokens; its rotary position continues from the cache's logical next position (``next_position +
rope_delta + t``, text positions: the three M-RoPE rows equal), whatever the prefill pruned. The block's
K/V are then written into the cache, so a later block or the decode sees them, and the logits of each row's
last real token come back. Nothing of the earlier prompt is recomputed: a video is encoded once.

Blocks are right-padded to a bucket of ``T`` tokens (``q_valid [B, T]``): padding is neither attended to nor
kept, and each row moves on by its own count of real tokens. How the block is written is a static ``kv_step``
object (its ``attend_block`` and ``advance``): :class:`ContiguousAppend` appends at slot ``length``
(the cache grows); :class:`purekv_jax.decode_budget.EvictingKV` evicts to stay within a fixed number of slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.family import text_stack
from models.qwen2_5_vl.config import TextConfig
from models.qwen2_5_vl.model import text_part

from . import cache as C
from .compile_cache import count_trace
from .prefill import scan_layers


def block_attention(q, k_cache, v_cache, cache_valid, k_new, v_new, q_valid):
    """Attention of a block of new tokens over a cache and themselves (float32 softmax).

    q ``[B, Hq, T, hd]``; k_cache / v_cache ``[B, Hkv, S, hd]`` with cache_valid ``[B, Hkv, S]``; k_new / v_new
    ``[B, Hkv, T, hd]``; q_valid ``[B, T]`` (real tokens of the block). Returns ``(attn [B, Hq, T, hd],
    probs [B, Hkv, T, S + T])``: ``probs`` are the attention probabilities averaged over the query heads of
    each KV group (zero for padded queries), what a decode-time budget scores the slots by.
    """
    b, hq, t, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    keys = jnp.concatenate([k_cache, k_new.astype(k_cache.dtype)], axis=2)
    values = jnp.concatenate([v_cache, v_new.astype(v_cache.dtype)], axis=2)
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = jnp.concatenate([
        jnp.broadcast_to(cache_valid[:, :, None, :], (b, hkv, t, cache_valid.shape[-1])),
        jnp.broadcast_to((causal[None] & q_valid[:, None, :])[:, None], (b, hkv, t, t)),
    ], axis=-1) & q_valid[:, None, :, None]  # [B, Hkv, T, S + T]
    qg = q.reshape(b, hkv, g, t, d)
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg, keys, preferred_element_type=jnp.float32) * d**-0.5
    m = mask[:, :, None]
    scores = jnp.where(m, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(m, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return out.reshape(b, hq, t, d).astype(q.dtype), jnp.mean(p, axis=2)


def write_rows(buffer, block, start):
    """``buffer [B, H, C, ...]`` with each row's ``block [B, H, T, ...]`` written at slots ``[start[b], start[b] + T)``
    (``start [B]``; the caller checks that it fits: XLA would clamp the start)."""
    def one(buf, blk, s):
        return jax.lax.dynamic_update_slice_in_dim(buf, blk.astype(buf.dtype), s, axis=1)

    return jax.vmap(one)(buffer, block, start)


@dataclasses.dataclass(frozen=True)
class ContiguousAppend:
    """The growing cache's block step: attend over every valid slot (quantised ones dequantised), then write the
    block at slots ``[length, length + T)`` of the model-dtype region (and its tokens' logical positions into
    ``token_index``), padding marked invalid; the next block (or decode token) overwrites those padded slots."""

    def attend_block(self, cache: C.KVCache, layer, q, k, v, q_valid):
        """-> ``(attn [B, Hq, T, hd], cache)`` with layer ``layer``'s block written."""
        quant = None if cache.quant is None else cache.quant.layer(layer)
        kc, vc, valid = C.layer_entries(cache.k[layer], cache.v[layer], cache.valid[layer], quant)
        attn, _ = block_attention(q, kc, vc, valid, k, v, q_valid)
        b, heads, t = k.shape[:3]
        mark = jnp.broadcast_to(q_valid[:, None, :], (b, heads, t))
        index = jnp.where(mark, (cache.next_position[:, None] + jnp.arange(t, dtype=jnp.int32))[:, None], -1)
        at = cache.length + cache.quantized_slots  # token_index counts the quantised slots first
        written = dataclasses.replace(
            cache,
            k=cache.k.at[layer].set(write_rows(cache.k[layer], k, cache.length)),
            v=cache.v.at[layer].set(write_rows(cache.v[layer], v, cache.length)),
            valid=cache.valid.at[layer].set(write_rows(cache.valid[layer], mark, cache.length)),
        )
        if cache.token_index is None:  # (a cache built without the record keeps none)
            return attn, written
        return attn, dataclasses.replace(
            written, token_index=cache.token_index.at[layer].set(write_rows(cache.token_index[layer], index, at)))

    def advance(self, cache: C.KVCache, n) -> C.KVCache:
        """The cache moved on by ``n [B]`` real tokens per row."""
        return C.advance(cache, n)


def question_prefill(params, cache, ids, q_valid, *, cfg: TextConfig, kv_step):
    """Runs the block ``ids [B, T]`` (``q_valid [B, T]``: real tokens first, then padding; at least one per
    row) over ``cache`` -> ``(cache with the block written, logits [B, V] float32 of each row's last real
    token)``. ``cache`` is whatever ``kv_step`` (static) works on; it has ``decode_positions()``."""
    count_trace("question_prefill")
    text = text_part(params)
    n = jnp.sum(q_valid, axis=-1, dtype=jnp.int32)
    t = ids.shape[1]
    positions = cache.decode_positions()[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    stack = text_stack(cfg)
    cos, sin = stack.cos_sin(positions, cfg)
    x = jnp.take(text.embed, ids, axis=0)

    def step(state, layer, q, k, v):
        attn, state = kv_step.attend_block(state, layer, q, k, v, q_valid)
        return attn, state, None

    x, cache, _ = scan_layers(text, cfg, x, cos, sin, (0, cfg.num_hidden_layers), step, cache)
    cache = kv_step.advance(cache, n)
    last = jnp.take_along_axis(x, (n - 1)[:, None, None], axis=1)  # [B, 1, D]
    return cache, stack.final_logits(text, last, cfg)[:, 0]
