"""Named KV-cache policies, each defined once: the command line's ``--policy`` names, the fidelity harness's
main and ablation rows and the retrieval study's rows.

A :class:`Preset` turns a budget into a :class:`~purekv_jax.config.PureKVConfig` (``None``: the full cache).
It starts from one of three configurations and changes a few fields:

- ``"full"``: no compression;
- ``"library"``: the library default, ``PureKVConfig(budget=...)``;
- ``"paper"``: the paper's CLIE, ``PureKVConfig.paper(budget)``, pinned independently of the library default;
  the baselines are published this way too (``cross_layer=False`` with their ``base``).

:data:`PRESETS` holds every name in one table. Where two studies name the same policy differently (the
command line's ``pyramid`` and the fidelity harness's ``pyramidkv``, the retrieval study's
``clie (paper, anchor 2)`` and ``clie``), the second name is an alias: a preset that takes its target's
configuration. The policy walks one way: command line / request -> :func:`build_policy` (the one place that
applies the command line's budget-independent overrides) -> :meth:`Preset.make` -> ``PureKVConfig`` ->
``PureKVConfig.resolve`` -> ``KVPlan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import BudgetBelowWindowError, PureKVConfig, register_named_policy

ORIGINS = ("full", "library", "paper")
GROUPS = ("cli", "main", "ablation", "retrieval", "bytes", "prompt_state", "carry")


class PresetError(ValueError):
    """An unknown policy name, or an override that cannot work (raised before any weights are read)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named policy.

    Attributes:
      name: the name the command line, a batch request or a study's results use.
      help: one line saying what the policy keeps (the command line's help, the fidelity table's note).
      group: the study that defined it: ``"cli"`` (the command line's own), ``"main"`` / ``"ablation"``
        (the fidelity harness's main rows and ablations), ``"retrieval"``, ``"bytes"`` (byte budgets at
        every code width, rows of both studies: docs/kv_bytes.md) or ``"carry"`` (scores carried across
        layers: docs/carry.md).
      origin: the configuration it starts from: ``"full"`` (no compression), ``"library"``
        (``PureKVConfig(budget=...)``) or ``"paper"`` (``PureKVConfig.paper(budget)``).
      fields: ``PureKVConfig`` fields changed from the origin, as ``(name, value)`` pairs.
      anchors_every: anchor layers every ``anchors_every`` layers from ``anchors_from`` up to the model's
        depth (``None``: the anchors of ``fields`` / the origin); such a preset needs ``n_layers``.
      anchors_from: the first of those anchor layers.
      probe: text of generic probe queries that score a question-agnostic cache (``None``: none); the caller
        tokenizes it with the model's tokenizer for :func:`purekv_jax.prompt_state.prefill_prompt`'s ``probe_ids``.
    """

    name: str
    help: str
    group: str
    origin: str = "paper"
    fields: tuple[tuple[str, Any], ...] = ()
    anchors_every: int | None = None
    anchors_from: int = 0
    probe: str | None = None

    def __post_init__(self):
        if self.origin not in ORIGINS:
            raise PresetError(f"preset {self.name!r}: origin {self.origin!r} is not one of {ORIGINS}")
        if self.group not in GROUPS:
            raise PresetError(f"preset {self.name!r}: group {self.group!r} is not one of {GROUPS}")

    def make(self, budget: float | int, n_layers: int | None = None, **overrides) -> PureKVConfig | None:
        """The configuration at ``budget`` (``None`` for the full cache), with ``overrides`` (``PureKVConfig``
        fields) over the preset's own fields; ``n_layers``: the model's depth, needed by ``anchors_every``."""
        if self.origin == "full":
            return None
        fields = dict(self.fields)
        if self.anchors_every is not None:
            if n_layers is None:
                raise PresetError(f"preset {self.name!r} places an anchor every {self.anchors_every} layers: "
                                  "give the model's n_layers")
            fields["anchor_layers"] = tuple(range(self.anchors_from, n_layers, self.anchors_every))
        fields.update(overrides)
        if self.origin == "library":
            return PureKVConfig(budget=budget, **fields)
        return PureKVConfig.paper(budget, **fields)


def _full(name: str, help: str, group: str) -> Preset:
    return Preset(name, help, group, origin="full")


def _paper(name: str, help: str, group: str, **fields) -> Preset:
    """``PureKVConfig.paper`` (the paper's CLIE) with ``fields`` changed."""
    return Preset(name, help, group, fields=tuple(fields.items()))


def _baseline(name: str, help: str, group: str, **fields) -> Preset:
    """A per-layer baseline as published: ``PureKVConfig.paper(cross_layer=False)`` with ``fields`` changed."""
    return _paper(name, help, group, cross_layer=False, **fields)


def _every(name: str, help: str, group: str, step: int, first: int, **fields) -> Preset:
    """The paper's CLIE with an anchor every ``step`` layers from ``first``."""
    return Preset(name, help, group, fields=tuple(fields.items()), anchors_every=step, anchors_from=first)


def _alias(name: str, target: Preset, group: str, help: str | None = None) -> Preset:
    """``target``'s configuration under another name (``help``: the target's unless given)."""
    return dataclasses.replace(target, name=name, group=group, help=target.help if help is None else help)


_FULL = _full("full", "the full KV cache, nothing dropped (baseline)", "main")
_LIBRARY = Preset(
    "purekv",
    "the library's default policy, PureKVConfig(budget=...), chosen by measurement on a real LM "
    "(docs/retrieval.md): every layer's own SnapKV window score (flash-compatible), the window aligned to the "
    "question (the prompt text after the video / image, at most --window tokens), avg pooling 15; add "
    "--st-sparse for the ST-SpAttn prefill",
    "cli", origin="library")
_RANDOM = _baseline("random", "random entries (plus the window and the sinks); a control", "main", base="random")
_STREAMING = _baseline("streaming", "StreamingLLM: the first --sink tokens plus the most recent ones", "main",
                       base="streaming")
_SNAPKV = _baseline("snapkv", "SnapKV: every layer ranks its entries by the attention of the last --window "
                              "prompt tokens", "main", base="snapkv")
_PYRAMIDKV = _baseline("pyramidkv", "SnapKV, layer-decreasing budgets", "main", base="pyramid")
_H2O = _baseline("h2o", "H2O: accumulated attention over all queries (evaluation only: needs the full attention "
                        "matrix)", "main", base="h2o")
_CLIE = _paper("clie", "the paper's CLIE: SnapKV window score at the --anchors layers, carried to the layers above "
                       "(times value norms)", "main")
_CLIE_NO_VNORM = _paper("clie_no_vnorm", "CLIE without the value-norm factor", "main", value_norm=False)

_ABLATIONS = (
    _paper("clie_anchor0", "anchor layer 0", "ablation", anchor_layers=(0,)),
    _paper("clie_anchor1", "anchor layer 1", "ablation", anchor_layers=(1,)),
    _paper("clie_anchor4", "anchor layer 4", "ablation", anchor_layers=(4,)),
    _paper("clie_anchor8", "anchor layer 8", "ablation", anchor_layers=(8,)),
    _paper("clie_anchor15", "anchor layer 15", "ablation", anchor_layers=(15,)),
    _paper("clie_anchor15_no_vnorm", "anchor 15, no value norm", "ablation", anchor_layers=(15,), value_norm=False),
    _paper("clie_anchor8_no_vnorm", "anchor 8, no value norm", "ablation", anchor_layers=(8,), value_norm=False),
    _every("clie_every8", "anchors 2, 10, 18, 26", "ablation", 8, 2),
    _every("clie_every4", "anchors every 4 layers from 2", "ablation", 4, 2),
    _every("clie_every2", "anchors every 2 layers from 2", "ablation", 2, 2),
    _paper("clie_pool_none", "no pooling", "ablation", pooling="none"),
    _paper("clie_pool_max7", "max pooling, kernel 7", "ablation", pooling="max"),
    _paper("clie_pool_avg15", "avg pooling, kernel 15", "ablation", kernel_size=15),
    _paper("clie_window16", "window 16", "ablation", window=16),
    _paper("clie_window64", "window 64", "ablation", window=64),
    _baseline("snapkv_window16", "SnapKV, window 16", "ablation", window=16),
    _baseline("snapkv_window64", "SnapKV, window 64", "ablation", window=64),
    _paper("clie_sink0", "no sink tokens", "ablation", sink=0),
    _baseline("snapkv_sink0", "SnapKV, no sinks", "ablation", sink=0),
    _baseline("snapkv_pool_max7", "SnapKV, max pooling", "ablation", pooling="max"),
    _baseline("snapkv_adakv", "SnapKV, AdaKV per-head budgets", "ablation", adaptive_heads=True),
    _baseline("snapkv_pool_avg15", "SnapKV, avg pooling 15", "ablation", kernel_size=15),
    _baseline("snapkv_pool_avg31", "SnapKV, avg pooling 31", "ablation", kernel_size=31),
    _baseline("snapkv_pool_avg63", "SnapKV, avg pooling 63", "ablation", kernel_size=63),
)
_BY_NAME = {p.name: p for p in _ABLATIONS}


def _qwin(name: str, help: str, **fields) -> Preset:
    """SnapKV as published with the window aligned to the question, and ``fields`` changed."""
    return _baseline(name, help, "retrieval", question_window=True, **fields)


_RETRIEVAL = (
    _alias("clie (paper, anchor 2)", _CLIE, "retrieval"),
    _alias("clie anchor 2, no vnorm", _CLIE_NO_VNORM, "retrieval"),
    _alias("clie anchor 8", _BY_NAME["clie_anchor8"], "retrieval"),
    _alias("clie anchor 15", _BY_NAME["clie_anchor15"], "retrieval"),
    _alias("clie anchor 15, no vnorm", _BY_NAME["clie_anchor15_no_vnorm"], "retrieval"),
    _every("clie every 2", "anchors every 2 layers from 0", "retrieval", 2, 0),
    _every("clie every 2, no vnorm", "anchors every 2 layers from 0, no value norm", "retrieval", 2, 0,
           value_norm=False),
    _every("clie every 4", "anchors every 4 layers from 0", "retrieval", 4, 0),
    _alias("snapkv adakv", _BY_NAME["snapkv_adakv"], "retrieval"),
    _qwin("snapkv qwin", "SnapKV, question-aligned window"),
    _qwin("snapkv adakv qwin", "SnapKV, question-aligned window, AdaKV per-head budgets", adaptive_heads=True),
    _qwin("snapkv qwin, max pool", "SnapKV, question-aligned window, max pooling", pooling="max"),
    _qwin("snapkv qwin, no pool", "SnapKV, question-aligned window, no pooling", pooling="none"),
    _qwin("snapkv qwin, pool 15", "SnapKV, question-aligned window, avg pooling 15", kernel_size=15),
    _qwin("snapkv qwin, pool 11", "SnapKV, question-aligned window, avg pooling 11", kernel_size=11),
    _qwin("snapkv qwin, pool 21", "SnapKV, question-aligned window, avg pooling 21", kernel_size=21),
    _qwin("snapkv qwin, pool 31", "SnapKV, question-aligned window, avg pooling 31", kernel_size=31),
    _qwin("snapkv qwin, pool 63", "SnapKV, question-aligned window, avg pooling 63", kernel_size=63),
    _qwin("snapkv qwin, max pool 15", "SnapKV, question-aligned window, max pooling 15", pooling="max",
          kernel_size=15),
    _qwin("snapkv qwin adakv, pool 15", "SnapKV, question-aligned window, AdaKV, avg pooling 15", kernel_size=15,
          adaptive_heads=True),
    _qwin("pyramidkv qwin, pool 15", "PyramidKV, question-aligned window, avg pooling 15", base="pyramid",
          kernel_size=15),
    _qwin("pyramidkv qwin", "PyramidKV, question-aligned window", base="pyramid"),
    _alias("snapkv max pool", _BY_NAME["snapkv_pool_max7"], "retrieval"),
    _alias("snapkv pool 15", _BY_NAME["snapkv_pool_avg15"], "retrieval"),
    _every("clie every 2 adakv", "anchors every 2 layers from 0, AdaKV per-head budgets", "retrieval", 2, 0,
           adaptive_heads=True),
    _alias("default PureKVConfig()", _LIBRARY, "retrieval"),
)

#: The library default's scoring under a byte budget, at every code width (``budget`` = the fraction of the
#: full cache's bytes in the model's dtype).
_BYTES = (
    Preset("purekv_bytes", "the default scoring, a byte budget, the cache in the model's dtype", "bytes",
           origin="library", fields=(("budget_unit", "bytes"),)),
    Preset("purekv_bytes_int8", "the default scoring, a byte budget, 8-bit KIVI keys / values (the recent window "
           "in the model's dtype)", "bytes", origin="library", fields=(("budget_unit", "bytes"), ("kv_bits", 8))),
    Preset("purekv_bytes_int4", "the default scoring, a byte budget, 4-bit KIVI keys / values (the recent window "
           "in the model's dtype)", "bytes", origin="library", fields=(("budget_unit", "bytes"), ("kv_bits", 4))),
    Preset("purekv_bytes_int2", "the default scoring, a byte budget, 2-bit KIVI keys / values (the recent window "
           "in the model's dtype)", "bytes", origin="library", fields=(("budget_unit", "bytes"), ("kv_bits", 2))),
    Preset("purekv_bytes_int4_adaptive", "a byte budget, 4-bit KIVI keys / values, the default scoring with "
           "AdaKV's per-head budgets (one top-k over a layer's KV heads)", "bytes", origin="library",
           fields=(("budget_unit", "bytes"), ("kv_bits", 4), ("adaptive_heads", True))),
    Preset("purekv_bytes_auto", "the default scoring, a byte budget, the code width the measured tables favour "
           "(kv_bits='auto')", "bytes", origin="library", fields=(("budget_unit", "bytes"), ("kv_bits", "auto"))),
)

#: Generic probe queries in the chat markup both models use: a request for everything the prompt holds, in the
#: place a question would be, so their queries score the cache the way many questions would.
GENERIC_PROBE = ("\n\nDescribe everything above in detail: what happens, who and what appears, every name, "
                 "code, number and fact.<|im_end|>\n<|im_start|>assistant\n")

#: Question-agnostic compression for a prompt that is prefilled once and asked many questions
#: (:mod:`purekv_jax.prompt_state`; docs/prompt_state.md).
_PROMPT_STATE = (
    Preset("agnostic_tail", "question-agnostic: the default scoring with a fixed window over the prompt's own last "
           "--window tokens (no question in the prompt)", "prompt_state", origin="library",
           fields=(("question_window", False),)),
    Preset("agnostic_probe", "question-agnostic: the default scoring with generic probe queries after the prompt as "
           "the window (scored with, never kept)", "prompt_state", origin="library", probe=GENERIC_PROBE),
)


def _carry(name: str, help: str, **fields) -> Preset:
    """The library default with a cross-layer carry (``PureKVConfig.carry``) and ``fields`` changed."""
    every = fields.pop("anchors_every", None)
    return Preset(name, help, "carry", origin="library", fields=tuple(fields.items()), anchors_every=every)


#: The carry study's rows (docs/carry.md): the default's scoring, each layer also taking from the layers below.
_CARRY = (
    _carry("carry accumulate 0.3", "own score + 0.3 x the decayed consensus of the layers below",
           carry="accumulate", carry_decay=0.3),
    _carry("carry accumulate 0.6", "own score + 0.6 x the decayed consensus of the layers below",
           carry="accumulate", carry_decay=0.6),
    _carry("carry accumulate 0.9", "own score + 0.9 x the decayed consensus of the layers below",
           carry="accumulate", carry_decay=0.9),
    _carry("carry rerank every 2", "anchors every 2 layers; owned layers re-rank the anchor's top 2 x budget by "
           "their own score", carry="rerank", cross_layer=True, anchors_every=2),
    _carry("carry rerank every 4", "anchors every 4 layers; owned layers re-rank the anchor's top 2 x budget by "
           "their own score", carry="rerank", cross_layer=True, anchors_every=4),
    _carry("carry allocate", "own scores; each layer's budget from its window-score entropy (up to 2 x)",
           carry="allocate"),
    _carry("carry allocate p4", "own scores; each layer's budget from its window-score entropy ** 4 (up to 2 x)",
           carry="allocate", carry_power=4.0),
    _carry("carry allocate missed", "own scores; each layer's budget from the score mass the uniform budget misses "
           "(up to 2 x)", carry="allocate", carry_statistic="missed"),
)

#: Every named policy, by name (the fidelity harness's main rows first, in its order).
PRESETS: dict[str, Preset] = {p.name: p for p in (
    _FULL, _RANDOM, _STREAMING, _SNAPKV, _PYRAMIDKV, _H2O, _CLIE, _CLIE_NO_VNORM,
    _alias("purekv_default", _LIBRARY, "main", help="PureKVConfig()"),
    _LIBRARY,
    _alias("pyramid", _PYRAMIDKV, "cli",
           help="PyramidKV: SnapKV scores with budgets decreasing from the bottom layers to the top"),
    *_ABLATIONS,
    *_RETRIEVAL,
    *_BYTES,
    *_PROMPT_STATE,
    *_CARRY,
)}

#: ``--policy`` names of ``purekv generate`` / ``purekv batch`` (and a batch request's ``policy``), in the
#: order the help lists them.
CLI_POLICIES = ("full", "purekv", "clie", "snapkv", "pyramid", "streaming", "random", "h2o")

#: ``--policy`` names of ``purekv cache save``: the question-agnostic presets first (a saved cache is
#: compressed before any question is known), then the command line's own.
CACHE_POLICIES = ("agnostic_probe", "agnostic_tail") + CLI_POLICIES



def register_presets(presets: dict[str, Preset]) -> None:
    """Registers every preset that needs nothing but a budget (not the full cache, no anchors placed by the
    model's depth) as ``PureKVConfig.named(name)``, which ``PureKVConfig.snapkv()`` ... call."""
    for name, spec in presets.items():
        if spec.origin != "full" and spec.anchors_every is None:
            register_named_policy(name, spec.make)


register_presets(PRESETS)


def preset(name: str) -> Preset:
    """The preset called ``name``; :class:`PresetError` listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown policy {name!r}; known: {', '.join(PRESETS)}") from None


def presets_in(group: str) -> tuple[Preset, ...]:
    """The presets of ``group`` (see :attr:`Preset.group`), in :data:`PRESETS` order."""
    if group not in GROUPS:
        raise PresetError(f"unknown preset group {group!r}; known: {', '.join(GROUPS)}")
    return tuple(p for p in PRESETS.values() if p.group == group)


def build_policy(name: str, budget: float | int, window: int = 32, sink: int = 4, anchors=(2,),
                 st_sparse: bool = False, seed: int = 0, st_start: int | None = None,
                 head_patterns: str | None = None, budget_unit: str = "tokens",
                 kv_bits: int | str | None = None, names: tuple[str, ...] = CLI_POLICIES) -> PureKVConfig | None:
    """A ``--policy`` name (one of ``names``: :data:`CLI_POLICIES`, or :data:`CACHE_POLICIES`) with the command line's budget-independent overrides
    (``--window``, ``--sink``, ``--anchors``, ``--seed``, the ST-SpAttn flags, ``--budget-unit``,
    ``--kv-bits``) -> ``None`` (the full cache) or a ``PureKVConfig``. The one place these overrides are
    applied (``purekv generate``, ``purekv batch`` and a batch request's ``policy`` come here). ``full`` with
    ``st_sparse`` or ``kv_bits``: every entry kept, ``PureKVConfig(budget=1.0, cross_layer=False, ...)``.

    Errors (:class:`PresetError`) are worded in the command line's flags; a field the configuration rejects
    raises its :class:`~purekv_jax.config.PureKVConfigError`.
    """
    if name not in names:
        raise PresetError(f"unknown --policy {name!r}; choose one of: {', '.join(names)}")
    if window < 1:
        raise PresetError(f"--window {window} must be >= 1")
    if sink < 0:
        raise PresetError(f"--sink {sink} must be >= 0")
    if not st_sparse and (st_start is not None or head_patterns is not None):
        raise PresetError("--st-start and --head-patterns configure ST-SpAttn: add --st-sparse")
    if name == "full" and budget_unit == "bytes":
        raise PresetError("--budget-unit bytes sets a compressing policy's budget: the full cache keeps every entry")
    st = {}
    if st_sparse:
        st = dict(st_sparse=True, st_start=None if st_start is None else int(st_start),
                  head_patterns_file=head_patterns)
    shape = dict(window=window, sink=sink, anchor_layers=tuple(anchors), **st)
    if kv_bits is not None:
        shape["kv_bits"] = kv_bits
    try:
        if name == "full":
            return PureKVConfig(budget=1.0, cross_layer=False, **shape) if st_sparse or kv_bits else None
        if budget_unit != "tokens":
            shape["budget_unit"] = budget_unit
        return preset(name).make(budget, seed=seed, **shape)
    except BudgetBelowWindowError as err:
        raise PresetError(f"--budget {err.budget} is below the --window {err.window} + --sink {err.sink} = "
                          f"{err.window + err.sink} tokens that are always kept; raise --budget or lower --window"
                          ) from None


def policy_label(name: str, policy: PureKVConfig | None) -> str:
    """How a run names its policy: ``"full"`` or ``"NAME budget=B"``, ``+st-sparse`` with ST-SpAttn."""
    st = "+st-sparse" if policy is not None and policy.st_sparse else ""
    if policy is None or name == "full":
        return "full" + st
    return f"{name} budget={policy.budget}{st}"
