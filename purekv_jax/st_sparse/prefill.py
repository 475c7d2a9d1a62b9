"""ST-SpAttn in the model's prefill, and model-level head calibration.

``generate(..., policy=PureKVConfig(st_sparse=True, ...))`` resolves the policy's ST settings into an
:class:`~purekv_jax.config.STPlan` (``KVPlan.st``), then builds, on the host, one :class:`STLayout`
per prompt row from the (left-padded) token ids and the video grids, and hands the prefill an
:class:`STPrefillAttention`: a hashable callable ``fn(q, k, v, valid, layer)`` (the prefill attention
protocol of :mod:`purekv_jax.attention`) that runs the block-sparse kernel in layers ``>= st_start``
and the plain prefill attention (dense / flash) below.

Batches. ``generate`` left-pads every row to the bucket ``N``: a row with ``n`` real tokens holds them at
``[N - n, N)``. Each row gets its own layout (video starts counted from its first real token). Rows
with the same offset and the same layout share one kernel call on the slice ``[N - n, N)``; rows with
different layouts are handled per row (one kernel call per distinct layout: more code to compile, same
results). Rows without video use the plain attention in every layer. Padding query rows get zeros,
exactly what the dense path gives a query that sees no valid key.

Calibration (:func:`calibrate_model`): a dense prefill of one prompt, layer by layer; in each layer
``>= st_start`` sample video query rows (a different sample per layer), compare each candidate
pattern's output with dense attention per q head (O(rows * N), no N x N matrix), keep the lowest error.
The result is static data for ``PureKVConfig.head_patterns`` (the kernels' ``save_head_patterns`` /
``load_head_patterns`` / ``PureKVConfig(head_patterns_file=...)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention import (HeadPattern, LayoutError, STLayout, VideoSpan,
                                            block_sparse_attention, resolve_backend)
from models.family import family_of, text_stack
from models.qwen2_5_vl.model import static_grid
from purekv_jax.attention import prefill_attention_impl
from purekv_jax.config import PureKVConfig, STPlan
from purekv_jax.st_sparse.calibrate import DEFAULT_CANDIDATES, pattern_errors, sample_video_rows
from purekv_jax.st_sparse.cost import PathChoice, choose_path, find_profile, load_profiles

__all__ = ["STPrefillAttention", "row_layouts", "st_prefill_attention", "CalibrationResult", "calibrate_model",
           "choose_patterns"]


# --------------------------------------------------------------------------------- layouts
def _merged_grids(config, video_grid) -> list[tuple[int, int, int]]:
    try:
        return family_of(config).video_token_grids(config, video_grid)
    except ValueError as err:
        raise LayoutError(str(err)) from None


def row_layouts(config, ids, valid, video_grid, *, spatial_radius=None, temporal_window=None):
    """Per row ``(offset, STLayout | None)``: ``offset`` is the row's first real token; the layout covers
    the real tokens ``[offset, N)`` (``None`` for a row without video). Videos are assigned to rows in
    order (the ``video_grid_thw`` convention); every video's tokens must be contiguous and match its
    merged grid, else :class:`LayoutError`."""
    ids, valid = np.asarray(ids), np.asarray(valid, bool)
    grids = _merged_grids(config, video_grid)
    k = 0
    out = []
    for r in range(ids.shape[0]):
        real = np.flatnonzero(valid[r])
        off = int(real[0])
        if not np.array_equal(real, np.arange(off, ids.shape[1])):
            raise LayoutError(f"row {r}: the real tokens must be one block at the end (left padding)")
        pos = np.flatnonzero(ids[r, off:] == family_of(config).video_token_id(config))
        spans, i = [], 0
        while i < pos.size:
            if k >= len(grids):
                raise LayoutError(f"row {r}: more video tokens than the {len(grids)} video grid(s) describe")
            t, h, w = grids[k]
            span = pos[i:i + t * h * w]
            if span.size < t * h * w or span[-1] - span[0] != t * h * w - 1:
                run = int(np.argmax(np.append(np.diff(span), 0) != 1)) + 1
                raise LayoutError(
                    f"row {r}, video {k}: merged grid (t, h, w) = {(t, h, w)} needs {t * h * w} contiguous "
                    f"video tokens from offset {int(span[0])}, but the prompt holds a run of {run}")
            spans.append(VideoSpan(int(span[0]), t, h, w))
            i += t * h * w
            k += 1
        n = ids.shape[1] - off
        out.append((off, STLayout(n, tuple(spans), spatial_radius, temporal_window) if spans else None))
    if k != len(grids):
        raise LayoutError(f"{len(grids)} video grid(s) given but the prompt holds {k} video(s)")
    return out


# --------------------------------------------------------------------------------- prefill attention
@dataclasses.dataclass(frozen=True)
class STPrefillAttention:
    """``fn(q, k, v, valid, layer)`` for the prefill: block-sparse ST attention in the layers with a
    pattern tuple, ``base`` attention elsewhere (hashable: a static jit argument).

    groups: ``(rows, offset, layout)``: rows sharing one layout, whose real tokens are ``[offset, N)``.
    dense_rows: rows without video (``base`` attention in every layer).
    plan: the resolved ST settings (per-layer patterns, backend, block sizes), with the pattern sets the cost
      model sent to the dense path already set to ``None``.
    choices: the cost model's decision per distinct pattern set (:class:`~purekv_jax.st_sparse.cost.PathChoice`).
    requested: the plan's per-layer patterns before the cost model's choice.
    """

    groups: tuple
    dense_rows: tuple
    plan: STPlan
    base: Any = "auto"
    choices: tuple = ()
    requested: tuple = ()

    @property
    def st_layers(self) -> tuple[int, ...]:
        """The layers that run block-sparse attention."""
        return self.plan.layers

    def report(self) -> list[dict]:
        """The cost model's decisions, one per distinct pattern set: its layers, the predicted seconds per layer
        of every head group block-sparse / the dense path / the choice (None: no measured profile for the
        backend, or ``st_select="always"``), the path (``sparse``, ``dense``, or ``mixed``: some head groups
        block-sparse, the others dense inside the kernel) and each head group's choice."""
        return [{"layers": [l for l, p in enumerate(self.requested) if p == c.patterns],
                 "patterns": sorted({p.name.lower() for p in c.patterns}),
                 "sparse_s": c.sparse_s, "dense_s": c.dense_s, "chosen_s": c.chosen_s, "path": c.path, "note": c.note,
                 "groups": [{"pattern": g.pattern.name.lower(), "heads": list(g.heads),
                             "path": "sparse" if g.sparse else "dense", "sparse_s": g.sparse_s, "dense_s": g.dense_s}
                            for g in c.groups]}
                for c in self.choices]

    def _st(self, pats, q, k, v, valid, layer, base_fn):
        b, _, n, _ = q.shape
        out = None
        for rows, off, lay in self.groups:
            whole = rows == tuple(range(b))
            r = np.asarray(rows)
            qs, ks, vs = (x if whole else x[r] for x in (q, k, v))
            o = block_sparse_attention(qs[:, :, off:], ks[:, :, off:], vs[:, :, off:], lay, head_patterns=pats,
                                       backend=self.plan.backend, block_q=self.plan.block_q,
                                       block_k=self.plan.block_k)
            if off:
                o = jnp.pad(o, ((0, 0), (0, 0), (off, 0), (0, 0)))
            if whole:
                return o.astype(q.dtype)
            out = (jnp.zeros_like(q) if out is None else out).at[r].set(o.astype(q.dtype))
        if self.dense_rows:
            r = np.asarray(self.dense_rows)
            out = out.at[r].set(base_fn(q[r], k[r], v[r], valid[r], layer))
        return out

    def __call__(self, q, k, v, valid, layer=None):
        base_fn = prefill_attention_impl(self.base, q.shape[2])
        sets = sorted({p for p in self.plan.layer_patterns if p is not None})
        if not sets:
            return base_fn(q, k, v, valid, layer)
        if layer is None:
            raise ValueError("STPrefillAttention needs the layer index")
        branch = [0 if p is None else 1 + sets.index(p) for p in self.plan.layer_patterns]
        if isinstance(layer, (int, np.integer)):
            i = branch[int(layer)]
            return base_fn(q, k, v, valid, layer) if i == 0 else self._st(sets[i - 1], q, k, v, valid, layer, base_fn)
        fns = [lambda q, k, v, valid, layer: base_fn(q, k, v, valid, layer)]
        fns += [functools.partial(self._st, p, base_fn=base_fn) for p in sets]
        idx = jnp.asarray(branch, jnp.int32)[layer]
        return jax.lax.switch(idx, fns, q, k, v, valid, layer)


def st_prefill_attention(st_plan: STPlan, config, ids, valid, video_grid, base="auto"):
    """The :class:`STPrefillAttention` for a left-padded batch (``ids``, ``valid`` [B, N]), or ``None``
    when no row holds a video (ST-SpAttn then changes nothing: the prefill runs exactly as without it).
    ``st_plan``: ``KVPlan.st`` (validated at resolution); ``base``: the prefill attention elsewhere.

    With ``st_plan.select == "auto"`` every distinct pattern set is priced on this batch's layouts by the
    backend's measured cost model (:mod:`purekv_jax.st_sparse.cost`), per head group; the sets predicted no
    faster than the dense path, and every set on a backend without a measured profile, run the dense path."""
    lays = row_layouts(config, ids, valid, video_grid, spatial_radius=st_plan.spatial_radius,
                       temporal_window=st_plan.temporal_window)
    if all(lay is None for _, lay in lays):
        return None
    by_layout: dict = {}
    dense = []
    for r, (off, lay) in enumerate(lays):
        if lay is None:
            dense.append(r)
        else:
            by_layout.setdefault((off, lay), []).append(r)
    groups = tuple((tuple(rows), off, lay) for (off, lay), rows in by_layout.items())
    cfg = config.text
    sets = sorted({p for p in st_plan.layer_patterns if p is not None})
    if st_plan.select == "always":
        choices = tuple(PathChoice(pats, pats, None, None, note="st_select='always'") for pats in sets)
    else:
        profile = find_profile(load_profiles(), resolve_backend(st_plan.backend).name)
        choices = tuple(choose_path(profile, pats, groups, int(np.shape(ids)[1]), cfg.num_attention_heads,
                                    cfg.head_dim, st_plan.backend, st_plan.block_q, st_plan.block_k, base)
                        for pats in sets)
    chosen_of = {c.patterns: c.chosen for c in choices}
    chosen = dataclasses.replace(st_plan, layer_patterns=tuple(None if p is None else chosen_of[p]
                                                               for p in st_plan.layer_patterns))
    return STPrefillAttention(groups=groups, dense_rows=tuple(dense), plan=chosen, base=base, choices=choices,
                              requested=st_plan.layer_patterns)


# --------------------------------------------------------------------------------- calibration
@dataclasses.dataclass
class CalibrationResult:
    """head_patterns: per layer ``None`` (below st_start) or a tuple of HeadPattern per q head;
    errors: ``[layers, candidates, q heads]`` relative errors (NaN below st_start)."""

    head_patterns: tuple
    errors: np.ndarray
    candidates: tuple
    st_start: int
    layout: STLayout
    rows_per_layer: int

    def config(self, policy):
        """``policy`` with these patterns (``dataclasses.replace``)."""
        return dataclasses.replace(policy, st_sparse=True, head_patterns=self.head_patterns,
                                   head_patterns_file=None)


def choose_patterns(errors, candidates, rel_tol: float = 0.0, atol: float = 0.0, group_size: int = 1) -> tuple:
    """Per layer (NaN rows -> None) the candidate with the lowest error per group of ``group_size``
    consecutive q heads (their errors summed; 1: per head); ties (and anything within
    ``best * (1 + rel_tol) + atol``) go to the earliest (cheapest) candidate.

    One pattern per KV group (``group_size`` = q heads per KV head) keeps grouped-query attention whole in the
    kernel: q heads of one KV head with different patterns run as separate passes over a repeated K / V."""
    errors = np.asarray(errors)
    cands = tuple(HeadPattern.parse(c) for c in candidates)
    heads = errors.shape[-1]
    if group_size < 1 or heads % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {heads} q heads")
    out = []
    for el in errors:
        if not np.isfinite(el).all():
            out.append(None)
            continue
        grouped = el.reshape(el.shape[0], heads // group_size, group_size).sum(-1)
        best = grouped.min(axis=0)
        pick = [cands[int(np.nonzero(grouped[:, j] <= best[j] * (1.0 + rel_tol) + atol * group_size)[0][0])]
                for j in range(grouped.shape[1])]
        out.append(tuple(p for p in pick for _ in range(group_size)))
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def _calib_layer(layers, layer, x, cos, sin, valid, *, cfg, attention):
    """Layer ``layer`` (traced: one program for every layer) of the stacked ``layers``: its output and q, k, v."""
    lp = jax.tree.map(lambda p: p[layer], layers)
    stack = text_stack(cfg)
    q, k, v = stack.layer_qkv(lp, x, cos, sin, cfg)
    attn = prefill_attention_impl(attention, x.shape[1])(q, k, v, valid, None)
    return stack.layer_out(lp, x, attn, cfg), q, k, v


def calibrate_model(params, config, input_ids, *, pixel_values=None, image_grid_thw=None,
                    pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, policy=None,
                    num_rows: int = 256, seed: int = 0, candidates=None, rel_tol: float = 0.0,
                    atol: float = 0.0, attention: str = "auto", per_kv_group: bool = True) -> CalibrationResult:
    """Calibrates the per-layer, per-head ST patterns on one prompt (``input_ids [1, N]``, no padding).

    Runs the dense prefill layer by layer (``attention``: "auto" / "dense" / "flash"); in every layer
    ``>= policy.st_first_layer()`` samples ``num_rows`` video query rows (seed ``seed + layer``) and
    scores each candidate pattern (default: temporal, spatial, union; cheapest first) against dense
    attention per q head (``pattern_errors``). ``policy`` (default ``PureKVConfig(st_sparse=True)``),
    resolved against the model (``policy.st_plan``), supplies ``st_start``, ``spatial_radius`` and
    ``temporal_window``. ``rel_tol`` / ``atol``: see
    :func:`choose_patterns` (errors below float noise are ties, which go to the cheaper pattern);
    ``per_kv_group``: one pattern for the q heads of each KV head (their errors summed), else one per q head.
    """
    policy = PureKVConfig(st_sparse=True) if policy is None else policy
    candidates = tuple(HeadPattern.parse(c) for c in (DEFAULT_CANDIDATES if candidates is None else candidates))
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"calibrate_model takes one prompt, input_ids [1, N]; got shape {ids.shape}")
    cfg = config.text
    n_layers = cfg.num_hidden_layers
    st = policy.st_plan(cfg)  # validates st_start (and the rest) against the model
    start = st.layers[0]
    image_grid, video_grid = static_grid(image_grid_thw), static_grid(video_grid_thw)
    if video_grid is None:
        raise ValueError("calibrate_model needs a video prompt (pixel_values_videos and video_grid_thw)")
    family = family_of(config)
    family.check_media(config, ids, image_grid, video_grid)
    valid = np.ones(ids.shape, bool)
    ((_, layout),) = row_layouts(config, ids, valid, video_grid, spatial_radius=st.spatial_radius,
                                 temporal_window=st.temporal_window)

    dtype = params.text.embed.dtype
    embed = jax.jit(family.embed, static_argnums=(1, 4, 6))
    x = embed(params, config, jnp.asarray(ids, jnp.int32),
              None if pixel_values is None else jnp.asarray(pixel_values, dtype), image_grid,
              jnp.asarray(pixel_values_videos, dtype), video_grid)
    pos, _ = family.prompt_positions(config, ids, valid, image_grid, video_grid, second_per_grid_ts)
    cos, sin = family.text.cos_sin(jnp.asarray(pos, jnp.int32), cfg)
    valid_j = jnp.asarray(valid)
    errors = np.full((n_layers, len(candidates), cfg.num_attention_heads), np.nan, np.float64)
    for l in range(n_layers):
        x, q, k, v = _calib_layer(params.text.layers, l, x, cos, sin, valid_j, cfg=cfg, attention=attention)
        if l >= start:
            rows = sample_video_rows(layout, num_rows, seed + l)
            errors[l] = pattern_errors(q, k, v, layout, rows, candidates)
    group = cfg.num_attention_heads // cfg.num_key_value_heads if per_kv_group else 1
    return CalibrationResult(choose_patterns(errors, candidates, rel_tol, atol, group), errors, candidates, start, layout,
                             min(num_rows, layout.num_video_tokens))
