"""``generate``: a jitted prefill that prunes the KV cache actively, then an on-device decode loop.

Host side (before any device work): the batch is re-aligned to left padding (real tokens at the end,
so every row's observation window is the last ``window`` positions) in a prompt-length bucket, M-RoPE
positions and rope deltas are computed (``get_rope_index``), the policy is resolved to a static
:class:`~purekv_jax.config.KVPlan`, and every user error is raised.

Prefill (one jitted program per bucket): the layers run as grouped ``lax.scan`` segments (own-score
layers below the first anchor, each anchor layer, the layers it owns). Each layer computes q/k/v,
attends with a plain prefill attention path (dense, flash-style, or a registered kernel such as issue
4's block-sparse one), scores its entries (own score, or CLIE's carried anchor score times value norms:
owned layers never compute attention probabilities), and writes only its kept entries into the cache,
so peak KV memory is about ``L * budget + N`` entries.

Decode (one jitted program per cache-capacity bucket): a ``lax.while_loop`` over tokens, each step a
``lax.scan`` over layers that appends the new token's K/V and attends over the valid slots; rows stop
at EOS (padded after it), and the loop exits when every row is done. Positions continue from the
original prompt length plus the rope delta. No host sync per token; the cache is donated.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig
from models.qwen2_5_vl.layers import rms_norm
from models.qwen2_5_vl.merge import check_feature_counts
from models.qwen2_5_vl.model import _n_features, embed_inputs, static_grid
from models.qwen2_5_vl.rope_index import get_rope_index
from models.qwen2_5_vl.text import TextParams, layer_out, layer_qkv, lm_logits, mrope_cos_sin

from . import cache as C
from . import policies as P
from . import sharding as S
from .attention import decode_attention, prefill_attention_impl
from .config import KVPlan, PureKVConfig, Segment
from .observation import question_window_lengths
from .sampling import sample_tokens


class GenerateError(ValueError):
    """Bad input to :func:`generate` (shapes, lengths, capacity, positions, policy combinations)."""


@dataclasses.dataclass
class GenerateResult:
    """``tokens [B, max_new_tokens]`` int32 (``pad_token_id`` after a row's EOS) and ``stats``."""

    tokens: np.ndarray
    stats: dict[str, Any]
    cache: C.KVCache | None = None


#: trace-time counters: how often the prefill / decode functions were traced (== compiled).
TRACE_COUNTS: collections.Counter = collections.Counter()
_COMPILED: dict = {}


def clear_compile_cache() -> None:
    """Forgets every compiled prefill / decode program (and resets :data:`TRACE_COUNTS`)."""
    _COMPILED.clear()
    TRACE_COUNTS.clear()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _compiled(name: str, fn, statics: dict, args: tuple, donate: tuple[int, ...] = ()):
    """AOT-compiles ``fn(*args, **statics)`` once per (statics, argument shapes); returns
    ``(compiled, compile_seconds or 0.0 when cached, memory_analysis)``."""
    leaves, treedef = jax.tree.flatten(args)
    key = (name, tuple(sorted(statics.items())), treedef,
           tuple((l.shape, str(l.dtype), getattr(l, "sharding", None)) for l in leaves))  # (a mesh compiles anew)
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit[0], 0.0, hit[1]
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(fn, **statics), donate_argnums=donate).lower(*args).compile()
    dt = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend without memory analysis
        mem = None
    _COMPILED[key] = (compiled, mem)
    return compiled, dt, mem


def _text_params(params) -> TextParams:
    return params if isinstance(params, TextParams) else params.text


def _layer(params: TextParams, l):
    return jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, l, 0, keepdims=False), params.layers)


# ------------------------------------------------------------------------------------------ prefill
def _prefill(
    params,
    input_ids,
    positions,
    valid,
    window_len,
    next_position,
    rope_delta,
    pixel_values,
    pixel_values_videos,
    *,
    config: Qwen25VLConfig,
    plan: KVPlan,
    capacity: int,
    attention,
    image_grid: tuple | None,
    video_grid: tuple | None,
    fused: bool = False,
):
    """-> (cache with every layer's kept prompt entries, last-position logits ``[B, V]`` float32).

    ``window_len [B]`` int32: each row's observation window (the question-aligned one when
    ``plan.question_window``; it is traced, so questions of any length share the compiled program).

    ``fused=False``: one ``lax.scan`` per plan segment (own / anchor / owned layers), so owned layers'
    loop bodies hold no scoring code at all. ``fused=True``: one ``lax.scan`` over all layers, the
    score chosen per layer by ``lax.cond`` (owned layers run the branch without attention
    probabilities). On XLA:CPU every extra loop gets its own activation temporaries (measured: about
    +21 MiB of prefill temporaries for two extra segments at 2,048 tokens, hidden 512), which the
    fused loop avoids. H2O always runs the segments.
    """
    TRACE_COUNTS["prefill"] += 1
    cfg = config.text
    text = _text_params(params)
    if pixel_values is None and pixel_values_videos is None:
        x = jnp.take(text.embed, input_ids, axis=0)
    else:
        x = embed_inputs(params, config, input_ids, pixel_values, image_grid, pixel_values_videos, video_grid)
    b, n, _ = x.shape
    hkv, hd = cfg.num_key_value_heads, cfg.head_dim
    cos, sin = mrope_cos_sin(positions, cfg)
    attend = prefill_attention_impl(attention, n)
    budgets = jnp.asarray(plan.budgets, jnp.int32)
    cache = C.create(cfg.num_hidden_layers, b, hkv, capacity, hd, x.dtype)
    carried = jnp.zeros((b, hkv, n), jnp.float32)

    def segment_body(kind: str):
        def body(carry, l):
            x, cache, carried = carry
            lp = _layer(text, l)
            q, k, v = layer_qkv(lp, x, cos, sin, cfg)
            if kind in ("own", "anchor") and isinstance(plan.base, P.H2O):
                probs = P.full_attention_probs(q, k, valid)  # evaluation only: the [N, N] matrix
                g = q.shape[1] // hkv
                attn = jnp.einsum(
                    "bhgqk,bhkd->bhgqd", probs.reshape(b, hkv, g, n, n).astype(v.dtype), v,
                    preferred_element_type=jnp.float32,
                ).reshape(q.shape).astype(q.dtype)
            else:
                probs = None
                attn = attend(q, k, v, valid, l)
            if kind == "full":
                idx, kept = P.keep_all(valid, hkv)
            else:
                own = lambda: plan.base.score(P.ScoreContext(q=q, k=k, v=v, valid=valid, layer=l, probs=probs,
                                                             window_len=window_len))
                if kind == "owned":
                    score = plan.clie.owned_score(carried, v)
                elif kind == "fused":  # one loop for all layers; owned layers take the branch without scoring
                    is_owned = owned_mask[l]
                    score = jax.lax.cond(is_owned, lambda: plan.clie.owned_score(carried, v), own)
                    carried = jnp.where(anchor_mask[l], score, carried)
                else:
                    score = own()
                    if kind == "anchor":
                        carried = score
                idx, kept = P.keep_set(
                    score, valid, slots=plan.slots, budget=budgets[l],
                    window=window_len if plan.question_window else plan.window, sink=plan.sink,
                    adaptive=plan.head_adaptive,
                )
            kk, vv = C.keep_indices(k, v, idx)
            cache = C.write_layer(cache, l, kk, vv, kept)
            return (layer_out(lp, x, attn, cfg), cache, carried), None

        return body

    segments = plan.segments
    if fused and len(segments) > 1 and not isinstance(plan.base, P.H2O):
        kinds = [seg.kind for seg in segments for _ in range(seg.lo, seg.hi)]
        owned_mask = jnp.asarray([k == "owned" for k in kinds])
        anchor_mask = jnp.asarray([k == "anchor" for k in kinds])
        segments = (Segment("fused", 0, cfg.num_hidden_layers),)
    for seg in segments:
        (x, cache, carried), _ = jax.lax.scan(
            segment_body(seg.kind), (x, cache, carried), jnp.arange(seg.lo, seg.hi, dtype=jnp.int32)
        )
    hidden = rms_norm(x[:, -1:], text.norm, cfg.rms_norm_eps)
    logits = lm_logits(text, hidden)[:, 0]
    cache = dataclasses.replace(
        cache,
        length=jnp.full((b,), plan.slots, jnp.int32),
        next_position=next_position,
        rope_delta=rope_delta,
    )
    return cache, logits


# ------------------------------------------------------------------------------------------ decode
def _decode(
    params,
    cache: C.KVCache,
    first_logits,
    max_new,
    key,
    *,
    cfg: TextConfig,
    n_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos: tuple[int, ...],
    pad_id: int,
):
    """-> (tokens ``[B, n_tokens]``, steps run, final cache). ``max_new`` is traced (<= n_tokens)."""
    TRACE_COUNTS["decode"] += 1
    text = _text_params(params)
    b = first_logits.shape[0]
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p)

    def is_eos(t):
        return jnp.any(t[:, None] == eos_arr[None, :], axis=-1) if eos else jnp.zeros_like(t, bool)

    tok0 = sample(first_logits, jax.random.fold_in(key, 0))
    tokens = jnp.full((b, n_tokens), pad_id, jnp.int32).at[:, 0].set(tok0)

    def step(state):
        i, tok, done, cache, tokens = state
        x = jnp.take(text.embed, tok, axis=0)[:, None]
        cos, sin = mrope_cos_sin(cache.decode_positions()[:, None], cfg)

        def layer(carry, l):
            x, cache = carry
            lp = _layer(text, l)
            q, k, v = layer_qkv(lp, x, cos, sin, cfg)
            cache = C.append(cache, l, k, v)
            attn = decode_attention(q, cache.k[l], cache.v[l], cache.valid[l])
            return (layer_out(lp, x, attn, cfg), cache), None

        (x, cache), _ = jax.lax.scan(layer, (x, cache), jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32))
        cache = C.advance(cache)
        logits = lm_logits(text, rms_norm(x, text.norm, cfg.rms_norm_eps))[:, 0]
        nxt = jnp.where(done, pad_id, sample(logits, jax.random.fold_in(key, i)))
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (jnp.int32(0), i))
        return i + 1, nxt, done | is_eos(nxt), cache, tokens

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_new) & ~jnp.all(done)

    init = (jnp.int32(1), tok0, is_eos(tok0), cache, tokens)
    i, _, _, cache, tokens = jax.lax.while_loop(cond, step, init)
    return tokens, i, cache


# ------------------------------------------------------------------------------------------ host
def _realign(ids: np.ndarray, mask: np.ndarray, n: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens moved to the end of an ``n``-long row (left padding)."""
    b = ids.shape[0]
    out = np.full((b, n), fill, ids.dtype)
    valid = np.zeros((b, n), bool)
    for r in range(b):
        real = ids[r][mask[r]]
        out[r, n - len(real) :] = real
        valid[r, n - len(real) :] = True
    return out, valid


def generate(
    params,
    config: Qwen25VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    *,
    policy: PureKVConfig | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    prompt_bucket: int = 64,
    new_tokens_bucket: int = 32,
    cache_capacity: int | None = None,
    attention="auto",
    fused_prefill: bool = True,
    return_cache: bool = False,
    question_len=None,
) -> GenerateResult:
    """Generates ``max_new_tokens`` tokens per row with a (compressed) KV cache.

    Args:
      params: ``Qwen25VLParams`` (or ``TextParams`` for text-only prompts).
      config: the model's ``Qwen25VLConfig``.
      input_ids: ``[B, N]``; attention_mask ``[B, N]`` (1 = token, left or right padding).
      pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts: as in the
        model's ``forward``.
      policy: ``None`` = full cache; a :class:`PureKVConfig` (``PureKVConfig(budget=0.2)`` = PureKV).
      max_new_tokens: tokens generated per row (rows stop early at EOS, padded with ``pad_token_id``).
      temperature / top_k / top_p / seed: sampling (``temperature=0`` is greedy).
      eos_token_id / pad_token_id: default to the config's EOS ids / the first of them.
      prompt_bucket: the prompt is left-padded to a multiple of this (compile bucketing).
      new_tokens_bucket: the token buffer (and cache room) is a multiple of this.
      cache_capacity: a static number of cache slots; the kept prompt plus the generated tokens must fit.
      attention: prefill attention of non-scoring layers: ``"auto"``, ``"dense"``, ``"flash"``, a
        registered name, or a callable ``fn(q, k, v, valid, layer)`` (a static argument: keep the same
        object to reuse the compiled prefill).
      fused_prefill: run the prefill as one layer loop with a per-layer ``lax.cond`` for the score
        (default: less temporary memory and half the compile time, measured in
        ``benchmarks/kv_budget.py``) instead of one loop per segment (see :func:`_prefill`).
      return_cache: also return the final cache.
      question_len: the number of trailing prompt tokens that form the question (with the chat markup
        after it): an int, or one per row. With the default policy (``question_window``) the observation
        window of each row is its question (at most ``policy.window`` tokens). ``None``: the tokens after
        the row's last ``<|vision_end|>`` (video / image questions), else the fixed window
        (:mod:`purekv_jax.observation`).

    Returns:
      :class:`GenerateResult` with ``tokens [B, max_new_tokens]`` and ``stats`` (``kv_bytes_full``,
      ``kv_bytes_kept`` (prompt KV, all layers), ``kv_bytes_allocated``, ``prefill_s``, ``decode_s``,
      ``prefill_compile_s``, ``decode_compile_s``, ``decode_steps``, ``prompt_len``, ``padded_len``,
      ``budgets``, ``capacity``, ``prefill_peak_bytes``, ``prefill_temp_bytes``: XLA's compiled memory
      analysis of the prefill).
    """
    # ---------------------------------------------------------------- validation (host, no device work)
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerateError(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerateError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise GenerateError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise GenerateError(f"attention_mask rows {np.flatnonzero(lengths == 0).tolist()} hold no token")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if policy is not None and not isinstance(policy, PureKVConfig):
        raise GenerateError(f"policy must be None (full cache) or a PureKVConfig, got {type(policy).__name__}")
    if temperature < 0:
        raise GenerateError(f"temperature={temperature} must be >= 0")
    cfg = config.text
    image_grid, video_grid = static_grid(image_grid_thw), static_grid(video_grid_thw)
    if (pixel_values is None) != (image_grid is None):
        raise GenerateError("pixel_values and image_grid_thw must be given together")
    if (pixel_values_videos is None) != (video_grid is None):
        raise GenerateError("pixel_values_videos and video_grid_thw must be given together")
    mm = image_grid is not None or video_grid is not None
    check_feature_counts(config, np.where(mask, ids, 0), _n_features(image_grid, config), _n_features(video_grid, config))
    if mm and isinstance(params, TextParams):
        raise GenerateError("image / video inputs need the full Qwen25VLParams (with the vision tower), got TextParams")

    prompt_len = int(lengths.max())
    padded = _round_up(prompt_len, prompt_bucket)
    fill = 0
    ids_al, valid = _realign(ids, mask, padded, fill)
    if mm:
        pos, deltas = get_rope_index(config, ids_al, image_grid, video_grid, second_per_grid_ts, valid.astype(np.int32))
        rope_delta = deltas[:, 0].astype(np.int64) + padded - lengths
    else:
        pos = np.where(valid, np.cumsum(valid, axis=1) - 1, 1)
        pos = np.broadcast_to(pos[None], (3, *pos.shape))
        rope_delta = np.zeros_like(lengths)
    last_pos = lengths + rope_delta + max_new_tokens - 1
    if int(last_pos.max()) >= cfg.max_position_embeddings:
        r = int(np.argmax(last_pos))
        raise GenerateError(
            f"max_new_tokens={max_new_tokens} runs past the model's positions: row {r} starts decoding at "
            f"position {int(lengths[r] + rope_delta[r])} and would reach {int(last_pos[r])}, but "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )
    plan = KVPlan.full(cfg.num_hidden_layers, padded) if policy is None else policy.resolve(cfg, prompt_len, padded)
    if plan.needs_full_probs and attention not in ("auto", "dense"):
        raise GenerateError(
            f"base='h2o' needs the full attention probabilities of every scoring layer (evaluation only); it "
            f"cannot run with attention={attention!r}"
        )
    prefill_attention_impl(attention, padded)  # validates the name
    window_len = np.full((ids.shape[0],), plan.window, np.int32)
    if plan.question_window:
        window_len = question_window_lengths(ids_al, valid, window=plan.window, question_len=question_len,
                                             vision_end_id=config.vision_end_token_id)
    st_attn = None
    if policy is not None and policy.st_sparse:  # ST-SpAttn: a layout-aware prefill attention (issue 4)
        from .st_sparse.prefill import st_prefill_attention
        st_attn = st_prefill_attention(policy, config, ids_al, valid, video_grid, attention)
        attention = attention if st_attn is None else st_attn
    n_tokens = _round_up(max_new_tokens, new_tokens_bucket)
    need = plan.slots + max_new_tokens - 1
    if cache_capacity is None:
        capacity = plan.slots + n_tokens
    else:
        capacity = int(cache_capacity)
        if need > capacity:
            raise GenerateError(
                f"the prompt does not fit cache_capacity={capacity}: {plan.slots} prompt slots "
                f"(prompt of {prompt_len} tokens, padded to {padded}) + {max_new_tokens - 1} decoded tokens "
                f"= {need} slots"
            )
    eos = config.eos_token_id if eos_token_id is None else (
        (int(eos_token_id),) if np.ndim(eos_token_id) == 0 else tuple(int(e) for e in eos_token_id))
    pad_id = (eos[0] if eos else 0) if pad_token_id is None else int(pad_token_id)

    # ---------------------------------------------------------------- prefill
    dtype = _text_params(params).embed.dtype
    args = (
        params if mm else _text_params(params),
        jnp.asarray(ids_al, jnp.int32),
        jnp.asarray(pos, jnp.int32),
        jnp.asarray(valid),
        jnp.asarray(window_len),
        jnp.asarray(lengths, jnp.int32),
        jnp.asarray(rope_delta, jnp.int32),
        None if pixel_values is None else jnp.asarray(pixel_values, dtype),
        None if pixel_values_videos is None else jnp.asarray(pixel_values_videos, dtype),
    )
    mesh = S.params_mesh(params)  # params on a mesh: the batch goes over its "data" axis (issue 7)
    if mesh is not None:
        args = (args[0], *S.shard_batch_args(args[1:], (0, 1, 0, 0, 0, 0, None, None), mesh))
    statics = dict(config=config, plan=plan, capacity=capacity, attention=attention,
                   image_grid=image_grid, video_grid=video_grid, fused=bool(fused_prefill))
    prefill, prefill_compile_s, mem = _compiled("prefill", _prefill, statics, args)
    t0 = time.perf_counter()
    cache, logits = prefill(*args)
    jax.block_until_ready((cache, logits))
    prefill_s = time.perf_counter() - t0
    kept_bytes = C.kv_bytes_kept(cache)

    # ---------------------------------------------------------------- decode
    dargs = (_text_params(params), cache, logits, jnp.int32(max_new_tokens), jax.random.PRNGKey(seed))
    dstatics = dict(cfg=cfg, n_tokens=n_tokens, temperature=float(temperature), top_k=top_k,
                    top_p=None if top_p is None else float(top_p), eos=tuple(eos), pad_id=pad_id)
    decode, decode_compile_s, _ = _compiled("decode", _decode, dstatics, dargs, donate=(1,))
    t0 = time.perf_counter()
    tokens, steps, cache = decode(*dargs)
    tokens = np.asarray(jax.block_until_ready(tokens))
    decode_s = time.perf_counter() - t0

    full_bytes = C.kv_bytes_full(lengths, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype)
    stats = {
        "kv_bytes_full": full_bytes,
        "kv_bytes_kept": kept_bytes,
        "kv_compression": full_bytes / max(kept_bytes, 1),
        "kv_bytes_allocated": C.kv_bytes_allocated(cache),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_compile_s": prefill_compile_s,
        "decode_compile_s": decode_compile_s,
        "decode_steps": int(steps) - 1,
        "prompt_len": prompt_len,
        "padded_len": padded,
        "budgets": plan.budgets,
        "capacity": capacity,
        "prefill_peak_bytes": None if mem is None else _peak_bytes(mem),
        "prefill_temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
        "st_layers": () if st_attn is None else st_attn.st_layers,
    }
    return GenerateResult(tokens=tokens[:, :max_new_tokens], stats=stats, cache=cache if return_cache else None)


def _peak_bytes(mem) -> int:
    """Arguments + outputs + temporaries - aliased (XLA's compiled memory analysis)."""
    return int(
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    )


def prefill_jaxpr(params, config: Qwen25VLConfig, input_ids, policy: PureKVConfig | None = None,
                  attention: str = "auto", prompt_bucket: int = 64, fused: bool = False):
    """The prefill's closed jaxpr for a text prompt (for inspection: which layers compute attention
    probabilities)."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool)
    n = int(ids.shape[1])
    padded = _round_up(n, prompt_bucket)
    ids_al, valid = _realign(ids, mask, padded, 0)
    pos = np.broadcast_to(np.where(valid, np.cumsum(valid, axis=1) - 1, 1)[None], (3, *ids_al.shape))
    cfg = config.text
    plan = KVPlan.full(cfg.num_hidden_layers, padded) if policy is None else policy.resolve(cfg, n, padded)
    fn = functools.partial(_prefill, config=config, plan=plan, capacity=plan.slots + 1, attention=attention,
                           image_grid=None, video_grid=None, fused=fused)
    lengths = jnp.full((ids.shape[0],), n, jnp.int32)
    return plan, jax.make_jaxpr(fn)(_text_params(params), jnp.asarray(ids_al, jnp.int32), jnp.asarray(pos, jnp.int32),
                                    jnp.asarray(valid), jnp.full_like(lengths, plan.window), lengths,
                                    jnp.zeros_like(lengths), None, None)
