"""The segment path: ST-SpAttn as batched dense attention over the layout's own segments (no block tables).

In the layout's coordinates the ST mask is made of dense pieces. A video query sees every key before its video
(a dense rectangle), its own frame (spatial: one run of ``hw`` tokens, causal inside it, optionally within a
radius) and its own place in earlier slots (temporal: ``t`` tokens strided by ``hw``, optionally within a
window); a non-video query sees every earlier key. So instead of gathering key blocks (the block-table
kernels), this path computes, per region of the layout (:func:`~kernels.block_sparse_attention.layout.layout_regions`):

    global    video rows x the keys before the video       an online-softmax sweep over key blocks
    spatial   per frame, row chunks x the keys up to them  frames batched (``lax.map``)
    temporal  [t, t] scores per place                      places batched (a reshape + transpose: no gather)
    text      non-video rows x every earlier key (causal)  the online-softmax sweep, causal blocks only

and merges each row's parts exactly by their log-sum-exps. Every product is a batched matmul over whole frames or
places, with no gathered key lists, no permutation and no padding of the sequence to block multiples: on a CPU
this is the cheapest way to skip the masked-out keys. It computes every pattern in the original order in one
pass (a union head is global + spatial + strictly-earlier temporal, with the global keys scored once).
:func:`segment_cells` counts the score cells it computes (the cost model's unit of work).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.block_sparse_attention.layout import HeadPattern, STLayout, VideoSpan, layout_regions, round_up

__all__ = ["segment_attention", "segment_cells", "frame_row_splits", "merge_partials", "SWEEP_BLOCK"]

#: query rows and key columns per step of the online-softmax sweep (global keys, non-video rows)
SWEEP_BLOCK = 128
#: bound on one batched step's float32 scores (+ probabilities) in the frame / place batches: small steps stay
#: in the CPU's caches (and bound the temporaries), one frame or place at least
_MAX_SCORE_BYTES = 1 << 20


def _masked_softmax_values(s, v, mask):
    """``s [..., q, k]`` float32 scores, ``v [..., k, D]``, ``mask`` broadcastable to ``s`` -> ``(o [..., q, D]``
    float32, ``lse [..., q]``); a row with no key gets 0 and log-sum-exp -inf."""
    s = jnp.where(mask, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(s - mx)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("...qk,...kd->...qd", (p / jnp.where(l > 0, l, 1.0)).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
    return o, (mx + jnp.log(l))[..., 0]


def _grouped_attention(q, k, v, mask, scale):
    """Attention inside each group (frame or place) of the leading axis: ``q [n, B,Hkv,G,L,D]``, ``k / v
    [n, B,Hkv,L,D]``, ``mask [L, L]`` -> ``(o [n, B,Hkv,G,L,D]`` float32, ``lse [n, B,Hkv,G,L])``, groups
    batched (``lax.map``) so that one step's scores stay within :data:`_MAX_SCORE_BYTES`."""
    n, b, hkv, g, length = q.shape[:5]

    def one(xs):
        qi, ki, vi = xs
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, ki, preferred_element_type=jnp.float32) * scale
        return _masked_softmax_values(s, vi[:, :, None], mask)

    per_group = b * hkv * g * length * k.shape[3] * 8
    return jax.lax.map(one, (q, k, v), batch_size=int(max(1, min(n, _MAX_SCORE_BYTES // per_group))))


def frame_row_splits(hw: int) -> list[int]:
    """Row boundaries ``[0, ..., hw]`` of a frame's query chunks: chunk ``i`` scores only the keys up to its
    last row (the frame is causal), so ``c`` chunks compute ``(c + 1) / 2c`` of the ``hw x hw`` square instead of
    all of it. One chunk per :data:`SWEEP_BLOCK` rows, at most 4 (each chunk is one more batched matmul)."""
    c = max(1, min(4, hw // SWEEP_BLOCK))
    return sorted({0, hw, *(min(hw, round_up(i * hw // c, 8)) for i in range(1, c))})


def _frames(q, k, v, video: VideoSpan, radius, scale):
    """Spatial part: ``q [B,Hkv,G,L,D]``, ``k / v [B,Hkv,L,D]`` over one video's ``L = t*hw`` tokens."""
    b, hkv, g, _, d = q.shape
    t, hw, w = video.t, video.hw, video.w
    qf = q.reshape(b, hkv, g, t, hw, d).transpose(3, 0, 1, 2, 4, 5)     # [t, B, Hkv, G, hw, D]
    kf = k.reshape(b, hkv, t, hw, d).transpose(2, 0, 1, 3, 4)          # [t, B, Hkv, hw, D]
    vf = v.reshape(b, hkv, t, hw, d).transpose(2, 0, 1, 3, 4)
    outs, lses = [], []
    bounds = frame_row_splits(hw)
    for r0, r1 in zip(bounds[:-1], bounds[1:]):   # query rows [r0, r1) see the frame's keys [0, r1)
        qp, kp = jnp.arange(r0, r1), jnp.arange(r1)
        mask = kp[None, :] <= qp[:, None]                              # causal inside the frame
        if radius is not None:
            mask = mask & (jnp.abs(kp[None, :] // w - qp[:, None] // w) <= radius) \
                & (jnp.abs(kp[None, :] % w - qp[:, None] % w) <= radius)
        o, lse = _grouped_attention(qf[:, :, :, :, r0:r1], kf[:, :, :, :r1], vf[:, :, :, :r1], mask, scale)
        outs.append(o)
        lses.append(lse)
    o, lse = jnp.concatenate(outs, axis=4), jnp.concatenate(lses, axis=4)
    return (o.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, t * hw, d),
            lse.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, t * hw))


def _places(q, k, v, video: VideoSpan, window, strict: bool, scale):
    """Temporal part (``strict``: strictly earlier slots only): same shapes as :func:`_frames`."""
    b, hkv, g, _, d = q.shape
    t, hw = video.t, video.hw
    qp = q.reshape(b, hkv, g, t, hw, d).transpose(4, 0, 1, 2, 3, 5)     # [hw, B, Hkv, G, t, D]
    kp = k.reshape(b, hkv, t, hw, d).transpose(3, 0, 1, 2, 4)          # [hw, B, Hkv, t, D]
    vp = v.reshape(b, hkv, t, hw, d).transpose(3, 0, 1, 2, 4)
    slot = jnp.arange(t)
    mask = (slot[None, :] < slot[:, None]) if strict else (slot[None, :] <= slot[:, None])
    if window is not None:
        mask = mask & (slot[:, None] - slot[None, :] <= window)

    o, lse = _grouped_attention(qp, kp, vp, mask, scale)
    return (o.transpose(1, 2, 3, 4, 0, 5).reshape(b, hkv, g, t * hw, d),
            lse.transpose(1, 2, 3, 4, 0).reshape(b, hkv, g, t * hw))


def _sweep(q, k, v, first_pos: int, causal: bool, scale):
    """Rows ``q [B,Hkv,G,R,D]`` at positions ``first_pos + i`` over keys ``k / v [B,Hkv,K,D]`` at positions
    ``0..K-1`` (``causal``: a key at or before the row; else every key), as an online softmax over key blocks
    that visits, per query block, only the key blocks it can see. Returns ``(o [B,Hkv,G,R,D]`` float32,
    ``lse [B,Hkv,G,R])``."""
    b, hkv, g, r, d = q.shape
    nkeys = k.shape[2]
    bq, bk = _sweep_blocks(r, nkeys)
    rp, kp = round_up(r, bq), round_up(nkeys, bk)
    q = jnp.pad(q, ((0, 0),) * 3 + ((0, rp - r), (0, 0)))
    kb = jnp.pad(k, ((0, 0), (0, 0), (0, kp - nkeys), (0, 0))).reshape(b, hkv, kp // bk, bk, d)
    vb = jnp.pad(v, ((0, 0), (0, 0), (0, kp - nkeys), (0, 0))).reshape(b, hkv, kp // bk, bk, d)
    qb = q.reshape(b, hkv, g, rp // bq, bq, d).transpose(3, 0, 1, 2, 4, 5)   # [nq, B, Hkv, G, bq, D]
    q_offs, k_offs = jnp.arange(bq), jnp.arange(bk)

    def query_block(xs):
        i, qi = xs
        qpos = first_pos + i * bq + q_offs
        last = jnp.minimum(nkeys, first_pos + (i + 1) * bq) if causal else nkeys
        n_blocks = (last + bk - 1) // bk

        def body(j, carry):
            m, l, acc = carry
            kj = jax.lax.dynamic_index_in_dim(kb, j, axis=2, keepdims=False)
            vj = jax.lax.dynamic_index_in_dim(vb, j, axis=2, keepdims=False)
            kpos = j * bk + k_offs
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale
            mask = kpos[None, :] < nkeys
            if causal:
                mask = mask & (kpos[None, :] <= qpos[:, None])
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.where(jnp.isfinite(m), jnp.exp(m - m_safe), 0.0)
            acc = alpha[..., None] * acc + jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(vj.dtype), vj,
                                                      preferred_element_type=jnp.float32)
            return m_new, alpha * l + jnp.sum(p, axis=-1), acc

        init = (jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
                jnp.zeros((b, hkv, g, bq, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
        lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return acc / jnp.where(l > 0, l, 1.0)[..., None], lse

    o, lse = jax.lax.map(query_block, (jnp.arange(rp // bq), qb))
    o = o.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, rp, d)[:, :, :, :r]
    return o, lse.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, rp)[..., :r]


def merge_partials(parts):
    """Exact attention over the union of disjoint key sets from per-set ``(o [..., D], lse [...])`` results
    (``lse`` float32 natural log-sum-exp, -inf for a row with no key in that set): ``(o`` float32, ``lse)``; a
    row with no key in any set gets 0 and -inf."""
    if len(parts) == 1:
        return parts[0]
    lses = jnp.stack([lse for _, lse in parts])
    m = jnp.max(lses, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m)
    den = jnp.sum(w, axis=0)
    num = sum(w[i][..., None] * o.astype(jnp.float32) for i, (o, _) in enumerate(parts))
    lse = jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return num / jnp.where(den > 0, den, 1.0)[..., None], lse


def segment_attention(q, k, v, layout: STLayout, pattern=HeadPattern.UNION, *, scale=None, return_lse=False):
    """ST-SpAttn for one pattern on every head, in the original order: ``q [B,Hq,N,D]``, ``k / v [B,Hkv,N,D]``
    with ``N == layout.seq_len`` -> ``[B,Hq,N,D]`` in ``q.dtype`` (and the float32 ``[B,Hq,N]`` log-sum-exp with
    ``return_lse``; a row with no key: output 0, log-sum-exp -inf). The same mask as
    :func:`~kernels.block_sparse_attention.mask.element_mask` (TEMPORAL_STRICT included)."""
    pattern = HeadPattern.parse(pattern)
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, hkv, g, n, d)
    outs, lses = [], []
    for r0, r1, video in layout_regions(layout, n):
        qr = qg[:, :, :, r0:r1]
        if video is None or pattern is HeadPattern.DENSE:
            if pattern.strict:   # no key for a non-video row
                o, lse = jnp.zeros(qr.shape, jnp.float32), jnp.full(qr.shape[:-1], -jnp.inf, jnp.float32)
            else:
                o, lse = _sweep(qr, k[:, :, :r1], v[:, :, :r1], r0, True, scale)
        else:
            parts = []
            if r0 > 0 and not pattern.strict:
                parts.append(_sweep(qr, k[:, :, :r0], v[:, :, :r0], r0, False, scale))
            kr, vr = k[:, :, r0:r1], v[:, :, r0:r1]
            if pattern.spatial:
                parts.append(_frames(qr, kr, vr, video, layout.spatial_radius, scale))
            if pattern.temporal:
                parts.append(_places(qr, kr, vr, video, layout.temporal_window, pattern is not HeadPattern.TEMPORAL,
                                     scale))
            o, lse = merge_partials(parts)
        outs.append(o)
        lses.append(lse)
    out = jnp.concatenate(outs, axis=3).reshape(b, hq, n, d).astype(q.dtype)
    if not return_lse:
        return out
    return out, jnp.concatenate(lses, axis=3).reshape(b, hq, n)


def _sweep_blocks(rows: int, nkeys: int) -> tuple[int, int]:
    """The sweep's (query, key) block: :data:`SWEEP_BLOCK`, or less for a short run (to a multiple of 8)."""
    return min(SWEEP_BLOCK, round_up(rows, 8)), min(SWEEP_BLOCK, round_up(nkeys, 8))


def _sweep_cells(rows: int, first_pos: int, nkeys: int, causal: bool) -> int:
    bq, bk = _sweep_blocks(rows, nkeys)
    total = 0
    for i in range(-(-rows // bq)):
        last = min(nkeys, first_pos + (i + 1) * bq) if causal else nkeys
        total += bq * -(-last // bk) * bk
    return total


def segment_cells(layout: STLayout, pattern) -> int:
    """The (query, key) score cells :func:`segment_attention` computes for one head (padding included)."""
    pattern = HeadPattern.parse(pattern)
    total = 0
    for r0, r1, video in layout_regions(layout):
        if video is None or pattern is HeadPattern.DENSE:
            total += 0 if pattern.strict else _sweep_cells(r1 - r0, r0, r1, True)
            continue
        if r0 > 0 and not pattern.strict:
            total += _sweep_cells(r1 - r0, r0, r0, False)
        if pattern.spatial:
            bounds = frame_row_splits(video.hw)
            total += video.t * sum((r1 - r0) * r1 for r0, r1 in zip(bounds[:-1], bounds[1:]))
        if pattern.temporal:
            total += video.hw * video.t * video.t
    return total

