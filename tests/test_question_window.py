"""The question-aligned observation window: the per-row rule, the per-row score and keep-set
against the static-window versions row by row, and generate's question_len / <|vision_end|> detection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl import init_params, tiny_config
from purekv_jax import policies as P
from purekv_jax.config import PureKVConfig
from purekv_jax.generation import GenerateError, generate
from purekv_jax.observation import ObservationError, question_window_lengths
from keep_set_reference import keep_set_reference
from tests.conftest import random_text_ids


def test_window_lengths_hand_cases():
    end = 7
    ids = np.array([
        [0, 0, 5, 5, end, 5, 5, 5, 5, 5],      # 5 tokens after the vision end
        [0, 5, end, 5, 5, 5, 5, 5, end, 5],    # the last vision end counts: 1 token after it
        [0, 0, 0, 5, 5, 5, 5, 5, 5, 5],        # no media: the fixed window
        [0, 0, 5, 5, 5, 5, 5, 5, 5, end],      # nothing after the media: the fixed window
        [end, 5, 5, 5, 5, 5, 5, 5, 5, 5],      # 9 after it: clipped to the window
    ])
    valid = np.ones_like(ids, bool)
    valid[0, :2] = valid[2, :3] = valid[3, :2] = False
    valid[4, 0] = True
    got = question_window_lengths(ids, valid, window=8, vision_end_id=end)
    assert got.tolist() == [5, 1, 8, 8, 8] and got.dtype == np.int32
    # a padding token equal to the vision end id is not one
    ids2 = ids.copy()
    ids2[2, 0] = end
    assert question_window_lengths(ids2, valid, window=8, vision_end_id=end)[2] == 8
    # the caller's question_len wins, clipped to the window
    assert question_window_lengths(ids, valid, window=8, vision_end_id=end, question_len=3).tolist() == [3] * 5
    q = question_window_lengths(ids, valid, window=8, vision_end_id=end, question_len=[2, 9, 1, 4, 10])
    assert q.tolist() == [2, 8, 1, 4, 8]


@pytest.mark.parametrize("bad", [0, 9, [1, 2, 3, 4, 11]])
def test_window_lengths_errors(bad):
    ids = np.full((5, 10), 5)
    valid = np.ones_like(ids, bool)
    valid[1, :2] = False  # row 1 holds 8 tokens
    with pytest.raises(ObservationError, match="question_len=.* for row"):
        question_window_lengths(ids, valid, window=8, vision_end_id=7, question_len=bad if bad != 9 else [1, 9, 1, 1, 1])
    with pytest.raises(ObservationError, match="integers"):
        question_window_lengths(ids, valid, window=8, vision_end_id=7, question_len=2.5)


def _ctx(seed, b=3, hq=4, hkv=2, n=40, d=16):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, hq, n, d))
    k = jax.random.normal(ks[1], (b, hkv, n, d))
    v = jax.random.normal(ks[2], (b, hkv, n, d))
    valid = jnp.ones((b, n), bool).at[2, :7].set(False)  # a left-padded row
    return q, k, v, valid


@pytest.mark.parametrize("pooling", ["avg", "max", "none"])
def test_per_row_window_score_equals_static_window_row_by_row(pooling):
    q, k, v, valid = _ctx(np.random.SeedSequence().entropy % 2**31)
    wl = np.array([5, 16, 11], np.int32)
    pol = P.SnapKV(window=16, pooling=pooling, question_window=True)
    got = pol.score(P.ScoreContext(q=q, k=k, v=v, valid=valid, layer=0, window_len=jnp.asarray(wl)))
    for r, w in enumerate(wl):
        row = P.ScoreContext(q=q[r:r + 1], k=k[r:r + 1], v=v[r:r + 1], valid=valid[r:r + 1], layer=0)
        want = P.SnapKV(window=int(w), pooling=pooling).score(row)
        np.testing.assert_allclose(np.asarray(got[r]), np.asarray(want[0]), rtol=1e-6, atol=1e-7)
    # without window_len (or with question_window off) the static window is used
    fixed = P.SnapKV(window=16, pooling=pooling).score(P.ScoreContext(q=q, k=k, v=v, valid=valid, layer=0))
    off = P.SnapKV(window=16, pooling=pooling).score(
        P.ScoreContext(q=q, k=k, v=v, valid=valid, layer=0, window_len=jnp.asarray(wl)))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(fixed))


def test_keep_set_per_row_window_matches_reference():
    rng = np.random.default_rng()
    b, h, n, sink, budget = 3, 2, 48, 2, 20
    score = rng.random((b, h, n)).astype(np.float32)
    valid = np.ones((b, n), bool)
    valid[1, :9] = False
    wl = np.array([3, 12, 7], np.int32)
    idx, kept = P.keep_set(jnp.asarray(score), jnp.asarray(valid), slots=budget, budget=budget,
                           window=jnp.asarray(wl), sink=sink)
    for r in range(b):
        for hh in range(h):
            held = np.asarray(idx[r, hh])[np.asarray(kept[r, hh])].tolist()
            assert held == keep_set_reference(score[r, hh], valid[r], budget, int(wl[r]), sink)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(num_hidden_layers=3)
    return cfg, init_params(cfg, jax.random.key(11))


def test_generate_question_len_equals_static_window_per_row(model):
    cfg, params = model
    rng = np.random.default_rng()
    lengths, qlen = (70, 57), (5, 11)
    ids = np.zeros((2, 70), np.int32)
    mask = np.zeros((2, 70), np.int32)
    for r, n in enumerate(lengths):  # right padding: generate re-aligns it
        ids[r, :n] = random_text_ids(rng, (n,), cfg)
        mask[r, :n] = 1
    small = dict(budget=24, window=16, sink=2, budget_multiple=8)
    got = generate(params, cfg, ids, mask, policy=PureKVConfig(**small), question_len=list(qlen),
                   max_new_tokens=6, return_cache=True)
    for r, n in enumerate(lengths):
        one = generate(params, cfg, ids[r:r + 1, :n], policy=PureKVConfig(**{**small, "window": qlen[r]},
                                                                           question_window=False),
                       max_new_tokens=6, return_cache=True)
        np.testing.assert_array_equal(got.tokens[r], one.tokens[0])
        slots = got.stats["budgets"][0]  # the prompt's kept entries come first in every layer's cache
        np.testing.assert_array_equal(np.asarray(got.cache.valid[:, r, :, :slots]),
                                      np.asarray(one.cache.valid[:, 0, :, :slots]))
        np.testing.assert_allclose(np.asarray(got.cache.k[:, r, :, :slots]), np.asarray(one.cache.k[:, 0, :, :slots]),
                                   rtol=1e-5, atol=1e-5)  # other padded length: other summation order
    # the fixed window gives other keep-sets here (so the test above can fail)
    fixed = generate(params, cfg, ids, mask, policy=PureKVConfig(**small, question_window=False),
                     max_new_tokens=6, return_cache=True)
    assert not np.array_equal(np.asarray(fixed.cache.k), np.asarray(got.cache.k))


def test_generate_detects_the_question_after_vision_end(model):
    cfg, params = model
    rng = np.random.default_rng()
    ids = random_text_ids(rng, (2, 64), cfg)
    ids[:, 64 - 8] = cfg.vision_end_token_id  # 7 question tokens after it (no media: a text-only check)
    pk = PureKVConfig(budget=24, window=16, sink=2, budget_multiple=8)
    auto = generate(params, cfg, ids, policy=pk, max_new_tokens=4, return_cache=True)
    given = generate(params, cfg, ids, policy=pk, question_len=7, max_new_tokens=4, return_cache=True)
    np.testing.assert_array_equal(np.asarray(auto.cache.k), np.asarray(given.cache.k))
    other = generate(params, cfg, ids, policy=pk, question_len=16, max_new_tokens=4, return_cache=True)
    assert not np.array_equal(np.asarray(other.cache.k), np.asarray(given.cache.k))


def test_defaults():
    assert PureKVConfig().question_window and not PureKVConfig.paper().question_window
    plan = PureKVConfig(base="streaming").resolve(tiny_config().text, 400)
    assert not plan.question_window  # only the window-score bases use it


def test_question_len_for_a_policy_that_ignores_it_is_an_error(model):
    cfg, params = model
    ids = random_text_ids(np.random.default_rng(5), (1, 40), cfg)
    for policy in (None, PureKVConfig.paper(1.0), PureKVConfig(budget=1.0, question_window=False),
                   PureKVConfig.streaming(1.0)):
        with pytest.raises(GenerateError, match="question_len=5 is given, but the policy does not align"):
            generate(params, cfg, ids, policy=policy, question_len=5, max_new_tokens=2)
