"""The STC connector of VideoLLaMA2 (``mm_projector_type == "stc_connector"``), channels-last.

As the release composes it: ``s1`` = timm ``RegStage(depth, in_chs=mm_hidden, out_chs=hidden, stride=1,
act=SiLU, norm=LayerNorm2d)`` per frame, ``sampler`` = ``Conv3d(hidden, hidden, kernel=stride=(2,2,2),
padding=1)`` + SiLU over (time, rows, cols), ``s2`` = the same RegStage on ``hidden``, the tokens flattened
frame-major then row then column, and the ``readout`` MLP (Linear, GELU, Linear).

A RegStage block is timm's RegNet ``Bottleneck`` with its defaults (bottleneck ratio 1, group size 1 =
a depthwise 3x3, squeeze-excitation with ``round(0.25 * in_chs)`` channels): 1x1 conv-LN-SiLU, 3x3
depthwise conv-LN-SiLU, SE (mean over space, 1x1 + SiLU, 1x1 + sigmoid, scale), 1x1 conv-LN, plus the
shortcut (1x1 conv-LN when the channels change, else identity), then SiLU. Convolutions have no bias;
the LayerNorms (timm's ``LayerNormAct2d``: over channels, eps 1e-5) have weight and bias.

Module tree::

    Connector
    +- s1_first: TableModule     the first block of s1 (in_hidden -> hidden; its own shapes)
    +- s1_rest: TableModule      blocks 2.. of s1, stacked [depth - 1, ...]
    +- s2: TableModule           every block of s2, stacked [depth, ...]
    +- sampler_w [2, 2, 2, D, D] (DHWIO), sampler_b [D], readout_w [mlp_depth, D, D], readout_b [mlp_depth, D]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import ConnectorConfig
from .vision import layer_norm
from .weights import TableModule, draw_arrays

#: timm's LayerNormAct2d eps (ConvNormAct turns LayerNorm2d into it).
NORM_EPS = 1e-5
SE_RATIO = 0.25


def block_shapes(in_chs: int, out_chs: int) -> dict[str, tuple[int, ...]]:
    """One Bottleneck block's weights (our layout: 1x1 convs ``[in, out]``, the depthwise 3x3 HWIO
    ``[3, 3, 1, C]``)."""
    se = int(round(in_chs * SE_RATIO))
    shapes = {
        "conv1_w": (in_chs, out_chs), "ln1_w": (out_chs,), "ln1_b": (out_chs,),
        "conv2_w": (3, 3, 1, out_chs), "ln2_w": (out_chs,), "ln2_b": (out_chs,),
        "se_fc1_w": (out_chs, se), "se_fc1_b": (se,), "se_fc2_w": (se, out_chs), "se_fc2_b": (out_chs,),
        "conv3_w": (out_chs, out_chs), "ln3_w": (out_chs,), "ln3_b": (out_chs,),
    }
    if in_chs != out_chs:
        shapes.update({"down_w": (in_chs, out_chs), "down_ln_w": (out_chs,), "down_ln_b": (out_chs,)})
    return shapes


def stacked(shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, tuple[int, ...]]:
    return {name: (n, *shape) for name, shape in shapes.items()}


def connector_top_shapes(cfg: ConnectorConfig) -> dict[str, tuple[int, ...]]:
    d = cfg.hidden
    return {"sampler_w": (*cfg.downsample, d, d), "sampler_b": (d,),
            "readout_w": (cfg.mlp_depth, d, d), "readout_b": (cfg.mlp_depth, d)}


def connector_shapes(cfg: ConnectorConfig) -> dict[str, dict[str, tuple[int, ...]] | tuple[int, ...]]:
    """Every weight, nested as the module tree."""
    d = cfg.hidden
    return {"s1_first": block_shapes(cfg.in_hidden, d), "s1_rest": stacked(block_shapes(d, d), cfg.depth - 1),
            "s2": stacked(block_shapes(d, d), cfg.depth), **connector_top_shapes(cfg)}


def draw_connector_arrays(cfg: ConnectorConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Every random weight of a :class:`Connector`, nested by attribute name (std 0.1: the convolutions
    are small fan-in, and a visible signal keeps the parity tests meaningful)."""
    shapes = connector_shapes(cfg)
    keys = jax.random.split(key, 4)
    out = {name: draw_arrays(shapes[name], k, dtype, std=0.1) for name, k in zip(("s1_first", "s1_rest", "s2"), keys)}
    out.update(draw_arrays(connector_top_shapes(cfg), keys[3], dtype, std=0.1))
    return out


class Connector(nnx.Module):
    """The STC connector's weights (see the module doc); ``__call__`` = :func:`connector_forward`."""

    def __init__(self, cfg: ConnectorConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.depth < 1:
            raise ValueError(f"connector depth={cfg.depth} must be >= 1")
        arrays = draw_connector_arrays(cfg, rngs.params(), dtype)
        self.config = cfg
        self.s1_first = TableModule(arrays["s1_first"])
        self.s1_rest = TableModule(arrays["s1_rest"])
        self.s2 = TableModule(arrays["s2"])
        for name in connector_top_shapes(cfg):
            setattr(self, name, nnx.Param(arrays[name]))

    def __call__(self, features: jax.Array) -> jax.Array:
        return connector_forward(nnx.state(self), features, self.config)


def bottleneck(bp, x: jax.Array) -> jax.Array:
    """One RegNet Bottleneck block on ``x [N, H, W, Cin]`` -> ``[N, H, W, Cout]``."""
    silu = jax.nn.silu
    h = silu(layer_norm(x @ bp.conv1_w, bp.ln1_w, bp.ln1_b, NORM_EPS))
    c = h.shape[-1]
    h = jax.lax.conv_general_dilated(h, jnp.asarray(bp.conv2_w), (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    h = silu(layer_norm(h, bp.ln2_w, bp.ln2_b, NORM_EPS))
    s = silu(h.mean(axis=(1, 2), keepdims=True) @ bp.se_fc1_w + bp.se_fc1_b)
    h = h * jax.nn.sigmoid(s @ bp.se_fc2_w + bp.se_fc2_b)
    h = layer_norm(h @ bp.conv3_w, bp.ln3_w, bp.ln3_b, NORM_EPS)
    shortcut = layer_norm(x @ bp.down_w, bp.down_ln_w, bp.down_ln_b, NORM_EPS) if "down_w" in bp else x
    return silu(h + shortcut)


def run_blocks(blocks, x: jax.Array) -> jax.Array:
    """Stacked same-shape blocks under one ``lax.scan`` (none when the stack is empty)."""
    if jax.tree.leaves(blocks)[0].shape[0] == 0:
        return x
    x, _ = jax.lax.scan(lambda x, bp: (bottleneck(bp, x), None), x, blocks)
    return x


def connector_forward(params: nnx.State, features: jax.Array, cfg: ConnectorConfig) -> jax.Array:
    """Frame features ``[V, T, h, w, Cin]`` (V videos of T frames) -> video tokens ``[V, t'*h'*w', D]``,
    frame-major then row then column (``(t', h', w') = cfg.out_grid(T, h, w)``)."""
    v, t, h, w, c = features.shape
    x = features.reshape(v * t, h, w, c)
    x = run_blocks(params.s1_rest, bottleneck(params.s1_first, x))
    x = x.reshape(v, t, h, w, -1)
    pad = ((cfg.padding, cfg.padding),) * 3
    x = jax.lax.conv_general_dilated(x, jnp.asarray(params.sampler_w), cfg.downsample, pad,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    x = jax.nn.silu(x + params.sampler_b)
    _, t2, h2, w2, d = x.shape
    x = run_blocks(params.s2, x.reshape(v * t2, h2, w2, d)).reshape(v, t2 * h2 * w2, d)
    for i in range(cfg.mlp_depth):
        if i:
            x = jax.nn.gelu(x, approximate=False)
        x = x @ params.readout_w[i] + params.readout_b[i]
    return x
