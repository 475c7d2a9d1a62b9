"""Retrieval task: the documented default, AdaKV keep-sets, and a small real-LM retrieval check."""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from purekv_jax import policies as P
from purekv_jax.config import PureKVConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"^Library default \(checked by tests/test_retrieval\.py\): `(PureKVConfig\(.*\))`\s*$", re.M)


def test_default_config_is_the_documented_one():
    with open(os.path.join(ROOT, "docs", "retrieval.md"), encoding="utf-8") as f:
        m = MARKER.search(f.read())
    assert m, "docs/retrieval.md must hold the 'Library default (checked by ...)' marker line"
    documented = eval(m.group(1), {"PureKVConfig": PureKVConfig})  # noqa: S307 - our own docs
    assert documented == PureKVConfig()


def test_paper_classmethod_is_single_anchor_clie():
    p = PureKVConfig.paper(0.1)
    assert (p.budget, p.base, p.cross_layer, p.anchor_layers, p.value_norm, p.window, p.sink, p.adaptive_heads,
            p.question_window, p.pooling, p.kernel_size) == (0.1, "snapkv", True, (2,), True, 32, 4, False, False,
                                                             "avg", 7)


def test_default_is_the_retrieval_row_the_docs_name():
    from purekv_jax.fidelity.retrieval import policy_grid

    with open(os.path.join(ROOT, "docs", "retrieval.md"), encoding="utf-8") as f:
        assert "| **default**: snapkv + question window + pool 15 |" in f.read()
    grid = policy_grid(30)
    for b in (0.1, 0.2, 0.4):
        assert grid["snapkv qwin, pool 15"](b) == PureKVConfig(budget=b) == grid["default PureKVConfig()"](b)
        assert grid["snapkv"](b) != PureKVConfig(budget=b)  # the baseline stays SnapKV as published


def test_adaptive_keep_set_total_and_forced():
    rng = np.random.default_rng(0)
    b, h, n, window, sink, budget, slots = 2, 3, 64, 4, 2, 12, 24
    score = jnp.asarray(rng.random((b, h, n)) ** np.array([1.0, 4.0, 12.0])[None, :, None], jnp.float32)
    valid = jnp.ones((b, n), bool).at[1, :5].set(False)
    idx, kept = P.keep_set(score, valid, slots=slots, budget=budget, window=window, sink=sink, adaptive=True)
    idx, kept = np.asarray(idx), np.asarray(kept)
    assert (kept.sum((1, 2)) == h * budget).all()  # the layer's total equals the uniform budget
    assert (kept.sum(-1) >= window + sink).all() and (kept.sum(-1) <= slots).all()
    assert len(set(kept.sum(-1).ravel().tolist())) > 1  # the heads got different budgets
    for r in range(b):
        real = np.flatnonzero(np.asarray(valid[r]))
        forced = set(real[:sink]) | set(real[-window:])
        for hh in range(h):
            held = set(idx[r, hh][kept[r, hh]].tolist())
            assert forced <= held and held <= set(real.tolist())
    # covering budget: the same as keeping everything
    idx2, kept2 = P.keep_set(score, valid, slots=n, budget=n, window=window, sink=sink, adaptive=True)
    assert (np.asarray(kept2).sum(-1) == np.asarray(valid).sum(-1)[:, None]).all()


@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("gguf")
    from purekv_jax.fidelity import load_model
    from purekv_jax.fidelity.data import FidelityDataError

    try:
        return load_model()
    except (FidelityDataError, FileNotFoundError, ImportError) as e:  # pragma: no cover
        pytest.skip(f"real LM not available: {e}")


def test_small_retrieval_full_answers_and_full_budget_identical(lm):
    from purekv_jax.fidelity import retrieval as R
    from purekv_jax.generation import generate

    config, params, tok = lm
    prompts = R.make_prompts(tok, 512, 3, seed=1)
    ids = np.stack([p.ids for p in prompts])
    full = generate(params, config, ids, policy=None, max_new_tokens=8).tokens
    for p, row in zip(prompts, full):
        assert p.code in tok.decode(row), (p.code, tok.decode(row))
    whole = generate(params, config, ids, policy=PureKVConfig(budget=1.0), max_new_tokens=8).tokens
    np.testing.assert_array_equal(whole, full)
    # the harness's caches are generate's: same answers for a compressing AdaKV policy and the full cache
    pk = PureKVConfig.paper(0.2, cross_layer=False, adaptive_heads=True)
    gen = generate(params, config, ids, policy=pk, max_new_tokens=8).tokens
    k, v, scores, logits = R.analysis_prefill(params, jnp.asarray(ids, jnp.int32), cfg=config.text,
                                               score_policies=(pk.base_policy(),))
    an = dict(k=k, v=v, table={pk.base_policy(): scores[0]}, logits=logits)
    np.testing.assert_array_equal(R.policy_answers(params, config, an, pk, 8)[0], gen)
    np.testing.assert_array_equal(R.policy_answers(params, config, an, None, 8)[0], full)
    # the default (question-aligned window, from generate's question_len) == the harness's per-row windows
    qlen = [p.question_len for p in prompts]
    gen_q = generate(params, config, ids, policy=PureKVConfig(budget=0.2), question_len=qlen, max_new_tokens=8).tokens
    d = PureKVConfig(budget=0.2)
    wl = jnp.asarray(qlen, jnp.int32)
    k, v, scores, logits = R.analysis_prefill(params, jnp.asarray(ids, jnp.int32), wl, cfg=config.text,
                                               score_policies=(d.base_policy(),))
    an = dict(k=k, v=v, table={d.base_policy(): scores[0]}, logits=logits, window_len=wl)
    np.testing.assert_array_equal(R.policy_answers(params, config, an, d, 8)[0], gen_q)
