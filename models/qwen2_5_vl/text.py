"""The Qwen2.5-VL language model (a Qwen2 decoder with M-RoPE) as pure functions over a params pytree.

Layout (see ``docs/DESIGN.md``, "Text interface"):

* :class:`TextLayerParams` holds every decoder layer stacked on a leading ``[L]`` axis, so the decoder
  runs as one :func:`jax.lax.scan` and compile time does not grow with depth;
* linear weights are ``[in, out]`` (torch's ``[out, in]`` transposed at load time);
* numerics follow the reference: RMSNorm variance in float32, rotary in float32, softmax in float32.

A prefill or decode step with a KV policy writes its own scan body from :func:`layer_qkv`, its own
attention, and :func:`layer_out`; :func:`decoder_forward` is the dense reference path.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .config import TextConfig
from .layers import apply_rotary, dense_attention, rms_norm

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextLayerParams:
    """All decoder layers, every leaf stacked on a leading ``[L]`` axis (one layer's slice inside scan)."""

    input_norm: jax.Array  # [L, D]
    q_w: jax.Array  # [L, D, Hq*hd]
    q_b: jax.Array  # [L, Hq*hd]
    k_w: jax.Array  # [L, D, Hkv*hd]
    k_b: jax.Array  # [L, Hkv*hd]
    v_w: jax.Array  # [L, D, Hkv*hd]
    v_b: jax.Array  # [L, Hkv*hd]
    o_w: jax.Array  # [L, Hq*hd, D]
    post_norm: jax.Array  # [L, D]
    gate_w: jax.Array  # [L, D, F]
    up_w: jax.Array  # [L, D, F]
    down_w: jax.Array  # [L, F, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextParams:
    """Embedding, stacked layers, final norm, and the LM head (``None`` when tied to the embedding)."""

    embed: jax.Array  # [V, D]
    layers: TextLayerParams
    norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V] or None (tied)


def text_layer_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Field of :class:`TextLayerParams` -> one layer's shape in our ``[in, out]`` layout (without the
    leading ``[L]``); the loader's leaf table and the Hub shapes are both derived from it."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {
        "input_norm": (d,), "q_w": (d, q), "q_b": (q,), "k_w": (d, kv), "k_b": (kv,), "v_w": (d, kv),
        "v_b": (kv,), "o_w": (q, d), "post_norm": (d,), "gate_w": (d, f), "up_w": (d, f), "down_w": (f, d),
    }


def init_text_params(cfg: TextConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> TextParams:
    """Fresh random weights: normal(0, ``std``) everywhere, biases included (so bias bugs show), and
    norm weights ``1 + normal(0, 0.1)`` (so a missing or misplaced norm weight shows too)."""
    n_layers = cfg.num_hidden_layers
    shapes = text_layer_shapes(cfg)
    keys = jax.random.split(key, len(shapes) + 4)
    layer = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        x = jax.random.normal(k, (n_layers, *shape), jnp.float32)
        layer[name] = (1.0 + 0.1 * x if name.endswith("norm") else std * x).astype(dtype)
    d, v = cfg.hidden_size, cfg.vocab_size
    k_emb, k_norm, k_head = keys[-3:]
    return TextParams(
        embed=(std * jax.random.normal(k_emb, (v, d), jnp.float32)).astype(dtype),
        layers=TextLayerParams(**layer),
        norm=(1.0 + 0.1 * jax.random.normal(k_norm, (d,), jnp.float32)).astype(dtype),
        lm_head=None
        if cfg.tie_word_embeddings
        else (std * jax.random.normal(k_head, (d, v), jnp.float32)).astype(dtype),
    )


# ---------------------------------------------------------------------------------------------- rotary
def rope_inv_freq(cfg: TextConfig) -> np.ndarray:
    """``1 / theta ** (arange(0, hd, 2) / hd)`` in float32, ``[hd/2]`` (host constant)."""
    hd = cfg.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    return (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """M-RoPE tables from ``[3, B, N]`` positions (rows t, h, w) -> ``(cos, sin)``, each ``[B, N, hd]`` float32.

    The half head-dim's frequency bands are split by ``mrope_section``: the first ``s[0]`` bands rotate
    with the t row, the next ``s[1]`` with h, the last ``s[2]`` with w; the half is then duplicated
    (``cat(f, f)``), matching ``rotate_half``.
    """
    pos = jnp.asarray(position_ids)
    if pos.ndim == 2:  # [B, N] text-only positions: the three rows are equal
        pos = jnp.broadcast_to(pos[None], (3, *pos.shape))
    freqs = pos.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))  # [3, B, N, hd/2]
    bounds = np.cumsum((0, *cfg.mrope_section))
    half = jnp.concatenate([freqs[i % 3, ..., bounds[i] : bounds[i + 1]] for i in range(3)], axis=-1)
    emb = jnp.concatenate([half, half], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ---------------------------------------------------------------------------------------------- layer
def _split_heads(x: jax.Array, n_heads: int) -> jax.Array:
    b, n, _ = x.shape
    return x.reshape(b, n, n_heads, -1).transpose(0, 2, 1, 3)


def layer_qkv(
    lp: TextLayerParams, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: TextConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Input RMSNorm and the q/k/v projections (with bias) of one layer; rotary applied to q and k.

    ``x`` ``[B, N, D]``; ``cos``/``sin`` ``[B, N, hd]`` float32 ->
    ``q [B, Hq, N, hd]``, ``k [B, Hkv, N, hd]``, ``v [B, Hkv, N, hd]`` in ``x.dtype``.
    """
    h = rms_norm(x, lp.input_norm, cfg.rms_norm_eps)
    q = _split_heads(h @ lp.q_w + lp.q_b, cfg.num_attention_heads)
    k = _split_heads(h @ lp.k_w + lp.k_b, cfg.num_key_value_heads)
    v = _split_heads(h @ lp.v_w + lp.v_b, cfg.num_key_value_heads)
    c, s = cos[:, None], sin[:, None]
    return apply_rotary(q, c, s), apply_rotary(k, c, s), v


def layer_out(lp: TextLayerParams, x: jax.Array, attn: jax.Array, cfg: TextConfig) -> jax.Array:
    """``o_proj`` (no bias) + residual, then post-attention RMSNorm, SwiGLU MLP (no biases) + residual.

    ``x`` ``[B, N, D]`` is the layer input (the residual); ``attn`` ``[B, Hq, N, hd]``.
    """
    b, _, n, _ = attn.shape
    x = x + attn.transpose(0, 2, 1, 3).reshape(b, n, -1).astype(x.dtype) @ lp.o_w
    h = rms_norm(x, lp.post_norm, cfg.rms_norm_eps)
    return x + (jax.nn.silu(h @ lp.gate_w) * (h @ lp.up_w)) @ lp.down_w


def causal_padding_mask(attention_mask: jax.Array | None, n: int) -> jax.Array:
    """Boolean ``[B or 1, 1, N, N]`` mask: causal, and keys at padding positions (mask 0) excluded.

    Works for left and right padding alike; rows of padding queries may be fully masked (the attention
    then yields zeros there, and those positions' outputs are meaningless, as in the reference).
    """
    causal = jnp.tril(jnp.ones((n, n), dtype=bool))[None, None]
    if attention_mask is None:
        return causal
    keys_ok = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    return causal & keys_ok


def decoder_forward(
    params: TextParams,
    embeds: jax.Array,
    position_ids: jax.Array,
    attention_mask: jax.Array | None,
    cfg: TextConfig,
) -> jax.Array:
    """Dense causal, padding-aware decoder over ``embeds [B, N, D]`` -> hidden ``[B, N, D]`` (final norm applied).

    ``position_ids`` is ``[3, B, N]`` (from :func:`~models.qwen2_5_vl.rope_index.get_rope_index`) or
    ``[B, N]`` for text-only positions. The layers run under :func:`jax.lax.scan`.
    """
    cos, sin = mrope_cos_sin(position_ids, cfg)
    mask = causal_padding_mask(attention_mask, embeds.shape[1])

    def body(x, lp: TextLayerParams):
        q, k, v = layer_qkv(lp, x, cos, sin, cfg)
        return layer_out(lp, x, dense_attention(q, k, v, mask), cfg), None

    x, _ = jax.lax.scan(body, embeds, params.layers)
    return rms_norm(x, params.norm, cfg.rms_norm_eps)


def lm_logits(params: TextParams, hidden: jax.Array) -> jax.Array:
    """``hidden [B, N, D]`` -> logits ``[B, N, V]`` float32 (through the embedding when the head is tied)."""
    if params.lm_head is None:
        return jnp.einsum("bnd,vd->bnv", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("bnd,dv->bnv", hidden, params.lm_head, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------- HF keys
# Field of TextLayerParams -> (Hub name inside ``model.layers.N.``, stored transposed in torch layout?)
TEXT_LAYER_HF_NAMES: dict[str, tuple[str, bool]] = {
    "input_norm": ("input_layernorm.weight", False),
    "q_w": ("self_attn.q_proj.weight", True),
    "q_b": ("self_attn.q_proj.bias", False),
    "k_w": ("self_attn.k_proj.weight", True),
    "k_b": ("self_attn.k_proj.bias", False),
    "v_w": ("self_attn.v_proj.weight", True),
    "v_b": ("self_attn.v_proj.bias", False),
    "o_w": ("self_attn.o_proj.weight", True),
    "post_norm": ("post_attention_layernorm.weight", False),
    "gate_w": ("mlp.gate_proj.weight", True),
    "up_w": ("mlp.up_proj.weight", True),
    "down_w": ("mlp.down_proj.weight", True),
}


def text_hf_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Hub name -> torch shape for every tensor of the text half (``lm_head.weight`` only when untied)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    shapes = text_layer_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for field, (name, transposed) in TEXT_LAYER_HF_NAMES.items():
            shape = shapes[field]
            out[f"model.layers.{i}.{name}"] = shape[::-1] if transposed else shape
    out["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def text_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: TextConfig, dtype=jnp.float32) -> TextParams:
    """Builds :class:`TextParams` from Hub-named host arrays (shapes already checked by the loader)."""

    def get(name: str, transposed: bool = False) -> np.ndarray:
        a = np.asarray(tensors[name])
        return a.T if transposed else a

    layers = {
        field: jnp.asarray(
            np.stack([get(f"model.layers.{i}.{name}", tr) for i in range(cfg.num_hidden_layers)]), dtype=dtype
        )
        for field, (name, tr) in TEXT_LAYER_HF_NAMES.items()
    }
    return TextParams(
        embed=jnp.asarray(get("model.embed_tokens.weight"), dtype=dtype),
        layers=TextLayerParams(**layers),
        norm=jnp.asarray(get("model.norm.weight"), dtype=dtype),
        lm_head=None if cfg.tie_word_embeddings else jnp.asarray(get("lm_head.weight", True), dtype=dtype),
    )


def text_params_to_hf(params: TextParams, cfg: TextConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`text_params_from_hf`: Hub-named host arrays in torch layout."""
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(params.embed)}
    for field, (name, transposed) in TEXT_LAYER_HF_NAMES.items():
        stacked = np.asarray(getattr(params.layers, field))
        for i in range(cfg.num_hidden_layers):
            out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(stacked[i].T if transposed else stacked[i])
    out["model.norm.weight"] = np.asarray(params.norm)
    if params.lm_head is not None:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params.lm_head).T)
    return out
