"""KV-cache compression policies: score functions and the shared keep-set.

Every policy is a small frozen dataclass with a ``score(ctx) -> [B, Hkv, N]`` float32 method (higher =
more important); :func:`keep_set` turns any score into the kept indices per layer and KV head, the same
way for every policy: the observation window (the last ``window`` real tokens), the first ``sink`` real
tokens, and the top ``budget - window - sink`` of the rest by score, sorted ascending. ``window`` is a static
int or a per-row ``[B]`` int32 array (the question-aligned window: each row's question, at most the static
window; see :mod:`purekv_jax.observation`). Ties go to the
lower index. Padded positions are never kept; a row with fewer real tokens than the budget keeps all of
them.

Layout assumed by the window-query scores (:class:`SnapKV`, :class:`H2O`): the prompt is *right-aligned*
(left padding), so the window queries of every row are the last ``window`` positions. ``generate``
re-aligns right-padded input on the host. :func:`keep_set` itself works with any padding.

Policies (METHOD.md "Baselines"; the full cache is ``generate(policy=None)``): :class:`RandomScore`, :class:`StreamingLLM`
(sinks + most recent), :class:`SnapKV` (window attention score), PyramidKV (:class:`SnapKV` with
:func:`pyramid_budgets`), :class:`H2O` (accumulated attention over all queries; evaluation only), and
:class:`CLIE` on top of any score-based one (the anchor's base score times the owned layer's value norms).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp

#: name of the ``jax.named_scope`` around every computation of attention probabilities for scoring;
#: tests look for it in the prefill's jaxpr (CLIE: only anchor / own-score layers may contain it).
SCORE_SCOPE = "purekv_score_probs"


class PolicyError(ValueError):
    """A policy used where it cannot work (e.g. H2O without full attention probabilities)."""


@dataclasses.dataclass(frozen=True)
class ScoreContext:
    """What a layer hands its score function.

    q ``[B, Hq, N, hd]`` (rotary applied), k / v ``[B, Hkv, N, hd]``, valid ``[B, N]`` (real tokens),
    layer (traced int32 scalar), probs: the full causal attention probabilities ``[B, Hq, N, N]``
    float32 when the layer computed them (only for :class:`H2O`), else ``None``; window_len ``[B]`` int32:
    each row's question-aligned observation window (``None``: the policy's static window).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    layer: Any
    probs: jax.Array | None = None
    window_len: jax.Array | None = None


# ------------------------------------------------------------------------------------------ helpers
def real_rank(valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(rank [B, N], count [B, 1])``: each position's index among the row's real tokens (-1 for
    padding) and the row's number of real tokens."""
    v = valid.astype(jnp.int32)
    rank = jnp.cumsum(v, axis=-1) - 1
    return jnp.where(valid, rank, -1), jnp.sum(v, axis=-1, keepdims=True)


def _per_row(window: int | jax.Array) -> int | jax.Array:
    """A static window as is; a per-row ``[B]`` window as ``[B, 1]`` (broadcasts against ``[B, N]``)."""
    return window if isinstance(window, int) else jnp.asarray(window, jnp.int32).reshape(-1, 1)


def in_window(valid: jax.Array, window: int | jax.Array) -> jax.Array:
    """``[B, N]`` True at the last ``window`` real tokens of each row (``window``: int or ``[B]``)."""
    rank, count = real_rank(valid)
    return valid & (rank >= count - _per_row(window))


def forced_mask(valid: jax.Array, window: int | jax.Array, sink: int) -> jax.Array:
    """``[B, N]`` True at the first ``sink`` and the last ``window`` real tokens of each row."""
    rank, _ = real_rank(valid)
    return (valid & (rank < sink)) | in_window(valid, window)


def pool1d(x: jax.Array, kind: str, kernel_size: int) -> jax.Array:
    """1-D pooling along the last axis, stride 1, "same" length, zero padding counted (torch's
    ``avg_pool1d(..., padding=k//2)`` with ``count_include_pad=True``, as SnapKV does)."""
    if kind == "none" or kernel_size == 1:
        return x
    pad = kernel_size // 2
    dims, strides = (1,) * (x.ndim - 1) + (kernel_size,), (1,) * x.ndim
    padding = ((0, 0),) * (x.ndim - 1) + ((pad, pad),)
    if kind == "avg":
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, padding) / kernel_size
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, padding)


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 softmax over the last axis; fully masked rows give zeros."""
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    d = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(d > 0, d, 1.0)


def window_attention_scores(q: jax.Array, k: jax.Array, valid: jax.Array, window: int,
                            window_len: jax.Array | None = None) -> jax.Array:
    """SnapKV's raw window score ``[B, Hkv, N]`` float32 for a right-aligned prompt.

    Softmax (float32) of the last ``window`` queries over all causal real keys, summed over the (real)
    window queries, averaged over the query heads of each KV group. ``window_len [B]`` (<= ``window``)
    narrows each row's window to its last ``window_len`` real queries (the question-aligned window).
    Cost O(window * N) per head; the probabilities exist only inside this function (named scope
    :data:`SCORE_SCOPE`).
    """
    with jax.named_scope(SCORE_SCOPE):
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        w = min(window, n)
        qw = q[:, :, n - w :].reshape(b, hkv, hq // hkv, w, d)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qw, k, preferred_element_type=jnp.float32) * (d**-0.5)
        qpos = jnp.arange(n - w, n)
        causal = jnp.arange(n)[None, :] <= qpos[:, None]  # [w, N]
        qvalid = (valid if window_len is None else in_window(valid, window_len))[:, n - w :]  # [B, w]
        mask = causal[None] & valid[:, None, :] & qvalid[:, :, None]  # [B, w, N]
        p = _masked_softmax(s, mask[:, None, None])
        return jnp.mean(jnp.sum(p, axis=3), axis=2)


def full_attention_probs(q: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
    """Causal, padding-aware float32 attention probabilities ``[B, Hq, N, N]`` (the O(N^2) matrix
    that H2O needs; named scope :data:`SCORE_SCOPE`)."""
    with jax.named_scope(SCORE_SCOPE):
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        qg = q.reshape(b, hkv, hq // hkv, n, d)
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
        mask = jnp.tril(jnp.ones((n, n), bool))[None] & valid[:, None, :] & valid[:, :, None]
        return _masked_softmax(s, mask[:, None, None]).reshape(b, hq, n, n)


def _zero_window(score: jax.Array, valid: jax.Array, window: int | jax.Array) -> jax.Array:
    """Zeroes the window positions (always kept anyway) before pooling, so that pooling near the window
    edge sees zero padding, as SnapKV pools over the prefix only."""
    rank, count = real_rank(valid)
    return jnp.where((rank >= count - _per_row(window))[:, None, :], 0.0, score)


# ------------------------------------------------------------------------------------------ policies
@dataclasses.dataclass(frozen=True)
class RandomScore:
    """Uniform random scores, independent per layer (``fold_in(seed, layer)``), row and KV head."""

    seed: int = 0

    def score(self, ctx: ScoreContext) -> jax.Array:
        b, hkv, n, _ = ctx.k.shape
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), ctx.layer)
        return jax.random.uniform(key, (b, hkv, n), jnp.float32)


@dataclasses.dataclass(frozen=True)
class StreamingLLM:
    """StreamingLLM: the sinks (forced by the keep-set) plus the most recent tokens; the score is the
    token's index among the row's real tokens (recency)."""

    def score(self, ctx: ScoreContext) -> jax.Array:
        rank, _ = real_rank(ctx.valid)
        b, hkv, n, _ = ctx.k.shape
        return jnp.broadcast_to(rank.astype(jnp.float32)[:, None, :], (b, hkv, n))


@dataclasses.dataclass(frozen=True)
class SnapKV:
    """SnapKV: window attention of the last ``window`` queries over all causal keys (float32 softmax),
    summed over the window queries, averaged over the query heads of each KV group, then pooled along
    the sequence (``avg``, kernel 7 by default). With layer-decreasing budgets it is PyramidKV.
    ``question_window``: each row's window is its question (``ctx.window_len``, at most ``window``)."""

    window: int = 32
    pooling: str = "avg"
    kernel_size: int = 7
    question_window: bool = False

    def score(self, ctx: ScoreContext) -> jax.Array:
        wl = None if ctx.window_len is None or not self.question_window else jnp.minimum(ctx.window_len, self.window)
        s = window_attention_scores(ctx.q, ctx.k, ctx.valid, self.window, wl)
        return pool1d(_zero_window(s, ctx.valid, self.window if wl is None else wl), self.pooling, self.kernel_size)


@dataclasses.dataclass(frozen=True)
class H2O:
    """H2O-style heavy hitters: attention accumulated over *all* (real, causal) queries, averaged over
    the query heads of each KV group.

    Evaluation only: it needs the full ``[N, N]`` attention probabilities of every scoring layer, so a
    layer using it cannot run a flash / block-sparse kernel. ``generate`` computes them densely for
    those layers and raises if asked for a flash path; :meth:`score` raises without them.
    """

    def score(self, ctx: ScoreContext) -> jax.Array:
        if ctx.probs is None:
            raise PolicyError(
                "H2O needs the full attention probabilities [B, Hq, N, N] of the layer (evaluation only); "
                "this layer ran without them (a flash-style attention path?)"
            )
        b, hq, n, _ = ctx.probs.shape
        hkv = ctx.k.shape[1]
        acc = jnp.sum(ctx.probs, axis=2)  # over queries -> [B, Hq, N]
        return jnp.mean(acc.reshape(b, hkv, hq // hkv, n), axis=2)


ScorePolicy = RandomScore | StreamingLLM | SnapKV | H2O


@dataclasses.dataclass(frozen=True)
class CLIE:
    """Cross-Layer Importance Estimation (METHOD.md): an owned layer ranks its entries by the anchor's
    score ``s_a [B, Hkv, N]`` times its own value norms ``||v_l||_2`` (``value_norm=True``). It never
    computes attention probabilities."""

    value_norm: bool = True

    def owned_score(self, carried: jax.Array, v: jax.Array) -> jax.Array:
        if not self.value_norm:
            return carried
        vf = v.astype(jnp.float32)
        return carried * jnp.sqrt(jnp.sum(vf * vf, axis=-1))


# ------------------------------------------------------------------------------------------ carries
def normalized_score(score: jax.Array) -> jax.Array:
    """``score [B, H, N]`` (non-negative) divided by its sum over the sequence, per row and head: a
    distribution, so that layers of different score scales weigh alike when combined."""
    total = jnp.sum(score, axis=-1, keepdims=True)
    return score / jnp.where(total > 0, total, 1.0)


@dataclasses.dataclass(frozen=True)
class AccumulatedCarry:
    """Accumulated carry: a layer ranks by its own normalised score plus ``decay`` times the carry of the
    layers below; the carry is ``decay * carry + (the layer's normalised score, averaged over its KV
    heads)`` (head ``h`` of one layer has no counterpart in the next, so the layers' consensus is carried
    per token). ``decay=0`` is the layer's own ranking. Carry ``[B, 1, N]`` float32."""

    decay: float = 0.5

    def init(self, b: int, hkv: int, n: int) -> jax.Array:
        return jnp.zeros((b, 1, n), jnp.float32)

    def step(self, own: jax.Array, carried: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``own [B, Hkv, N]`` -> ``(ranking score [B, Hkv, N], carry for the layer above)``."""
        norm = normalized_score(own)
        return norm + self.decay * carried, self.decay * carried + jnp.mean(norm, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class RerankCarry:
    """Anchors plus own correction: an owned layer takes the ``candidates`` entries its CLIE estimate ranks
    highest (the anchor's carried score times the layer's value norms) and orders them by its own window
    score; every other entry ranks below them. The carry is CLIE's (the last anchor's score)."""

    candidates: int

    def owned_score(self, estimate: jax.Array, own: jax.Array) -> jax.Array:
        """``estimate``, ``own [B, Hkv, N]`` (``own`` >= 0) -> ranking score ``[B, Hkv, N]``: ``own`` on the
        top ``candidates`` of ``estimate``, -1 elsewhere."""
        n = estimate.shape[-1]
        _, top = jax.lax.top_k(estimate, min(self.candidates, n))
        chosen = jnp.zeros(estimate.shape, bool).at[
            jnp.arange(estimate.shape[0])[:, None, None], jnp.arange(estimate.shape[1])[None, :, None], top].set(True)
        return jnp.where(chosen, own, -1.0)


@dataclasses.dataclass(frozen=True)
class BudgetCarry:
    """Cross-layer budget allocation (after CAKE's layer preferences, decided layer by layer as the prefill
    goes up): a layer whose window score is spread (high normalised entropy ``E_l``, mean over its KV
    heads) needs more entries than one whose score is concentrated. Layer ``l`` keeps, per row,
    ``budget * (E_l / mean(E_0..E_l)) ** power`` entries, less its share of what the layers below took beyond
    the budget (``debt / layers left``), clipped to ``[low, high]``; the last layer takes what is left, so
    the rows' totals match ``n_layers * budget`` unless the clipping binds. Carry ``[B, 2]`` float32: the
    sum of the statistics so far and the debt.

    ``statistic="missed"`` replaces the entropy by the score mass the uniform budget would miss (one minus
    the mass of the layer's top ``budget`` entries, after DynamicKV's per-layer top-k attention mass): a
    layer whose budget already holds nearly all of its mass gives entries to one that misses much.
    """

    budget: int
    n_layers: int
    low: int
    high: int
    power: float = 1.0
    statistic: str = "entropy"

    def init(self, b: int, hkv: int, n: int) -> jax.Array:
        return jnp.zeros((b, 2), jnp.float32)

    def step(self, own: jax.Array, carried: jax.Array, layer) -> tuple[jax.Array, jax.Array]:
        """``own [B, Hkv, N]`` (>= 0) -> ``(budget [B, 1, 1] int32, carry)`` for layer ``layer`` (traced)."""
        n = own.shape[-1]
        p = normalized_score(own)
        if self.statistic == "missed":
            stat = 1.0 - jnp.sum(jax.lax.top_k(p, min(self.budget, n))[0], axis=-1)
        else:
            stat = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1) / math.log(n)
        e = jnp.mean(stat, axis=1)  # [B]
        total, debt = carried[:, 0] + e, carried[:, 1]
        mean = total / (jnp.asarray(layer, jnp.float32) + 1.0)
        ratio = jnp.where(mean > 0, e / jnp.where(mean > 0, mean, 1.0), 1.0)
        left = jnp.asarray(self.n_layers - layer, jnp.float32)
        target = jnp.where(left > 1, self.budget * ratio ** self.power - debt / left, self.budget - debt)
        budget = jnp.clip(jnp.round(target), self.low, self.high)
        return budget.astype(jnp.int32)[:, None, None], jnp.stack([total, debt + budget - self.budget], axis=1)


CarryRule = AccumulatedCarry | RerankCarry | BudgetCarry


# ------------------------------------------------------------------------------------------ keep-set
def keep_set(
    score: jax.Array,
    valid: jax.Array,
    *,
    slots: int,
    budget: int | jax.Array,
    window: int | jax.Array,
    sink: int,
    adaptive: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Indices to keep per row and KV head, and whether each slot holds a kept real token.

    Args:
      score: ``[B, H, N]`` float32, higher = more important.
      valid: ``[B, N]`` bool, real tokens (any padding pattern).
      slots: static number of output slots (``>= budget``).
      budget: entries kept (static int, a traced scalar for per-layer budgets inside a scan, or ``[B, 1, 1]``
        int32 for per-row budgets: :class:`BudgetCarry`; not with ``adaptive``).
      window, sink: always kept (the last ``window`` and the first ``sink`` real tokens); ``window`` is a
        static int or a per-row ``[B]`` int32 array.
      adaptive: AdaKV-style per-head budgets (:func:`adaptive_select`): one top-k over all KV heads of the
        layer for ``H * budget`` entries in total, each head holding at most ``slots`` of them (the cache
        keeps its fixed shape; a head's unused slots are marked ``kept=False``).

    Returns:
      ``idx [B, H, slots]`` int32 and ``kept [B, H, slots]`` bool. The kept indices come first, sorted
      ascending; the remaining slots (row shorter than the budget, or ``budget < slots``) follow, marked
      ``kept=False``. Among non-forced tokens the top scores win, ties to the lower index.
    """
    n = score.shape[-1]
    forced = forced_mask(valid, window, sink)[:, None, :]
    key = jnp.where(forced, jnp.inf, jnp.where(valid[:, None, :], score.astype(jnp.float32), -jnp.inf))
    key = jnp.where(jnp.isnan(key), -jnp.inf, key)
    if adaptive:
        key = adaptive_select(key, budget, slots)
    top_key, top = jax.lax.top_k(key, slots)  # ties: lower index first
    rank = jnp.arange(slots, dtype=jnp.int32)
    is_valid = jnp.take_along_axis(jnp.broadcast_to(valid[:, None, :], key.shape), top, axis=-1)
    keep = ((top_key > -jnp.inf) if adaptive else (rank < budget)) & is_valid
    order = jnp.sort(jnp.where(keep, top, top + n), axis=-1)
    kept = order < n
    return jnp.where(kept, order, order - n).astype(jnp.int32), kept


def adaptive_select(key: jax.Array, budget: int | jax.Array, slots: int) -> jax.Array:
    """AdaKV-style selection across the KV heads of a layer: ``key [B, H, N]`` (forced entries ``+inf``,
    padding ``-inf``) -> the same keys with every entry outside the layer-wide top ``H * budget`` set to
    ``-inf``. Heads whose scores are concentrated give entries to heads whose scores are spread; the total
    equals the uniform per-head budget. One top-k over ``H * min(slots, N)`` candidates; ties go to the lower
    head, then the lower index. No attention matrix is involved."""
    b, h, n = key.shape
    flat = key.reshape(b, h * n)
    kk = h * min(slots, n)
    vals, top = jax.lax.top_k(flat, kk)
    sel = (jnp.arange(kk) < h * budget)[None] & (vals > -jnp.inf)
    mask = jnp.zeros((b, h * n), bool).at[jnp.arange(b)[:, None], top].set(sel)
    return jnp.where(mask.reshape(b, h, n), key, -jnp.inf)


def keep_all(valid: jax.Array, n_heads: int) -> tuple[jax.Array, jax.Array]:
    """The full policy's keep-set: every real token, ascending, then the padding slots (``kept=False``)."""
    b, n = valid.shape
    pos = jnp.arange(n, dtype=jnp.int32)
    order = jnp.sort(jnp.where(valid, pos, pos + n), axis=-1)
    kept = order < n
    idx = jnp.where(kept, order, order - n)
    return (jnp.broadcast_to(idx[:, None], (b, n_heads, n)), jnp.broadcast_to(kept[:, None], (b, n_heads, n)))


def pyramid_budgets(n_layers: int, budget: int, window: int, sink: int, beta: float = 20.0) -> tuple[int, ...]:
    """PyramidKV's layer-decreasing budgets with the same total (``n_layers * budget``).

    The selectable part ``e = budget - window - sink`` is spread as an arithmetic sequence from
    ``2e - e/beta`` (layer 0) down to ``e/beta`` (last layer) (PyramidKV's schedule, applied above the
    always-kept window and sinks); floors, with the remainder added to the lowest layers, keep the
    sequence non-increasing and the total exact.
    """
    e = budget - window - sink
    if n_layers == 1 or e <= 0:
        return (budget,) * n_layers
    e_min = Fraction(e) / Fraction(beta)
    e_max = 2 * e - e_min
    step = (e_max - e_min) / (n_layers - 1)
    floors = [math.floor(e_max - i * step) for i in range(n_layers)]
    rem = n_layers * e - sum(floors)  # 0 <= rem < n_layers
    floors = [f + (1 if i < rem else 0) for i, f in enumerate(floors)]
    return tuple(window + sink + f for f in floors)
