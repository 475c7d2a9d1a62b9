"""Public entry point: ST block-sparse attention over a layout, per-head patterns, backend table."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention.backends import Backend, KernelOptions, resolve_backend
from kernels.block_sparse_attention.blocks import block_tables
from kernels.block_sparse_attention.layout import (HeadPattern, LayoutError, STLayout, inverse_permutation,
                                                   permutation)
from kernels.block_sparse_attention.segments import merge_partials

__all__ = ["block_sparse_attention", "normalize_patterns", "merge_by_lse", "ShapeError", "HeadGroup",
           "head_groups", "backend_head_groups"]


class ShapeError(ValueError):
    """q / k / v shapes that do not fit together."""


def normalize_patterns(head_patterns, num_heads: int) -> tuple[HeadPattern, ...]:
    if isinstance(head_patterns, (HeadPattern, str, int)):
        pats = (HeadPattern.parse(head_patterns),) * num_heads
    else:
        pats = tuple(HeadPattern.parse(p) for p in head_patterns)
    if len(pats) != num_heads:
        raise ValueError(f"head_patterns has {len(pats)} entries but q has {num_heads} heads")
    if any(p.strict for p in pats):
        raise ValueError("temporal_strict is the internal second pass of a split union head (its "
                         "rows may have no key); use 'union', 'spatial', 'temporal' or 'dense'")
    return pats


@dataclasses.dataclass(frozen=True)
class HeadGroup:
    """The q heads that share one pattern and the kernel passes that compute them.

    heads: the q head indices; passes: ``(pattern, permuted)`` per kernel call over those heads (two for a
    split union group, merged by their log-sum-exps; one otherwise). What :func:`block_sparse_attention`
    runs, and what a cost model counts."""

    heads: tuple[int, ...]
    passes: tuple[tuple[HeadPattern, bool], ...]


def head_groups(head_patterns, num_heads: int, *, permute_temporal: bool = True,
                split_union: bool = True) -> tuple[HeadGroup, ...]:
    """The head groups and passes :func:`block_sparse_attention` runs for ``head_patterns``."""
    pats = normalize_patterns(head_patterns, num_heads)
    groups: dict[tuple[HeadPattern, bool], list[int]] = {}
    for h, p in enumerate(pats):
        groups.setdefault((p, bool(permute_temporal and p.default_permuted)), []).append(h)
    out = []
    for (pat, perm), heads in groups.items():
        if split_union and pat is HeadPattern.UNION:
            passes = ((HeadPattern.SPATIAL, False), (HeadPattern.TEMPORAL_STRICT, bool(permute_temporal)))
        else:
            passes = ((pat, perm),)
        out.append(HeadGroup(tuple(heads), passes))
    return tuple(out)


def backend_head_groups(head_patterns, num_heads: int, kernel: Backend, *, permute_temporal: bool = True,
                        split_union: bool = True) -> tuple[HeadGroup, ...]:
    """:func:`head_groups` as ``kernel`` runs them: one pass per pattern, in the original order, for a
    native-pattern backend (which neither permutes nor splits)."""
    if kernel.native_patterns:
        permute_temporal = split_union = False
    return head_groups(head_patterns, num_heads, permute_temporal=permute_temporal, split_union=split_union)


def merge_by_lse(o_a, lse_a, o_b, lse_b):
    """Attention over the union of two disjoint key sets from the two partial results.

    o_a, o_b [B, H, N, D]; lse_a, lse_b [B, H, N] float32 natural log-sum-exp (-inf for a row with
    no key, whose output is ignored). Returns [B, H, N, D] in o_a.dtype (0 where both are empty).
    """
    o, _ = merge_partials([(o_a, lse_a), (o_b, lse_b)])
    return o.astype(o_a.dtype)


def _head_selection(heads, g):
    """(q heads, kv heads) to gather for a set of q heads: whole GQA groups keep GQA, split groups
    repeat the kv head per q head."""
    kv_heads = sorted({h // g for h in heads})
    if all(set(range(kh * g, kh * g + g)) <= set(heads) for kh in kv_heads):
        return np.array([h for kh in kv_heads for h in range(kh * g, kh * g + g)]), np.array(kv_heads)
    qh = np.array(heads)
    return qh, qh // g


def _pattern_pass(q, k, v, layout, pat, perm, qh, kvh, bq, bk, kernel, options, return_lse=False):
    """One pattern on q heads qh / kv heads kvh: pad, permute, kernel, un-permute, unpad (a native-pattern
    backend takes the original order as it is).

    Returns [B, len(qh), N, D] (and the [B, len(qh), N] log-sum-exp with ``return_lse``)."""
    n = layout.seq_len
    pick = lambda x, idx: x if np.array_equal(idx, np.arange(x.shape[1])) else x[:, idx]
    if kernel.native_patterns:
        return kernel.run(pick(q, qh), pick(k, kvh), pick(v, kvh), layout, pat, options, return_lse)
    tables = block_tables(layout, pat, bq, bk, permuted=perm)
    npad = tables.padded_len
    pad = ((0, 0), (0, 0), (0, npad - n), (0, 0))
    qs = jnp.pad(pick(q, qh), pad)
    ks = jnp.pad(pick(k, kvh), pad)
    vs = jnp.pad(pick(v, kvh), pad)
    if perm:
        p_idx = permutation(layout, npad)
        qs, ks, vs = qs[:, :, p_idx], ks[:, :, p_idx], vs[:, :, p_idx]
    res = kernel.run(qs, ks, vs, tables, options, return_lse)
    o, lse = res if return_lse else (res, None)
    if perm:
        inv = inverse_permutation(layout, npad)
        o = o[:, :, inv]
        lse = None if lse is None else lse[:, :, inv]
    return (o[:, :, :n], lse[:, :, :n]) if return_lse else o[:, :, :n]


def block_sparse_attention(q, k, v, layout: STLayout, *, head_patterns=HeadPattern.UNION,
                           backend: str = "auto", block_q: int | None = None,
                           block_k: int | None = None, scale: float | None = None,
                           interpret: bool | None = None, permute_temporal: bool = True,
                           num_warps: int | None = None, num_stages: int = 2,
                           split_union: bool = True):
    """ST-SpAttn attention, causal on original indices.

    q [B, Hq, N, D]; k, v [B, Hkv, N, D] (Hq a multiple of Hkv); N == layout.seq_len; returns
    [B, Hq, N, D] in q.dtype. ``head_patterns``: one pattern or one per q head. Heads with the
    TEMPORAL pattern run on the position-major permutation (rows permuted, output un-permuted) when
    ``permute_temporal``. With ``split_union`` (every backend returns the log-sum-exp: xla,
    triton, tpu, mosaic_gpu), UNION heads run as two disjoint passes, SPATIAL in the original order and
    TEMPORAL_STRICT (earlier slots at the same place) on the permutation when ``permute_temporal``,
    merged exactly by log-sum-exp: far fewer blocks than UNION in the original order, where each
    temporal key is a partial block of its own. ``backend``: "auto" (tpu on TPU, triton on GPU,
    segments elsewhere), "segments" (XLA: batched dense attention per frame and per place, every pattern
    in the original order in one pass: ``permute_temporal``, ``split_union`` and the block sizes do not
    apply), "xla" (XLA over gathered key blocks), "triton", "mosaic_gpu" (Hopper TMA + WGMMA kernel, bf16 /
    f16 only; not the GPU default because it has not been timed on hardware yet), "mosaic_gpu_ws", "tpu".
    ``interpret`` defaults to
    True on the CPU for the Pallas backends (for mosaic_gpu: the Mosaic GPU interpreter);
    ``num_warps`` / ``num_stages`` tune the Triton kernel. Static python arguments (layout,
    patterns, blocks) make this traceable inside jit; tables are built on the host at trace time
    and cached.
    """
    kernel = resolve_backend(backend)
    if not isinstance(layout, STLayout):
        raise LayoutError(f"layout must be an STLayout, got {type(layout).__name__}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"q, k, v must be [B, H, N, D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    b, hq, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ShapeError(f"k {k.shape} and v {v.shape} must be [B={b}, Hkv, N={n}, D={d}]")
    hkv = k.shape[1]
    if hq % hkv:
        raise ShapeError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    if n != layout.seq_len:
        raise LayoutError(f"q/k/v hold {n} tokens but the layout describes {layout.seq_len}")
    kernel.check_inputs(q, k, v)
    dbq, dbk = kernel.default_blocks
    bq, bk = int(block_q or dbq), int(block_k or dbk)
    kernel.check_blocks(bq, bk)
    options = KernelOptions(scale=scale, num_warps=num_warps, num_stages=num_stages,
                            interpret=jax.default_backend() == "cpu" if interpret is None else interpret)
    g = hq // hkv
    outs, order = [], []
    for group in backend_head_groups(head_patterns, hq, kernel, permute_temporal=permute_temporal,
                                     split_union=split_union):
        qh, kvh = _head_selection(group.heads, g)
        if len(group.passes) == 2:  # a split union group: two disjoint key sets, merged exactly
            (pa, ma), (pb, mb) = group.passes
            o_a, lse_a = _pattern_pass(q, k, v, layout, pa, ma, qh, kvh, bq, bk, kernel, options, return_lse=True)
            o_b, lse_b = _pattern_pass(q, k, v, layout, pb, mb, qh, kvh, bq, bk, kernel, options, return_lse=True)
            outs.append(merge_by_lse(o_a, lse_a, o_b, lse_b))
        else:
            ((pat, perm),) = group.passes
            outs.append(_pattern_pass(q, k, v, layout, pat, perm, qh, kvh, bq, bk, kernel, options))
        order.extend(qh.tolist())
    out = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    if order != list(range(hq)):
        inv = np.empty(hq, np.int64)
        inv[np.array(order)] = np.arange(hq)
        out = out[:, inv]
    return out
