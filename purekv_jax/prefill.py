"""The prefill: the decoder's layer loop, each layer scoring and pruning its own KV entries as it goes.

One layer loop (:func:`scan_layers`) serves every prefill of the project: ``generate``'s active prefill
(:func:`compressed_prefill`) and the fidelity harness's analysis prefill. Each layer computes q / k / v,
attends (dense, flash, a registered kernel or the ST-SpAttn block-sparse path), ranks its entries and
writes only the kept ones into the cache, so the KV memory held during the prefill is about
``L * budget + N`` entries rather than ``L * N``.

A layer's ranking score comes from :func:`carried_score`, the one place where CLIE's carry lives: layers
of an ``own`` segment score themselves with the plan's base policy, an ``anchor`` layer scores itself and
hands its score up, and the ``owned`` layers above it rank by that carried score times their own value
norms (they compute no attention probabilities); the plan's carry rule, if any, changes what is carried
(a decayed consensus of the layers below, an anchor's candidates re-ranked by the owned layer, or the
statistic that sets each layer's budget).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from models.family import family_of, text_stack
from models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig
from models.qwen2_5_vl.model import text_part

from . import cache as C
from . import policies as P
from .attention import prefill_attention_impl
from .compile_cache import count_trace
from .config import KVPlan, Segment


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillInputs:
    """The device inputs of one prefill (a left-padded batch of ``B`` rows, ``N`` tokens each).

    input_ids ``[B, N]`` int32; positions ``[3, B, N]`` int32 (M-RoPE); valid ``[B, N]`` bool (real tokens);
    window_len ``[B]`` int32 (each row's observation window); next_position ``[B]`` int32 (each row's
    number of real tokens: the logical position of its first generated token); rope_delta ``[B]`` int32;
    pixel_values ``[P, patch_dim]`` / pixel_values_videos ``[Pv, patch_dim]`` or ``None``; keep_valid ``[B, N]``
    bool or ``None``: the tokens the cache may keep (``None``: every real token); real tokens outside it are
    attended to and score the others (probe queries, :mod:`purekv_jax.prompt_state`) but never cached.
    """

    input_ids: jax.Array
    positions: jax.Array
    valid: jax.Array
    window_len: jax.Array
    next_position: jax.Array
    rope_delta: jax.Array
    pixel_values: jax.Array | None = None
    pixel_values_videos: jax.Array | None = None
    keep_valid: jax.Array | None = None

    #: the batch axis of each field (``None``: not per row), for placing the batch on a mesh.
    BATCH_AXES = dict(input_ids=0, positions=1, valid=0, window_len=0, next_position=0, rope_delta=0,
                      pixel_values=None, pixel_values_videos=None, keep_valid=0)


def layer_params(text, layer):
    """One decoder layer's parameters from the text state's stacked ``[L, ...]`` leaves (``layer`` static or
    traced)."""
    return jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, layer, 0, keepdims=False), text.layers)


LayerStep = Callable[..., tuple]


def scan_layers(text, cfg: TextConfig, x, cos, sin, layers: tuple[int, int], step: LayerStep, carry):
    """The decoder layers ``[lo, hi)`` as one ``lax.scan``.

    Each layer computes ``q [B, Hq, N, hd]``, ``k`` / ``v [B, Hkv, N, hd]`` (rotary applied), then
    ``step(carry, layer, q, k, v) -> (attn [B, Hq, N, hd], carry, out)`` attends and does whatever the
    caller keeps of the layer (pruning into a cache, collecting scores), and the layer's output projection
    and MLP follow. Returns ``(x, carry, outs)`` (``outs`` stacked over the layers).
    """
    stack = text_stack(cfg)

    def body(state, layer):
        x, carry = state
        lp = layer_params(text, layer)
        q, k, v = stack.layer_qkv(lp, x, cos, sin, cfg)
        attn, carry, out = step(carry, layer, q, k, v)
        return (stack.layer_out(lp, x, attn, cfg), carry), out

    lo, hi = layers
    (x, carry), outs = jax.lax.scan(body, (x, carry), jnp.arange(lo, hi, dtype=jnp.int32))
    return x, carry, outs


def initial_carry(plan: KVPlan, b: int, hkv: int, n: int) -> jax.Array:
    """The carry the first layer receives: the plan's carry rule's, else CLIE's (an anchor score
    ``[B, Hkv, N]``, zeros until the first anchor)."""
    if isinstance(plan.carry, (P.AccumulatedCarry, P.BudgetCarry)):
        return plan.carry.init(b, hkv, n)
    return jnp.zeros((b, hkv, n), jnp.float32)


def carried_score(plan: KVPlan, kind: str, layer, own_score: Callable[[], jax.Array], carried: jax.Array, v,
                  budget):
    """One layer's ranking score ``[B, Hkv, N]``, its budget and the carry handed to the layer above.

    ``kind`` is the layer's segment kind (``own`` / ``anchor`` / ``owned``), or ``any`` when one loop runs
    layers of every kind and the kind is looked up per (traced) ``layer`` in ``plan.layer_kinds``.
    ``own_score()`` computes the layer's base score (called only where it is needed: a CLIE owned layer
    computes no attention probabilities); ``carried`` is the carry from the layer below
    (:func:`initial_carry` for the first); ``v [B, Hkv, N, hd]`` the layer's values (CLIE's value norms);
    ``budget`` the plan's budget of the layer, returned as is unless the plan's carry allocates budgets
    (:class:`~purekv_jax.policies.BudgetCarry`: ``[B, 1, 1]`` int32).

    The carries (``plan.carry``): none (CLIE: an anchor's score carried to the layers it owns),
    :class:`~purekv_jax.policies.AccumulatedCarry` (every layer: own score plus the decayed consensus below),
    :class:`~purekv_jax.policies.RerankCarry` (CLIE's owned layers re-rank the estimate's top candidates by
    their own score), :class:`~purekv_jax.policies.BudgetCarry` (every layer: own score, budget from the
    carried window-score entropies).
    """
    rule = plan.carry
    if isinstance(rule, P.AccumulatedCarry):
        score, carried = rule.step(own_score(), carried)
        return score, budget, carried
    if isinstance(rule, P.BudgetCarry):
        score = own_score()
        budget, carried = rule.step(score, carried, layer)
        return score, budget, carried
    if isinstance(rule, P.RerankCarry):
        owned_score = lambda: rule.owned_score(plan.clie.owned_score(carried, v), own_score())
    else:
        owned_score = lambda: plan.clie.owned_score(carried, v)
    if kind == "owned":
        return owned_score(), budget, carried
    if kind == "any":
        kinds = plan.layer_kinds
        owned = jnp.asarray([k == "owned" for k in kinds])[layer]
        anchor = jnp.asarray([k == "anchor" for k in kinds])[layer]
        score = jax.lax.cond(owned, owned_score, own_score)
        return score, budget, jnp.where(anchor, score, carried)
    score = own_score()
    return score, budget, (score if kind == "anchor" else carried)


def compressed_prefill(
    params,
    inputs: PrefillInputs,
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

    With ``plan.quant`` each layer's kept entries are quantised as they are written (all but the
    ``plan.recent_slots`` most recent, :func:`purekv_jax.cache.write_layer`); ``capacity`` counts both kinds
    of slots.

    ``fused=False``: one ``lax.scan`` per plan segment (own / anchor / owned layers), so owned layers' loop
    bodies hold no scoring code at all. ``fused=True``: one ``lax.scan`` over all layers, the score chosen
    per layer by ``lax.cond`` (owned layers run the branch without attention probabilities): on XLA:CPU
    every extra loop gets its own activation temporaries, which the single loop avoids. H2O always runs
    the segments (its scoring layers compute the full attention probabilities).
    """
    count_trace("prefill")
    cfg = config.text
    text = text_part(params)
    family = family_of(config)
    if inputs.pixel_values is None and inputs.pixel_values_videos is None:
        x = jnp.take(text.embed, inputs.input_ids, axis=0)
    else:
        x = family.embed(params, config, inputs.input_ids, inputs.pixel_values, image_grid,
                         inputs.pixel_values_videos, video_grid)
    b, n, _ = x.shape
    hkv = cfg.num_key_value_heads
    valid = inputs.valid
    keepable = valid if inputs.keep_valid is None else inputs.keep_valid
    cos, sin = family.text.cos_sin(inputs.positions, cfg)
    attend = prefill_attention_impl(attention, n)
    budgets = jnp.asarray(plan.budgets, jnp.int32)
    keep_window = plan.keep_window(inputs.window_len)
    h2o = isinstance(plan.base, P.H2O)
    real_rank, _ = P.real_rank(valid)  # [B, N]: a padded position's index among its row's real tokens

    def segment_step(kind: str):
        def step(state, layer, q, k, v):
            cache, carried = state
            probs = None
            if kind in ("own", "anchor") and h2o:
                probs = P.full_attention_probs(q, k, valid)  # evaluation only: the [N, N] matrix
                g = q.shape[1] // hkv
                attn = jnp.einsum(
                    "bhgqk,bhkd->bhgqd", probs.reshape(b, hkv, g, n, n).astype(v.dtype), v,
                    preferred_element_type=jnp.float32,
                ).reshape(q.shape).astype(q.dtype)
            else:
                attn = attend(q, k, v, valid, layer)
            if kind == "full":
                idx, kept = P.keep_all(keepable, hkv)
            else:
                own = lambda: plan.base.score(P.ScoreContext(q=q, k=k, v=v, valid=valid, layer=layer, probs=probs,
                                                             window_len=inputs.window_len))
                score, budget, carried = carried_score(plan, kind, layer, own, carried, v, budgets[layer])
                idx, kept = P.keep_set(score, keepable, slots=plan.slots, budget=budget, window=keep_window,
                                       sink=plan.sink, adaptive=plan.head_adaptive)
            kk, vv = C.keep_indices(k, v, idx)
            token_index = jnp.take_along_axis(jnp.broadcast_to(real_rank[:, None], idx.shape[:2] + (n,)), idx, axis=-1)
            return attn, (C.write_layer(cache, layer, kk, vv, kept, token_index), carried), None

        return step

    segments = plan.segments
    if fused and len(segments) > 1 and not h2o:
        segments = (Segment("any", 0, cfg.num_hidden_layers),)
    state = (C.create(cfg.num_hidden_layers, b, hkv, capacity, cfg.head_dim, x.dtype, plan.quant),
             initial_carry(plan, b, hkv, n))
    for seg in segments:
        x, state, _ = scan_layers(text, cfg, x, cos, sin, (seg.lo, seg.hi), segment_step(seg.kind), state)
    cache, _ = state
    logits = family.text.final_logits(text, x[:, -1:], cfg)[:, 0]
    cache = dataclasses.replace(cache, length=jnp.full((b,), plan.recent_slots, jnp.int32),
                                next_position=inputs.next_position, rope_delta=inputs.rope_delta)
    return cache, logits
