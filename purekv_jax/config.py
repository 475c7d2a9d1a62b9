"""``PureKVConfig``: the user-facing KV-compression configuration, and its static resolution.

``PureKVConfig`` is what a user writes. ``PureKVConfig(budget=0.2)`` is the library's default policy, chosen
by measurement on a real LM (``docs/retrieval.md``): every layer ranks its entries by its own SnapKV window
score (``cross_layer=False``; window attention only, O(window * N), flash-compatible) with the observation
window aligned to the question (``question_window``: at most 32 tokens), 4 sink tokens, average pooling with
kernel 15. The paper's single-anchor CLIE (anchor layer 2, value norms above it, fixed 32-token window) is
:meth:`PureKVConfig.paper`. :meth:`PureKVConfig.resolve` turns it, together
with the model's :class:`~models.qwen2_5_vl.config.TextConfig` and the (bucketed) prompt length, into a
:class:`KVPlan`: static per-layer budgets, the number of cache slots, the layer segments of the prefill
(own-score / anchor / owned layers), the policy objects and, with ``st_sparse``, the ST-SpAttn prefill
(:class:`STPlan`). Every user error is raised there, before any device work.

Budget bucketing (outside jit): a fractional budget ``f`` becomes ``ceil(f * N)`` tokens for a prompt of
``N`` tokens (the longest row of the batch; shorter rows keep a larger share); an integer budget is taken
as is. A count below ``window + sink`` is an error (never silently raised). The count is then rounded up
to a multiple of ``budget_multiple`` (default 16) so that nearby prompt lengths share compiled programs,
and clipped to the (bucketed) prompt length: a budget that covers the whole prompt keeps everything,
exactly like the full cache. A prompt no longer than ``window + sink`` keeps everything (nothing can be
pruned).

Byte budgets (``budget_unit="bytes"``): ``budget`` is a fraction of the full cache's bytes in the model's
dtype, and the plan keeps as many tokens as that many bytes hold at the chosen width (``kv_bits``): the
most recent kept tokens (at least ``window``) in the model's dtype, the others as KIVI codes with their
scales and zero points (:mod:`purekv_jax.kv_quant`), counted in full (:func:`byte_budget_tokens`). The
count is rounded *down* to a multiple of ``budget_multiple`` (the bytes are a ceiling) and clipped to the
prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention import (BACKEND_NAMES, HeadPattern, load_head_patterns,
                                            normalize_layer_patterns)

from . import kv_quant as Q
from . import policies as P

if TYPE_CHECKING:  # pragma: no cover
    from models.qwen2_5_vl.config import TextConfig


class PureKVConfigError(ValueError):
    """A ``PureKVConfig`` field (or its combination with the model / prompt) that cannot work."""


class BudgetBelowWindowError(PureKVConfigError):
    """A budget that keeps fewer tokens than the window and the sinks, which are always kept.

    Holds the facts, so that a caller can word the error in its own terms (the command line's flags):
    ``budget``, ``kept`` (the tokens it keeps), ``window``, ``sink`` and ``prompt_len`` (``None`` for an int
    count, too small whatever the prompt).
    """

    def __init__(self, budget: float | int, kept: int, window: int, sink: int, prompt_len: int | None = None):
        self.budget, self.kept, self.window, self.sink, self.prompt_len = budget, kept, window, sink, prompt_len
        floor = window + sink
        if prompt_len is None:
            message = (f"PureKVConfig.budget={budget} is smaller than window + sink = {window} + {sink} = {floor}; "
                       "the window and the sinks are always kept")
        else:
            message = (f"PureKVConfig.budget={budget} gives {kept} tokens for a {prompt_len}-token prompt, smaller "
                       f"than window + sink = {floor}; raise the budget or shrink window/sink")
        super().__init__(message)


def budget_tokens(budget: float | int, window: int, sink: int, prompt_len: int | None = None) -> int | None:
    """The tokens ``budget`` keeps per layer and KV head, before bucketing: ``ceil(budget * prompt_len)`` for
    a fraction, the count itself for an int. ``prompt_len=None``: the int count on its own (``None`` for a
    fraction, which needs the prompt); otherwise a prompt longer than ``window + sink`` (a shorter one keeps
    everything: :meth:`PureKVConfig.budget_count`).

    The one place that decides "the budget covers the window and the sinks": they are always kept, so a
    smaller budget cannot be honoured (and is never silently raised): :class:`BudgetBelowWindowError`.
    """
    if prompt_len is None and isinstance(budget, float):
        return None
    kept = int(budget) if isinstance(budget, int) else math.ceil(budget * prompt_len)
    if kept < window + sink:
        raise BudgetBelowWindowError(budget, kept, window, sink, prompt_len)
    return kept


def quantized_split(slots: int, recent: int, group: int) -> int:
    """How many of ``slots`` kept prompt slots a quantised cache stores as codes: all but the ``recent`` most
    recent ones, rounded down to whole groups of ``group`` (the remainder stays in the model's dtype too)."""
    return max(0, (slots - recent) // group * group)


def kept_bytes(slots: int, full_token_bytes: int, bits: int | None, head_dim: int, recent: int, group: int) -> float:
    """Bytes ``slots`` kept prompt tokens cost per layer and KV head: ``full_token_bytes`` each in the model's
    dtype, or, with ``bits``, the quantised ones at :func:`purekv_jax.kv_quant.token_bytes` each (codes,
    scales and zero points)."""
    n_quant = 0 if bits is None else quantized_split(slots, recent, group)
    quant = Q.token_bytes(head_dim, bits, group) if n_quant else 0.0
    return (slots - n_quant) * full_token_bytes + n_quant * quant


def byte_budget_tokens(budget_bytes: float, full_token_bytes: int, bits: int | None, head_dim: int, recent: int,
                       group: int, limit: int, multiple: int) -> int:
    """The most tokens whose :func:`kept_bytes` fit ``budget_bytes``: ``limit`` (the prompt) when it fits,
    else the most below it, rounded down to a multiple of ``multiple``.

    :func:`kept_bytes` is not monotone in the count (one more token can complete a group, which then costs
    less as codes), but for each number of quantised slots it is: so the most tokens for each split, and
    the best of those.
    """
    cost = lambda s: kept_bytes(s, full_token_bytes, bits, head_dim, recent, group)
    if cost(limit) <= budget_bytes:
        return limit
    quant = 0.0 if bits is None else Q.token_bytes(head_dim, bits, group)
    best = 0
    for n_quant in (0,) if bits is None else range(0, max(limit - recent, 0) + 1, group):
        # with n_quant slots quantised, the model-dtype ones number recent .. recent + group - 1
        most = limit if bits is None else min(limit, n_quant + recent + group - 1)
        fit = min(most, n_quant + int((budget_bytes - n_quant * quant) // full_token_bytes))
        if fit >= (n_quant + recent if n_quant else 0):
            best = max(best, fit)
    count = best // multiple * multiple
    while count > 0 and cost(count) > budget_bytes:  # rounding down can move a group back to the model's dtype
        count -= multiple
    return count


#: ``kv_bits="auto"``, chosen by the fidelity tables of docs/kv_bytes.md: ``(whole, evicting)``: the width
#: when its codes hold the whole prompt within the bytes, and the width otherwise (where the tables' best
#: trades eviction for narrower codes).
AUTO_KV_BITS: tuple[int, int] = (8, 4)


def auto_kv_bits(budget_bytes: float, prompt_len: int, full_token_bytes: int, head_dim: int, recent: int,
                 group: int) -> int:
    """The code width ``kv_bits="auto"`` picks for ``budget_bytes`` (per layer and KV head) and a
    ``prompt_len``-token prompt (:data:`AUTO_KV_BITS`)."""
    whole, evicting = AUTO_KV_BITS
    fits = kept_bytes(prompt_len, full_token_bytes, whole, head_dim, recent, group) <= budget_bytes
    return whole if fits else evicting


#: the named policies' constructors, ``name -> fn(budget, **overrides) -> PureKVConfig``: registered by
#: :mod:`purekv_jax.presets` (the one table of named policies, which builds on this module) when the package
#: is imported; read by :meth:`PureKVConfig.named` and the constructors beside it (``PureKVConfig.snapkv()``...).
NAMED_POLICIES: dict = {}


def register_named_policy(name: str, make) -> None:
    """Makes ``PureKVConfig.named(name, budget, **overrides)`` call ``make(budget, **overrides)``."""
    NAMED_POLICIES[name] = make


BASES = ("snapkv", "h2o", "streaming", "random", "pyramid")
CARRIES = ("none", "accumulate", "rerank", "allocate")
BUDGET_UNITS = ("tokens", "bytes")
#: how a decode may attend the quantised slots (``PureKVConfig.kv_decode``).
KV_DECODE_PATHS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class PureKVConfig:
    """KV-cache compression settings (frozen, hashable: usable as a static jit argument).

    Attributes:
      budget: KV entries kept per layer and KV head. A ``float`` in ``(0, 1]`` is a fraction of the
        prompt length; an ``int >= 1`` is an absolute count. Bucketed outside jit (see module doc).
        With ``budget_unit="bytes"``: a fraction of the full cache's bytes in the model's dtype, or the bytes
        an int count of tokens takes in the model's dtype.
      budget_unit: ``"tokens"`` (the budget counts tokens) or ``"bytes"`` (it counts bytes: as many tokens
        are kept as fit at the chosen ``kv_bits``).
      kv_bits: ``None`` (the cache in the model's dtype), ``8``, ``4`` or ``2`` (KIVI-style quantised keys and
        values, :mod:`purekv_jax.kv_quant`; the most recent ``window`` kept tokens (up to a group more) and
        the decoded ones stay in the model's dtype) or ``"auto"`` (byte budgets only: the width the measured
        fidelity tables favour at the budget: :data:`AUTO_KV_BITS`).
      kv_group: slots per key scale (keys are quantised per channel) and channels per value scale (values
        per token); must divide the model's head_dim.
      kv_decode: how the decode attends the quantised slots: ``"xla"`` (KIVI's arithmetic on the codes) or
        ``"pallas"`` (the Pallas kernel of :mod:`kernels.quantized_decode_attention`: Triton on a GPU, Mosaic
        on a TPU, interpret mode on the CPU, where it is for tests only).
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
      head_patterns_file: a JSON written by ``purekv calibrate``, used when ``head_patterns`` is None; read
        and checked at resolution (:meth:`st_plan`), not at construction.
      st_block_q / st_block_k: kernel block sizes (``None``: the backend's default, 128 x 128).
      st_backend: one of the kernels' ``BACKEND_NAMES``: ``"auto"`` (Triton on GPU, Mosaic on TPU, the
        segment path elsewhere), ``"segments"`` (XLA: batched attention per frame and per place), ``"xla"``
        (XLA over gathered key blocks), ``"triton"``, ``"mosaic_gpu"`` / ``"mosaic_gpu_ws"`` (Hopper TMA +
        WGMMA, bf16 / f16), ``"tpu"``.
      st_select: ``"auto"``: each head group of a pattern set runs block-sparse only where the backend's
        measured cost model (:mod:`purekv_jax.st_sparse.cost`) predicts a gain over the dense prefill
        attention for this prompt (a backend and device without a measured profile keep the dense path), so
        ST-SpAttn never slows a prefill down; ``"always"``: block-sparse in every ST layer (the paper's rule).
      spatial_radius / temporal_window: optional limits of the spatial (|dy|, |dx| <= r) and temporal
        (the last T slots) patterns.
      seed: seed of the ``"random"`` policy.
      pyramid_beta: PyramidKV's ``beta`` (ratio of the mean to the smallest selectable budget).
      budget_multiple: the budget count is rounded up to a multiple of this (compile-bucketing).
      adaptive_heads: AdaKV-style budgets per KV head within a layer (SnapKV base only): one top-k over all
        heads of the layer for ``Hkv * budget`` entries; the cache keeps a fixed shape of
        ``adaptive_cap * budget`` slots per head (bucketed, clipped to the prompt) with a validity mask.
      adaptive_cap: the most a head may hold, as a multiple of the per-head budget.
      carry: what a layer's ranking takes from the layers below (docs/carry.md): ``"none"`` (own scores, or
        CLIE's anchors with ``cross_layer``), ``"accumulate"`` (own normalised score plus ``carry_decay`` times
        the decayed consensus of the layers below), ``"rerank"`` (with ``cross_layer``: owned layers order the
        CLIE estimate's top ``carry_candidates`` x budget entries by their own window score), ``"allocate"``
        (own scores; each layer's budget from its window-score entropy against the mean of the layers
        below, ``** carry_power``, within ``[window + sink, carry_cap x budget]``, the rows' totals kept).
      carry_decay: ``"accumulate"``'s decay per layer (0: the own score alone).
      carry_candidates: ``"rerank"``'s candidates, as a multiple of the budget.
      carry_power: ``"allocate"``'s sharpening of the entropy ratio.
      carry_cap: ``"allocate"``'s most a layer may keep, as a multiple of the budget (the cache's slots).
      carry_statistic: ``"allocate"``'s per-layer statistic: ``"entropy"`` (of the window score, as CAKE) or
        ``"missed"`` (the score mass outside the uniform budget's top entries, as DynamicKV).
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
    st_select: str = "auto"
    spatial_radius: int | None = None
    temporal_window: int | None = None
    seed: int = 0
    pyramid_beta: float = 20.0
    budget_multiple: int = 16
    adaptive_heads: bool = False
    adaptive_cap: float = 2.0
    budget_unit: str = "tokens"
    kv_bits: int | str | None = None
    kv_group: int = 64
    kv_decode: str = "xla"
    carry: str = "none"
    carry_decay: float = 0.5
    carry_candidates: float = 2.0
    carry_power: float = 1.0
    carry_cap: float = 2.0
    carry_statistic: str = "entropy"

    @classmethod
    def named(cls, name: str, budget: float | int = 0.2, **overrides) -> "PureKVConfig":
        """The named policy ``name`` at ``budget`` (``overrides``: fields changed), from the one preset table
        (:data:`purekv_jax.presets.PRESETS`, registered here when the package is imported)."""
        if name not in NAMED_POLICIES:
            raise PureKVConfigError(f"unknown named policy {name!r}; known: {', '.join(NAMED_POLICIES)}")
        return NAMED_POLICIES[name](budget, **overrides)

    @classmethod
    def snapkv(cls, budget: float | int = 0.2, **overrides) -> "PureKVConfig":
        """SnapKV as published: every layer ranks its entries by the attention of the last ``window`` prompt
        tokens (fixed window, avg pooling 7)."""
        return cls.named("snapkv", budget, **overrides)

    @classmethod
    def pyramid(cls, budget: float | int = 0.2, **overrides) -> "PureKVConfig":
        """PyramidKV: SnapKV scores with budgets decreasing from the bottom layers to the top."""
        return cls.named("pyramid", budget, **overrides)

    @classmethod
    def streaming(cls, budget: float | int = 0.2, **overrides) -> "PureKVConfig":
        """StreamingLLM: the first ``sink`` tokens plus the most recent ones."""
        return cls.named("streaming", budget, **overrides)

    @classmethod
    def h2o(cls, budget: float | int = 0.2, **overrides) -> "PureKVConfig":
        """H2O: attention accumulated over all queries (evaluation only: the full attention matrix)."""
        return cls.named("h2o", budget, **overrides)

    @classmethod
    def random(cls, budget: float | int = 0.2, **overrides) -> "PureKVConfig":
        """Random entries plus the window and the sinks (a control)."""
        return cls.named("random", budget, **overrides)

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
        self._check_kv_storage()
        budget_tokens(b, self.window, self.sink)  # an int count must cover the window and the sinks
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
        self._check_carry()
        if self.pyramid_beta <= 1.0:
            raise PureKVConfigError(f"PureKVConfig.pyramid_beta={self.pyramid_beta} must be > 1")
        if self.budget_multiple < 1:
            raise PureKVConfigError(f"PureKVConfig.budget_multiple={self.budget_multiple} must be >= 1")
        if self.adaptive_heads and (self.base != "snapkv" or not self.adaptive_cap >= 1.0):
            raise PureKVConfigError(
                f"PureKVConfig.adaptive_heads=True needs base='snapkv' (scores comparable across heads) and "
                f"adaptive_cap >= 1, got base={self.base!r}, adaptive_cap={self.adaptive_cap}")

    def _check_carry(self):
        """The cross-layer carry against the other fields."""
        if self.carry not in CARRIES:
            raise PureKVConfigError(f"PureKVConfig.carry={self.carry!r} is not one of {CARRIES}")
        if self.carry == "none":
            return
        if self.base != "snapkv":
            raise PureKVConfigError(f"PureKVConfig.carry={self.carry!r} combines window scores: needs base='snapkv', "
                                    f"got base={self.base!r}")
        if (self.carry == "rerank") != self.cross_layer:
            raise PureKVConfigError(f"PureKVConfig.carry={self.carry!r} with cross_layer={self.cross_layer}: 'rerank' "
                                    "re-ranks CLIE's owned layers (cross_layer=True); the other carries replace CLIE")
        if self.carry == "allocate" and (self.adaptive_heads or self.kv_bits is not None):
            raise PureKVConfigError("PureKVConfig.carry='allocate' sets per-row layer budgets; adaptive_heads=True "
                                    "(per-head splits) and kv_bits (a static quantised split of the slots) cannot "
                                    f"follow them, got adaptive_heads={self.adaptive_heads}, kv_bits={self.kv_bits!r}")
        if self.carry_statistic not in ("entropy", "missed"):
            raise PureKVConfigError(f"PureKVConfig.carry_statistic={self.carry_statistic!r} is not one of "
                                    "('entropy', 'missed')")
        if not 0.0 <= self.carry_decay <= 1.0:
            raise PureKVConfigError(f"PureKVConfig.carry_decay={self.carry_decay} must lie in [0, 1]")
        if self.carry_candidates < 1.0 or self.carry_cap < 1.0 or self.carry_power <= 0.0:
            raise PureKVConfigError(f"PureKVConfig.carry_candidates={self.carry_candidates} and carry_cap="
                                    f"{self.carry_cap} must be >= 1, carry_power={self.carry_power} > 0")

    def carry_rule(self, n_layers: int, count: int, slots: int) -> P.CarryRule | None:
        """The plan's carry rule for a budget of ``count`` entries per layer in ``slots`` cache slots."""
        if self.carry == "accumulate":
            return P.AccumulatedCarry(decay=self.carry_decay)
        if self.carry == "rerank":
            return P.RerankCarry(candidates=math.ceil(self.carry_candidates * count))
        if self.carry == "allocate" and count < slots:
            return P.BudgetCarry(budget=count, n_layers=n_layers, low=self.window + self.sink, high=slots,
                                 power=self.carry_power, statistic=self.carry_statistic)
        return None

    def _check_kv_storage(self):
        """The budget unit and the quantisation fields on their own (the head_dim is :meth:`resolve`'s)."""
        if self.budget_unit not in BUDGET_UNITS:
            raise PureKVConfigError(f"PureKVConfig.budget_unit={self.budget_unit!r} is not one of {BUDGET_UNITS}")
        if self.kv_bits not in (None, *Q.KV_BITS, "auto") or isinstance(self.kv_bits, bool):
            raise PureKVConfigError(f"PureKVConfig.kv_bits={self.kv_bits!r} is not one of None, "
                                    f"{', '.join(map(str, Q.KV_BITS))}, 'auto'")
        if self.kv_bits == "auto" and self.budget_unit != "bytes":
            raise PureKVConfigError("PureKVConfig.kv_bits='auto' picks the width for a byte budget: set "
                                    "budget_unit='bytes'")
        if self.kv_decode not in KV_DECODE_PATHS:
            raise PureKVConfigError(f"PureKVConfig.kv_decode={self.kv_decode!r} is not one of {KV_DECODE_PATHS}")
        if self.kv_group < 4 or self.kv_group % 4:
            raise PureKVConfigError(f"PureKVConfig.kv_group={self.kv_group} must be a multiple of 4 (a group "
                                    "packs into whole bytes at every width)")

    def budget_bytes(self, prompt_len: int, head_dim: int, kv_dtype) -> tuple[float, int]:
        """A byte budget's bytes per layer and KV head, and a full token's (K and V in ``kv_dtype``)."""
        full_token = 2 * head_dim * jnp.dtype(kv_dtype).itemsize
        tokens_worth = self.budget if isinstance(self.budget, int) else self.budget * prompt_len
        return tokens_worth * full_token, full_token

    def code_bits(self, prompt_len: int, head_dim: int, kv_dtype) -> int | None:
        """The code width of the cache: ``kv_bits``, with ``"auto"`` resolved for the byte budget
        (:func:`auto_kv_bits`)."""
        if self.kv_bits != "auto":
            return self.kv_bits
        budget_bytes, full_token = self.budget_bytes(prompt_len, head_dim, kv_dtype)
        return auto_kv_bits(budget_bytes, prompt_len, full_token, head_dim, self.window, self.kv_group)

    # ------------------------------------------------------------------------------------- ST-SpAttn
    def _check_st(self):
        """The cheap ST-SpAttn checks (no file, no model): the rest is :meth:`st_plan`'s."""
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
        if self.st_select not in ("auto", "always"):
            raise PureKVConfigError(f"PureKVConfig.st_select={self.st_select!r} is not one of ('auto', 'always')")
        if self.st_backend not in BACKEND_NAMES:
            raise PureKVConfigError(f"PureKVConfig.st_backend={self.st_backend!r} is not one of "
                                    f"{BACKEND_NAMES}")
        if self.head_patterns is not None:
            try:
                pats = normalize_layer_patterns(self.head_patterns)
            except ValueError as e:
                raise PureKVConfigError(f"PureKVConfig.head_patterns: {e}") from None
            object.__setattr__(self, "head_patterns", pats)

    def st_first_layer(self) -> int:
        """``st_start``, or the layer after the last anchor."""
        if self.st_start is not None:
            return int(self.st_start)
        return (max(self.anchor_layers) + 1) if self.anchor_layers else 0

    def _given_head_patterns(self) -> tuple | None:
        """``head_patterns``, else the patterns read from ``head_patterns_file`` (None: neither)."""
        if self.head_patterns is not None or self.head_patterns_file is None:
            return self.head_patterns
        try:
            return load_head_patterns(self.head_patterns_file)
        except ValueError as e:
            raise PureKVConfigError(f"PureKVConfig.head_patterns_file: {e}") from None

    def st_plan(self, text_cfg: "TextConfig") -> "STPlan":
        """ST-SpAttn resolved against the model (also when ``st_sparse`` is off: calibration uses it).
        Reads ``head_patterns_file`` and validates ``st_start`` and the head patterns against the model
        (and the H2O combination): every ST error is raised here."""
        n_layers, hq = text_cfg.num_hidden_layers, text_cfg.num_attention_heads
        start = self.st_first_layer()
        if start >= n_layers:
            raise PureKVConfigError(
                f"PureKVConfig.st_start={start} (first ST-SpAttn layer) is out of range for a model with "
                f"{n_layers} layers (valid: 0..{n_layers - 1})")
        pats = self._given_head_patterns()
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
        return STPlan(layer_patterns=tuple(out), backend=self.st_backend, block_q=self.st_block_q,
                      block_k=self.st_block_k, spatial_radius=self.spatial_radius,
                      temporal_window=self.temporal_window, select=self.st_select)

    # ------------------------------------------------------------------------------------- resolution
    def budget_count(self, prompt_len: int, head_dim: int, kv_dtype=jnp.float32) -> int:
        """The bucketed per-layer budget (tokens per KV head) for a prompt of ``prompt_len`` tokens
        (before clipping to the prompt). A byte budget needs the model's ``head_dim`` and ``kv_dtype``: the
        tokens whose bytes at :meth:`code_bits` fit the bytes of ``budget * prompt_len`` tokens (an int
        budget: ``budget`` tokens) in ``kv_dtype``."""
        if prompt_len <= self.window + self.sink:
            return prompt_len  # nothing can be pruned: the window and the sinks cover the prompt
        m = self.budget_multiple
        if self.budget_unit == "tokens":
            return -(-budget_tokens(self.budget, self.window, self.sink, prompt_len) // m) * m
        budget_bytes, full_token = self.budget_bytes(prompt_len, head_dim, kv_dtype)
        bits = self.code_bits(prompt_len, head_dim, kv_dtype)
        if self.adaptive_heads and bits is not None:
            # per-head counts: a head's codes may end in a part-filled key group, whose scales cost a whole one
            budget_bytes -= 2 * head_dim * Q.PARAM_BYTES
        kept = byte_budget_tokens(budget_bytes, full_token, bits, head_dim, self.window, self.kv_group, prompt_len, m)
        if kept < self.window + self.sink:
            raise BudgetBelowWindowError(self.budget, kept, self.window, self.sink, prompt_len)
        return kept

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

    def resolve(self, text_cfg: "TextConfig", prompt_len: int, padded_len: int | None = None,
                kv_dtype=jnp.float32) -> "KVPlan":
        """Static plan for a model and a prompt: validates everything that depends on them.

        ``prompt_len`` is the longest row's number of real tokens (fractions apply to it);
        ``padded_len`` (default ``prompt_len``) is the bucketed sequence length the prefill runs at;
        ``kv_dtype``: the dtype of the model's keys and values (a byte budget's reference).
        """
        n_layers = text_cfg.num_hidden_layers
        padded_len = prompt_len if padded_len is None else padded_len
        head_dim = text_cfg.head_dim
        bits = self.code_bits(prompt_len, head_dim, kv_dtype)
        if bits is not None and head_dim % self.kv_group:
            raise PureKVConfigError(f"PureKVConfig.kv_group={self.kv_group} does not divide the model's head_dim "
                                    f"{head_dim} (value scales cover groups of kv_group channels)")
        if self.cross_layer:
            bad = [a for a in self.anchor_layers if a >= n_layers]
            if bad:
                raise PureKVConfigError(
                    f"PureKVConfig.anchor_layers={self.anchor_layers}: layer(s) {bad} out of range for a model "
                    f"with {n_layers} layers (valid: 0..{n_layers - 1})"
                )
        count = self.budget_count(prompt_len, head_dim, kv_dtype)
        if self.base == "pyramid" and count < prompt_len:
            # (as PyramidKV's reference: a budget that covers the prompt compresses nothing)
            budgets = P.pyramid_budgets(n_layers, count, self.window, self.sink, self.pyramid_beta)
        else:
            budgets = (count,) * n_layers
        slots = min(max(budgets), padded_len)
        if self.adaptive_heads:  # AdaKV: a head may hold up to adaptive_cap x the per-head budget
            m = self.budget_multiple
            slots = min(-(-math.ceil(self.adaptive_cap * max(budgets)) // m) * m, padded_len)
        if self.carry == "allocate":  # a layer may keep up to carry_cap x the budget
            m = self.budget_multiple
            slots = min(-(-math.ceil(self.carry_cap * max(budgets)) // m) * m, padded_len)
        budgets = tuple(min(b, slots) for b in budgets)
        n_quant = 0 if bits is None else quantized_split(slots, self.window, self.kv_group)
        if n_quant and self.adaptive_heads:
            # the model-dtype slots stay those of the per-head budget (what the byte count assumed): a head
            # holding more entries holds the extra ones as codes
            recent = count - quantized_split(count, self.window, self.kv_group)
            n_quant = (slots - recent) // self.kv_group * self.kv_group
            slots = n_quant + recent
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
            st=self.st_plan(text_cfg) if self.st_sparse else None,
            quant=Q.QuantLayout(bits, self.kv_group, n_quant) if n_quant else None,
            carry=self.carry_rule(n_layers, count, slots) if count < prompt_len else None,
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
class STPlan:
    """ST-SpAttn resolved against a model (hashable: part of :class:`KVPlan`, a static jit argument).

    layer_patterns: per decoder layer, ``None`` (below ``st_start``: the plain prefill attention) or a
      tuple of :class:`HeadPattern`, one per q head.
    backend: the block-sparse kernel backend (one of the kernels' ``BACKEND_NAMES``).
    block_q / block_k: kernel block sizes (``None``: the backend's default).
    spatial_radius / temporal_window: the layouts' optional pattern limits.
    select: ``"auto"`` (block-sparse only where the cost model predicts a gain) or ``"always"``.
    """

    layer_patterns: tuple[tuple[HeadPattern, ...] | None, ...]
    backend: str = "auto"
    block_q: int | None = None
    block_k: int | None = None
    spatial_radius: int | None = None
    temporal_window: int | None = None
    select: str = "auto"

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers that may run ST-SpAttn (``st_start`` and above)."""
        return tuple(l for l, p in enumerate(self.layer_patterns) if p is not None)


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """A resolved, static compression plan (hashable; a static jit argument).

    ``budgets[l]`` entries are kept in layer ``l`` (per row and KV head); every layer's cache has
    ``slots`` prompt slots (``max(budgets)``), unused ones marked invalid. ``prunes`` is False when the
    budget covers the whole prompt. ``st``: the resolved ST-SpAttn prefill (None: off). ``quant``: how many
    of the ``slots`` are stored quantised, at which width (None: every slot in the model's dtype).
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
    st: STPlan | None = None
    quant: Q.QuantLayout | None = None
    carry: P.CarryRule | None = None  # what a layer takes from the layers below (``prefill.carried_score``)

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
    def kv_bits(self) -> int | None:
        """The code width of the quantised slots (None: nothing quantised)."""
        return None if self.quant is None else self.quant.bits

    @property
    def recent_slots(self) -> int:
        """The prompt slots kept in the model's dtype (all of them without quantisation)."""
        return self.slots - (0 if self.quant is None else self.quant.slots)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Per layer, the kind of the segment holding it (``full`` / ``own`` / ``anchor`` / ``owned``)."""
        return tuple(seg.kind for seg in self.segments for _ in range(seg.lo, seg.hi))

    def keep_window(self, window_len):
        """The observation window the keep-set forces: each row's question-aligned window
        (``window_len [B]``, capped at ``window``) when the plan aligns windows to the question, else the
        static ``window``. The one place where that switch is decided."""
        if self.question_window and window_len is not None:
            return jnp.minimum(jnp.asarray(window_len, jnp.int32), self.window)
        return self.window

    @property
    def needs_full_probs(self) -> bool:
        """True when some layer needs the full ``[N, N]`` attention probabilities (H2O)."""
        return isinstance(self.base, P.H2O)
