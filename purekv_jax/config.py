"""``PureKVConfig``: the user-facing KV-compression configuration, and its static resolution.

``PureKVConfig`` is what a user writes. ``PureKVConfig(budget=0.2)`` is the library's default policy, chosen
by measurement on a real LM (``docs/retrieval.md``): every layer ranks its entries by its own SnapKV window
score (``cross_layer=False``; window attention only, O(window * N), flash-compatible) with the observation
window aligned to the question (``question_window``: at most 32 tokens), 4 sink tokens, average pooling with
kernel 15. The paper's single-anchor CLIE (anchor layer 2, value norms above it, fixed 32-token window) is
:meth:`PureKVConfig.paper`. :meth:`PureKVConfig.resolve` turns it, together
with the model's :class:`~models.qwen2_5_vl.config.TextConfig` and the (bucketed) prompt length, into a
:class:`KVPlan`: static per-layer budgets, the number of cache slots, the layer segments of the prefill
(own-score / anchor / owned layers) and the policy objects. Every user error is raised there, before
any device work.

Budget bucketing (outside jit): a fractional budget ``f`` becomes ``ceil(f * N)`` tokens for a prompt of
``N`` tokens (the longest row of the batch; shorter rows keep a larger share); an integer budget is taken
as is. A count below ``window + sink`` is an error (never silently raised). The count is then rounded up
to a multiple of ``budget_multiple`` (default 16) so that nearby prompt lengths share compiled programs,
and clipped to the (bucketed) prompt length: a budget that covers the whole prompt keeps everything,
exactly like the full cache. A prompt no longer than ``window + sink`` keeps everything (nothing can be
pruned).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from . import policies as P

if TYPE_CHECKING:  # pragma: no cover
    from models.qwen2_5_vl.config import TextConfig


class PureKVConfigError(ValueError):
    """A ``PureKVConfig`` field (or its combination with the model / prompt) that cannot work."""


BASES = ("snapkv", "h2o", "streaming", "random", "pyramid")


@dataclasses.dataclass(frozen=True)
class PureKVConfig:
    """KV-cache compression settings (frozen, hashable: usable as a static jit argument).

    Attributes:
      budget: KV entries kept per layer and KV head. A ``float`` in ``(0, 1]`` is a fraction of the
        prompt length; an ``int >= 1`` is an absolute count. Bucketed outside jit (see module doc).
      window: observation window W: the last ``window`` prompt tokens, whose queries score the keys
        and which are always kept (with ``question_window``: the most a row's window may hold).
      question_window: align each row's observation window to the question the prompt ends with (SnapKV /
        PyramidKV bases): ``generate(question_len=...)`` when given, else the tokens after the last
        ``<|vision_end|>``, else the fixed ``window`` (:mod:`purekv_jax.observation`). Default on: on the real
        LM's needle retrieval it kept the fact more often than the fixed window at every budget and
        length (docs/retrieval.md).
      sink: the first ``sink`` prompt tokens, always kept (attention sinks; see METHOD.md's
        measurements: dropping them ruins shallow-anchor CLIE).
      pooling: ``"avg"`` (SnapKV), ``"max"`` or ``"none"``: 1-D pooling of the window score along
        the sequence.
      kernel_size: pooling kernel (odd; default 15: on the real LM's needle retrieval 15 kept the fact far more
        often than SnapKV's 7 at every budget and length, for about 1-2 % more continuation perplexity at
        1,024 tokens and none at 2,048; 11-21 do about as well, 63 worse: docs/retrieval.md).
      base: the base score: ``"snapkv"`` (window attention), ``"h2o"`` (accumulated attention over all
        queries; evaluation only, it needs the full attention matrix), ``"streaming"`` (sinks + most
        recent), ``"random"``, ``"pyramid"`` (SnapKV score with PyramidKV's layer-decreasing budgets).
      cross_layer: CLIE. Anchor layers compute the base score; every layer above an anchor (up to the
        next anchor) ranks its entries by the anchor's score times its own value norms. Layers below
        the first anchor use their own base score. Requires a score-based base (not ``"random"``).
        Default ``False`` (per-layer scores): on the real LM's needle retrieval the paper's single anchor
        loses the fact almost always (docs/retrieval.md); ``PureKVConfig.paper()`` turns it on.
      anchor_layers: 0-based anchor layers, strictly increasing (default ``(2,)``).
      value_norm: multiply the carried score by ``||v_l||_2`` in owned layers (CLIE's weighting).
      st_sparse: ST-SpAttn (METHOD.md): video query rows attend through the block-sparse
        spatial-temporal mask in prefill layers ``>= st_start`` (text, image and system-prompt rows stay
        dense); a prompt without video is unaffected. Alone (``cross_layer=False, budget=1.0``) or with CLIE.
      st_start: first ST layer; ``None`` = the layer after the last of ``anchor_layers`` (also when
        ``cross_layer=False``: the anchors then only fix this default).
      head_patterns: static per-layer, per-q-head patterns (calibration's output): a tuple with one entry
        per decoder layer, each ``None`` (union) or a tuple of ``"spatial"`` / ``"temporal"`` /
        ``"union"`` / ``"dense"`` (or :class:`HeadPattern`), one per q head. Entries below ``st_start``
        are ignored. ``None`` = union for every head (METHOD.md's default without calibration).
      head_patterns_file: a JSON written by ``purekv calibrate`` (read when ``head_patterns`` is None).
      st_block_q / st_block_k: kernel block sizes (``None``: the backend's default, 128 x 128).
      st_backend: ``"auto"`` (Triton on GPU, Mosaic on TPU, the XLA gathered-block fallback elsewhere),
        ``"xla"``, ``"triton"``, ``"mosaic_gpu"`` (Hopper TMA + WGMMA, bf16 / f16), ``"tpu"``.
      spatial_radius / temporal_window: optional limits of the spatial (|dy|, |dx| <= r) and temporal
        (the last T slots) patterns.
      seed: seed of the ``"random"`` policy.
      pyramid_beta: PyramidKV's ``beta`` (ratio of the mean to the smallest selectable budget).
      budget_multiple: the budget count is rounded up to a multiple of this (compile-bucketing).
      adaptive_heads: AdaKV-style budgets per KV head within a layer (SnapKV base only): one top-k over all
        heads of the layer for ``Hkv * budget`` entries; the cache keeps a fixed shape of
        ``adaptive_cap * budget`` slots per head (bucketed, clipped to the prompt) with a validity mask.
      adaptive_cap: the most a head may hold, as a multiple of the per-head budget.
    """

    budget: float | int = 0.2
    window: int = 32
    question_window: bool = True
    sink: int = 4
    pooling: str = "avg"
    kernel_size: int = 15
    base: str = "snapkv"
    cross_layer: bool = False  # per-layer SnapKV by default (docs/retrieval.md); True = the paper's CLIE
    anchor_layers: tuple[int, ...] = (2,)
    value_norm: bool = True
    st_sparse: bool = False
    st_start: int | None = None
    head_patterns: tuple | None = None
    head_patterns_file: str | None = None
    st_block_q: int | None = None
    st_block_k: int | None = None
    st_backend: str = "auto"
    spatial_radius: int | None = None
    temporal_window: int | None = None
    seed: int = 0
    pyramid_beta: float = 20.0
    budget_multiple: int = 16
    adaptive_heads: bool = False
    adaptive_cap: float = 2.0

    @classmethod
    def paper(cls, budget: float | int = 0.2, **overrides) -> "PureKVConfig":
        """The paper's single-anchor CLIE as METHOD.md describes it (SnapKV window score at anchor layer 2,
        value norms above it, window 32, 4 sinks, avg pooling 7), pinned independently of the defaults."""
        kw = dict(budget=budget, base="snapkv", cross_layer=True, anchor_layers=(2,), value_norm=True,
                  window=32, question_window=False, sink=4, pooling="avg", kernel_size=7, adaptive_heads=False)
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self):
        b = self.budget
        if isinstance(b, (np.integer, np.floating)):
            b = b.item()
            object.__setattr__(self, "budget", b)
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise PureKVConfigError(f"PureKVConfig.budget must be a float fraction or an int count, got {b!r}")
        if isinstance(b, float) and not (0.0 < b <= 1.0):
            raise PureKVConfigError(
                f"PureKVConfig.budget={b} as a fraction must lie in (0, 1]; pass an int for an absolute count"
            )
        if isinstance(b, int) and b <= 0:
            raise PureKVConfigError(f"PureKVConfig.budget={b} as a count must be >= 1")
        if self.window < 1:
            raise PureKVConfigError(f"PureKVConfig.window={self.window} must be >= 1")
        if self.sink < 0:
            raise PureKVConfigError(f"PureKVConfig.sink={self.sink} must be >= 0")
        if isinstance(b, int) and b < self.window + self.sink:
            raise PureKVConfigError(
                f"PureKVConfig.budget={b} is smaller than window + sink = {self.window} + {self.sink} = "
                f"{self.window + self.sink}; the window and the sinks are always kept"
            )
        if self.base not in BASES:
            raise PureKVConfigError(f"PureKVConfig.base={self.base!r} is not one of {BASES}")
        if self.pooling not in ("avg", "max", "none"):
            raise PureKVConfigError(f"PureKVConfig.pooling={self.pooling!r} is not one of ('avg', 'max', 'none')")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise PureKVConfigError(f"PureKVConfig.kernel_size={self.kernel_size} must be a positive odd number")
        anchors = tuple(int(a) for a in self.anchor_layers)
        object.__setattr__(self, "anchor_layers", anchors)
        if self.cross_layer:
            if not anchors:
                raise PureKVConfigError("PureKVConfig.anchor_layers is empty but cross_layer=True")
            if any(a < 0 for a in anchors) or list(anchors) != sorted(set(anchors)):
                raise PureKVConfigError(
                    f"PureKVConfig.anchor_layers={anchors} must be non-negative and strictly increasing"
                )
            if self.base == "random":
                raise PureKVConfigError(
                    "PureKVConfig.base='random' is not score-based, so CLIE cannot carry it upward; "
                    "set cross_layer=False"
                )
        self._check_st()
        if self.pyramid_beta <= 1.0:
            raise PureKVConfigError(f"PureKVConfig.pyramid_beta={self.pyramid_beta} must be > 1")
        if self.budget_multiple < 1:
            raise PureKVConfigError(f"PureKVConfig.budget_multiple={self.budget_multiple} must be >= 1")
        if self.adaptive_heads and (self.base != "snapkv" or not self.adaptive_cap >= 1.0):
            raise PureKVConfigError(
                f"PureKVConfig.adaptive_heads=True needs base='snapkv' (scores comparable across heads) and "
                f"adaptive_cap >= 1, got base={self.base!r}, adaptive_cap={self.adaptive_cap}")

    # ------------------------------------------------------------------------------------- ST-SpAttn
    def _check_st(self):
        from .st_sparse.prefill import load_head_patterns, normalize_layer_patterns

        if self.st_start is not None and (isinstance(self.st_start, bool) or int(self.st_start) < 0):
            raise PureKVConfigError(f"PureKVConfig.st_start={self.st_start!r} must be an int >= 0 or None")
        for name in ("st_block_q", "st_block_k"):
            val = getattr(self, name)
            if val is not None and int(val) < 1:
                raise PureKVConfigError(f"PureKVConfig.{name}={val} must be >= 1 or None")
        for name in ("spatial_radius", "temporal_window"):
            val = getattr(self, name)
            if val is not None and int(val) < 0:
                raise PureKVConfigError(f"PureKVConfig.{name}={val} must be >= 0 or None")
        if self.st_backend not in ("auto", "xla", "triton", "mosaic_gpu", "tpu"):
            raise PureKVConfigError(f"PureKVConfig.st_backend={self.st_backend!r} is not one of "
                                    f"('auto', 'xla', 'triton', 'mosaic_gpu', 'tpu')")
        pats = self.head_patterns
        if pats is None and self.head_patterns_file is not None:
            try:
                pats = load_head_patterns(self.head_patterns_file)
            except ValueError as e:
                raise PureKVConfigError(f"PureKVConfig.head_patterns_file: {e}") from None
        if pats is not None:
            try:
                pats = normalize_layer_patterns(pats)
            except ValueError as e:
                raise PureKVConfigError(f"PureKVConfig.head_patterns: {e}") from None
        object.__setattr__(self, "head_patterns", pats)

    def st_first_layer(self) -> int:
        """``st_start``, or the layer after the last anchor."""
        if self.st_start is not None:
            return int(self.st_start)
        return (max(self.anchor_layers) + 1) if self.anchor_layers else 0

    def st_layer_patterns(self, text_cfg: "TextConfig") -> tuple:
        """Per layer: ``None`` (no ST: layers below ``st_start``) or a tuple of ``HeadPattern`` per q head.
        Validates ``st_start`` and ``head_patterns`` against the model (and the H2O combination)."""
        from .st_sparse.layout import HeadPattern

        n_layers, hq = text_cfg.num_hidden_layers, text_cfg.num_attention_heads
        start = self.st_first_layer()
        if start >= n_layers:
            raise PureKVConfigError(
                f"PureKVConfig.st_start={start} (first ST-SpAttn layer) is out of range for a model with "
                f"{n_layers} layers (valid: 0..{n_layers - 1})")
        pats = self.head_patterns
        if pats is not None and len(pats) != n_layers:
            raise PureKVConfigError(
                f"PureKVConfig.head_patterns has {len(pats)} layer entries but the model has {n_layers} layers")
        out = []
        for l in range(n_layers):
            if l < start:
                out.append(None)
                continue
            p = None if pats is None else pats[l]
            if p is None:
                p = (HeadPattern.UNION,) * hq
            if len(p) != hq:
                raise PureKVConfigError(
                    f"PureKVConfig.head_patterns[{l}] has {len(p)} entries but the model has {hq} q heads")
            out.append(tuple(p))
        if self.base == "h2o":
            own_hi = max(self.anchor_layers) + 1 if self.cross_layer else n_layers
            if start < own_hi:
                raise PureKVConfigError(
                    f"base='h2o' computes dense attention probabilities in layers 0..{own_hi - 1}, which "
                    f"overlaps the ST-SpAttn layers (from st_start={start}); use cross_layer=True with "
                    f"st_start above the anchors")
        return tuple(out)

    # ------------------------------------------------------------------------------------- resolution
    def budget_count(self, prompt_len: int) -> int:
        """The bucketed per-layer budget (tokens per KV head) for a prompt of ``prompt_len`` tokens
        (before clipping to the prompt)."""
        raw = math.ceil(self.budget * prompt_len) if isinstance(self.budget, float) else int(self.budget)
        if prompt_len <= self.window + self.sink:
            return prompt_len  # nothing can be pruned: the window and the sinks cover the prompt
        if raw < self.window + self.sink:
            raise PureKVConfigError(
                f"PureKVConfig.budget={self.budget} gives {raw} tokens for a {prompt_len}-token prompt, smaller "
                f"than window + sink = {self.window + self.sink}; raise the budget or shrink window/sink"
            )
        m = self.budget_multiple
        return -(-raw // m) * m

    def base_policy(self) -> P.ScorePolicy:
        """The per-layer score policy named by ``base``."""
        if self.base in ("snapkv", "pyramid"):
            return P.SnapKV(window=self.window, pooling=self.pooling, kernel_size=self.kernel_size,
                            question_window=self.question_window)
        if self.base == "h2o":
            return P.H2O()
        if self.base == "streaming":
            return P.StreamingLLM()
        return P.RandomScore(seed=self.seed)

    def resolve(self, text_cfg: "TextConfig", prompt_len: int, padded_len: int | None = None) -> "KVPlan":
        """Static plan for a model and a prompt: validates everything that depends on them.

        ``prompt_len`` is the longest row's number of real tokens (fractions apply to it);
        ``padded_len`` (default ``prompt_len``) is the bucketed sequence length the prefill runs at.
        """
        n_layers = text_cfg.num_hidden_layers
        padded_len = prompt_len if padded_len is None else padded_len
        if self.cross_layer:
            bad = [a for a in self.anchor_layers if a >= n_layers]
            if bad:
                raise PureKVConfigError(
                    f"PureKVConfig.anchor_layers={self.anchor_layers}: layer(s) {bad} out of range for a model "
                    f"with {n_layers} layers (valid: 0..{n_layers - 1})"
                )
        count = self.budget_count(prompt_len)
        if self.base == "pyramid" and count < prompt_len:
            # (as PyramidKV's reference: a budget that covers the prompt compresses nothing)
            budgets = P.pyramid_budgets(n_layers, count, self.window, self.sink, self.pyramid_beta)
        else:
            budgets = (count,) * n_layers
        slots = min(max(budgets), padded_len)
        if self.adaptive_heads:  # AdaKV: a head may hold up to adaptive_cap x the per-head budget
            m = self.budget_multiple
            slots = min(-(-math.ceil(self.adaptive_cap * max(budgets)) // m) * m, padded_len)
        budgets = tuple(min(b, slots) for b in budgets)
        return KVPlan(
            budgets=budgets,
            slots=slots,
            segments=plan_segments(n_layers, self.anchor_layers if self.cross_layer else ()),
            base=self.base_policy(),
            clie=P.CLIE(value_norm=self.value_norm) if self.cross_layer else None,
            window=self.window,
            sink=self.sink,
            prunes=slots < padded_len or any(b < slots for b in budgets),
            head_adaptive=self.adaptive_heads and count < prompt_len,
            question_window=self.question_window and self.base in ("snapkv", "pyramid"),
        )


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive layers ``[lo, hi)`` of one kind: ``"full"`` (keep everything), ``"own"`` (each layer
    scores itself with the base policy), ``"anchor"`` (own score, carried upward) or ``"owned"`` (CLIE:
    the carried anchor score, times value norms; no attention probabilities)."""

    kind: str
    lo: int
    hi: int


def plan_segments(n_layers: int, anchors: tuple[int, ...]) -> tuple[Segment, ...]:
    """Layer segments of the prefill: own layers below the first anchor, then per anchor the anchor
    layer and the layers it owns (up to the next anchor). Without anchors: one ``own`` segment."""
    if not anchors:
        return (Segment("own", 0, n_layers),)
    segs = []
    if anchors[0] > 0:
        segs.append(Segment("own", 0, anchors[0]))
    bounds = list(anchors) + [n_layers]
    for a, nxt in zip(anchors, bounds[1:]):
        segs.append(Segment("anchor", a, a + 1))
        if nxt > a + 1:
            segs.append(Segment("owned", a + 1, nxt))
    return tuple(segs)


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """A resolved, static compression plan (hashable; a static jit argument).

    ``budgets[l]`` entries are kept in layer ``l`` (per row and KV head); every layer's cache has
    ``slots`` prompt slots (``max(budgets)``), unused ones marked invalid. ``prunes`` is False when the
    budget covers the whole prompt.
    """

    budgets: tuple[int, ...]
    slots: int
    segments: tuple[Segment, ...]
    base: P.ScorePolicy | None
    clie: P.CLIE | None
    window: int
    sink: int
    prunes: bool = True
    head_adaptive: bool = False  # AdaKV-style per-head budgets (``policies.keep_set(adaptive=True)``)
    question_window: bool = False  # per-row windows (``ScoreContext.window_len``) for scoring and keeping

    @classmethod
    def full(cls, n_layers: int, padded_len: int) -> "KVPlan":
        """The full cache: every prompt entry kept, no scoring."""
        return cls(
            budgets=(padded_len,) * n_layers,
            slots=padded_len,
            segments=(Segment("full", 0, n_layers),),
            base=None,
            clie=None,
            window=0,
            sink=0,
            prunes=False,
        )

    @property
    def needs_full_probs(self) -> bool:
        """True when some layer needs the full ``[N, N]`` attention probabilities (H2O)."""
        return isinstance(self.base, P.H2O)
