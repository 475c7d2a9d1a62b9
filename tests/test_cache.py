"""KVCache pytree: create, write, append/advance, from_keep, byte accounting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from purekv_jax import cache as C


def test_cache_is_a_pytree_with_static_capacity():
    c = C.create(3, 2, 2, 10, 4)
    leaves = jax.tree.leaves(c)
    assert len(leaves) == 7  # k, v, valid, length, next_position, rope_delta, token_index
    assert c.capacity == 10 and c.num_layers == 3 and c.batch == 2
    c2 = jax.jit(lambda c: C.advance(c))(c)
    assert isinstance(c2, C.KVCache)
    np.testing.assert_array_equal(np.asarray(c2.length), [1, 1])
    np.testing.assert_array_equal(np.asarray(c2.next_position), [1, 1])


def test_write_append_advance_positions():
    rng = np.random.default_rng(0)
    c = C.create(2, 2, 2, 8, 4)
    kk = jnp.asarray(rng.normal(size=(2, 2, 5, 4)), jnp.float32)
    kept = jnp.asarray(rng.random((2, 2, 5)) > 0.3)
    c = C.write_layer(c, 1, kk, -kk, kept, jnp.asarray(rng.integers(0, 30, (2, 2, 5)), jnp.int32))
    np.testing.assert_array_equal(np.asarray(c.k[1, :, :, :5]), np.asarray(kk))
    np.testing.assert_array_equal(np.asarray(c.v[1, :, :, :5]), -np.asarray(kk))
    np.testing.assert_array_equal(np.asarray(c.valid[1, :, :, :5]), np.asarray(kept))
    assert not np.asarray(c.valid[0]).any()
    c = C.KVCache(c.k, c.v, c.valid, jnp.asarray([5, 5]), jnp.asarray([40, 33]), jnp.asarray([0, -3]),
                  token_index=c.token_index)
    new = jnp.asarray(rng.normal(size=(2, 2, 4)), jnp.float32)
    for layer in range(2):
        c = C.append(c, layer, new, 2 * new)
    c = C.advance(c)
    np.testing.assert_array_equal(np.asarray(c.k[:, :, :, 5]), np.broadcast_to(np.asarray(new), (2, 2, 2, 4)))
    np.testing.assert_array_equal(np.asarray(c.v[0, :, :, 5]), 2 * np.asarray(new))
    assert np.asarray(c.valid[:, :, :, 5]).all() and not np.asarray(c.valid[:, :, :, 6:]).any()
    np.testing.assert_array_equal(np.asarray(c.length), [6, 6])
    np.testing.assert_array_equal(np.asarray(c.decode_positions()), [41, 31])


def test_from_keep_and_bytes():
    rng = np.random.default_rng(1)
    L, B, H, N, D = 2, 1, 2, 9, 4
    k = jnp.asarray(rng.normal(size=(L, B, H, N, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(L, B, H, N, D)), jnp.float32)
    idx = jnp.asarray(np.broadcast_to(np.array([0, 2, 5, 8]), (L, B, H, 4)))
    kept = jnp.asarray(np.broadcast_to(np.array([True, True, True, False]), (L, B, H, 4)))
    c = C.from_keep(k, v, idx, kept, capacity=6, next_position=[9])
    np.testing.assert_array_equal(np.asarray(c.k[..., :4, :]), np.asarray(k)[..., [0, 2, 5, 8], :])
    np.testing.assert_array_equal(np.asarray(c.v[..., :4, :]), np.asarray(v)[..., [0, 2, 5, 8], :])
    assert c.capacity == 6 and int(c.length[0]) == 4
    assert C.kv_bytes_kept(c) == L * B * H * 3 * 2 * D * 4
    assert C.kv_bytes_full(N, L, H, D, jnp.float32) == L * H * N * 2 * D * 4
    assert C.kv_bytes_allocated(c) == 2 * L * B * H * 6 * D * 4
