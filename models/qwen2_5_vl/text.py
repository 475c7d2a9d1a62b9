"""The Qwen2.5-VL language model (a Qwen2 decoder with M-RoPE): Flax NNX modules and the pure functions they run.

Module tree (see ``docs/DESIGN.md``, "Text interface")::

    TextModel            embed [V, D], norm [D], lm_head [D, V] (None when tied), config (static)
    └── layers: TextDecoderLayers   every decoder layer STACKED: one nnx.Param per weight, leading [L] axis

The bridge: ``nnx.split(model)`` (or ``nnx.state(model)``) gives the pure state, an ``nnx.State`` with
the same attribute paths (``state.layers.q_w``) whose leaves are ``nnx.Param`` variables that behave as
arrays. The pure functions below take that state: :func:`decoder_forward` runs the stacked layers as
one :func:`jax.lax.scan` (compile time does not grow with depth), and a prefill or decode step with a
KV policy writes its own scan body from :func:`layer_qkv`, its own attention, and :func:`layer_out`.
The modules' ``__call__`` run the same functions on ``nnx.state(self)``.

Layout and numerics: linear weights are ``[in, out]`` (torch's ``[out, in]`` transposed at load time);
RMSNorm variance, rotary and softmax in float32, as in the reference.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from .config import TextConfig
from .layers import apply_rotary, dense_attention, rms_norm
from .state import module_from_arrays, state_from_leaves


def text_layer_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Weight of :class:`TextDecoderLayers` -> one layer's shape in our ``[in, out]`` layout (without the
    leading ``[L]``); the loader's leaf table and the Hub shapes are both derived from it."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {
        "input_norm": (d,), "q_w": (d, q), "q_b": (q,), "k_w": (d, kv), "k_b": (kv,), "v_w": (d, kv),
        "v_b": (kv,), "o_w": (q, d), "post_norm": (d,), "gate_w": (d, f), "up_w": (d, f), "down_w": (f, d),
    }
    if not cfg.attention_bias:  # a Mistral / Llama decoder: no q/k/v bias
        del shapes["q_b"], shapes["k_b"], shapes["v_b"]
    return shapes


# ---------------------------------------------------------------------------------------------- init
def draw_text_layers(cfg: TextConfig, keys: Sequence[jax.Array], dtype=jnp.float32, std: float = 0.02
                     ) -> dict[str, jax.Array]:
    """Random stacked layer weights, one key per weight (in :func:`text_layer_shapes` order): normal(0,
    ``std``) everywhere, biases included (so bias bugs show), and norm weights ``1 + normal(0, 0.1)``
    (so a missing or misplaced norm weight shows too). Each ``[L, *shape]`` in ``dtype``."""
    layers = {}
    for k, (name, shape) in zip(keys, text_layer_shapes(cfg).items()):
        x = jax.random.normal(k, (cfg.num_hidden_layers, *shape), jnp.float32)
        layers[name] = (1.0 + 0.1 * x if name.endswith("norm") else std * x).astype(dtype)
    return layers


def draw_text_arrays(cfg: TextConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Every random weight of a :class:`TextModel`, nested by attribute name (``lm_head`` only when
    untied): the layers as :func:`draw_text_layers`, the embedding and head normal(0, ``std``), the final
    norm ``1 + normal(0, 0.1)``. The one source of the text model's random weights."""
    n_fields = len(text_layer_shapes(cfg))
    keys = jax.random.split(key, n_fields + 4)
    d, v = cfg.hidden_size, cfg.vocab_size
    k_emb, k_norm, k_head = keys[-3:]
    arrays = {
        "embed": (std * jax.random.normal(k_emb, (v, d), jnp.float32)).astype(dtype),
        "layers": draw_text_layers(cfg, keys[:n_fields], dtype, std),
        "norm": (1.0 + 0.1 * jax.random.normal(k_norm, (d,), jnp.float32)).astype(dtype),
    }
    if not cfg.tie_word_embeddings:
        arrays["lm_head"] = (std * jax.random.normal(k_head, (d, v), jnp.float32)).astype(dtype)
    return arrays


# ---------------------------------------------------------------------------------------------- modules
class TextDecoderLayers(nnx.Module):
    """All decoder layers, every weight stacked on a leading ``[L]`` axis (one layer's slice inside scan).

    Weights are drawn by :func:`draw_text_layers` from a key taken from ``rngs``.
    """

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, std: float = 0.02, rngs: nnx.Rngs):
        w = draw_text_layers(cfg, jax.random.split(rngs.params(), len(text_layer_shapes(cfg))), dtype, std)
        self.config = cfg
        self.input_norm = nnx.Param(w["input_norm"])  # [L, D]
        self.q_w = nnx.Param(w["q_w"])  # [L, D, Hq*hd]
        self.q_b = nnx.Param(w["q_b"]) if cfg.attention_bias else None  # [L, Hq*hd]
        self.k_w = nnx.Param(w["k_w"])  # [L, D, Hkv*hd]
        self.k_b = nnx.Param(w["k_b"]) if cfg.attention_bias else None  # [L, Hkv*hd]
        self.v_w = nnx.Param(w["v_w"])  # [L, D, Hkv*hd]
        self.v_b = nnx.Param(w["v_b"]) if cfg.attention_bias else None  # [L, Hkv*hd]
        self.o_w = nnx.Param(w["o_w"])  # [L, Hq*hd, D]
        self.post_norm = nnx.Param(w["post_norm"])  # [L, D]
        self.gate_w = nnx.Param(w["gate_w"])  # [L, D, F]
        self.up_w = nnx.Param(w["up_w"])  # [L, D, F]
        self.down_w = nnx.Param(w["down_w"])  # [L, F, D]

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Hidden ``x [B, N, D]`` through every layer (dense attention): see :func:`run_text_layers`."""
        return run_text_layers(nnx.state(self), x, cos, sin, mask, self.config)


class TextModel(nnx.Module):
    """The language model: ``embed [V, D]``, ``layers`` (:class:`TextDecoderLayers`), ``norm [D]`` and
    ``lm_head [D, V]`` (``None`` when tied to the embedding, and then absent from the state).

    All weights are drawn by :func:`draw_text_arrays` from one key taken from ``rngs``, so the state
    equals ``init_text_params(cfg, key)`` for that key.
    """

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, std: float = 0.02, rngs: nnx.Rngs):
        arrays = draw_text_arrays(cfg, rngs.params(), dtype, std)
        self.config = cfg
        self.embed = nnx.Param(arrays["embed"])
        self.layers = module_from_arrays(
            lambda: TextDecoderLayers(cfg, dtype=dtype, std=std, rngs=nnx.Rngs(0)), arrays["layers"]
        )
        self.norm = nnx.Param(arrays["norm"])
        self.lm_head = nnx.Param(arrays["lm_head"]) if "lm_head" in arrays else None

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits ``[B, N, V]`` float32 of ``input_ids [B, N]`` or ``inputs_embeds [B, N, D]`` (exactly one).

        ``position_ids``: ``[B, N]`` or ``[3, B, N]``; default ``arange(N)`` for every row (give them
        for left padding). ``attention_mask`` ``[B, N]``: 1 = token, 0 = padding. Traceable (``nnx.jit``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        params = nnx.state(self)
        embeds = jnp.take(params.embed, input_ids, axis=0) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            b, n = embeds.shape[:2]
            position_ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        hidden = decoder_forward(params, embeds, position_ids, attention_mask, self.config)
        return lm_logits(params, hidden)


def abstract_text_state(cfg: TextConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state)`` of a text-only :class:`TextModel` (e.g. a GGUF model), the state's leaves
    ``jax.ShapeDtypeStruct`` (nothing drawn or allocated)."""
    return nnx.split(nnx.eval_shape(lambda: TextModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))))


def init_text_params(cfg: TextConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> nnx.State:
    """The pure state of a :class:`TextModel` holding :func:`draw_text_arrays` ``(cfg, key)`` (jittable)."""
    _, abstract = abstract_text_state(cfg, dtype)
    return state_from_leaves(abstract, flatten_dict(draw_text_arrays(cfg, key, dtype, std)))


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
    lp: nnx.State, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: TextConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Input RMSNorm and the q/k/v projections (with bias when ``cfg.attention_bias``) of one layer; rotary
    applied to q and k.

    ``lp`` is one layer's slice of the :class:`TextDecoderLayers` state (what scan hands its body).

    ``x`` ``[B, N, D]``; ``cos``/``sin`` ``[B, N, hd]`` float32 ->
    ``q [B, Hq, N, hd]``, ``k [B, Hkv, N, hd]``, ``v [B, Hkv, N, hd]`` in ``x.dtype``.
    """
    h = rms_norm(x, lp.input_norm, cfg.rms_norm_eps)
    q, k, v = h @ lp.q_w, h @ lp.k_w, h @ lp.v_w
    if cfg.attention_bias:
        q, k, v = q + lp.q_b, k + lp.k_b, v + lp.v_b
    q = _split_heads(q, cfg.num_attention_heads)
    k = _split_heads(k, cfg.num_key_value_heads)
    v = _split_heads(v, cfg.num_key_value_heads)
    c, s = cos[:, None], sin[:, None]
    return apply_rotary(q, c, s), apply_rotary(k, c, s), v


def layer_out(lp: nnx.State, x: jax.Array, attn: jax.Array, cfg: TextConfig) -> jax.Array:
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


def run_text_layers(
    layers: nnx.State, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None, cfg: TextConfig
) -> jax.Array:
    """Hidden ``x [B, N, D]`` through every layer of the :class:`TextDecoderLayers` state ``layers`` with
    dense attention, under one :func:`jax.lax.scan`. ``cos``/``sin`` ``[B, N, hd]`` float32 (from
    :func:`mrope_cos_sin`); ``mask`` boolean, broadcastable to ``[B, 1, N, N]`` (True = attend)."""

    def body(x, lp: nnx.State):
        q, k, v = layer_qkv(lp, x, cos, sin, cfg)
        return layer_out(lp, x, dense_attention(q, k, v, mask), cfg), None

    x, _ = jax.lax.scan(body, x, layers)
    return x


def decoder_forward(
    params: nnx.State,
    embeds: jax.Array,
    position_ids: jax.Array,
    attention_mask: jax.Array | None,
    cfg: TextConfig,
) -> jax.Array:
    """Dense causal, padding-aware decoder over ``embeds [B, N, D]`` -> hidden ``[B, N, D]`` (final norm applied).

    ``params``: a :class:`TextModel` state. ``position_ids`` is ``[3, B, N]`` (from
    :func:`~models.qwen2_5_vl.rope_index.get_rope_index`) or ``[B, N]`` for text-only positions. The
    layers run under :func:`jax.lax.scan` (:func:`run_text_layers`).
    """
    cos, sin = mrope_cos_sin(position_ids, cfg)
    mask = causal_padding_mask(attention_mask, embeds.shape[1])
    x = run_text_layers(params.layers, embeds, cos, sin, mask, cfg)
    return rms_norm(x, params.norm, cfg.rms_norm_eps)


def lm_logits(params: nnx.State, hidden: jax.Array) -> jax.Array:
    """``hidden [B, N, D]`` -> logits ``[B, N, V]`` float32 (through the embedding when the head is tied:
    a tied :class:`TextModel` state has no ``lm_head``)."""
    lm_head = getattr(params, "lm_head", None)
    if lm_head is None:
        return jnp.einsum("bnd,vd->bnv", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("bnd,dv->bnv", hidden, lm_head, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------- HF keys
# Weight of TextDecoderLayers -> (Hub name inside ``model.layers.N.``, stored transposed in torch layout?)
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


def text_layer_hf_names(cfg: TextConfig) -> dict[str, tuple[str, bool]]:
    """:data:`TEXT_LAYER_HF_NAMES` for the weights this config has (no q/k/v biases without
    ``attention_bias``)."""
    shapes = text_layer_shapes(cfg)
    return {field: spec for field, spec in TEXT_LAYER_HF_NAMES.items() if field in shapes}


def text_hf_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Hub name -> torch shape for every tensor of the text half (``lm_head.weight`` only when untied)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    shapes = text_layer_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for field, (name, transposed) in text_layer_hf_names(cfg).items():
            shape = shapes[field]
            out[f"model.layers.{i}.{name}"] = shape[::-1] if transposed else shape
    out["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def text_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: TextConfig, dtype=jnp.float32) -> nnx.State:
    """A :class:`TextModel` state in ``dtype`` from Hub-named host arrays (shapes already checked)."""

    def get(name: str, transposed: bool = False) -> jax.Array:
        a = np.asarray(tensors[name])
        return jnp.asarray(a.T if transposed else a, dtype=dtype)

    leaves = {("embed",): get("model.embed_tokens.weight"), ("norm",): get("model.norm.weight")}
    for field, (name, tr) in text_layer_hf_names(cfg).items():
        stacked = np.stack([np.asarray(tensors[f"model.layers.{i}.{name}"]) for i in range(cfg.num_hidden_layers)])
        leaves[("layers", field)] = jnp.asarray(stacked.swapaxes(-1, -2) if tr else stacked, dtype=dtype)
    if not cfg.tie_word_embeddings:
        leaves[("lm_head",)] = get("lm_head.weight", True)
    return state_from_leaves(abstract_text_state(cfg, dtype)[1], leaves)


def text_params_to_hf(params: nnx.State, cfg: TextConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`text_params_from_hf`: Hub-named host arrays in torch layout."""
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(params.embed)}
    for field, (name, transposed) in text_layer_hf_names(cfg).items():
        stacked = np.asarray(getattr(params.layers, field))
        for i in range(cfg.num_hidden_layers):
            out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(stacked[i].T if transposed else stacked[i])
    out["model.norm.weight"] = np.asarray(params.norm)
    lm_head = getattr(params, "lm_head", None)
    if lm_head is not None:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(lm_head).T)
    return out
