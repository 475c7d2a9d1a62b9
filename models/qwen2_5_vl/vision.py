"""Qwen2.5-VL vision tower (ViT with 2-D rotary, window attention and a 2x2 patch merger).

Module tree: :class:`VisionModel` (patch embed, merger weights, static ``config``) holding
``blocks: VisionBlocks`` (every block's weights stacked on a leading ``[depth]`` axis). Its pure state
(``nnx.state(model)``) is what :func:`vision_forward` runs on; ``VisionModel.__call__`` does exactly that.

Mirrors ``Qwen2_5_VisionTransformerPretrainedModel`` from transformers:

1. patch embed: the bias-free Conv3d as a matmul over rows of ``patch_dim`` (C * T * P * P) values;
2. 2-D rotary ids (h, w) per patch in merge-group order, repeated over the temporal slots;
3. rows permuted into window order (in units of one merge group), blocks run, merger applied, and the
   merged tokens un-permuted;
4. blocks listed in ``fullatt_block_indexes`` attend within each temporal slice (one frame pair or
   image), the others within windows of ``window_size / spatial_merge / patch`` merged tokens per side.

All layout bookkeeping (window index, rotary ids, per-row segment ids, padded segment batches) is
host numpy computed from the static ``grid_thw``; the jitted part only gathers with constant indices.

Attention within segments is :func:`batched_segment_attention`: :func:`segment_batches` packs the
segments (windows of at most 64 patches, or the temporal slices) into padded ``[num_segments,
max_len]`` batches, so memory is O(P * 64) for window blocks and O(sum of slice_len^2) for
full-attention blocks (query-chunked when large) rather than the O(P^2) of the dense block-diagonal
reference :func:`segment_attention` (kept as a test twin; same numerics, float32 scores).
Full-attention and window blocks share one ``lax.scan`` and pick their layout with ``lax.cond``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from models.qwen2_5_vl.config import VisionConfig
from models.qwen2_5_vl.layers import apply_rotary, dense_attention, rms_norm
from models.qwen2_5_vl.state import module_from_arrays, state_from_leaves

GridTHW = tuple[tuple[int, int, int], ...]

ROPE_THETA = 10000.0
MERGER_LN_EPS = 1e-6


class VisionInputError(ValueError):
    """Pixel values or ``grid_thw`` that do not fit each other or the vision config."""


class VisionWeightsError(ValueError):
    """A vision tensor that is missing, unexpected or of the wrong shape."""


# ----------------------------------------------------------------------------- params
def vision_param_shapes(cfg: VisionConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Our-layout shapes of the vision weights: ``(top, blocks)``, attribute -> shape, the block weights
    with their leading ``[depth]`` axis."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.depth
    m = d * cfg.merge_unit
    top = {
        "patch_embed": (cfg.patch_dim, d),
        "merger_norm": (d,),
        "merger_fc1_w": (m, m),
        "merger_fc1_b": (m,),
        "merger_fc2_w": (m, cfg.out_hidden_size),
        "merger_fc2_b": (cfg.out_hidden_size,),
    }
    blocks = {
        "norm1": (L, d),
        "qkv_w": (L, d, 3 * d),
        "qkv_b": (L, 3 * d),
        "proj_w": (L, d, d),
        "proj_b": (L, d),
        "norm2": (L, d),
        "gate_w": (L, d, f),
        "gate_b": (L, f),
        "up_w": (L, d, f),
        "up_b": (L, f),
        "down_w": (L, f, d),
        "down_b": (L, d),
    }
    return top, blocks


def draw_vision_weight(name: str, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """One random vision weight for tests: matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm weights
    ~ 1 + N(0, 0.1^2) (all random, so a swapped or dropped tensor shows in parity tests)."""
    z = jax.random.normal(key, shape, jnp.float32)
    if name.startswith("norm") or name == "merger_norm":
        v = 1.0 + 0.1 * z
    elif name.endswith("_b"):
        v = 0.1 * z
    else:  # [.., in, out]
        v = z / np.sqrt(shape[-2])
    return v.astype(dtype)


def draw_vision_blocks(cfg: VisionConfig, keys: Sequence[jax.Array], dtype=jnp.float32) -> dict[str, jax.Array]:
    """The stacked block weights (:func:`draw_vision_weight`), one key per weight in
    :func:`vision_param_shapes` order."""
    shapes = vision_param_shapes(cfg)[1]
    return {name: draw_vision_weight(name, k, shape, dtype) for k, (name, shape) in zip(keys, shapes.items())}


def draw_vision_arrays(cfg: VisionConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Every random weight of a :class:`VisionModel`, nested by attribute name: the one source of the
    tower's random weights (the top-level weights, then the blocks, each from its own split of ``key``)."""
    top, blocks = vision_param_shapes(cfg)
    keys = jax.random.split(key, len(top) + len(blocks))
    arrays: dict = {name: draw_vision_weight(name, k, shape, dtype) for k, (name, shape) in zip(keys, top.items())}
    arrays["blocks"] = draw_vision_blocks(cfg, keys[len(top):], dtype)
    return arrays


class VisionBlocks(nnx.Module):
    """All vision blocks, every weight with a leading ``[depth]`` axis; linear weights ``[in, out]``.

    Weights are drawn by :func:`draw_vision_blocks` from a key taken from ``rngs``.
    """

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        w = draw_vision_blocks(cfg, jax.random.split(rngs.params(), len(vision_param_shapes(cfg)[1])), dtype)
        self.norm1 = nnx.Param(w["norm1"])  # [L, D]
        self.qkv_w = nnx.Param(w["qkv_w"])  # [L, D, 3D]
        self.qkv_b = nnx.Param(w["qkv_b"])  # [L, 3D]
        self.proj_w = nnx.Param(w["proj_w"])  # [L, D, D]
        self.proj_b = nnx.Param(w["proj_b"])  # [L, D]
        self.norm2 = nnx.Param(w["norm2"])  # [L, D]
        self.gate_w = nnx.Param(w["gate_w"])  # [L, D, F]
        self.gate_b = nnx.Param(w["gate_b"])  # [L, F]
        self.up_w = nnx.Param(w["up_w"])  # [L, D, F]
        self.up_b = nnx.Param(w["up_b"])  # [L, F]
        self.down_w = nnx.Param(w["down_w"])  # [L, F, D]
        self.down_b = nnx.Param(w["down_b"])  # [L, D]


class VisionModel(nnx.Module):
    """The vision tower: ``patch_embed [patch_dim, D]`` (no bias), ``blocks`` (:class:`VisionBlocks`),
    and the merger: ``merger_norm [D]``, ``merger_fc1_w [4D, 4D]`` + ``merger_fc1_b``, ``merger_fc2_w
    [4D, out_hidden]`` + ``merger_fc2_b`` (4 = merge_unit); ``config`` static.

    All weights are drawn by :func:`draw_vision_arrays` from one key taken from ``rngs``, so the state
    equals ``init_vision_params(cfg, key)`` for that key.
    """

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        arrays = draw_vision_arrays(cfg, rngs.params(), dtype)
        self.config = cfg
        self.patch_embed = nnx.Param(arrays["patch_embed"])
        self.blocks = module_from_arrays(lambda: VisionBlocks(cfg, dtype=dtype, rngs=nnx.Rngs(0)), arrays["blocks"])
        self.merger_norm = nnx.Param(arrays["merger_norm"])
        self.merger_fc1_w = nnx.Param(arrays["merger_fc1_w"])
        self.merger_fc1_b = nnx.Param(arrays["merger_fc1_b"])
        self.merger_fc2_w = nnx.Param(arrays["merger_fc2_w"])
        self.merger_fc2_b = nnx.Param(arrays["merger_fc2_b"])

    def __call__(self, pixel_values: jax.Array, grid_thw) -> jax.Array:
        """Merged features ``[P // merge_unit, out_hidden]``: see :func:`vision_forward`."""
        return vision_forward(nnx.state(self), pixel_values, grid_thw, self.config)


def abstract_vision_state(cfg: VisionConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of a :class:`VisionModel`, the state's leaves ``jax.ShapeDtypeStruct``."""
    return nnx.split(nnx.eval_shape(lambda: VisionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))))


def init_vision_params(cfg: VisionConfig, key: jax.Array, dtype=jnp.float32) -> nnx.State:
    """The pure state of a :class:`VisionModel` holding :func:`draw_vision_arrays` ``(cfg, key)`` (jittable)."""
    _, abstract = abstract_vision_state(cfg, dtype)
    return state_from_leaves(abstract, flatten_dict(draw_vision_arrays(cfg, key, dtype)))


# ----------------------------------------------------------------------------- HF names
def vision_block_hf_names(i: int) -> dict[str, str]:
    """Weight of :class:`VisionBlocks` -> Hub name of block ``i``'s tensor."""
    p = f"visual.blocks.{i}."
    return {
        "norm1": p + "norm1.weight",
        "qkv_w": p + "attn.qkv.weight",
        "qkv_b": p + "attn.qkv.bias",
        "proj_w": p + "attn.proj.weight",
        "proj_b": p + "attn.proj.bias",
        "norm2": p + "norm2.weight",
        "gate_w": p + "mlp.gate_proj.weight",
        "gate_b": p + "mlp.gate_proj.bias",
        "up_w": p + "mlp.up_proj.weight",
        "up_b": p + "mlp.up_proj.bias",
        "down_w": p + "mlp.down_proj.weight",
        "down_b": p + "mlp.down_proj.bias",
    }


# Top-level weight of VisionModel -> Hub name.
VISION_TOP_HF_NAMES = {
    "patch_embed": "visual.patch_embed.proj.weight",
    "merger_norm": "visual.merger.ln_q.weight",
    "merger_fc1_w": "visual.merger.mlp.0.weight",
    "merger_fc1_b": "visual.merger.mlp.0.bias",
    "merger_fc2_w": "visual.merger.mlp.2.weight",
    "merger_fc2_b": "visual.merger.mlp.2.bias",
}


def _torch_shape(field: str, jax_shape: tuple[int, ...], cfg: VisionConfig) -> tuple[int, ...]:
    if field == "patch_embed":
        return (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    if field.endswith("_w"):  # Linear: [in, out] -> (out, in)
        return (jax_shape[1], jax_shape[0])
    return jax_shape


def vision_hf_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Hub name (``visual.*``) -> torch shape, for every tensor of the vision tower."""
    top, blocks = vision_param_shapes(cfg)
    shapes = {VISION_TOP_HF_NAMES[f]: _torch_shape(f, s, cfg) for f, s in top.items()}
    for i in range(cfg.depth):
        for f, hf in vision_block_hf_names(i).items():
            shapes[hf] = _torch_shape(f, blocks[f][1:], cfg)
    return shapes


def vision_to_jax_layout(field: str, x: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    """One torch-layout tensor of ``field`` in our layout: Linear weights transposed to ``[in, out]``, the
    Conv3d patch embed flattened to ``[patch_dim, D]``."""
    if field == "patch_embed":
        return x.reshape(cfg.hidden_size, cfg.patch_dim).T
    if field.endswith("_w"):
        return x.T
    return x


def _to_torch_layout(field: str, x: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    if field == "patch_embed":
        return x.T.reshape(_torch_shape(field, x.shape, cfg))
    if field.endswith("_w"):
        return x.T
    return x


def vision_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: VisionConfig, dtype=jnp.float32) -> nnx.State:
    """A :class:`VisionModel` state in ``dtype`` from torch-layout arrays keyed by Hub names (``visual.*``).

    Extra keys (e.g. the text half) are ignored; a missing or wrong-shape vision tensor raises
    :class:`VisionWeightsError`.
    """
    expected = vision_hf_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise VisionWeightsError(f"missing vision tensors: {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        got = tuple(np.shape(tensors[name]))
        if got != shape:
            raise VisionWeightsError(f"vision tensor {name}: expected shape {shape}, got {got}")

    def load(field: str, name: str) -> np.ndarray:
        return vision_to_jax_layout(field, np.asarray(tensors[name]), cfg)

    leaves = {(f,): jnp.asarray(load(f, n), dtype) for f, n in VISION_TOP_HF_NAMES.items()}
    names = [vision_block_hf_names(i) for i in range(cfg.depth)]
    for f in names[0]:
        leaves[("blocks", f)] = jnp.asarray(np.stack([load(f, names[i][f]) for i in range(cfg.depth)]), dtype)
    return state_from_leaves(abstract_vision_state(cfg, dtype)[1], leaves)


def vision_params_to_hf(params: nnx.State, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`vision_params_from_hf`: Hub names -> torch-layout numpy arrays (params' dtype)."""
    out = {n: np.ascontiguousarray(_to_torch_layout(f, np.asarray(getattr(params, f)), cfg)) for f, n in VISION_TOP_HF_NAMES.items()}
    for f in vision_param_shapes(cfg)[1]:
        stacked = np.asarray(getattr(params.blocks, f))
        for i in range(cfg.depth):
            out[vision_block_hf_names(i)[f]] = np.ascontiguousarray(_to_torch_layout(f, stacked[i], cfg))
    return out


# ----------------------------------------------------------------------------- host layout
def _normalize_grid(grid_thw) -> GridTHW:
    try:
        grid = tuple(tuple(int(v) for v in g) for g in np.asarray(grid_thw).reshape(-1, 3).tolist())
    except (TypeError, ValueError):
        raise VisionInputError(f"grid_thw must be a sequence of (t, h, w) triples, got {grid_thw!r}") from None
    return grid


def _check_grid(grid_thw: GridTHW, cfg: VisionConfig) -> None:
    if not grid_thw:
        raise VisionInputError("grid_thw is empty: at least one image or video is needed")
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grid_thw):
        if t <= 0 or h <= 0 or w <= 0 or h % m or w % m:
            raise VisionInputError(
                f"grid_thw[{i}]=({t}, {h}, {w}): t, h, w must be positive and h, w multiples of "
                f"spatial_merge_size={m}"
            )


def vision_window_index(
    grid_thw: Sequence[Sequence[int]], spatial_merge_size: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """HF's ``get_window_index`` in numpy.

    Returns ``window_index`` (int64, one entry per merged token: the merged-token index that goes to
    each position in window order) and ``cu_window_seqlens`` (int32, cumulative window lengths in
    patch rows, starting at 0, with empty windows removed).

    Each temporal slot of each grid is cut into windows of ``window_size // spatial_merge_size //
    patch_size`` merged tokens per side, row-major over windows. The pad is ``ws - n % ws``, a whole
    empty window when ``n`` divides evenly; its zero length vanishes when repeated cumulative
    lengths are de-duplicated.
    """
    ws = window_size // spatial_merge_size // patch_size
    unit = spatial_merge_size**2
    index_parts: list[np.ndarray] = []
    cu = [0]
    offset = 0
    for t, h, w in grid_thw:
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = ws - gh % ws, ws - gw % ws
        nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
        padded = np.full((t, gh + pad_h, gw + pad_w), -100, dtype=np.int64)
        padded[:, :gh, :gw] = index
        padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        index_parts.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * gh * gw
    cu_arr = np.asarray(cu, dtype=np.int32)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    return np.concatenate(index_parts), cu_arr[keep]


def vision_rotary_ids(grid_thw: Sequence[Sequence[int]], spatial_merge_size: int) -> np.ndarray:
    """``[P, 2]`` int32 (h, w) rotary ids per patch row, in merge-group order, repeated t times."""
    m = spatial_merge_size
    parts = []
    for t, h, w in grid_thw:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hh = hh.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        parts.append(np.tile(np.stack([hh, ww], axis=-1), (t, 1)))
    return np.concatenate(parts).astype(np.int32)


def _segment_ids(cu_seqlens: np.ndarray, n: int) -> np.ndarray:
    """Per-row segment id for rows ``0..n-1`` given cumulative lengths starting at 0."""
    return (np.searchsorted(cu_seqlens[1:], np.arange(n), side="right")).astype(np.int32)


# Defaults of :func:`segment_batches` and of the query chunking in :func:`batched_segment_attention`.
SPLIT_MIN_LEN = 128
MIN_FILL = 0.5
MAX_SCORES_PER_CHUNK = 1 << 22  # float32 scores of one query chunk: 16 MiB (scores and probabilities live
#   together, so a prefill's vision temporaries stay a few times this, not O(frames * window^2))


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentBatches:
    """Static (host numpy) packing of the segments of ``P`` rows into padded batches.

    buckets:  one ``(gather, valid)`` pair per padded batch: ``gather [S_b, L_b]`` int32 row of each
              slot (segments in id order, rows in row order; a padding slot repeats its segment's
              first row), ``valid [S_b, L_b]`` bool (False on padding).
    scatter:  ``[P]`` int32: slot of each row in the concatenation of the flattened buckets, so the
              batched output goes back to row order with one gather.
    identity: one bucket, no padding, slots = rows ``0..P-1`` in order: gather and scatter are
              plain reshapes.
    """

    buckets: tuple[tuple[np.ndarray, np.ndarray], ...]
    scatter: np.ndarray
    identity: bool

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.scatter,) + tuple(a for pair in self.buckets for a in pair)


def segment_batches(segment_ids, *, min_fill: float = MIN_FILL, split_min_len: int = SPLIT_MIN_LEN) -> SegmentBatches:
    """Packs rows sharing a segment id into padded ``[num_segments, max_len]`` batches.

    Segments need not be contiguous; empty ids are skipped. Segments are sorted by length (longest
    first) and cut greedily into buckets: a segment shorter than ``min_fill`` times its bucket's
    longest one opens a new bucket, unless that longest one has at most ``split_min_len`` rows
    (short segments all share one bucket: padding them costs less than another batch). So one big
    image next to a video of small frames does not pad every frame to the image's size, while the
    windows (at most 64 rows) and the equal temporal slices of one grid stay one batch each.
    """
    ids = np.asarray(segment_ids).reshape(-1)
    n = ids.shape[0]
    if n == 0:
        raise ValueError("segment_batches needs at least one row")
    _, seg_of_row, lengths = np.unique(ids, return_inverse=True, return_counts=True)
    seg_of_row = seg_of_row.reshape(-1)
    order = np.argsort(seg_of_row, kind="stable")  # rows grouped by segment, row order within
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(n) - starts[seg_of_row[order]]  # position of each row in its segment

    groups: list[list[int]] = []
    for s in np.argsort(-lengths, kind="stable").tolist():
        head = lengths[groups[-1][0]] if groups else 0
        if not groups or (head > split_min_len and lengths[s] < min_fill * head):
            groups.append([])
        groups[-1].append(s)

    bucket_of_seg = np.empty(len(lengths), np.int64)
    local_of_seg = np.empty(len(lengths), np.int64)
    buckets, offsets, offset = [], [], 0
    for b, segs in enumerate(groups):
        segs = np.sort(np.asarray(segs))
        width = int(lengths[segs].max())
        bucket_of_seg[segs] = b
        local_of_seg[segs] = np.arange(len(segs))
        first_rows = order[starts[segs]]
        gather = np.repeat(first_rows[:, None], width, axis=1)
        valid = np.zeros((len(segs), width), bool)
        buckets.append((gather, valid))
        offsets.append(offset)
        offset += gather.size
    rows = np.arange(n)
    b_row, l_row = bucket_of_seg[seg_of_row], local_of_seg[seg_of_row]
    scatter = np.empty(n, np.int64)
    for b, (gather, valid) in enumerate(buckets):
        sel = b_row == b
        gather[l_row[sel], pos[sel]] = rows[sel]
        valid[l_row[sel], pos[sel]] = True
        scatter[sel] = offsets[b] + l_row[sel] * gather.shape[1] + pos[sel]
    buckets = tuple((g.astype(np.int32), v) for g, v in buckets)
    identity = len(buckets) == 1 and bool(buckets[0][1].all()) and np.array_equal(buckets[0][0].reshape(-1), rows)
    out = SegmentBatches(buckets=buckets, scatter=scatter.astype(np.int32), identity=identity)
    for a in out.arrays():
        a.setflags(write=False)
    return out


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Static (host numpy) bookkeeping for one ``grid_thw``.

    row_perm:       [P] patch row that goes to each position in window order.
    merged_unperm:  [P // merge_unit] argsort of the window index (undoes the order after the merger).
    rotary_ids:     [P, 2] (h, w) ids in window order.
    layer_segments: [depth, P] segment id per row in window order, per block (temporal-slice
                    segments for full-attention blocks, window segments for the others).
    cu_seqlens, cu_window_seqlens: the same segments as cumulative lengths (for a varlen kernel).
    full_layers:    [depth] bool, True for the full-attention (temporal-slice) blocks.
    full_batches, window_batches: the two kinds of segments packed by :func:`segment_batches`.
    """

    row_perm: np.ndarray
    merged_unperm: np.ndarray
    rotary_ids: np.ndarray
    layer_segments: np.ndarray
    cu_seqlens: np.ndarray
    cu_window_seqlens: np.ndarray
    full_layers: np.ndarray
    full_batches: SegmentBatches
    window_batches: SegmentBatches


@functools.lru_cache(maxsize=64)
def vision_layout(grid_thw: GridTHW, cfg: VisionConfig) -> VisionLayout:
    _check_grid(grid_thw, cfg)
    unit = cfg.merge_unit
    window_index, cu_window = vision_window_index(
        grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
    )
    row_perm = (window_index[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    n = row_perm.shape[0]
    slice_lens = np.concatenate([np.full(t, h * w) for t, h, w in grid_thw])
    cu_full = np.concatenate([[0], np.cumsum(slice_lens)]).astype(np.int32)
    full_seg, win_seg = _segment_ids(cu_full, n), _segment_ids(cu_window, n)
    is_full = np.array([i in cfg.fullatt_block_indexes for i in range(cfg.depth)], dtype=bool)
    layer_segments = np.where(is_full[:, None], full_seg[None, :], win_seg[None, :]).astype(np.int32)
    layout = VisionLayout(
        row_perm=row_perm.astype(np.int32),
        merged_unperm=np.argsort(window_index, kind="stable").astype(np.int32),
        rotary_ids=vision_rotary_ids(grid_thw, cfg.spatial_merge_size)[row_perm],
        layer_segments=layer_segments,
        cu_seqlens=cu_full,
        cu_window_seqlens=cu_window,
        full_layers=is_full,
        full_batches=segment_batches(full_seg),
        window_batches=segment_batches(win_seg),
    )
    for f in dataclasses.fields(VisionLayout):
        a = getattr(layout, f.name)
        if isinstance(a, np.ndarray):
            a.setflags(write=False)
    return layout


# ----------------------------------------------------------------------------- compute
def vision_rotary_cos_sin(rotary_ids: jax.Array, cfg: VisionConfig) -> tuple[jax.Array, jax.Array]:
    """``[P, 2]`` (h, w) ids -> cos, sin ``[P, head_dim]`` float32 (h-half, w-half, duplicated)."""
    d = cfg.head_dim // 2
    inv_freq = 1.0 / (np.float32(ROPE_THETA) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    freqs = rotary_ids.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)  # [P, 2, d/2]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [P, d]: h then w
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Non-causal attention of each row to the rows sharing its segment id.

    q, k, v: ``[heads, P, head_dim]``; segment_ids: ``[P]`` int. Returns ``[heads, P, head_dim]``.
    Dense reference (a ``[P, P]`` block-diagonal mask, O(P^2) memory): the test twin of
    :func:`batched_segment_attention`, which the tower uses.
    """
    mask = segment_ids[:, None] == segment_ids[None, :]
    return dense_attention(q[None], k[None], v[None], mask[None, None])[0]


def _padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: np.ndarray | None,
                      max_scores: int) -> jax.Array:
    """q, k, v ``[S, L, heads, hd]`` (``valid [S, L]`` marks real keys, None = all) -> ``[S, L, heads, hd]``.

    When ``S * heads * L * L`` float32 scores exceed ``max_scores``, queries go in chunks
    (``lax.map``); every query row still sees all keys of its segment, so the softmax is unchanged.
    """
    s, l, h, hd = q.shape
    mask = None if valid is None else jnp.asarray(valid)[:, None, None, :]

    def attend(qc):  # [S, c, H, hd]
        t = lambda a: a.transpose(0, 2, 1, 3)
        return t(dense_attention(t(qc), t(k), t(v), mask))

    chunk = max(1, max_scores // (s * h * l))
    if chunk >= l:
        return attend(q)
    n_chunks = -(-l // chunk)
    chunk = -(-l // n_chunks)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * chunk - l), (0, 0), (0, 0)))
    out = jax.lax.map(attend, qp.reshape(s, n_chunks, chunk, h, hd).swapaxes(0, 1))
    return out.swapaxes(0, 1).reshape(s, n_chunks * chunk, h, hd)[:, :l]


def batched_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, batches: SegmentBatches, *,
                              max_scores: int = MAX_SCORES_PER_CHUNK) -> jax.Array:
    """Same result as :func:`segment_attention`, computed on padded segment batches.

    q, k, v: ``[P, heads, head_dim]`` (row-major, as the qkv projection gives them); ``batches`` from
    :func:`segment_batches`. Rows are gathered into each bucket's ``[S_b, L_b]`` slots, attend with
    a key-padding mask, and are gathered back to row order: memory O(sum_b S_b * L_b^2) instead of
    O(P^2) (and query-chunked above ``max_scores`` scores). Returns ``[P, heads, head_dim]``.
    """
    p, h, hd = q.shape
    if batches.identity:
        ((gather, _),) = batches.buckets
        s, l = gather.shape
        r = lambda a: a.reshape(s, l, h, hd)
        return _padded_attention(r(q), r(k), r(v), None, max_scores).reshape(p, h, hd)
    outs = []
    for gather, valid in batches.buckets:
        idx = jnp.asarray(gather)
        out = _padded_attention(q[idx], k[idx], v[idx], None if valid.all() else valid, max_scores)
        outs.append(out.reshape(-1, h, hd))
    flat = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
    return flat[jnp.asarray(batches.scatter)]


def vision_block(bp: nnx.State, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 segments: SegmentBatches | jax.Array, cfg: VisionConfig) -> jax.Array:
    """One block (``bp`` is one layer's slice of the :class:`VisionBlocks` state): x + attn(norm1(x)); x + mlp(norm2(x)).

    ``segments``: a :class:`SegmentBatches` (batched attention, what the tower runs) or per-row
    segment ids ``[P]`` (the dense ``[P, P]``-mask reference, for tests and benchmarks).
    """
    n, dim = x.shape
    h, hd = cfg.num_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    y = rms_norm(x, bp.norm1, eps)
    qkv = (y @ bp.qkv_w + bp.qkv_b).reshape(n, 3, h, hd)
    q = apply_rotary(qkv[:, 0], cos[:, None], sin[:, None])  # [P, H, hd]
    k = apply_rotary(qkv[:, 1], cos[:, None], sin[:, None])
    if isinstance(segments, SegmentBatches):
        attn = batched_segment_attention(q, k, qkv[:, 2], segments)
    else:
        t = lambda a: a.swapaxes(0, 1)
        attn = t(segment_attention(t(q), t(k), t(qkv[:, 2]), segments))
    x = x + (attn.reshape(n, dim) @ bp.proj_w + bp.proj_b)
    y = rms_norm(x, bp.norm2, eps)
    mlp = (jax.nn.silu(y @ bp.gate_w + bp.gate_b) * (y @ bp.up_w + bp.up_b)) @ bp.down_w + bp.down_b
    return x + mlp


def _same_batches(a: SegmentBatches, b: SegmentBatches) -> bool:
    return len(a.buckets) == len(b.buckets) and all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a.arrays(), b.arrays())
    )


@functools.partial(jax.jit, static_argnames=("grid_thw", "cfg"))
def _vision_forward(params: nnx.State, pixel_values: jax.Array, grid_thw: GridTHW, cfg: VisionConfig) -> jax.Array:
    layout = vision_layout(grid_thw, cfg)
    dtype = params.patch_embed.dtype
    x = pixel_values.astype(dtype) @ params.patch_embed  # [P, D], original row order
    x = x[layout.row_perm]  # window order
    cos, sin = vision_rotary_cos_sin(jnp.asarray(layout.rotary_ids), cfg)
    full_b, win_b = layout.full_batches, layout.window_batches
    kinds = set(layout.full_layers.tolist())
    if len(kinds) == 2 and _same_batches(full_b, win_b):  # e.g. every slice is one window
        kinds = {False}

    def body(x, xs):
        bp, is_full = xs
        if len(kinds) == 1:
            return vision_block(bp, x, cos, sin, full_b if True in kinds else win_b, cfg), None
        return jax.lax.cond(
            is_full,
            lambda x: vision_block(bp, x, cos, sin, full_b, cfg),
            lambda x: vision_block(bp, x, cos, sin, win_b, cfg),
            x,
        ), None

    x, _ = jax.lax.scan(body, x, (params.blocks, jnp.asarray(layout.full_layers)))

    x = rms_norm(x, params.merger_norm, MERGER_LN_EPS)
    x = x.reshape(-1, cfg.merge_unit * cfg.hidden_size)
    x = jax.nn.gelu(x @ params.merger_fc1_w + params.merger_fc1_b, approximate=False)
    x = x @ params.merger_fc2_w + params.merger_fc2_b
    return x[layout.merged_unperm]


def vision_forward(params: nnx.State, pixel_values: jax.Array, grid_thw, cfg: VisionConfig) -> jax.Array:
    """Vision tower: ``pixel_values [P, patch_dim]`` -> merged features ``[P // merge_unit, out_hidden]``.

    ``params``: a :class:`VisionModel` state (``nnx.state(model)``, or from :func:`init_vision_params`).

    ``grid_thw`` is static: a tuple of ``(t, h, w)`` patch-grid triples (lists and ``[n, 3]`` host
    arrays are converted). Rows of ``pixel_values`` are the processor's patches, grid after grid.
    Jitted; callable inside an outer ``jax.jit`` (with ``grid_thw`` and ``cfg`` static there).
    """
    grid = _normalize_grid(grid_thw)
    _check_grid(grid, cfg)
    total = sum(t * h * w for t, h, w in grid)
    if pixel_values.ndim != 2 or pixel_values.shape != (total, cfg.patch_dim):
        raise VisionInputError(
            f"pixel_values has shape {tuple(pixel_values.shape)}, expected ({total}, {cfg.patch_dim}) "
            f"for grid_thw={list(map(list, grid))} (sum of t*h*w rows of patch_dim values)"
        )
    return _vision_forward(params, pixel_values, grid, cfg)
