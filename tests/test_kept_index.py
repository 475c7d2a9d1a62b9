"""The cache's record of each kept entry's original token index (``KVCache.token_index``,
``GenerateResult.kept_index``): hand-computed StreamingLLM keep-sets on a padded batch, the decoded tokens'
positions, and a hypothesis property against a host reference of the random policy's keep-set."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.qwen2_5_vl import init_params, tiny_config
from purekv_jax import generation as G
from purekv_jax.config import PureKVConfig
from purekv_jax.kept_map import kept_fraction
from conftest import random_text_ids
from keep_set_reference import keep_set_reference

WINDOW, SINK, BUDGET, N = 4, 2, 16, 40


@pytest.fixture(scope="module")
def model():
    config = tiny_config(num_hidden_layers=3)
    return config, init_params(config, jax.random.key(7))


def right_padded(cfg, rng, lengths):
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    for r, m in enumerate(lengths):
        ids[r, :m], mask[r, :m] = random_text_ids(rng, (m,), cfg), 1
    return ids, mask


def test_streaming_keeps_sinks_and_recent_and_decode_appends_positions(model):
    """StreamingLLM keeps the first ``sink`` and the last ``budget - sink`` real tokens of each row, whatever the
    padding; each decoded token is recorded at its logical position (prompt length + step)."""
    cfg, params = model
    lengths, n_new = [40, 27], 5
    ids, mask = right_padded(cfg, np.random.default_rng(3), lengths)
    pol = PureKVConfig(budget=BUDGET, base="streaming", window=WINDOW, sink=SINK)
    res = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=n_new, prompt_bucket=8, return_cache=True)
    idx = res.kept_index
    assert idx.shape == (3, 2, cfg.text.num_key_value_heads, BUDGET) and idx.dtype == np.int32
    for r, n in enumerate(lengths):
        want = [0, 1] + list(range(n - (BUDGET - SINK), n))
        for layer in range(3):
            for h in range(idx.shape[2]):
                assert idx[layer, r, h].tolist() == want
    # the final cache: the prompt's slots as kept, then the decoded tokens (the last one is not fed back)
    final = np.asarray(res.cache.token_index)
    np.testing.assert_array_equal(final[..., :BUDGET], idx)
    steps = res.stats["decode_steps"]
    for r, n in enumerate(lengths):
        np.testing.assert_array_equal(final[:, r, :, BUDGET:BUDGET + steps], np.broadcast_to(
            np.arange(n, n + steps), final[:, r, :, BUDGET:BUDGET + steps].shape))
    assert (final[..., BUDGET + steps:] == -1).all()
    # every layer and head kept the sinks and the recent tokens, nothing else
    frac = kept_fraction(idx, max(lengths))
    want = np.zeros(40)
    want[[0, 1]] = want[40 - 14:] = 1
    np.testing.assert_array_equal(frac[0], want)
    assert frac[1, 27:].sum() == 0 and frac[1, :27].sum() == 16


def test_full_cache_records_every_real_token(model):
    cfg, params = model
    ids, mask = right_padded(cfg, np.random.default_rng(4), [21, 9])
    idx = G.generate(params, cfg, ids, mask, max_new_tokens=1, prompt_bucket=8).kept_index
    assert idx.shape[-1] == 24  # the padded row
    np.testing.assert_array_equal(idx[:, 0], np.broadcast_to(np.r_[np.arange(21), [-1] * 3], idx[:, 0].shape))
    np.testing.assert_array_equal(idx[:, 1], np.broadcast_to(np.r_[np.arange(9), [-1] * 15], idx[:, 1].shape))


@settings(max_examples=12, deadline=None)
@given(short=st.lists(st.integers(WINDOW + SINK + 1, N), min_size=2, max_size=2), seed=st.integers(0, 2**31 - 1))
def test_random_policy_indices_equal_the_host_keep_set(model, short, seed):
    """Per layer, row and KV head the recorded indices are the host reference's keep-set of the same random
    scores, moved from the left-padded row to the row's real-token numbering: strictly increasing among the
    valid slots, inside the row, ``-1`` after."""
    cfg, params = model
    lengths = [N] + short  # row 0 fixes the padded length (one compiled program for every example)
    ids, mask = right_padded(cfg, np.random.default_rng(seed), lengths)
    res = G.generate(params, cfg, ids, mask, policy=PureKVConfig(budget=BUDGET, base="random", window=WINDOW,
                                                                 sink=SINK), max_new_tokens=1, prompt_bucket=8)
    idx = res.kept_index
    hkv = cfg.text.num_key_value_heads
    for layer in range(cfg.text.num_hidden_layers):
        key = jax.random.fold_in(jax.random.PRNGKey(0), jnp.int32(layer))  # RandomScore(seed=0)'s draw
        score = np.asarray(jax.random.uniform(key, (len(lengths), hkv, N), jnp.float32))
        for r, n in enumerate(lengths):
            valid = np.arange(N) >= N - n  # generate's left padding
            for h in range(hkv):
                got = idx[layer, r, h]
                held = got[got >= 0]
                assert (np.diff(held) > 0).all() and held.min() >= 0 and held.max() < n
                assert (got[len(held):] == -1).all()
                want = np.asarray(keep_set_reference(score[r, h], valid, BUDGET, WINDOW, SINK)) - (N - n)
                np.testing.assert_array_equal(held, want)
