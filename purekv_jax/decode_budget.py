"""The decode-time budget: a cache of a fixed number of slots that evicts by score as new tokens arrive.

A compressed prompt answered at length would otherwise grow by one slot per token and per layer. Under a
:class:`DecodeBudget` the cache has ``slots`` slots per layer and KV head for the prompt, the questions and
the answers together, and every new token (a decode step, or a question block) takes a free slot, evicting
one when none is free. What is evicted is decided by the same kind of score the prefill ranks the prompt by
(SnapKV's: the attention that the latest queries pay each entry), kept per slot and updated from the decode's
own attention, so no extra attention is computed:

    score <- decay * score + p_t        (p_t: this token's attention probability of the slot, averaged over
                                          the query heads of the KV group)

``decay = 0`` is TOVA's rule (Oren et al. 2024, "Transformers are Multi-State RNNs": evict the entry the
current query attends to least), ``decay = 1`` H2O's accumulated attention (Zhang et al. 2023), which favours
old entries; a decay in between is a running observation window of about ``1 / (1 - decay)`` queries. The
``recent`` most recent tokens are never evicted (the window SnapKV / H2O always keep), and among the others
the lowest score goes, ties to the lower slot. Chosen over a fixed ring after the budget because a ring
drops the question and the video as soon as the answer is longer than the ring, whatever they are worth.

The scores live beside the cache (:class:`BudgetedCache`), as the slots' logical positions do (the prompt's
slots carry -1: older than any new token); the :class:`~purekv_jax.cache.KVCache` itself is unchanged, and
its ``length`` is not used under a budget (free slots are found by validity). Quantised caches are not
supported here (their codes are written once by the prefill).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import cache as C
from .question_prefill import block_attention


class DecodeBudgetError(ValueError):
    """A decode budget that cannot hold what it must (the prompt's slots, the recent window and a block)."""


@dataclasses.dataclass(frozen=True)
class DecodeBudget:
    """A fixed cache size for prompt + questions + answers (frozen, hashable: a static argument).

    slots: cache slots per layer and KV head, all of them (at least the prompt's kept slots, and the recent
      window plus one question block).
    recent: the most recent tokens, never evicted.
    decay: the running score's decay per new token (0: TOVA, 1: H2O's accumulated attention).
    """

    slots: int
    recent: int = 32
    decay: float = 0.9

    def __post_init__(self):
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
            raise DecodeBudgetError(f"DecodeBudget.slots={self.slots!r} must be an int >= 1")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0:
            raise DecodeBudgetError(f"DecodeBudget.recent={self.recent!r} must be an int >= 0")
        if not 0.0 <= float(self.decay) <= 1.0:
            raise DecodeBudgetError(f"DecodeBudget.decay={self.decay!r} must lie in [0, 1]")

    def check_block(self, block: int) -> None:
        """A block of ``block`` new tokens must find room outside the recent window."""
        if self.slots < self.recent + block:
            raise DecodeBudgetError(
                f"DecodeBudget.slots={self.slots} cannot take a block of {block} new tokens besides the "
                f"{self.recent} recent ones that are never evicted (needs slots >= {self.recent + block})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BudgetedCache:
    """A cache under a :class:`DecodeBudget`: kv (its ``C`` slots are the budget), score ``[L, B, Hkv, C]``
    float32 (each slot's running score), slot_pos ``[L, B, Hkv, C]`` int32 (each slot's logical position; -1
    for the prompt's slots)."""

    kv: C.KVCache
    score: jax.Array
    slot_pos: jax.Array

    def decode_positions(self) -> jax.Array:
        return self.kv.decode_positions()


def budgeted(cache: C.KVCache) -> BudgetedCache:
    """A prefill's cache under a budget: every slot scored 0, the prompt's slots at position -1."""
    if cache.quant is not None:
        raise DecodeBudgetError("a decode budget needs a cache in the model's dtype; this one holds quantised "
                                f"slots (kv_bits={cache.quant.bits})")
    return BudgetedCache(cache, jnp.zeros(cache.valid.shape, jnp.float32), jnp.full(cache.valid.shape, -1, jnp.int32))


def evict_lowest(score, valid, slot_pos, need, protect_from, k: int):
    """``valid [..., C]`` with the ``need [...]`` lowest-score evictable slots of each row marked free.

    Evictable: valid with ``slot_pos < protect_from [...]`` (older than the recent window). Ties go to the
    lower slot; ``k`` (static) bounds ``need``.
    """
    evictable = valid & (slot_pos < protect_from[..., None])
    key = jnp.where(evictable, -score, -jnp.inf)
    top_key, top = jax.lax.top_k(key, k)
    drop = (jnp.arange(k) < need[..., None]) & (top_key > -jnp.inf)
    hit = jnp.any((top[..., None] == jnp.arange(valid.shape[-1])) & drop[..., None], axis=-2)
    return valid & ~hit


def free_slots(valid, k: int):
    """``[..., k]`` the first ``k`` free slots of each row, ascending (``C`` where a row has fewer)."""
    c = valid.shape[-1]
    slot = jnp.arange(c, dtype=jnp.int32)
    order = jnp.sort(jnp.where(valid, slot + c, slot), axis=-1)[..., :k]
    return jnp.where(order < c, order, c)


@dataclasses.dataclass(frozen=True)
class EvictingKV:
    """The budgeted cache's step (a static ``kv_step`` of the decode loop and the append-prefill): attend over
    the cache and the block, update the scores from that attention, evict the lowest-score slots the block
    needs, write the block into free slots."""

    budget: DecodeBudget

    def attend_block(self, cache: BudgetedCache, layer, q, k, v, q_valid):
        """``q [B, Hq, T, hd]``, ``k``/``v [B, Hkv, T, hd]``, ``q_valid [B, T]`` (real tokens first) ->
        ``(attn [B, Hq, T, hd], cache)``."""
        kv, decay = cache.kv, jnp.float32(self.budget.decay)
        valid, c, t = kv.valid[layer], kv.capacity, k.shape[2]
        attn, probs = block_attention(q, kv.k[layer], kv.v[layer], valid, k, v, q_valid)
        n = jnp.sum(q_valid, axis=-1, dtype=jnp.int32)  # [B]
        steps = jnp.arange(t, dtype=jnp.int32)
        weight = jnp.where(q_valid, decay ** (n[:, None] - 1 - steps).astype(jnp.float32), 0.0)  # [B, T]
        gained = jnp.einsum("bhtk,bt->bhk", probs, weight)  # [B, Hkv, C + T]
        score = cache.score[layer] * (decay ** n.astype(jnp.float32))[:, None, None] + gained[..., :c]
        end = kv.next_position + n
        need = jnp.maximum(n[:, None] - jnp.sum(~valid, axis=-1, dtype=jnp.int32), 0)  # [B, Hkv]
        protect = jnp.broadcast_to((end - self.budget.recent)[:, None], need.shape)
        valid = evict_lowest(score, valid, cache.slot_pos[layer], need, protect, t)
        slots = free_slots(valid, t)
        slots = jnp.where((steps[None, :] < n[:, None])[:, None], slots, c)  # padding: dropped
        rows = jnp.arange(kv.batch)[:, None, None]
        heads = jnp.arange(valid.shape[1])[None, :, None]
        put = lambda a, x: a.at[rows, heads, slots].set(x.astype(a.dtype), mode="drop")
        new_pos = jnp.broadcast_to((kv.next_position[:, None] + steps)[:, None], slots.shape)
        kv = dataclasses.replace(
            kv,
            k=kv.k.at[layer].set(put(kv.k[layer], k)),
            v=kv.v.at[layer].set(put(kv.v[layer], v)),
            valid=kv.valid.at[layer].set(put(valid, jnp.ones(slots.shape, bool))),
        )
        if kv.token_index is not None:  # (a cache built without the record keeps none)
            kv = dataclasses.replace(kv, token_index=kv.token_index.at[layer].set(
                put(jnp.where(valid, kv.token_index[layer], -1), new_pos)))
        return attn, BudgetedCache(kv, cache.score.at[layer].set(put(score, gained[..., c:])),
                                   cache.slot_pos.at[layer].set(put(cache.slot_pos[layer], new_pos)))

    def attend(self, cache: BudgetedCache, layer, q, k, v):
        """One decode token (``T = 1``)."""
        return self.attend_block(cache, layer, q, k, v, jnp.ones((q.shape[0], 1), bool))

    def advance(self, cache: BudgetedCache, n=1) -> BudgetedCache:
        """The logical position moved on by ``n`` (int or ``[B]``) tokens; slots are found by validity."""
        return dataclasses.replace(cache, kv=dataclasses.replace(cache.kv, next_position=cache.kv.next_position + n))
