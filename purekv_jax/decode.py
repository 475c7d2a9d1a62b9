"""The decode: an on-device ``lax.while_loop`` over tokens on a (compressed) KV cache.

Each step embeds the last token, runs the layer stack as a ``lax.scan`` that attends over each layer's valid
slots and the token's own K/V (the cache is only read inside the layer loop), appends every layer's K/V in
one write after it, samples the next token and writes it into the token buffer.
Rows stop at EOS (padded after it); the loop exits when every row is done or ``max_new`` tokens exist.
Positions continue from the original prompt length plus the rope delta, whatever was pruned. No host sync
per token; the cache is donated to the compiled program. A quantised cache keeps its codes as they are: each
step dequantises them inside its attention (:func:`purekv_jax.attention.cache_decode_attention`) and appends
the new token to the model-dtype slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.qwen2_5_vl.config import TextConfig
from models.qwen2_5_vl.layers import rms_norm
from models.qwen2_5_vl.model import text_part
from models.qwen2_5_vl.text import layer_out, layer_qkv, lm_logits, mrope_cos_sin

from . import cache as C
from .attention import cache_decode_attention
from .compile_cache import CompiledProgram, compiled, count_trace
from .prefill import layer_params
from .sampling import sample_tokens


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static decode settings (hashable: part of the compiled program's key).

    n_tokens: the token buffer's length (a bucket ``>= max_new``); temperature / top_k / top_p: sampling
    (``temperature=0`` is greedy); eos: the ids that end a row; pad_id: what follows a row's EOS.
    """

    n_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos: tuple[int, ...] = ()
    pad_id: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The decode loop's state.

    step ``[]`` int32: the buffer index of the next token (after the loop: tokens produced);
    token ``[B]`` int32: the last sampled token; done ``[B]`` bool: the row produced EOS;
    cache: the KV cache; tokens ``[B, n_tokens]`` int32: the produced tokens, ``pad_id`` after EOS.
    """

    step: jax.Array
    token: jax.Array
    done: jax.Array
    cache: C.KVCache
    tokens: jax.Array


def decode_loop(params, cache: C.KVCache, first_logits, max_new, key, *, cfg: TextConfig,
                sampling: SamplingSettings) -> DecodeState:
    """Samples the first token from ``first_logits [B, V]`` (the prefill's), then decodes until every row
    is done or ``max_new`` (traced, ``<= sampling.n_tokens``) tokens exist. Returns the final state."""
    count_trace("decode")
    text = text_part(params)
    b = first_logits.shape[0]
    eos = jnp.asarray(sampling.eos if sampling.eos else (-1,), jnp.int32)

    def sample(logits, i):
        return sample_tokens(logits, jax.random.fold_in(key, i), temperature=sampling.temperature,
                             top_k=sampling.top_k, top_p=sampling.top_p)

    def is_eos(t):
        return jnp.any(t[:, None] == eos[None, :], axis=-1) if sampling.eos else jnp.zeros_like(t, bool)

    def step(s: DecodeState) -> DecodeState:
        x = jnp.take(text.embed, s.token, axis=0)[:, None]
        cos, sin = mrope_cos_sin(s.cache.decode_positions()[:, None], cfg)

        def layer(x, l):  # reads the cache; the new entries are written once, after the layer loop
            lp = layer_params(text, l)
            q, k, v = layer_qkv(lp, x, cos, sin, cfg)
            attn = cache_decode_attention(q, s.cache, l, k, v)
            return layer_out(lp, x, attn, cfg), (k[:, :, 0], v[:, :, 0])

        x, (k_new, v_new) = jax.lax.scan(layer, x, jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32))
        cache = C.advance(C.append_layers(s.cache, k_new, v_new))
        logits = lm_logits(text, rms_norm(x, text.norm, cfg.rms_norm_eps))[:, 0]
        nxt = jnp.where(s.done, sampling.pad_id, sample(logits, s.step))
        tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (jnp.int32(0), s.step))
        return DecodeState(s.step + 1, nxt, s.done | is_eos(nxt), cache, tokens)

    def running(s: DecodeState):
        return (s.step < max_new) & ~jnp.all(s.done)

    tok0 = sample(first_logits, 0)
    tokens = jnp.full((b, sampling.n_tokens), sampling.pad_id, jnp.int32).at[:, 0].set(tok0)
    return jax.lax.while_loop(running, step, DecodeState(jnp.int32(1), tok0, is_eos(tok0), cache, tokens))


def decode_program(params, cache: C.KVCache, first_logits, max_new: int, seed: int, *, cfg: TextConfig,
                   sampling: SamplingSettings) -> tuple[CompiledProgram, tuple]:
    """The compiled decode for these shapes and settings (compiled once, then cached) and its arguments;
    ``program.run(*args)`` donates the cache."""
    args = (text_part(params), cache, first_logits, jnp.int32(max_new), jax.random.PRNGKey(seed))
    return compiled("decode", decode_loop, dict(cfg=cfg, sampling=sampling), args, donate=(1,)), args
