"""The decode's layer loop: per-layer zero-copy views of the stacked weights, the decode reading them against
the decode slicing the stacked weights, and the decode attention against the model's dense attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl import tiny_config
from models.qwen2_5_vl.layers import dense_attention
from models.qwen2_5_vl.text import init_text_params
from purekv_jax import cache as C
from purekv_jax.attention import decode_attention
from purekv_jax.decode import AppendKV, SamplingSettings, decode_loop
from purekv_jax.kv_quant import QuantLayout
from purekv_jax.layer_weights import per_layer


@pytest.fixture(scope="module")
def text():
    cfg = dataclasses.replace(tiny_config().text, num_hidden_layers=3)
    return cfg, init_text_params(cfg, jax.random.key(7))


def test_per_layer_views_are_the_stacked_bytes(text):
    """Every view holds its layer's slice exactly and lives inside the stacked leaf's buffer (no copy)."""
    cfg, params = text
    views = per_layer(params.layers)
    assert views is not None and len(views) == cfg.num_hidden_layers
    stacked = jax.tree_util.tree_leaves_with_path(params.layers)
    for i, view in enumerate(views):
        assert jax.tree.structure(view) == jax.tree.structure(params.layers)
        for (path, whole), leaf in zip(stacked, jax.tree.leaves(view)):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(whole)[i], err_msg=str(path))
            assert leaf.unsafe_buffer_pointer() == whole.unsafe_buffer_pointer() + i * leaf.nbytes, path


def test_per_layer_refuses_what_it_would_copy():
    """A slice the CPU client cannot wrap (3 float32 per layer: an unaligned offset) or a traced leaf -> None."""
    assert per_layer({"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)}) is None
    assert per_layer({"w": jnp.asarray(np.random.default_rng(1).standard_normal((4, 16)), jnp.float32)}) is not None
    seen = []
    jax.jit(lambda w: seen.append(per_layer({"w": w})) or w)(jnp.ones((4, 16)))
    assert seen == [None]


def _random_cache(cfg, rng, quant=None):
    """A batch of 2 with different lengths and scattered invalid slots, random K/V."""
    lengths = np.array([37, 21])
    capacity, n_layers, heads, d = 64, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    k = rng.standard_normal((n_layers, 2, heads, 40, d)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    idx = np.broadcast_to(np.arange(40), (n_layers, 2, heads, 40))
    kept = (np.arange(40) < lengths[None, :, None, None]) & (rng.random(idx.shape) > 0.2)
    return C.from_keep(jnp.asarray(k), jnp.asarray(v), jnp.asarray(idx), jnp.asarray(kept), capacity,
                       next_position=jnp.asarray(lengths), rope_delta=jnp.asarray([3, -2]), quant=quant)


@pytest.mark.parametrize("quant", [None, QuantLayout(bits=4, group=16, slots=32)], ids=["model-dtype", "4-bit"])
def test_decode_on_views_equals_decode_on_stacked_weights(text, quant):
    """Matrix products reading the per-layer views decode what slicing the stacked weights decodes: the same
    tokens (sampled, top-k) and the same cache, on a batch with different lengths and holes."""
    cfg, params = text
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((2, cfg.vocab_size)), jnp.float32)
    sampling = SamplingSettings(n_tokens=8, temperature=0.7, top_k=50)
    run = jax.jit(lambda p, c, w: decode_loop(p, c, logits, 8, jax.random.key(5), w, cfg=cfg, sampling=sampling,
                                              kv_step=AppendKV()))
    sliced = run(params, _random_cache(cfg, np.random.default_rng(9), quant), None)
    viewed = run(params, _random_cache(cfg, np.random.default_rng(9), quant), per_layer(params.layers))
    np.testing.assert_array_equal(viewed.tokens, sliced.tokens)
    for name in ("k", "v"):
        np.testing.assert_allclose(getattr(viewed.cache, name), getattr(sliced.cache, name), rtol=1e-5, atol=1e-5)
    for name in ("valid", "token_index", "length", "next_position"):
        np.testing.assert_array_equal(getattr(viewed.cache, name), getattr(sliced.cache, name), err_msg=name)


@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (6, 1)], ids=["gqa4", "mha", "mqa"])
def test_decode_attention_matches_dense(heads):
    """Per-KV-head validity, a row whose slots are all invalid (zeros), against the model's dense attention
    with the mask repeated over each group's query heads."""
    hq, hkv = heads
    rng = np.random.default_rng(hq * 10 + hkv)
    b, c, d = 3, 45, 16
    q = jnp.asarray(rng.standard_normal((b, hq, 1, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, hkv, c, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, hkv, c, d)), jnp.float32)
    valid = rng.random((b, hkv, c)) > 0.3
    valid[2] = False
    want = dense_attention(q, k, v, jnp.asarray(np.repeat(valid, hq // hkv, axis=1))[:, :, None, :])
    got = jax.jit(decode_attention)(q, k, v, jnp.asarray(valid))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)
    # float64 softmax over each KV group's valid slots (rows 0 and 1)
    qg = np.asarray(q, np.float64).reshape(b, hkv, hq // hkv, d)
    scores = np.where(valid[:, :, None], np.einsum("bhgd,bhcd->bhgc", qg, np.asarray(k, np.float64)) / d**0.5, -np.inf)
    p = np.exp(scores[:2] - scores[:2].max(-1, keepdims=True))
    exact = np.einsum("bhgc,bhcd->bhgd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64)[:2])
    np.testing.assert_allclose(got[:2], exact.reshape(2, hq, 1, d), rtol=0, atol=2e-6)
