"""Keep-set properties (hypothesis), score functions against naive numpy, PyramidKV budgets, config checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.qwen2_5_vl import tiny_config
from purekv_jax import cache as C
from purekv_jax import policies as P
from purekv_jax.config import PureKVConfig, PureKVConfigError, Segment, plan_segments
from keep_set_reference import keep_set_reference

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def keep_cases(draw):
    n = draw(st.sampled_from([12, 16, 24]))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    window = draw(st.integers(1, 5))
    sink = draw(st.integers(0, 3))
    slots = draw(st.integers(window + sink, n))
    budget = draw(st.integers(window + sink, slots))
    # few distinct values -> many ties
    levels = draw(st.sampled_from([2, 3, 1000]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    score = rng.integers(0, levels, size=(b, h, n)).astype(np.float32)
    valid = np.ones((b, n), bool)
    for r in range(b):
        n_real = int(rng.integers(1, n + 1))
        side = draw(st.sampled_from(["left", "right"]))
        valid[r] = False
        if side == "left":
            valid[r, n - n_real :] = True
        else:
            valid[r, :n_real] = True
    return score, valid, slots, budget, window, sink


@SETTINGS
@given(keep_cases())
def test_keep_set_properties(case):
    score, valid, slots, budget, window, sink = case
    idx, kept = P.keep_set(jnp.asarray(score), jnp.asarray(valid), slots=slots, budget=budget, window=window, sink=sink)
    idx, kept = np.asarray(idx), np.asarray(kept)
    b, h, n = score.shape
    assert idx.shape == kept.shape == (b, h, slots)
    for r in range(b):
        real = np.flatnonzero(valid[r])
        for hh in range(h):
            ks = idx[r, hh][kept[r, hh]]
            # kept entries first, then the unused slots
            assert kept[r, hh].tolist() == sorted(kept[r, hh].tolist(), reverse=True)
            assert (np.diff(ks) > 0).all(), "sorted ascending and unique"
            assert valid[r, ks].all(), "padding never kept"
            assert len(np.unique(idx[r, hh])) == slots, "slot indices unique"
            # window and sinks always present
            must = set(real[:sink].tolist()) | set(real[max(len(real) - window, 0) :].tolist())
            assert must <= set(ks.tolist())
            if len(real) <= budget:
                assert ks.tolist() == real.tolist(), "short rows keep every real token"
            else:
                assert len(ks) == budget
            # exactly the top scores otherwise (ties to the lower index)
            assert ks.tolist() == keep_set_reference(score[r, hh], valid[r], budget, window, sink)


@SETTINGS
@given(keep_cases())
def test_keep_set_is_deterministic_and_gathers_originals(case):
    score, valid, slots, budget, window, sink = case
    b, h, n = score.shape
    a1 = P.keep_set(jnp.asarray(score), jnp.asarray(valid), slots=slots, budget=budget, window=window, sink=sink)
    a2 = P.keep_set(jnp.asarray(score), jnp.asarray(valid), slots=slots, budget=budget, window=window, sink=sink)
    np.testing.assert_array_equal(np.asarray(a1[0]), np.asarray(a2[0]))
    rng = np.random.default_rng(n * 7 + b)
    k = rng.normal(size=(b, h, n, 4)).astype(np.float32)
    v = rng.normal(size=(b, h, n, 4)).astype(np.float32)
    kk, vv = C.keep_indices(jnp.asarray(k), jnp.asarray(v), a1[0])
    idx = np.asarray(a1[0])
    for r in range(b):
        for hh in range(h):
            np.testing.assert_array_equal(np.asarray(kk)[r, hh], k[r, hh, idx[r, hh]])
            np.testing.assert_array_equal(np.asarray(vv)[r, hh], v[r, hh, idx[r, hh]])


def test_keep_set_ties_go_to_lower_index():
    score = jnp.zeros((1, 1, 12), jnp.float32)
    valid = jnp.ones((1, 12), bool)
    idx, kept = P.keep_set(score, valid, slots=6, budget=6, window=2, sink=1)
    assert np.asarray(idx)[0, 0][np.asarray(kept)[0, 0]].tolist() == [0, 1, 2, 3, 10, 11]


def test_keep_set_traced_budget_below_slots():
    score = jnp.arange(10, dtype=jnp.float32)[None, None]
    valid = jnp.ones((1, 10), bool)
    idx, kept = jax.jit(lambda b: P.keep_set(score, valid, slots=6, budget=b, window=2, sink=1))(jnp.int32(4))
    assert np.asarray(idx)[0, 0][np.asarray(kept)[0, 0]].tolist() == [0, 7, 8, 9]
    assert np.asarray(kept).sum() == 4


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(40, 600), st.integers(1, 16), st.integers(0, 8), st.sampled_from([5.0, 20.0]))
def test_pyramid_budgets(n_layers, budget, window, sink, beta):
    if budget < window + sink:
        return
    b = P.pyramid_budgets(n_layers, budget, window, sink, beta)
    assert len(b) == n_layers
    assert sum(b) == n_layers * budget, "same total as the uniform budget"
    assert all(x >= window + sink for x in b)
    assert all(x >= y for x, y in zip(b, b[1:])), "non-increasing with depth"
    e = budget - window - sink
    if n_layers > 1 and e > 0:
        assert b[0] - window - sink >= e and b[-1] - window - sink <= e
        assert abs((b[-1] - window - sink) - e / beta) <= 1 + 1e-9


def _naive_window_score(q, k, valid, window):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = np.zeros((b, hkv, n))
    for r in range(b):
        for h in range(hq):
            for i in range(n - window, n):
                if not valid[r, i]:
                    continue
                s = q[r, h, i] @ k[r, h // g].T / np.sqrt(d)
                ok = valid[r] & (np.arange(n) <= i)
                s = np.where(ok, s, -np.inf)
                p = np.exp(s - s.max())
                out[r, h // g] += p / p.sum() / g
    return out


def test_snapkv_score_matches_naive():
    rng = np.random.default_rng(1)
    b, hq, hkv, n, d, w = 2, 4, 2, 20, 8, 5
    q = rng.normal(size=(b, hq, n, d)).astype(np.float32)
    k = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    v = rng.normal(size=(b, hkv, n, d)).astype(np.float32)
    valid = np.ones((b, n), bool)
    valid[1, :6] = False
    raw = _naive_window_score(q, k, valid, w)
    np.testing.assert_allclose(np.asarray(P.window_attention_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(valid), w)), raw, atol=1e-5)
    # pooled score: window zeroed, avg-pool kernel 3 with zero padding counted
    zeroed = raw.copy()
    zeroed[..., n - w :] = 0
    pooled = np.stack([np.convolve(np.pad(z, 1), np.ones(3) / 3, "valid") for z in zeroed.reshape(-1, n)]).reshape(raw.shape)
    ctx = P.ScoreContext(q=jnp.asarray(q), k=jnp.asarray(k), v=jnp.asarray(v), valid=jnp.asarray(valid), layer=0)
    got = P.SnapKV(window=w, kernel_size=3).score(ctx)
    np.testing.assert_allclose(np.asarray(got), pooled, atol=1e-5)
    # CLIE: the carried score times the owned layer's value norms
    owned = P.CLIE(value_norm=True).owned_score(got, jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(owned), pooled * np.linalg.norm(v, axis=-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(P.CLIE(value_norm=False).owned_score(got, jnp.asarray(v))), np.asarray(got))


def test_h2o_score_and_requires_probs():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 4, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 2, 6, 8)), jnp.float32)
    valid = jnp.ones((1, 6), bool)
    ctx = P.ScoreContext(q=q, k=k, v=k, valid=valid, layer=0)
    with pytest.raises(P.PolicyError, match="full attention probabilities"):
        P.H2O().score(ctx)
    probs = P.full_attention_probs(q, k, valid)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
    s = P.H2O().score(P.ScoreContext(q=q, k=k, v=k, valid=valid, layer=0, probs=probs))
    np.testing.assert_allclose(np.asarray(s).sum(-1), 6.0, rtol=1e-5)  # each query row sums to 1


def test_streaming_keeps_sinks_and_recent():
    valid = jnp.asarray(np.r_[np.zeros(3, bool), np.ones(17, bool)])[None]
    ctx = P.ScoreContext(q=None, k=jnp.zeros((1, 2, 20, 4)), v=None, valid=valid, layer=0)
    idx, kept = P.keep_set(P.StreamingLLM().score(ctx), valid, slots=8, budget=8, window=2, sink=2)
    assert np.asarray(idx)[0, 0].tolist() == [3, 4, 14, 15, 16, 17, 18, 19]


def test_config_validation():
    with pytest.raises(PureKVConfigError, match="window \\+ sink"):
        PureKVConfig(budget=20)
    with pytest.raises(PureKVConfigError, match="\\(0, 1\\]"):
        PureKVConfig(budget=1.5)
    with pytest.raises(PureKVConfigError, match=">= 1"):
        PureKVConfig(budget=0)
    with pytest.raises(PureKVConfigError, match="not one of"):
        PureKVConfig(base="magic")
    with pytest.raises(PureKVConfigError, match="not score-based"):
        PureKVConfig(base="random", cross_layer=True)
    with pytest.raises(PureKVConfigError, match="strictly increasing"):
        PureKVConfig(cross_layer=True, anchor_layers=(3, 2))
    text = tiny_config(num_hidden_layers=4).text
    with pytest.raises(PureKVConfigError, match="out of range"):
        PureKVConfig(cross_layer=True, anchor_layers=(2, 4)).resolve(text, 500)
    with pytest.raises(PureKVConfigError, match="smaller than window"):
        PureKVConfig(budget=0.05).resolve(text, 500)
    plan = PureKVConfig.paper(budget=0.2).resolve(text, 500)
    assert PureKVConfig(budget=0.2).resolve(text, 500).segments == (Segment("own", 0, 4),)  # the default: per-layer
    assert plan.budgets == (112,) * 4 and plan.slots == 112  # ceil(100) -> multiple of 16
    assert [(s.kind, s.lo, s.hi) for s in plan.segments] == [("own", 0, 2), ("anchor", 2, 3), ("owned", 3, 4)]
    assert [(s.kind, s.lo, s.hi) for s in plan_segments(8, (1, 4))] == [
        ("own", 0, 1), ("anchor", 1, 2), ("owned", 2, 4), ("anchor", 4, 5), ("owned", 5, 8)
    ]
    big = PureKVConfig(budget=1.0).resolve(text, 50, 64)
    assert big.slots == 64 and not big.prunes
    # PyramidKV: a budget covering the prompt compresses nothing (as the reference); below it, the pyramid
    assert not PureKVConfig(budget=1.0, base="pyramid").resolve(text, 50, 64).prunes
    pyr = PureKVConfig(budget=0.2, base="pyramid").resolve(text, 500)
    assert sum(pyr.budgets) == 4 * 112 and pyr.budgets[0] > pyr.budgets[-1] and pyr.slots == pyr.budgets[0]
