"""Scores carried across layers (PureKVConfig.carry): each rule against a float64 numpy twin, the budget
allocation's totals, and the configuration errors. The harness-equals-generate check of every carry preset
is tests/test_fidelity.py's; the no-[N, N] jaxpr check is tests/test_generate.py's."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl import tiny_config
from purekv_jax import policies as P
from purekv_jax.config import PureKVConfig, PureKVConfigError
from purekv_jax.fidelity.harness import carried_layers
from purekv_jax.prefill import initial_carry

L, B, H, N = 6, 2, 3, 40


def fresh_scores(seed: int) -> np.ndarray:
    """Non-negative window-like scores [L, B, H, N] of very different scales per layer."""
    rng = np.random.default_rng(seed)
    return rng.random((L, B, H, N)) ** 3 * rng.uniform(0.1, 30.0, size=(L, 1, 1, 1))


def run(plan, scores):
    table = {plan.base: jnp.asarray(scores, jnp.float32)}
    v = jnp.ones((L, B, H, N, 4), jnp.float32)
    s, b = carried_layers(plan, table, v)
    return np.asarray(s), np.asarray(b)


def plan_of(budget=16, **fields):
    cfg = tiny_config(num_hidden_layers=L).text
    return PureKVConfig(budget=budget, window=4, sink=2, budget_multiple=4, **fields).resolve(cfg, N)


@pytest.mark.parametrize("decay", [0.0, 0.4, 0.9])
def test_accumulated_carry_matches_numpy(decay):
    scores = fresh_scores(1)
    got, budgets = run(plan_of(carry="accumulate", carry_decay=decay), scores)
    carry = np.zeros((B, 1, N))
    for layer in range(L):
        norm = scores[layer] / scores[layer].sum(-1, keepdims=True)
        np.testing.assert_allclose(got[layer], norm + decay * carry, rtol=2e-5, atol=1e-8)
        carry = decay * carry + norm.mean(1, keepdims=True)
    assert (budgets == 16).all()
    if decay == 0.0:  # the own score's ranking, layer by layer
        np.testing.assert_array_equal(np.argsort(-got, -1, kind="stable"), np.argsort(-scores, -1, kind="stable"))


def test_rerank_keeps_the_estimates_candidates_in_own_order():
    rng = np.random.default_rng(2)
    est, own = rng.random((B, H, N)), rng.random((B, H, N))
    rule = P.RerankCarry(candidates=10)
    got = np.asarray(rule.owned_score(jnp.asarray(est, jnp.float32), jnp.asarray(own, jnp.float32)))
    for r in range(B):
        for h in range(H):
            cand = np.argsort(-est[r, h])[:10]
            want = np.full(N, -1.0)
            want[cand] = own[r, h, cand]
            np.testing.assert_allclose(got[r, h], want, rtol=1e-6)
    # the keep-set of 6 takes the own top 6 of the candidates (no window or sinks here)
    idx, kept = P.keep_set(jnp.asarray(got), jnp.ones((B, N), bool), slots=6, budget=6, window=0, sink=0)
    cand = np.argsort(-est[0, 0])[:10]
    assert set(np.asarray(idx)[0, 0].tolist()) == set(cand[np.argsort(-own[0, 0, cand])[:6]].tolist())


@pytest.mark.parametrize("power", [1.0, 3.0])
def test_budget_allocation_matches_numpy_and_keeps_the_total(power):
    scores = fresh_scores(3)
    scores[1] = np.random.default_rng(4).random((B, H, N)) + 1.0  # a spread layer: high entropy
    scores[2] = 1e-4
    scores[2, :, :, 7] = 1.0  # a concentrated layer
    plan = plan_of(carry="allocate", carry_power=power, carry_cap=2.0)
    rule = plan.carry
    assert isinstance(rule, P.BudgetCarry) and plan.slots == 32 and (rule.low, rule.high) == (6, 32)
    _, budgets = run(plan, scores)
    budgets = budgets[:, :, 0, 0]  # [L, B]
    total, debt = np.zeros(B), np.zeros(B)
    for layer in range(L):
        p = scores[layer] / scores[layer].sum(-1, keepdims=True)
        e = (-(p * np.log(p)).sum(-1) / np.log(N)).mean(-1)
        total += e
        target = 16 * (e / (total / (layer + 1))) ** power - debt / (L - layer) if layer < L - 1 else 16 - debt
        want = np.clip(np.round(target), 6, 32)
        np.testing.assert_array_equal(budgets[layer], want)
        debt += want - 16
    assert (budgets[1] > budgets[2]).all()  # the spread layer gets more than the concentrated one
    if ((budgets > 6) & (budgets < 32)).all():
        assert (budgets.sum(0) == L * 16).all()


def test_allocated_budgets_reach_the_keep_set():
    scores = fresh_scores(5)
    plan = plan_of(carry="allocate", carry_power=3.0)
    s, budgets = run(plan, scores)
    for layer in range(L):
        _, kept = P.keep_set(jnp.asarray(s[layer]), jnp.ones((B, N), bool), slots=plan.slots,
                             budget=jnp.asarray(budgets[layer]), window=plan.window, sink=plan.sink)
        np.testing.assert_array_equal(np.asarray(kept).sum(-1), np.broadcast_to(budgets[layer][:, :, 0], (B, H)))
    assert initial_carry(plan, B, H, N).shape == (B, 2)


def test_carry_configuration_errors():
    with pytest.raises(PureKVConfigError, match="carry='sideways'"):
        PureKVConfig(carry="sideways")
    with pytest.raises(PureKVConfigError, match="cross_layer=True"):
        PureKVConfig(carry="rerank")
    with pytest.raises(PureKVConfigError, match="replace CLIE"):
        PureKVConfig(carry="accumulate", cross_layer=True)
    with pytest.raises(PureKVConfigError, match="base='snapkv'"):
        PureKVConfig(carry="allocate", base="streaming")
    with pytest.raises(PureKVConfigError, match="adaptive_heads"):
        PureKVConfig(carry="allocate", adaptive_heads=True)
    with pytest.raises(PureKVConfigError, match="kv_bits=4"):
        PureKVConfig(carry="allocate", kv_bits=4)
    with pytest.raises(PureKVConfigError, match="carry_decay"):
        PureKVConfig(carry="accumulate", carry_decay=1.5)
    assert plan_of().carry is None and plan_of(carry="allocate", budget=1.0).carry is None


def test_missed_mass_statistic_gives_the_missing_layer_more():
    """statistic='missed': the layer whose top-16 entries hold least of its score mass gets the most."""
    rng = np.random.default_rng(6)
    scores = rng.random((L, B, H, N)) ** 8 + 1e-6
    scores[3] = 1.0  # flat: its top 16 of 40 miss 60% of the mass
    plan = plan_of(carry="allocate", carry_statistic="missed")
    _, budgets = run(plan, scores)
    budgets = budgets[:, :, 0, 0]
    p = scores / scores.sum(-1, keepdims=True)
    missed = (1 - np.sort(p, -1)[..., -16:].sum(-1)).mean(-1)  # [L, B]
    assert missed[3].min() > missed[:3].max()
    assert (budgets[3] == budgets[:4].max(0)).all() and (budgets[3] > 16).all()
    with pytest.raises(PureKVConfigError, match="carry_statistic"):
        PureKVConfig(carry="allocate", carry_statistic="variance")
