"""What KV compression does to a real model: continuation quality of every policy against the full cache.

For each prompt of ``N`` real tokens:

1. **Analysis prefill** (one jitted program per ``N``): the model's dense causal forward over the prompt,
   layer by layer (``layer_qkv`` -> ``dense_attention`` -> ``layer_out``, the same functions as
   ``decoder_forward``), keeping every layer's rotary-applied keys and values and every needed base score
   computed by the project's policy objects (``SnapKV(...).score``, ``H2O().score`` with the layer's full
   probabilities, ``StreamingLLM``, ``RandomScore``) on that layer's ``ScoreContext``.

   Pruning never changes the prefill's own hidden states (a layer attends densely over the whole prompt,
   then writes only its kept entries), so one analysis prefill serves every policy and budget: each
   policy's cache is exactly what ``generate``'s active prefill writes (``tests/test_fidelity.py`` checks
   this against ``purekv_jax.generation._prefill``).
2. **Keep sets**: ``PureKVConfig.resolve`` gives the static plan (per-layer budgets, slots, layer segments:
   own-score / anchor / CLIE-owned, the quantised slots of a byte budget); each layer's score is its own
   base score, or CLIE's carried anchor score times its value norms (``CLIE.owned_score``);
   ``policies.keep_set`` picks the window, the sinks and the top of the rest; ``cache.from_keep`` builds the
   :class:`~purekv_jax.cache.KVCache`, quantising with the function ``generate``'s prefill uses
   (``cache.quantize_entries``). The keys and values can be cast to a storage dtype first
   (``FidelitySettings.kv_dtype``: e.g. bfloat16, the dtype the byte budgets are then counted in).
3. **Teacher-forced continuation** (one jitted program per cache capacity): the next ``T`` real tokens in
   one forward, each layer attending to the compressed prompt cache (its valid slots, per KV head) plus
   the continuation's own keys, causally, at positions ``N .. N+T-1``. That is the set of keys a
   one-by-one decode sees after appending each token (``cache.append`` + ``decode_attention``), so the
   logits equal decoding token by token (checked in the tests).
4. **Metrics** against the full cache's continuation: perplexity of the true next tokens, top-1
   agreement with the full cache's argmax, mean KL(full || compressed) per token; and per layer the
   Spearman rank correlation between CLIE's carried estimate and the layer's own (true) window score.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.family import text_stack
from models.qwen2_5_vl.layers import dense_attention
from models.qwen2_5_vl.model import text_part
from models.qwen2_5_vl.text import TextConfig

from .. import cache as C
from .. import policies as P
from ..config import KVPlan, PureKVConfig
from ..prefill import carried_score, initial_carry, scan_layers
from ..presets import Preset, preset, presets_in
from .data import DEFAULT_SOURCES, make_windows


# ------------------------------------------------------------------------------------------ policies
#: The main rows: the pinned policies of :mod:`purekv_jax.presets` (group ``"main"``), less the library
#: default's row, which :func:`default_policy_spec` adds when it measures something new.
MAIN_POLICIES: tuple[Preset, ...] = tuple(p for p in presets_in("main") if p.name != "purekv_default")
ABLATIONS: tuple[Preset, ...] = presets_in("ablation")
#: The byte-budget rows (``FidelitySettings.kv_bytes``): the default scoring at every code width.
BYTES_POLICIES: tuple[Preset, ...] = presets_in("bytes")
#: The carried-score rows (``FidelitySettings.carry``): the default's scoring with a cross-layer carry.
CARRY_POLICIES: tuple[Preset, ...] = presets_in("carry")


def default_policy_spec() -> Preset | None:
    """The library default's row (``purekv_default``: ``PureKVConfig()``), when its configuration differs
    from every pinned main row's (the default was chosen among such policies; a duplicate adds nothing)."""
    row = preset("purekv_default")
    probe = row.make(0.2)
    if any(spec.make(0.2, 1000) == probe for spec in MAIN_POLICIES):
        return None
    return row


# ------------------------------------------------------------------------------------------ jitted parts
def score_policies_needed(configs) -> tuple:
    """The distinct base-score policy objects that ``configs`` (PureKVConfig) need, in a stable order."""
    seen = {}
    for c in configs:
        if c is not None:
            seen.setdefault(c.base_policy(), None)
    return tuple(seen)


@functools.partial(jax.jit, static_argnames=("cfg", "score_policies"))
def analysis_prefill(params, ids: jax.Array, window_len: jax.Array | None = None, *, cfg: TextConfig,
                     score_policies: tuple):
    """Dense prefill of ``ids [B, N]`` -> ``(k, v [L, B, Hkv, N, hd], scores: tuple of [L, B, Hkv, N],
    last-position logits [B, V])``, one score per policy of ``score_policies`` (the project's policy objects,
    each on its layer's context; ``window_len [B]``: the rows' question-aligned windows, used by the policies
    with ``question_window``). The layer loop is the prefill's own (:func:`purekv_jax.prefill.scan_layers`)."""
    b, n = ids.shape
    x = jnp.take(params.embed, ids, axis=0)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (b, n))
    cos, sin = text_stack(cfg).cos_sin(pos, cfg)
    valid = jnp.ones((b, n), bool)
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
    need_probs = any(isinstance(p, P.H2O) for p in score_policies)

    def step(carry, layer, q, k, v):
        attn = dense_attention(q, k, v, mask)
        probs = P.full_attention_probs(q, k, valid) if need_probs else None
        scores = tuple(pol.score(P.ScoreContext(q=q, k=k, v=v, valid=valid, layer=layer,
                                                probs=probs if isinstance(pol, P.H2O) else None,
                                                window_len=window_len))
                       for pol in score_policies)
        return attn, carry, (k, v, scores)

    x, _, (k, v, scores) = scan_layers(params, cfg, x, cos, sin, (0, cfg.num_hidden_layers), step, ())
    logits = text_stack(cfg).final_logits(params, x[:, -1:], cfg)[:, 0]
    return k, v, scores, logits


@functools.partial(jax.jit, static_argnames=("plan", "capacity"))
def build_cache(scores, k, v, window_len=None, budgets=None, *, plan: KVPlan, capacity: int | None = None):
    """Every layer's keep-set under ``plan`` (``policies.keep_set`` on ``scores [L, B, Hkv, N]``, the plan's
    per-layer budgets, window (``window_len [B]``: the rows' question-aligned windows, used when the plan
    aligns windows to the question), sinks and per-head budgets) -> ``(cache, idx [L, B, Hkv, slots], kept)``;
    the cache has ``capacity`` slots (default ``plan.slots``; more leaves room to decode), next position ``N``;
    ``budgets``: the layers' budgets when a carry decided them (:func:`carried_layers`; default the plan's)."""
    n_layers, b, _, n, _ = k.shape
    valid = jnp.ones((b, n), bool)
    window = plan.keep_window(window_len)
    keep = lambda s, budget: P.keep_set(s, valid, slots=plan.slots, budget=budget, window=window, sink=plan.sink,
                                        adaptive=plan.head_adaptive)
    idx, kept = jax.vmap(keep)(scores, jnp.asarray(plan.budgets if budgets is None else budgets, jnp.int32))
    cache = C.from_keep(k, v, idx, kept, capacity=plan.slots if capacity is None else capacity,
                        next_position=jnp.full((b,), n, jnp.int32), quant=plan.quant)
    return cache, idx, kept


@jax.jit
def build_full_cache(k, v):
    """The full cache (``policies.keep_all`` in every layer) -> ``(cache, idx, kept)``."""
    n_layers, b, hkv, n, _ = k.shape
    idx, kept = P.keep_all(jnp.ones((b, n), bool), hkv)
    idx, kept = (jnp.broadcast_to(a[None], (n_layers, *a.shape)) for a in (idx, kept))
    cache = C.from_keep(k, v, idx, kept, capacity=n, next_position=jnp.full((b,), n, jnp.int32))
    return cache, idx, kept


@functools.partial(jax.jit, static_argnames=("cfg",))
def continuation_logits(params, cache: C.KVCache, ids: jax.Array, *, cfg: TextConfig) -> jax.Array:
    """Teacher-forced logits ``[B, T, V]`` float32 of ``ids [B, T]`` fed after the cached prompt.

    Each layer appends the ``T`` new keys/values after the cache's slots; query ``t`` sees the valid cache
    slots of its KV head (quantised ones dequantised, as the decode step does) and the new tokens ``<= t``
    (exactly what ``T`` decode steps see), at rotary positions ``cache.decode_positions() + t``.
    """
    b, t = ids.shape
    hkv = cache.k.shape[2]
    g = cfg.num_attention_heads // hkv
    x = jnp.take(params.embed, ids, axis=0)
    pos = cache.decode_positions()[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    cos, sin = text_stack(cfg).cos_sin(pos, cfg)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None, None], (b, hkv, t, t))

    def body(x, xs):
        lp, kc, vc, valid, quant = xs
        kc, vc, valid = C.layer_entries(kc, vc, valid, quant)
        q, k, v = text_stack(cfg).layer_qkv(lp, x, cos, sin, cfg)
        keys = jnp.concatenate([kc, k.astype(kc.dtype)], axis=2)
        vals = jnp.concatenate([vc, v.astype(vc.dtype)], axis=2)
        mask = jnp.concatenate([jnp.broadcast_to(valid[:, :, None, :], (b, hkv, t, valid.shape[-1])), causal], -1)
        attn = dense_attention(q, keys, vals, jnp.repeat(mask, g, axis=1))
        return text_stack(cfg).layer_out(lp, x, attn, cfg), None

    x, _ = jax.lax.scan(body, x, (params.layers, cache.k, cache.v, cache.valid, cache.quant))
    return text_stack(cfg).final_logits(params, x, cfg)


@jax.jit
def continuation_metrics(logits, ref_logits, targets):
    """Per token: ``nll`` of ``targets`` under ``logits``, ``agree`` (argmax equals the reference's argmax),
    ``kl`` = KL(ref || this). Every input ``[B, T, ...]``; outputs ``[B, T]`` float32."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    rp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    agree = (jnp.argmax(lp, -1) == jnp.argmax(rp, -1)).astype(jnp.float32)
    kl = jnp.sum(jnp.exp(rp) * (rp - lp), axis=-1)
    return nll, agree, kl


def carried_layers(plan: KVPlan, table: dict, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each layer's ranking score ``[L, B, Hkv, N]`` and budget (``[L]``, or ``[L, B, 1, 1]`` when the plan's
    carry allocates budgets) under ``plan``, formed by the prefill's own carry
    (:func:`purekv_jax.prefill.carried_score`) from the base scores ``table[plan.base]`` and the values
    ``v [L, B, Hkv, N, hd]``."""
    base = table[plan.base]
    scores, budgets = [], []
    carried = initial_carry(plan, *base.shape[1:])
    for layer, kind in enumerate(plan.layer_kinds):
        score, budget, carried = carried_score(plan, kind, layer, lambda: base[layer], carried, v[layer],
                                               jnp.asarray(plan.budgets[layer], jnp.int32))
        scores.append(score)
        budgets.append(budget)
    return jnp.stack(scores), jnp.stack(budgets)


def layer_scores(plan: KVPlan, table: dict, v: jax.Array) -> jax.Array:
    """Each layer's ranking score ``[L, B, Hkv, N]`` under ``plan`` (:func:`carried_layers`)."""
    return carried_layers(plan, table, v)[0]


# ------------------------------------------------------------------------------------------ per prompt
@dataclasses.dataclass
class PromptAnalysis:
    """Everything one prompt's analysis prefill produced (device arrays)."""

    k: jax.Array
    v: jax.Array
    table: dict
    n_prompt: int


def language_model(params, cfg):
    """The text state and :class:`TextConfig` of a model of either family (a whole-model state and config:
    Qwen2.5-VL, VideoLLaMA2) or of a text model (a GGUF LM): the harness measures the language model."""
    return text_part(params), text_config(cfg)


def text_config(cfg) -> TextConfig:
    """The :class:`TextConfig` of a whole-model config (either family), or ``cfg`` itself."""
    return getattr(cfg, "text", cfg)


def analyse_prompt(params, cfg: TextConfig, prompt_ids: np.ndarray, configs, kv_dtype=None) -> PromptAnalysis:
    """The analysis prefill of one prompt (``params`` / ``cfg``: any model, :func:`language_model`);
    ``kv_dtype``: the dtype its keys and values are stored in (the caches' dtype; None: the model's)."""
    params, cfg = language_model(params, cfg)
    pols = score_policies_needed(configs)
    k, v, scores, _ = analysis_prefill(params, jnp.asarray(prompt_ids[None], jnp.int32), cfg=cfg, score_policies=pols)
    if kv_dtype is not None:
        k, v = k.astype(kv_dtype), v.astype(kv_dtype)
    return PromptAnalysis(k=k, v=v, table=dict(zip(pols, scores)), n_prompt=int(prompt_ids.shape[0]))


def policy_cache(an: PromptAnalysis, cfg: TextConfig, pk: PureKVConfig | None):
    """``(cache, idx, kept, plan)`` for one policy (``None`` = full) on an analysed prompt (byte budgets
    counted in the analysis' key / value dtype; ``cfg``: a text or whole-model config)."""
    cfg = text_config(cfg)
    if pk is None:
        cache, idx, kept = build_full_cache(an.k, an.v)
        return cache, idx, kept, KVPlan.full(cfg.num_hidden_layers, an.n_prompt)
    plan = pk.resolve(cfg, an.n_prompt, kv_dtype=an.k.dtype)
    scores, budgets = carried_layers(plan, an.table, an.v)
    cache, idx, kept = build_cache(scores, an.k, an.v, budgets=budgets, plan=plan)
    return cache, idx, kept, plan


def spearman_rows(est: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row pair (``[..., M]`` each, no NaN) -> ``[...]``."""
    from scipy.stats import rankdata

    re, rt = rankdata(est, axis=-1), rankdata(true, axis=-1)
    re = re - re.mean(-1, keepdims=True)
    rt = rt - rt.mean(-1, keepdims=True)
    den = np.sqrt((re * re).sum(-1) * (rt * rt).sum(-1))
    return np.where(den > 0, (re * rt).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


def clie_spearman(an: PromptAnalysis, cfg: TextConfig, pk: PureKVConfig) -> dict[str, np.ndarray]:
    """Per layer (mean over KV heads): Spearman between CLIE's estimate (with and without value norms) /
    the token position, and the layer's true window score (its own base score), over the selectable
    positions (sinks and window excluded)."""
    plan = pk.resolve(cfg, an.n_prompt)
    true = np.asarray(an.table[plan.base])[:, 0]  # [L, Hkv, N]
    n = an.n_prompt
    sel = slice(plan.sink, n - plan.window)
    est = np.asarray(layer_scores(plan, an.table, an.v))[:, 0]
    no_vn = dataclasses.replace(pk, value_norm=False).resolve(cfg, n)
    est_nv = np.asarray(layer_scores(no_vn, an.table, an.v))[:, 0]
    pos = np.broadcast_to(np.arange(n, dtype=np.float64), true.shape)
    return {
        "clie": spearman_rows(est[..., sel], true[..., sel]).mean(-1),
        "clie_no_vnorm": spearman_rows(est_nv[..., sel], true[..., sel]).mean(-1),
        "position": spearman_rows(pos[..., sel], true[..., sel]).mean(-1),
    }


def keep_overlap(idx, kept, ref_idx, ref_kept, n: int) -> np.ndarray:
    """Per layer: |kept ∩ ref kept| / |ref kept| (mean over rows and KV heads)."""
    a = np.zeros(np.asarray(idx).shape[:-1] + (n,), bool)
    r = np.zeros_like(a)
    np.put_along_axis(a, np.asarray(idx), np.asarray(kept), axis=-1)
    np.put_along_axis(r, np.asarray(ref_idx), np.asarray(ref_kept), axis=-1)
    inter = (a & r).sum(-1)
    return (inter / np.maximum(r.sum(-1), 1)).reshape(a.shape[0], -1).mean(-1)


# ------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass(frozen=True)
class FidelitySettings:
    lengths: tuple[int, ...] = (1024, 2048)
    budgets: tuple[float, ...] = (0.1, 0.2, 0.4)
    n_cont: int = 256
    prompts: int = 6
    ablations: bool = True
    ablation_lengths: tuple[int, ...] = (1024, 2048)
    ablation_budgets: tuple[float, ...] = (0.1, 0.2)
    spearman_policy: str = "clie"
    overlap_budget: float = 0.2
    seed: int = 0
    policies: tuple[str, ...] | None = None  # run only these (and full, snapkv, clie); None = all
    kv_bytes: bool = False  # add the byte-budget rows (BYTES_POLICIES) at ``budgets``
    kv_dtype: str | None = None  # the caches' dtype (byte budgets count in it); None: the model's
    carry: bool = False  # add the carried-score rows (CARRY_POLICIES, docs/carry.md) at ``budgets``


def run_fidelity(params, cfg: TextConfig, tokenizer, settings: FidelitySettings,
                 sources=None, log=print) -> dict:
    """Runs every (length, policy, budget) over ``settings.prompts`` windows per length -> a JSON-able dict
    (``params`` / ``cfg``: a model of either family or a text model, :func:`language_model`)."""
    params, cfg = language_model(params, cfg)
    t_start = time.perf_counter()
    n_layers = cfg.num_hidden_layers
    main = list(MAIN_POLICIES)
    extra = default_policy_spec()
    if extra is not None:
        main.append(extra)
    rows: dict[tuple, dict] = {}
    spearman: dict[str, dict[str, list]] = {}
    overlap: dict[str, dict[str, list]] = {}
    timings: dict[str, float] = {"analysis_s": 0.0, "continuation_s": 0.0, "cache_s": 0.0}
    sp_spec = next(s for s in main if s.name == settings.spearman_policy)
    extras = (list(BYTES_POLICIES) if settings.kv_bytes else []) + (list(CARRY_POLICIES) if settings.carry else [])
    unknown = set(settings.policies or ()) - {s.name for s in main + list(ABLATIONS) + extras}
    if unknown:
        raise ValueError(f"unknown fidelity policies {sorted(unknown)}; known: "
                         f"{[s.name for s in main + list(ABLATIONS) + extras]}")

    for n in settings.lengths:
        specs = main + (list(ABLATIONS) if settings.ablations and n in settings.ablation_lengths else []) + extras
        if settings.policies is not None:  # the reference rows (full, snapkv, clie) always run
            specs = [s for s in specs if s.name in ("full", "snapkv", settings.spearman_policy)
                     or s.name in settings.policies]
        def budgets_of(s):
            if s.name == "full":
                return (1.0,)
            return settings.ablation_budgets if s.group == "ablation" else settings.budgets

        grid = [(s, b, s.make(b, n_layers)) for s in specs for b in budgets_of(s)]
        windows = make_windows(tokenizer, n, settings.n_cont, settings.prompts, sources or DEFAULT_SOURCES,
                               seed=settings.seed + n)
        sp_acc: dict[str, list] = {}
        ov_acc: dict[str, list] = {}
        for wi, win in enumerate(windows):
            prompt, cont, targets = win.ids[:n], win.ids[n : n + settings.n_cont], win.ids[n + 1 : n + 1 + settings.n_cont]
            t0 = time.perf_counter()
            an = analyse_prompt(params, cfg, prompt, [c for _, _, c in grid], settings.kv_dtype)
            jax.block_until_ready(an.k)
            timings["analysis_s"] += time.perf_counter() - t0
            cont_j = jnp.asarray(cont[None], jnp.int32)
            tgt_j = jnp.asarray(targets[None], jnp.int32)
            full_cache, full_idx, full_kept, _ = policy_cache(an, cfg, None)
            ref = continuation_logits(params, full_cache, cont_j, cfg=cfg)
            snap_keep = {}
            for spec, b, pk in grid:
                t0 = time.perf_counter()
                cache, idx, kept, plan = policy_cache(an, cfg, pk)
                jax.block_until_ready(cache.k)
                t1 = time.perf_counter()
                logits = ref if pk is None else continuation_logits(params, cache, cont_j, cfg=cfg)
                nll, agree, kl = (np.asarray(a)[0] for a in continuation_metrics(logits, ref, tgt_j))
                timings["cache_s"] += t1 - t0
                timings["continuation_s"] += time.perf_counter() - t1
                row = rows.setdefault((n, spec.name, b), {
                    "n_prompt": n, "policy": spec.name, "group": spec.group, "note": spec.help, "budget": b,
                    "config": None if pk is None else _config_dict(pk), "nll": [], "agree": [], "kl": [],
                    "kept_fraction": [], "bytes_fraction": [], "kv_bits": plan.kv_bits, "sources": [],
                })
                row["nll"].append(float(nll.mean()))
                row["agree"].append(float(agree.mean()))
                row["kl"].append(float(kl.mean()))
                row["kept_fraction"].append(C.kv_tokens_kept(cache) / (n_layers * cache.k.shape[2] * n))
                row["bytes_fraction"].append(C.kv_bytes_kept(cache) / C.kv_bytes_full(
                    n, n_layers, cache.k.shape[2], cfg.head_dim, an.k.dtype))
                row["sources"].append(f"{win.source}@{win.offset}")
                if spec.name == "snapkv" and b == settings.overlap_budget:
                    snap_keep = (idx, kept)
                if b == settings.overlap_budget and pk is not None and snap_keep and spec.name != "snapkv":
                    ov_acc.setdefault(spec.name, []).append(keep_overlap(idx, kept, *snap_keep, n))
            sp = clie_spearman(an, cfg, sp_spec.make(settings.overlap_budget, n_layers))
            for k_, v_ in sp.items():
                sp_acc.setdefault(k_, []).append(v_)
            log(f"[fidelity] N={n} prompt {wi + 1}/{len(windows)} ({win.source}) done, "
                f"{time.perf_counter() - t_start:.0f} s elapsed")
        spearman[str(n)] = {k_: np.mean(v_, axis=0).round(4).tolist() for k_, v_ in sp_acc.items()}
        overlap[str(n)] = {k_: np.mean(v_, axis=0).round(4).tolist() for k_, v_ in ov_acc.items()}

    results = []
    for row in rows.values():
        nll = np.asarray(row["nll"])
        results.append({
            **{k_: row[k_] for k_ in ("n_prompt", "policy", "group", "note", "budget", "config", "kv_bits",
                                      "sources")},
            "ppl": float(np.exp(nll.mean())),
            "ppl_per_prompt": np.exp(nll).round(4).tolist(),
            "top1": float(np.mean(row["agree"])),
            "top1_per_prompt": np.round(row["agree"], 4).tolist(),
            "kl": float(np.mean(row["kl"])),
            "kl_per_prompt": np.round(row["kl"], 5).tolist(),
            "kept_fraction": float(np.mean(row["kept_fraction"])),
            "bytes_fraction": float(np.mean(row["bytes_fraction"])),
        })
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "settings": dataclasses.asdict(settings),
        "results": results,
        "spearman": spearman,
        "snapkv_overlap": overlap,
        "timings": {k_: round(v_, 2) for k_, v_ in timings.items()},
    }


def _config_dict(pk: PureKVConfig) -> dict:
    d = dataclasses.asdict(pk)
    d["anchor_layers"] = list(d["anchor_layers"])
    return d
