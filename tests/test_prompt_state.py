"""Compress once, ask many: PromptState's answers against generate, the append-prefill against token-by-token
decode steps, the decode-time budget's eviction against hand-computed and brute-force references, save / load,
and compile reuse."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.qwen2_5_vl.model import text_part
from models.qwen2_5_vl.text import layer_out, layer_qkv, lm_logits, mrope_cos_sin
from models.qwen2_5_vl.layers import rms_norm
from purekv_jax import cache as C
from purekv_jax import generation as G
from purekv_jax import prompt_state as PS
from purekv_jax.compile_cache import TRACE_COUNTS
from purekv_jax.config import PureKVConfig
from purekv_jax.decode import AppendKV
from purekv_jax.decode_budget import (BudgetedCache, DecodeBudget, DecodeBudgetError, EvictingKV, budgeted,
                                      evict_lowest)
from purekv_jax.kv_quant import QuantLayout
from purekv_jax.prefill import layer_params
from purekv_jax.prompt_state_files import PromptStateFileError, load_state, save_state
from purekv_jax.question_prefill import ContiguousAppend, question_prefill
from conftest import random_text_ids

COMPRESSED = PureKVConfig(budget=32, window=8, sink=2, budget_multiple=8)
N_NEW = 8  # (the tests share prompt lengths and token buckets, so they share compiled programs)


@pytest.fixture(scope="module")
def model(tiny_untied):
    return tiny_untied.config, tiny_untied.params


def _ids(rng, n, config):
    return random_text_ids(rng, (1, n), config)


# ------------------------------------------------------------------------------- answers against generate
def test_full_cache_answers_equal_generate_multi_turn(model):
    """Full cache: each turn's tokens are exactly generate's on the whole transcript (prompt, question 1, its
    answer, question 2), and the first state is unchanged by answering (an independent second question)."""
    config, params = model
    rng = np.random.default_rng(1)
    p, q1, q2 = _ids(rng, 60, config), _ids(rng, 9, config), _ids(rng, 5, config)
    state = PS.prefill_prompt(params, config, p)
    a1, after1 = PS.answer(params, state, q1, max_new_tokens=N_NEW, eos_token_id=())
    ref1 = G.generate(params, config, np.concatenate([p, q1], 1), max_new_tokens=N_NEW, eos_token_id=())
    np.testing.assert_array_equal(a1, ref1.tokens)
    a2, after2 = PS.answer(params, after1, q2, max_new_tokens=N_NEW, eos_token_id=())
    ref2 = G.generate(params, config, np.concatenate([p, q1, a1, q2], 1), max_new_tokens=N_NEW, eos_token_id=())
    np.testing.assert_array_equal(a2, ref2.tokens)
    assert after2.turns == 2 and int(after2.kv.next_position[0]) == 60 + 9 + N_NEW + 5 + N_NEW - 1
    alone, _ = PS.answer(params, state, q2, max_new_tokens=N_NEW, eos_token_id=())
    ref_alone = G.generate(params, config, np.concatenate([p, q2], 1), max_new_tokens=N_NEW, eos_token_id=())
    np.testing.assert_array_equal(alone, ref_alone.tokens)


def test_batch_rows_ending_early_are_trimmed(model):
    """Two rows, row 0 hits EOS early while row 1 decodes on: the next turn of each row equals generate on that
    row's own transcript (the tokens decoded after row 0's EOS are dropped from its cache)."""
    config, params = model
    rng = np.random.default_rng(2)
    p, q1, q2 = random_text_ids(rng, (2, 60), config), random_text_ids(rng, (2, 6), config), \
        random_text_ids(rng, (2, 4), config)
    state = PS.prefill_prompt(params, config, p)
    free, _ = PS.answer(params, state, q1, max_new_tokens=N_NEW, eos_token_id=())
    eos = int(free[0, 3])
    assert eos not in free[0, :3] and eos not in free[1]
    a1, after = PS.answer(params, state, q1, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    assert (a1[0, 4:] == 0).all() and (a1[1] == free[1]).all()
    a2, _ = PS.answer(params, after, q2, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    for r, n in ((0, 4), (1, N_NEW)):
        ref = G.generate(params, config, np.concatenate([p[r:r + 1], q1[r:r + 1], a1[r:r + 1, :n], q2[r:r + 1]], 1),
                         max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
        np.testing.assert_array_equal(a2[r:r + 1], ref.tokens)


def test_probe_is_never_kept(model):
    """Probe queries score the prefill but never enter the cache: with a budget covering the prompt, the probed
    state answers exactly as the full cache; compressed, it keeps the budget and the question continues from
    the prompt's own position."""
    config, params = model
    rng = np.random.default_rng(3)
    p, probe, q = _ids(rng, 60, config), _ids(rng, 7, config)[0], _ids(rng, 8, config)
    full, _ = PS.answer(params, PS.prefill_prompt(params, config, p), q, max_new_tokens=N_NEW, eos_token_id=())
    whole = PS.prefill_prompt(params, config, p, policy=PureKVConfig(budget=1.0, window=8), probe_ids=probe)
    probed, _ = PS.answer(params, whole, q, max_new_tokens=N_NEW, eos_token_id=())
    np.testing.assert_array_equal(probed, full)
    small = PS.prefill_prompt(params, config, p, policy=COMPRESSED, probe_ids=probe)
    assert int(small.kv.valid.sum(-1).max()) == 32 and int(small.kv.decode_positions()[0]) == 60
    with pytest.raises(PS.PromptStateError, match="question_window=True"):
        PS.prefill_prompt(params, config, p, policy=dataclasses.replace(COMPRESSED, question_window=False),
                          probe_ids=probe)


# ------------------------------------------------------------------------ the append-prefill, token by token
def _decode_steps(params, cache, ids, cfg, kv_step):
    """Reference: the block fed one token at a time through the decode's own layer step."""
    text = text_part(params)
    for t in range(ids.shape[1]):
        x = jnp.take(text.embed, ids[:, t], axis=0)[:, None]
        cos, sin = mrope_cos_sin(cache.decode_positions()[:, None], cfg)
        for layer in range(cfg.num_hidden_layers):
            lp = layer_params(text, layer)
            q, k, v = layer_qkv(lp, x, cos, sin, cfg)
            attn, cache = kv_step.attend(cache, layer, q, k, v)
            x = layer_out(lp, x, attn, cfg)
        cache = kv_step.advance(cache)
    return cache, lm_logits(text, rms_norm(x, text.norm, cfg.rms_norm_eps))[:, 0]


@pytest.mark.parametrize("budget", [None, DecodeBudget(slots=64, recent=4, decay=0.7)])
def test_append_prefill_equals_decode_steps(model, budget):
    """A compressed cache: the question block run at once equals the same tokens decoded one by one (cache
    contents, logits, and under a budget the running scores), padding ignored."""
    config, params = model
    cfg = config.text
    rng = np.random.default_rng(4)
    state = PS.prefill_prompt(params, config, _ids(rng, 60, config), policy=COMPRESSED, decode_budget=budget)
    q = _ids(rng, 6, config)
    block = np.concatenate([q, np.zeros((1, 2), np.int32)], 1)
    valid = np.arange(8)[None] < 6
    cache = state.cache if budget else PS.grown(state.cache, 64)
    step = ContiguousAppend() if budget is None else EvictingKV(budget)
    got, logits = jax.jit(lambda c: question_prefill(params, c, jnp.asarray(block), jnp.asarray(valid), cfg=cfg,
                                                     kv_step=step))(cache)
    reference = jax.jit(lambda c: _decode_steps(params, c, jnp.asarray(q), cfg, AppendKV() if budget is None else step))
    ref, ref_logits = reference(cache)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    g = got.kv if budget else got
    r = ref.kv if budget else ref
    np.testing.assert_array_equal(g.valid, r.valid)
    np.testing.assert_allclose(jnp.where(g.valid[..., None], g.k, 0), jnp.where(r.valid[..., None], r.k, 0), atol=1e-5)
    assert int(g.next_position[0]) == int(r.next_position[0]) == 66
    if budget:
        np.testing.assert_allclose(jnp.where(g.valid, got.score, 0), jnp.where(r.valid, ref.score, 0), atol=1e-5)


# --------------------------------------------------------------------------------- the decode-time budget
EVICT = jax.jit(lambda *a: evict_lowest(*a, k=4))


def test_evict_lowest_hand_computed():
    score = jnp.asarray([[0.5, 0.1, 0.9, 0.05, 0.3, 0.2, 0.1]])
    valid = jnp.asarray([[True, True, True, True, True, False, True]])
    pos = jnp.asarray([[-1, -1, -1, 10, 11, 12, 3]])
    # evictable: valid and older than 11 -> slots 0, 1, 2, 3, 6; the two lowest: 3 (0.05), then 1 and 6 tie at
    # 0.1 -> the lower slot, 1
    out = evict_lowest(score, valid, pos, jnp.asarray([2]), jnp.asarray([11]), k=3)
    np.testing.assert_array_equal(out, [[True, False, True, False, True, False, True]])
    none = evict_lowest(score, valid, pos, jnp.asarray([0]), jnp.asarray([11]), k=3)
    np.testing.assert_array_equal(none, valid)


def test_evicting_step_hand_computed():
    """One decode token on a full 4-slot cache whose keys are all zero: every probability is 1/5 (four slots
    and the token itself), so with decay 0.5 the scores become 0.5 * s + 0.2; slot 1 is the lowest outside
    the recent window and takes the token, at score 0.2 and position 7."""
    hd = 4
    kv = C.KVCache(k=jnp.zeros((1, 1, 1, 4, hd)), v=jnp.arange(16.0).reshape(1, 1, 1, 4, hd),
                   valid=jnp.ones((1, 1, 1, 4), bool), length=jnp.asarray([4]), next_position=jnp.asarray([7]),
                   rope_delta=jnp.asarray([0]))
    cache = BudgetedCache(kv, jnp.asarray([[[[0.3, 0.1, 0.5, 0.2]]]]), jnp.asarray([[[[-1, -1, 5, 6]]]]))
    q = jax.random.normal(jax.random.key(0), (1, 2, 1, hd))
    v_new = jnp.full((1, 1, 1, hd), 100.0)
    step = jax.jit(EvictingKV(DecodeBudget(slots=4, recent=1, decay=0.5)).attend, static_argnums=1)
    attn, out = step(cache, 0, q, jnp.zeros((1, 1, 1, hd)), v_new)
    np.testing.assert_allclose(out.score[0, 0, 0], [0.35, 0.2, 0.45, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(out.slot_pos[0, 0, 0], [-1, 7, 5, 6])
    np.testing.assert_array_equal(out.kv.v[0, 0, 0, 1], [100.0] * hd)
    assert bool(out.kv.valid.all())
    expected = (np.arange(16.0).reshape(4, hd).sum(0) + 100.0) / 5  # the mean of the five values
    np.testing.assert_allclose(attn[0, :, 0], np.broadcast_to(expected, (2, hd)), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_evict_lowest_matches_brute_force(data):
    c, k = 8, 4  # (one shape: one compile)
    score = np.asarray(data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]), min_size=c, max_size=c)))
    valid = np.asarray(data.draw(st.lists(st.booleans(), min_size=c, max_size=c)))
    pos = np.asarray(data.draw(st.lists(st.integers(-1, 9), min_size=c, max_size=c)))
    need, protect = data.draw(st.integers(0, k)), data.draw(st.integers(0, 10))
    ref = valid.copy()
    candidates = sorted((s, i) for i, s in enumerate(score) if valid[i] and pos[i] < protect)
    for _, i in candidates[:need]:
        ref[i] = False
    out = EVICT(jnp.asarray(score, jnp.float32)[None], jnp.asarray(valid)[None], jnp.asarray(pos, jnp.int32)[None],
                jnp.asarray([need], jnp.int32), jnp.asarray([protect], jnp.int32))
    np.testing.assert_array_equal(out[0], ref)


def test_budget_keeps_memory_flat_and_the_recent_window(model):
    """A 30-token answer under a 48-slot budget (32 kept prompt slots, 7 question tokens): the cache keeps its
    48 slots, every one in use, the last ``recent`` positions present in every layer and head; with room to
    spare the budget changes nothing."""
    config, params = model
    rng = np.random.default_rng(5)
    p, q = _ids(rng, 60, config), _ids(rng, 7, config)
    budget = DecodeBudget(slots=48, recent=8, decay=0.9)
    state = PS.prefill_prompt(params, config, p, policy=COMPRESSED, decode_budget=budget)
    _, after = PS.answer(params, state, q, max_new_tokens=30, eos_token_id=(), question_bucket=16)
    assert after.kv.k.shape == state.kv.k.shape and after.kv.k.shape[3] == 48
    assert bool(after.kv.valid.all())
    end = int(after.kv.next_position[0])
    assert end == 60 + 7 + 29
    pos = np.asarray(after.cache.slot_pos)
    for want in range(end - 8, end):
        assert ((pos == want) & np.asarray(after.kv.valid)).any(-1).all()
    roomy = PS.prefill_prompt(params, config, p, policy=COMPRESSED, decode_budget=DecodeBudget(64, recent=4, decay=0.7))
    plain = PS.prefill_prompt(params, config, p, policy=COMPRESSED)
    np.testing.assert_array_equal(PS.answer(params, roomy, q, max_new_tokens=N_NEW, eos_token_id=())[0],
                                  PS.answer(params, plain, q, max_new_tokens=N_NEW, eos_token_id=())[0])
    with pytest.raises(DecodeBudgetError, match="slots >= 56"):
        PS.answer(params, state, q, question_bucket=48)
    with pytest.raises(PS.PromptStateError, match="smaller than the prompt's 32 kept slots"):
        PS.prefill_prompt(params, config, p, policy=COMPRESSED, decode_budget=DecodeBudget(slots=16))
    with pytest.raises(DecodeBudgetError, match="quantised"):
        budgeted(dataclasses.replace(state.kv, quant=C.empty_quantized((2, 1, 2), 16, 16, QuantLayout(8, 8, 16))))


# ---------------------------------------------------------------------------------------- compile reuse
def test_questions_reuse_compiled_programs(model):
    """Three questions of different lengths within one bucket, then a second turn: one trace of each
    program."""
    config, params = model
    rng = np.random.default_rng(6)
    state = PS.prefill_prompt(params, config, _ids(rng, 60, config), policy=COMPRESSED)
    _, after = PS.answer(params, state, _ids(rng, 4, config), max_new_tokens=N_NEW, eos_token_id=())
    before = dict(TRACE_COUNTS)
    for n in (5, 12, 20):
        PS.answer(params, state, _ids(rng, n, config), max_new_tokens=N_NEW - 1, eos_token_id=())
    PS.answer(params, after, _ids(rng, 3, config), max_new_tokens=N_NEW, eos_token_id=())
    assert dict(TRACE_COUNTS) == before and before["question_prefill"] >= 1


# ---------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("budget", [None, DecodeBudget(slots=64, recent=4, decay=0.7)])
def test_save_load_round_trip(model, tmp_path, budget):
    config, params = model
    rng = np.random.default_rng(8)
    p, q1, q2 = _ids(rng, 60, config), _ids(rng, 6, config), _ids(rng, 4, config)
    _, state = PS.answer(params, PS.prefill_prompt(params, config, p, policy=COMPRESSED, decode_budget=budget), q1,
                         max_new_tokens=N_NEW, eos_token_id=())
    path = save_state(tmp_path / "state", state)
    loaded = load_state(path, params, config)
    assert loaded.policy == COMPRESSED and loaded.budget == budget and loaded.turns == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(PS.answer(params, loaded, q2, max_new_tokens=N_NEW, eos_token_id=())[0],
                                  PS.answer(params, state, q2, max_new_tokens=N_NEW, eos_token_id=())[0])
    assert [n for n in os.listdir(tmp_path) if n != "state"] == []  # nothing left beside it


def test_load_refuses_other_model_policy_or_version(model, tmp_path):
    config, params = model
    rng = np.random.default_rng(9)
    state = PS.prefill_prompt(params, config, _ids(rng, 60, config), policy=COMPRESSED)
    path = save_state(tmp_path / "s", state)
    other = jax.tree.map(lambda a: a * 1.01, params)
    with pytest.raises(PromptStateFileError, match="other weights"):
        load_state(path, other, config)
    bigger = dataclasses.replace(config, text=dataclasses.replace(config.text, rms_norm_eps=1e-5))
    with pytest.raises(PromptStateFileError, match="text.rms_norm_eps"):
        load_state(path, params, bigger)
    with pytest.raises(PromptStateFileError, match="budget: saved 32, now 64"):
        load_state(path, params, config, policy=dataclasses.replace(COMPRESSED, budget=64))
    with pytest.raises(PromptStateFileError, match="exists"):
        save_state(path, state)
    with pytest.raises(PS.PromptStateError, match="not the ones the prompt state was prefilled with"):
        PS.answer(other, state, _ids(rng, 4, config))
    marker = os.path.join(path, "purekv_prompt_state.json")
    data = json.load(open(marker))
    json.dump({**data, "version": 99}, open(marker, "w"))
    with pytest.raises(PromptStateFileError, match="version 99"):
        load_state(path, params, config)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("mine")
    with pytest.raises(PromptStateFileError, match="not a saved prompt state"):
        save_state(tmp_path / "plain", state, force=True)
    save_state(path, state, force=True)  # replaces a saved state
    assert load_state(path, params, config).prompt_len == 60
