"""Decode attention with the step's own entry kept apart from the cache (the decode reads each layer's cache
and appends every layer's entry once after its layer loop): checked against a float64 numpy softmax over the
cache with the entry written in, and the one-write append against per-layer appends."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from purekv_jax import cache as C
from purekv_jax import kv_quant as Q
from purekv_jax.attention import cache_decode_attention, decode_attention


def reference(q, k, v, valid):
    """float64 masked softmax attention of one query per row: q [B,Hq,hd], k/v [B,Hkv,S,hd], valid [B,Hkv,S]."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    k, v, valid = (np.repeat(a, hq // hkv, axis=1) for a in (k, v, valid))
    s = np.einsum("bhd,bhsd->bhs", q, k) / np.sqrt(d)
    s = np.where(valid, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhs,bhsd->bhd", p, v)


@settings(max_examples=15, deadline=None)
@given(b=st.sampled_from([1, 3]), hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 3]), c=st.sampled_from([1, 7, 33]),
       p_valid=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_decode_attention_with_the_new_entry_equals_softmax_over_the_cache_and_the_entry(b, hkv, g, c, p_valid, seed):
    rng = np.random.default_rng(seed)
    d = 8
    q = rng.standard_normal((b, hkv * g, 1, d))
    k, v = rng.standard_normal((2, b, hkv, c, d))
    kn, vn = rng.standard_normal((2, b, hkv, 1, d))
    valid = rng.random((b, hkv, c)) < p_valid  # rows with no valid slot attend to the new entry alone
    got = jax.jit(decode_attention)(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(valid),
                           jnp.asarray(kn, jnp.float32), jnp.asarray(vn, jnp.float32))
    want = reference(q[:, :, 0], np.concatenate([k, kn], 2), np.concatenate([v, vn], 2),
                     np.concatenate([valid, np.ones((b, hkv, 1), bool)], -1))
    np.testing.assert_allclose(np.asarray(got)[:, :, 0], want, rtol=2e-5, atol=2e-5)


def test_quantised_cache_attention_with_the_new_entry_equals_the_materialised_cache_with_it_appended():
    rng = np.random.default_rng(3)
    n_layers, b, hkv, hq, d, cap = 2, 2, 2, 4, 16, 24
    layout = Q.QuantLayout(4, 8, 16)
    cache = C.create(n_layers, b, hkv, cap, d, jnp.float32, layout)
    for layer in range(n_layers):
        k, v = (jnp.asarray(rng.standard_normal((b, hkv, 20, d)), jnp.float32) for _ in range(2))
        cache = C.write_layer(cache, layer, k, v, jnp.asarray(rng.random((b, hkv, 20)) < 0.8))
    cache = C.KVCache(cache.k, cache.v, cache.valid, jnp.full((b,), 4, jnp.int32), jnp.zeros((b,), jnp.int32),
                      jnp.zeros((b,), jnp.int32), cache.quant)
    q = jnp.asarray(rng.standard_normal((b, hq, 1, d)), jnp.float32)
    kn, vn = (jnp.asarray(rng.standard_normal((n_layers, b, hkv, d)), jnp.float32) for _ in range(2))
    appended = C.materialized(C.append_layers(cache, kn, vn))
    for layer in range(n_layers):
        got = jax.jit(cache_decode_attention)(q, cache, layer, kn[layer][:, :, None], vn[layer][:, :, None])
        want = reference(np.asarray(q)[:, :, 0], *(np.asarray(a[layer], np.float64)
                                                   for a in (appended.k, appended.v, appended.valid)))
        np.testing.assert_allclose(np.asarray(got)[:, :, 0], want, rtol=1e-4, atol=1e-4)


def test_append_layers_equals_one_append_per_layer():
    rng = np.random.default_rng(4)
    n_layers, b, hkv, cap, d = 3, 2, 2, 6, 4
    cache = C.create(n_layers, b, hkv, cap, d)
    cache = C.KVCache(jnp.asarray(rng.standard_normal(cache.k.shape), jnp.float32),
                      jnp.asarray(rng.standard_normal(cache.v.shape), jnp.float32),
                      jnp.asarray(rng.random(cache.valid.shape) < 0.5), jnp.asarray([2, 5]), jnp.asarray([7, 9]),
                      jnp.asarray([0, 1]))
    kn, vn = (jnp.asarray(rng.standard_normal((n_layers, b, hkv, d)), jnp.float32) for _ in range(2))
    once = jax.jit(C.append_layers)(cache, kn, vn)
    each = cache
    for layer in range(n_layers):
        each = C.append(each, layer, kn[layer], vn[layer])
    for got, want in zip(jax.tree.leaves(once), jax.tree.leaves(each)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(once.valid[:, 0, :, 2]).all() and np.asarray(once.valid[:, 1, :, 5]).all()
