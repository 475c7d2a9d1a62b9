"""The per-frame vision tower of VideoLLaMA2: a CLIP or SigLIP ViT (transformers' ``CLIPVisionModel`` /
``SiglipVisionModel`` numerics), returning the configured hidden state.

Module tree::

    VisionTower     patch_w [C*p*p, D], patch_b [D] (SigLIP), class_emb [D] (CLIP), pos_emb [P(+1), D],
    |               pre_ln_w / pre_ln_b [D] (CLIP's pre_layrnorm)
    +- layers: TableModule   every weight stacked on a leading [layers] axis (run under lax.scan)

Only the first ``cfg.layers_run`` layers run (``hidden_states[select_layer]``); the post-LayerNorm and
SigLIP's pooling head are never used by VideoLLaMA2 and are not held (the loader skips them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.qwen2_5_vl.layers import dense_attention

from .config import VisionTowerConfig
from .weights import TableModule, draw_arrays


def tower_top_shapes(cfg: VisionTowerConfig) -> dict[str, tuple[int, ...]]:
    """Weights outside the layers, in our layout (linear ``[in, out]``)."""
    d, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
    shapes = {"patch_w": (c * p * p, d)}
    if cfg.kind == "siglip":
        shapes["patch_b"] = (d,)
    else:
        shapes["class_emb"] = (d,)
    shapes["pos_emb"] = (cfg.num_positions, d)
    if cfg.kind == "clip":
        shapes["pre_ln_w"], shapes["pre_ln_b"] = (d,), (d,)
    return shapes


def tower_layer_shapes(cfg: VisionTowerConfig) -> dict[str, tuple[int, ...]]:
    """One encoder layer's weights (without the leading ``[layers]`` axis)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "ln1_w": (d,), "ln1_b": (d,), "q_w": (d, d), "q_b": (d,), "k_w": (d, d), "k_b": (d,),
        "v_w": (d, d), "v_b": (d,), "o_w": (d, d), "o_b": (d,), "ln2_w": (d,), "ln2_b": (d,),
        "fc1_w": (d, f), "fc1_b": (f,), "fc2_w": (f, d), "fc2_b": (d,),
    }


def draw_tower_arrays(cfg: VisionTowerConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Every random weight of a :class:`VisionTower`, nested by attribute name."""
    k_top, k_layers = jax.random.split(key)
    n = cfg.num_hidden_layers
    stacked = {name: (n, *shape) for name, shape in tower_layer_shapes(cfg).items()}
    return {**draw_arrays(tower_top_shapes(cfg), k_top, dtype), "layers": draw_arrays(stacked, k_layers, dtype)}


class VisionTower(nnx.Module):
    """The tower's weights (see the module doc); ``__call__`` = :func:`tower_forward` on its state."""

    def __init__(self, cfg: VisionTowerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        arrays = draw_tower_arrays(cfg, rngs.params(), dtype)
        self.config = cfg
        for name in tower_top_shapes(cfg):
            setattr(self, name, nnx.Param(arrays[name]))
        self.layers = TableModule(arrays["layers"])

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return tower_forward(nnx.state(self), pixels, self.config)


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in float32, cast back to ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * w + b).astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The tower's MLP activation by its transformers name."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=name == "gelu_pytorch_tanh")


def patchify(pixels: jax.Array, cfg: VisionTowerConfig) -> jax.Array:
    """``[F, C, H, W]`` frames -> ``[F, P, C*p*p]`` patches, row-major over the patch grid, each patch
    flattened in (channel, row, column) order (torch's conv weight order); a remainder of pixels past the
    last whole patch is dropped, as the stride-``p`` convolution does."""
    f, c = pixels.shape[:2]
    p, n = cfg.patch_size, cfg.patches_per_side
    x = pixels[:, :, : n * p, : n * p].reshape(f, c, n, p, n, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(f, n * n, c * p * p)


def tower_forward(params: nnx.State, pixels: jax.Array, cfg: VisionTowerConfig) -> jax.Array:
    """Frames ``[F, C, H, W]`` (the tower's processor output, ``H = W = image_size``) -> the selected hidden
    state ``[F, P, D]`` (CLIP with ``select_feature="patch"``: class token dropped; ``P`` = patches)."""
    f, _, h, w = pixels.shape
    if h != cfg.image_size or w != cfg.image_size:
        raise ValueError(f"pixel_values frames are {h}x{w}; the vision tower takes {cfg.image_size}x{cfg.image_size}")
    x = patchify(pixels.astype(params.patch_w.dtype), cfg) @ params.patch_w
    if cfg.kind == "siglip":
        x = x + params.patch_b
    else:
        cls = jnp.broadcast_to(params.class_emb, (f, 1, cfg.hidden_size)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
    x = x + params.pos_emb
    if cfg.kind == "clip":
        x = layer_norm(x, params.pre_ln_w, params.pre_ln_b, cfg.layer_norm_eps)
    heads, eps = cfg.num_attention_heads, cfg.layer_norm_eps

    def split(t):
        return t.reshape(f, -1, heads, cfg.head_dim).transpose(0, 2, 1, 3)

    def body(x, lp):
        hdn = layer_norm(x, lp.ln1_w, lp.ln1_b, eps)
        q, k, v = (split(hdn @ getattr(lp, n + "_w") + getattr(lp, n + "_b")) for n in ("q", "k", "v"))
        attn = dense_attention(q, k, v, None).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + attn @ lp.o_w + lp.o_b
        hdn = layer_norm(x, lp.ln2_w, lp.ln2_b, eps)
        return x + activation(cfg.hidden_act, hdn @ lp.fc1_w + lp.fc1_b) @ lp.fc2_w + lp.fc2_b, None

    used = jax.tree.map(lambda a: a[: cfg.layers_run], params.layers)
    x, _ = jax.lax.scan(body, x, used)
    return x[:, 1:] if cfg.class_token and cfg.select_feature == "patch" else x


# ---------------------------------------------------------------------------------------------- HF keys
#: the release nests the transformers tower under ``model.vision_tower.vision_tower``.
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."

#: layer weight -> (name inside ``encoder.layers.N.``, stored transposed in torch layout?)
TOWER_LAYER_HF_NAMES: dict[str, tuple[str, bool]] = {
    "ln1_w": ("layer_norm1.weight", False), "ln1_b": ("layer_norm1.bias", False),
    "q_w": ("self_attn.q_proj.weight", True), "q_b": ("self_attn.q_proj.bias", False),
    "k_w": ("self_attn.k_proj.weight", True), "k_b": ("self_attn.k_proj.bias", False),
    "v_w": ("self_attn.v_proj.weight", True), "v_b": ("self_attn.v_proj.bias", False),
    "o_w": ("self_attn.out_proj.weight", True), "o_b": ("self_attn.out_proj.bias", False),
    "ln2_w": ("layer_norm2.weight", False), "ln2_b": ("layer_norm2.bias", False),
    "fc1_w": ("mlp.fc1.weight", True), "fc1_b": ("mlp.fc1.bias", False),
    "fc2_w": ("mlp.fc2.weight", True), "fc2_b": ("mlp.fc2.bias", False),
}

#: top weight -> name after :data:`TOWER_PREFIX`.
TOWER_TOP_HF_NAMES: dict[str, str] = {
    "patch_w": "embeddings.patch_embedding.weight", "patch_b": "embeddings.patch_embedding.bias",
    "class_emb": "embeddings.class_embedding", "pos_emb": "embeddings.position_embedding.weight",
    "pre_ln_w": "pre_layrnorm.weight", "pre_ln_b": "pre_layrnorm.bias",
}

#: tensors of the transformers tower that VideoLLaMA2 never uses (skipped by the loader).
TOWER_UNUSED_PREFIXES = (TOWER_PREFIX + "post_layernorm.", TOWER_PREFIX + "head.",
                         TOWER_PREFIX + "embeddings.position_ids")


def patch_to_jax(x, cfg: VisionTowerConfig):
    """torch's conv weight ``[D, C, p, p]`` -> our ``[C*p*p, D]``."""
    return x.reshape(x.shape[0], -1).T


def patch_to_torch(x, cfg: VisionTowerConfig):
    """The inverse of :func:`patch_to_jax`."""
    p = cfg.patch_size
    return x.T.reshape(cfg.hidden_size, cfg.num_channels, p, p)


def tower_hf_shape(name: str, shape: tuple[int, ...], cfg: VisionTowerConfig) -> tuple[int, ...]:
    """The torch shape of a top weight of our ``shape``."""
    if name == "patch_w":
        return (cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size)
    return shape
