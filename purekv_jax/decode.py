"""The decode: an on-device ``lax.while_loop`` over tokens on a (compressed) KV cache.

Each step embeds the last token, runs the layer stack as a ``lax.scan`` (on a CPU its weight matrices read
through per-layer views, :mod:`purekv_jax.layer_weights`), each layer appending the token's K/V to the cache
and attending over the valid slots, samples the next token and writes it into the token buffer.
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

from models.family import text_stack
from models.qwen2_5_vl.config import TextConfig
from models.qwen2_5_vl.model import text_part

from . import cache as C
from .attention import cache_decode_attention
from .compile_cache import CompiledProgram, compiled, count_trace
from .layer_weights import per_layer, switched_layer
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


@dataclasses.dataclass(frozen=True)
class AppendKV:
    """How a decode step writes and reads the cache (a static argument of :func:`decode_loop`): the new token's
    K/V appended at slot ``length``, attention over every valid slot (a quantised cache's codes read by the
    ``kv_decode`` path, ``PureKVConfig.kv_decode``). The decode-time budget
    (:class:`purekv_jax.decode_budget.EvictingKV`) is the other kind: it evicts instead of growing."""

    kv_decode: str = "xla"

    def attend(self, cache: C.KVCache, layer, q, k, v):
        """``q [B, Hq, 1, hd]``, ``k``/``v [B, Hkv, 1, hd]`` of layer ``layer`` -> ``(attn [B, Hq, 1, hd], cache)``."""
        cache = C.append(cache, layer, k, v)
        return cache_decode_attention(q, cache, layer, self.kv_decode), cache

    def advance(self, cache: C.KVCache) -> C.KVCache:
        """The cache moved on by the token every layer appended."""
        return C.advance(cache)


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


def decode_loop(params, cache: C.KVCache, first_logits, max_new, key, layer_weights=None, *, cfg: TextConfig,
                sampling: SamplingSettings, kv_step=AppendKV()) -> DecodeState:
    """Samples the first token from ``first_logits [B, V]`` (the prefill's), then decodes until every row
    is done or ``max_new`` (traced, ``<= sampling.n_tokens``) tokens exist. Returns the final state.
    ``kv_step`` (static): how each layer writes and reads the cache (:class:`AppendKV`, the default).

    ``layer_weights``: None, each layer of the scan slices its weights from ``params``' stacked ``[L, ...]``
    leaves; or one state per layer (:func:`purekv_jax.layer_weights.per_layer`), and each matrix product
    reads its layer's own view in place (:func:`purekv_jax.layer_weights.switched_layer`)."""
    count_trace("decode")
    text = text_part(params)
    stack = text_stack(cfg)
    b = first_logits.shape[0]
    eos = jnp.asarray(sampling.eos if sampling.eos else (-1,), jnp.int32)

    def sample(logits, i):
        return sample_tokens(logits, jax.random.fold_in(key, i), temperature=sampling.temperature,
                             top_k=sampling.top_k, top_p=sampling.top_p)

    def is_eos(t):
        return jnp.any(t[:, None] == eos[None, :], axis=-1) if sampling.eos else jnp.zeros_like(t, bool)

    def step(s: DecodeState) -> DecodeState:
        x = jnp.take(text.embed, s.token, axis=0)[:, None]
        cos, sin = stack.cos_sin(s.cache.decode_positions()[:, None], cfg)

        def layer(carry, l):
            x, cache = carry
            lp = layer_params(text, l) if layer_weights is None else switched_layer(text.layers, layer_weights, l)
            q, k, v = stack.layer_qkv(lp, x, cos, sin, cfg)
            attn, cache = kv_step.attend(cache, l, q, k, v)
            return (stack.layer_out(lp, x, attn, cfg), cache), None

        (x, cache), _ = jax.lax.scan(layer, (x, s.cache), jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32))
        cache = kv_step.advance(cache)
        logits = stack.final_logits(text, x, cfg)[:, 0]
        nxt = jnp.where(s.done, sampling.pad_id, sample(logits, s.step))
        tokens = jax.lax.dynamic_update_slice(s.tokens, nxt[:, None], (jnp.int32(0), s.step))
        return DecodeState(s.step + 1, nxt, s.done | is_eos(nxt), cache, tokens)

    def running(s: DecodeState):
        return (s.step < max_new) & ~jnp.all(s.done)

    tok0 = sample(first_logits, 0)
    tokens = jnp.full((b, sampling.n_tokens), sampling.pad_id, jnp.int32).at[:, 0].set(tok0)
    return jax.lax.while_loop(running, step, DecodeState(jnp.int32(1), tok0, is_eos(tok0), cache, tokens))


def decode_program(params, cache: C.KVCache, first_logits, max_new: int, seed: int, *, cfg: TextConfig,
                   sampling: SamplingSettings, kv_step=AppendKV()) -> tuple[CompiledProgram, tuple]:
    """The compiled decode for these shapes and settings (compiled once, then cached) and its arguments;
    ``program.run(*args)`` donates the cache. Where the layers' weights have per-layer views
    (:func:`purekv_jax.layer_weights.per_layer`: on a CPU) the program's matrix products read them."""
    text = text_part(params)
    args = (text, cache, first_logits, jnp.int32(max_new), jax.random.PRNGKey(seed), per_layer(text.layers))
    statics = dict(cfg=cfg, sampling=sampling, kv_step=kv_step)
    return compiled("decode", decode_loop, statics, args, donate=(1,)), args
