"""Per-head ST-SpAttn pattern calibration (Sparse VideoGen style).

Sample video query rows, compute each candidate pattern's attention output on those rows and dense
causal attention on the same rows, and keep per q head the pattern with the lowest error. Work is
O(rows * N) per head: no N x N matrix. The result is a tuple of HeadPattern per q head, static data
to store in the config.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.block_sparse_attention import HeadPattern, STLayout, reference_mask

__all__ = ["sample_video_rows", "pattern_errors", "calibrate_head_patterns", "DEFAULT_CANDIDATES"]

# cheapest first: ties and near-ties go to the cheaper pattern
DEFAULT_CANDIDATES = (HeadPattern.TEMPORAL, HeadPattern.SPATIAL, HeadPattern.UNION)


def sample_video_rows(layout: STLayout, num_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted random sample of video-token query rows (every row if there are fewer)."""
    rows = np.concatenate([np.arange(v.start, v.end) for v in layout.videos]) if layout.videos \
        else np.zeros((0,), np.int64)
    if rows.size <= num_rows:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=num_rows, replace=False))


@functools.partial(jax.jit, static_argnames=("scale",))
def _rows_attention(q_rows, k, v, mask, scale):
    """q_rows [B,Hq,R,D], k/v [B,Hkv,N,D], mask [R,N] -> [B,Hq,R,D] float32."""
    b, hq, r, d = q_rows.shape
    hkv = k.shape[1]
    qg = q_rows.astype(jnp.float32).reshape(b, hkv, hq // hkv, r, d)
    s = jnp.einsum("bhgrd,bhnd->bhgrn", qg, k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhgrn,bhnd->bhgrd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return o.reshape(b, hq, r, d)


def pattern_errors(q, k, v, layout: STLayout, rows, candidates=DEFAULT_CANDIDATES, scale=None):
    """[len(candidates), Hq] relative error ||o_pattern - o_dense|| / ||o_dense|| over the rows
    (summed over the batch), q [B,Hq,N,D], k/v [B,Hkv,N,D] in original order."""
    rows = np.asarray(rows)
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    q_rows = q[:, :, rows]
    dense = _rows_attention(q_rows, k, v, reference_mask(layout, HeadPattern.DENSE, rows=rows), scale)
    den = jnp.sqrt(jnp.sum(dense ** 2, axis=(0, 2, 3)))
    errs = []
    for p in candidates:
        o = _rows_attention(q_rows, k, v, reference_mask(layout, p, rows=rows), scale)
        errs.append(jnp.sqrt(jnp.sum((o - dense) ** 2, axis=(0, 2, 3))) / jnp.maximum(den, 1e-30))
    return np.asarray(jnp.stack(errs))


def calibrate_head_patterns(q, k, v, layout: STLayout, *, num_rows: int = 256,
                            candidates=DEFAULT_CANDIDATES, rel_tol: float = 0.0, seed: int = 0,
                            scale=None):
    """Per q head, the candidate with the lowest row-sampled error against dense attention.

    With ``rel_tol`` > 0 the first (cheapest) candidate whose error is within (1 + rel_tol) of the
    best is kept instead. Returns (patterns: tuple[HeadPattern, ...], errors [n_cand, Hq]).
    A prompt without video gives UNION for every head (the pattern is then irrelevant).
    """
    candidates = tuple(HeadPattern.parse(c) for c in candidates)
    rows = sample_video_rows(layout, num_rows, seed)
    hq = q.shape[1]
    if rows.size == 0:
        return (HeadPattern.UNION,) * hq, np.zeros((len(candidates), hq), np.float32)
    errs = pattern_errors(q, k, v, layout, rows, candidates, scale)
    best = errs.min(axis=0)
    pats = []
    for h in range(hq):
        ok = np.nonzero(errs[:, h] <= best[h] * (1.0 + rel_tol))[0]
        pats.append(candidates[int(ok[0])])
    return tuple(pats), errs
