"""generate(): parity with transformers (full cache), policies vs full, CLIE's jaxpr, compile counts, errors."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from models.qwen2_5_vl import forward, get_rope_index, init_params, tiny_config
from purekv_jax import generation as G
from purekv_jax import policies as P
from purekv_jax.compile_cache import TRACE_COUNTS, clear_compile_cache
from purekv_jax.config import PureKVConfig, PureKVConfigError
from purekv_jax.presets import preset, presets_in
from conftest import random_text_ids

N_NEW = 32


def _torch():
    return pytest.importorskip("torch")


def _hf_generate(model, ids, mask, n_new, eos, pad):
    torch = _torch()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=pad,
        )
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, n_new - new.shape[1])), constant_values=pad)


def _hf_greedy_explicit_positions(model, ids, pos, start, n_new, eos, pad, **vision):
    """transformers' model with its own KV cache, greedy, positions passed explicitly (prefill: ours from
    get_rope_index; decode: start + t for all three M-RoPE rows)."""
    torch = _torch()
    t = lambda a: torch.from_numpy(np.asarray(a).astype(np.int64) if np.asarray(a).dtype.kind in "iub" else np.asarray(a, np.float32))
    b = ids.shape[0]
    with torch.no_grad():
        out = model(input_ids=t(ids), position_ids=t(pos), use_cache=True, **{k: t(v) for k, v in vision.items()})
        cache = getattr(out, "cache", None) or out.past_key_values
        toks, done = [], np.zeros(b, bool)
        nxt = out.logits[:, -1].argmax(-1).numpy()
        for i in range(n_new):
            nxt = np.where(done, pad, nxt)
            toks.append(nxt)
            done |= np.isin(nxt, eos)
            if i == n_new - 1 or done.all():
                break
            p = np.broadcast_to((start + i)[None, :, None], (3, b, 1))
            out = model(input_ids=t(nxt[:, None]), position_ids=t(p), cache=cache, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            nxt = out.logits[:, -1].argmax(-1).numpy()
    toks = np.stack(toks, 1)
    return np.pad(toks, ((0, 0), (0, n_new - toks.shape[1])), constant_values=pad)


def _eos_pad(config):
    return list(config.eos_token_id), config.eos_token_id[0]


# ----------------------------------------------------------------------------------- HF parity (full)
def test_full_matches_hf_generate_text(tiny_untied, hf_tiny):
    cfg = tiny_untied.config
    rng = np.random.default_rng(11)
    ids = random_text_ids(rng, (1, int(rng.integers(20, 40))), cfg)
    eos, pad = _eos_pad(cfg)
    ours = G.generate(tiny_untied.params, cfg, ids, max_new_tokens=N_NEW)
    ref = _hf_generate(hf_tiny, ids, np.ones_like(ids), N_NEW, eos, pad)
    np.testing.assert_array_equal(ours.tokens, ref)
    assert ours.stats["kv_bytes_kept"] == ours.stats["kv_bytes_full"]


def test_full_matches_hf_generate_padded_batch(tiny_untied, hf_tiny):
    """Two prompts of different lengths: ours right-padded (re-aligned inside), HF left-padded."""
    cfg = tiny_untied.config
    rng = np.random.default_rng(12)
    n0, n1 = 37, 22
    a, b = random_text_ids(rng, (1, n0), cfg)[0], random_text_ids(rng, (1, n1), cfg)[0]
    right = np.zeros((2, n0), np.int32)
    right_mask = np.zeros((2, n0), np.int32)
    right[0], right_mask[0] = a, 1
    right[1, :n1], right_mask[1, :n1] = b, 1
    left, left_mask = np.zeros_like(right), np.zeros_like(right_mask)
    left[0], left_mask[0] = a, 1
    left[1, n0 - n1:], left_mask[1, n0 - n1:] = b, 1
    eos, pad = _eos_pad(cfg)
    ours = G.generate(tiny_untied.params, cfg, right, right_mask, max_new_tokens=N_NEW)
    ref = _hf_generate(hf_tiny, left, left_mask, N_NEW, eos, pad)
    np.testing.assert_array_equal(ours.tokens, ref)
    # each row alone gives the same tokens as in the batch
    alone = G.generate(tiny_untied.params, cfg, b[None], max_new_tokens=N_NEW)
    np.testing.assert_array_equal(alone.tokens[0], ours.tokens[1])


def _vision_prompt(cfg, rng, kind, grid, text_before=9, text_after=7):
    merge = cfg.vision.spatial_merge_size
    t, h, w = grid
    n_tok = t * (h // merge) * (w // merge)
    pad_tok = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = np.concatenate([
        random_text_ids(rng, (text_before,), cfg), [cfg.vision_start_token_id], np.full(n_tok, pad_tok),
        [cfg.vision_end_token_id], random_text_ids(rng, (text_after,), cfg),
    ]).astype(np.int32)[None]
    pixels = rng.normal(size=(t * h * w, cfg.vision.patch_dim)).astype(np.float32)
    return ids, pixels


@pytest.mark.parametrize("kind", ["image", "video"])
def test_full_matches_hf_vision(tiny_untied, hf_tiny, kind):
    """Image and video prompts. Positions are passed explicitly to the reference (transformers 5.24 resumes
    text after a video by a different rule than the released checkpoints; for images the rules agree).
    The video case is also checked teacher-forced against our own forward over the generated sequence."""
    cfg = tiny_untied.config
    rng = np.random.default_rng(13 if kind == "image" else 14)
    grid = (1, 4, 6) if kind == "image" else (3, 4, 4)
    ids, pixels = _vision_prompt(cfg, rng, kind, grid)
    grids = np.array([grid])
    eos, pad = _eos_pad(cfg)
    if kind == "image":
        mm = dict(pixel_values=pixels, image_grid_thw=grids)
        pos, delta = get_rope_index(cfg, ids, image_grid_thw=grids)
    else:
        mm = dict(pixel_values_videos=pixels, video_grid_thw=grids, second_per_grid_ts=np.array([1.0], np.float32))
        pos, delta = get_rope_index(cfg, ids, video_grid_thw=grids, second_per_grid_ts=[1.0])
    ours = G.generate(tiny_untied.params, cfg, ids, max_new_tokens=N_NEW, **mm)
    start = ids.shape[1] + delta[:, 0]
    hf_vision = {k: v for k, v in mm.items() if k != "second_per_grid_ts"}
    ref = _hf_greedy_explicit_positions(hf_tiny, ids, pos, start, N_NEW, eos, pad, **hf_vision)
    np.testing.assert_array_equal(ours.tokens, ref)
    if kind == "video":
        seq = np.concatenate([ids, ours.tokens[:, :-1]], axis=1)
        logits = np.asarray(forward(tiny_untied.params, cfg, seq, **mm))
        np.testing.assert_array_equal(logits[0, ids.shape[1] - 1:].argmax(-1), ours.tokens[0])


# ----------------------------------------------------------------------------------- policies
@pytest.fixture(scope="module")
def model4():
    cfg = tiny_config(num_hidden_layers=4)
    return cfg, init_params(cfg, jax.random.key(7))


SMALL = dict(window=8, sink=2, budget_multiple=8)
POLICIES = {
    "purekv": PureKVConfig(budget=1.0, **SMALL),
    "clie": PureKVConfig(budget=1.0, cross_layer=True, **SMALL),
    "snapkv": PureKVConfig(budget=1.0, cross_layer=False, **SMALL),
    "pyramid_clie": PureKVConfig(budget=1.0, base="pyramid", cross_layer=True, anchor_layers=(1, 3), **SMALL),
    "h2o": PureKVConfig(budget=1.0, base="h2o", cross_layer=False, **SMALL),
    "h2o_clie": PureKVConfig(budget=1.0, base="h2o", cross_layer=True, **SMALL),
    "streaming": PureKVConfig(budget=1.0, base="streaming", cross_layer=False, **SMALL),
    "random": PureKVConfig(budget=1.0, base="random", cross_layer=False, **SMALL),
}


def _batch(cfg, rng, lengths):
    n = max(lengths)
    ids = np.zeros((len(lengths), n), np.int32)
    mask = np.zeros_like(ids)
    for r, m in enumerate(lengths):
        ids[r, :m] = random_text_ids(rng, (m,), cfg)
        mask[r, :m] = 1
    return ids, mask


def test_budget_covering_prompt_equals_full(model4):
    cfg, params = model4
    rng = np.random.default_rng(21)
    ids, mask = _batch(cfg, rng, [45, 30])
    full = G.generate(params, cfg, ids, mask, max_new_tokens=N_NEW)
    for name, pol in POLICIES.items():
        got = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=N_NEW)
        np.testing.assert_array_equal(got.tokens, full.tokens, err_msg=name)
        assert got.stats["kv_bytes_kept"] == full.stats["kv_bytes_full"], name


def test_compressed_cache_is_subset_of_full_prefill(model4):
    """Active pruning writes exactly `budget` original entries per layer and head (window + sinks inside),
    each bit-equal to the full cache's entry; PyramidKV's per-layer counts follow its budgets."""
    cfg, params = model4
    rng = np.random.default_rng(22)
    ids, mask = _batch(cfg, rng, [120, 70])
    full = G.generate(params, cfg, ids, mask, max_new_tokens=1, return_cache=True).cache
    for pol in (PureKVConfig(budget=0.3, cross_layer=True, **SMALL),
                PureKVConfig(budget=0.3, base="pyramid", cross_layer=True, **SMALL)):
        res = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=1, return_cache=True)
        c, budgets = res.cache, res.stats["budgets"]
        assert res.stats["kv_bytes_kept"] < res.stats["kv_bytes_full"]
        valid = np.asarray(c.valid)
        for layer in range(cfg.text.num_hidden_layers):
            for r, n_real in enumerate((120, 70)):
                for h in range(cfg.text.num_key_value_heads):
                    assert valid[layer, r, h].sum() == min(budgets[layer], n_real)
                    kk = np.asarray(c.k[layer, r, h])[valid[layer, r, h]]
                    fk = np.asarray(full.k[layer, r, h])[np.asarray(full.valid[layer, r, h])]
                    match = (kk[:, None, :] == fk[None, :, :]).all(-1)
                    pos = match.argmax(1)
                    assert match.any(1).all() and (np.diff(pos) > 0).all()
                    kept = set(pos.tolist())
                    assert set(range(2)) <= kept and set(range(n_real - 8, n_real)) <= kept
        if pol.base == "pyramid":
            assert list(budgets) == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
        else:  # the segmented prefill (one loop per segment) keeps the same entries as the fused default
            seg = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=1, return_cache=True,
                             fused_prefill=False).cache
            np.testing.assert_array_equal(np.asarray(seg.valid), valid)
            np.testing.assert_allclose(np.asarray(seg.k), np.asarray(c.k), atol=1e-5)


def _scans_with_scoring(jaxpr):
    """For each top-level scan (one per prefill segment): how many equations compute scoring
    probabilities (named scope), and the shapes of its exp ops (window-shaped ones are [.., W, N])."""
    return [_scans_with_scoring_body(e.params["jaxpr"].jaxpr) for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


def _scans_with_scoring_body(jx):
    acc = {"scope": 0, "exp_shapes": []}

    def walk(jx):
        for eqn in jx.eqns:
            if P.SCORE_SCOPE in str(eqn.source_info.name_stack):
                acc["scope"] += 1
            if eqn.primitive.name == "exp":
                acc["exp_shapes"].append(tuple(eqn.outvars[0].aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jx)
    return acc


@pytest.mark.parametrize("attention", ["dense", "flash"])
def test_clie_scores_only_at_anchor_layers(model4, attention):
    cfg, params = model4
    ids = random_text_ids(np.random.default_rng(23), (1, 100), cfg)
    window = 8
    pol = PureKVConfig(budget=0.3, window=window, sink=2, cross_layer=True, anchor_layers=(1,))
    plan, jaxpr = G.prefill_jaxpr(params, cfg, ids, pol, attention=attention)
    kinds = [s.kind for s in plan.segments]
    assert kinds == ["own", "anchor", "owned"]
    scans = _scans_with_scoring(jaxpr)
    assert len(scans) == len(kinds)
    for kind, acc in zip(kinds, scans):
        window_exps = [s for s in acc["exp_shapes"] if len(s) >= 2 and s[-2] == window]
        if kind == "owned":
            assert acc["scope"] == 0 and not window_exps, f"owned layers computed scoring probabilities: {acc}"
        else:
            assert acc["scope"] > 0 and window_exps
    # fused prefill: one loop, the score picked per layer by a cond whose owned branch holds no scoring
    _, fj = G.prefill_jaxpr(params, cfg, ids, pol, attention=attention, fused=True)
    (scan,) = [e for e in fj.jaxpr.eqns if e.primitive.name == "scan"]
    conds = [e for e in scan.params["jaxpr"].jaxpr.eqns if e.primitive.name == "cond"]
    assert len(conds) == 1
    branch_scoring = [_scans_with_scoring_body(br.jaxpr)["scope"] > 0 for br in conds[0].params["branches"]]
    assert branch_scoring == [True, False]  # cond(is_owned): branch 0 = own score, branch 1 = owned (CLIE)
    # without CLIE every layer scores (one segment)
    plan2, jaxpr2 = G.prefill_jaxpr(params, cfg, ids, PureKVConfig(budget=0.3, window=window, sink=2, cross_layer=False))
    assert [s.kind for s in plan2.segments] == ["own"] and _scans_with_scoring(jaxpr2)[0]["scope"] > 0


def _out_shapes(jx):
    """Every equation output's shape in ``jx`` and its sub-jaxprs."""
    for eqn in jx.eqns:
        yield from (tuple(o.aval.shape) for o in eqn.outvars if hasattr(o.aval, "shape"))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _out_shapes(sub)


@pytest.mark.parametrize("name", [p.name for p in presets_in("carry")])
def test_carried_presets_never_build_an_n_by_n_matrix(model4, name):
    """Every carry is state of the layer scan: with the flash path no array of the prefill is [.., N, N]
    (the dense path's [B, H, N, N] scores show the check can fail); every carry only ever sees window
    scores ([.., window, N] exps)."""
    cfg, params = model4
    n = 192  # not a multiple of the flash block's 128, so no block is [N, N] either
    ids = random_text_ids(np.random.default_rng(26), (1, n), cfg)
    pol = preset(name).make(0.3, cfg.text.num_hidden_layers, window=8, sink=2)
    for fused in (False, True):
        plan, jaxpr = G.prefill_jaxpr(params, cfg, ids, pol, attention="flash", fused=fused)
        assert plan.carry is not None
        shapes = list(_out_shapes(jaxpr.jaxpr))
        assert not [s for s in shapes if len(s) >= 2 and s[-2:] == (n, n)], (name, fused)
        assert any(len(s) >= 2 and s[-2:] == (8, n) for s in shapes)  # the window's scores
    _, dense = G.prefill_jaxpr(params, cfg, ids, pol, attention="dense")
    assert any(len(s) >= 2 and s[-2:] == (n, n) for s in _out_shapes(dense.jaxpr))


def test_decode_compiled_once_per_bucket(model4):
    cfg, params = model4
    rng = np.random.default_rng(24)
    pol = PureKVConfig(budget=48, **SMALL)
    clear_compile_cache()
    G.generate(params, cfg, random_text_ids(rng, (1, 60), cfg), policy=pol, max_new_tokens=50, eos_token_id=())
    assert TRACE_COUNTS == {"prefill": 1, "decode": 1}
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for n, new in ((20, 64), (33, 40), (57, 33), (64, 64)):  # one prompt bucket (64), one token bucket (64)
            r = G.generate(params, cfg, random_text_ids(rng, (1, n), cfg), policy=pol, max_new_tokens=new,
                           eos_token_id=())
            assert r.stats["decode_steps"] == new - 1 and r.stats["decode_compile_s"] == 0.0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert TRACE_COUNTS == {"prefill": 1, "decode": 1}
    assert compiles == [], compiles
    # a new prompt bucket compiles once more
    G.generate(params, cfg, random_text_ids(rng, (1, 70), cfg), policy=pol, max_new_tokens=8)
    assert TRACE_COUNTS == {"prefill": 2, "decode": 2}


def test_bad_input_errors_before_any_work(model4):
    cfg, params = model4
    ids = random_text_ids(np.random.default_rng(25), (1, 50), cfg)
    clear_compile_cache()
    with pytest.raises(PureKVConfigError, match="window \\+ sink"):
        PureKVConfig(budget=30)
    with pytest.raises(PureKVConfigError, match="smaller than window \\+ sink"):
        G.generate(params, cfg, ids, policy=PureKVConfig(budget=0.1))
    with pytest.raises(PureKVConfigError, match="out of range"):
        G.generate(params, cfg, ids, policy=PureKVConfig(budget=0.9, cross_layer=True, anchor_layers=(1, 4)))
    with pytest.raises(G.GenerateError, match="max_position_embeddings"):
        G.generate(params, cfg, ids, max_new_tokens=cfg.text.max_position_embeddings)
    with pytest.raises(G.GenerateError, match="cache_capacity=40"):
        G.generate(params, cfg, ids, cache_capacity=40)
    with pytest.raises(G.GenerateError, match="cache_capacity=60"):
        G.generate(params, cfg, ids, policy=PureKVConfig(budget=48, **SMALL), max_new_tokens=20, cache_capacity=60)
    with pytest.raises(G.GenerateError, match="h2o"):
        G.generate(params, cfg, ids, policy=PureKVConfig(budget=0.9, base="h2o"), attention="flash")
    with pytest.raises(G.GenerateError, match="attention_mask shape"):
        G.generate(params, cfg, ids, attention_mask=np.ones((1, 3)))
    assert not TRACE_COUNTS


def test_sampling_options(model4):
    cfg, params = model4
    ids = random_text_ids(np.random.default_rng(26), (2, 30), cfg)
    greedy = G.generate(params, cfg, ids, max_new_tokens=8).tokens
    np.testing.assert_array_equal(G.generate(params, cfg, ids, max_new_tokens=8, temperature=1.0, top_k=1).tokens, greedy)
    s1 = G.generate(params, cfg, ids, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3).tokens
    s2 = G.generate(params, cfg, ids, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3).tokens
    np.testing.assert_array_equal(s1, s2)


def test_eos_stops_rows_and_pads(model4):
    cfg, params = model4
    ids = random_text_ids(np.random.default_rng(27), (2, 30), cfg)
    free = G.generate(params, cfg, ids, max_new_tokens=8, eos_token_id=()).tokens
    stop = int(free[0, 2])  # pretend row 0's third token is EOS
    got = G.generate(params, cfg, ids, max_new_tokens=8, eos_token_id=stop, pad_token_id=-1)
    np.testing.assert_array_equal(got.tokens[0, :3], free[0, :3])
    assert (got.tokens[0, 3:] == -1).all()
    hit = np.flatnonzero(free[1] == stop)
    end = hit[0] + 1 if len(hit) else 8
    np.testing.assert_array_equal(got.tokens[1, :end], free[1, :end])


@pytest.mark.parametrize("n, block", [(50, 16), (64, 16), (97, 32), (40, 64)])
def test_flash_prefill_matches_dense(n, block):
    """The causal-skipping flash path (query block i visits key blocks 0..i) == dense masked softmax, with
    left padding longer than a block, a last block padded, and one block covering everything."""
    from purekv_jax import attention as A

    rng = np.random.default_rng()
    q = jnp.asarray(rng.normal(size=(3, 4, n, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 2, n, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(3, 2, n, 8)), jnp.float32)
    valid = np.ones((3, n), bool)
    valid[1, :13] = False
    valid[2, : n - 5] = False
    valid = jnp.asarray(valid)
    dense = A.dense_prefill_attention(q, k, v, valid)
    flash = A.flash_prefill_attention(q, k, v, valid, block=block)
    real = np.asarray(valid)[:, None, :, None]  # padded query rows are never read
    np.testing.assert_allclose(np.where(real, np.asarray(flash), 0), np.where(real, np.asarray(dense), 0), atol=2e-6)
