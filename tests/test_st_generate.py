"""ST-SpAttn inside generate: the block-sparse prefill equals a dense prefill with the explicit
METHOD.md mask in layers >= st_start, alone and with CLIE, per row in a mixed batch; text-only prompts
are untouched; images stay dense; head calibration on a model; the calibrate command's JSON."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest

from conftest import random_text_ids
from models.qwen2_5_vl import init_params, tiny_config
from models.qwen2_5_vl.layers import dense_attention
from purekv_jax import generation as G
from purekv_jax.config import PureKVConfig, PureKVConfigError
from purekv_jax.st_sparse import (HeadPattern, LayoutError, STLayout, VideoSpan, load_head_patterns,
                                  reference_mask, save_head_patterns)
from purekv_jax.st_sparse.prefill import calibrate_model, row_layouts

# the block-sparse path itself is under test: st_select="always" keeps the cost model from choosing dense
SMALL = dict(window=8, sink=2, budget_multiple=8, anchor_layers=(1,), st_block_q=16, st_block_k=16, st_select="always")
N_NEW = 6
T, S, U, D = HeadPattern.TEMPORAL, HeadPattern.SPATIAL, HeadPattern.UNION, HeadPattern.DENSE


@pytest.fixture(scope="module")
def model4():
    cfg = tiny_config(num_hidden_layers=4)
    return cfg, init_params(cfg, jax.random.key(7))


def _segment(cfg, rng, kind, grid):
    merge = cfg.vision.spatial_merge_size
    t, h, w = grid
    pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = np.concatenate([[cfg.vision_start_token_id], np.full(t * (h // merge) * (w // merge), pad),
                          [cfg.vision_end_token_id]])
    return ids, rng.normal(size=(t * h * w, cfg.vision.patch_dim)).astype(np.float32)


def _prompt(cfg, rng, parts):
    """parts: ints (random text of that length) or (kind, grid). -> ids [N], pixel dict lists."""
    ids, px = [], {"image": ([], []), "video": ([], [])}
    for p in parts:
        if isinstance(p, int):
            ids.append(random_text_ids(rng, (p,), cfg))
        else:
            seg, pix = _segment(cfg, rng, *p)
            ids.append(seg)
            px[p[0]][0].append(pix)
            px[p[0]][1].append(p[1])
    return np.concatenate(ids).astype(np.int32), px


def _batch(cfg, rng, rows):
    """Right-padded batch of prompts (generate re-aligns it) with the vision inputs in row order."""
    prompts = [_prompt(cfg, rng, r) for r in rows]
    n = max(len(p[0]) for p in prompts)
    ids = np.zeros((len(rows), n), np.int32)
    mask = np.zeros_like(ids)
    mm = {}
    for r, (p, _) in enumerate(prompts):
        ids[r, :len(p)], mask[r, :len(p)] = p, 1
    for kind, (pk, gk) in (("image", ("pixel_values", "image_grid_thw")), ("video", ("pixel_values_videos", "video_grid_thw"))):
        pix = [x for _, px in prompts for x in px[kind][0]]
        grids = [g for _, px in prompts for g in px[kind][1]]
        if pix:
            mm[pk], mm[gk] = np.concatenate(pix), np.array(grids)
    if "video_grid_thw" in mm:
        mm["second_per_grid_ts"] = np.ones(len(mm["video_grid_thw"]), np.float32)
    return ids, mask, mm


def _reference_attention(cfg, policy, ids, mask, mm, bucket=64):
    """Dense prefill attention with the explicit METHOD.md mask (``reference_mask``) in layers >= st_start
    (per row, in the left-padded coordinates generate uses; padding keys masked by ``valid``)."""
    n = -(-ids.shape[1] // bucket) * bucket
    ids_al, valid = G.realign_left(ids, mask.astype(bool), n, 0)
    vg = mm.get("video_grid_thw")
    lays = row_layouts(cfg, ids_al, valid, None if vg is None else tuple(tuple(int(x) for x in g) for g in vg))
    pats = policy.st_plan(cfg.text).layer_patterns
    masks = np.zeros((cfg.text.num_hidden_layers, ids.shape[0], cfg.text.num_attention_heads, n, n), bool)
    for r, (off, lay) in enumerate(lays):
        # the padded layout: the row's videos shifted by its offset; the left padding is non-video
        full = STLayout(n, tuple(VideoSpan(v.start + off, v.t, v.h, v.w) for v in lay.videos)) \
            if lay is not None else STLayout(n)
        for l, lp in enumerate(pats):
            for h in range(cfg.text.num_attention_heads):
                masks[l, r, h] = reference_mask(full, D if lp is None else lp[h])
    masks = jnp.asarray(masks)

    def attend(q, k, v, valid, layer):
        m = masks[layer] & valid[:, None, None, :]
        return dense_attention(q, k, v, m)

    return attend


def _compare(a, b, tol=1e-5):
    ca, cb = a.cache, b.cache
    va, vb = np.asarray(ca.valid), np.asarray(cb.valid)
    np.testing.assert_array_equal(va, vb)
    for x, y in ((ca.k, cb.k), (ca.v, cb.v)):
        x, y = np.asarray(x), np.asarray(y)
        err = np.abs(np.where(va[..., None], x - y, 0)).max()
        assert err < tol, err
    np.testing.assert_array_equal(a.tokens, b.tokens)


def _max_diff_from(a, b):
    va = np.asarray(a.cache.valid) & np.asarray(b.cache.valid)
    return np.abs(np.where(va[..., None], np.asarray(a.cache.k) - np.asarray(b.cache.k), 0)).max()


def test_st_alone_equals_masked_reference_mixed_batch(model4):
    """No compression (cross_layer=False, budget 1.0): two video rows with different layouts (per-row
    kernel calls), a text-only row (dense), per-layer per-head patterns incl. permuted temporal heads
    and GQA groups split across patterns."""
    cfg, params = model4
    rng = np.random.default_rng(1)
    rows = [[9, ("video", (4, 8, 8)), 7], [5, ("video", (2, 8, 12)), 12], [40]]
    ids, mask, mm = _batch(cfg, rng, rows)
    pats = (None, None, (T, S, U, D), (S, S, T, T))
    pol = PureKVConfig(budget=1.0, cross_layer=False, st_sparse=True, head_patterns=pats, **SMALL)
    got = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=N_NEW, return_cache=True, **mm)
    assert got.stats["st_layers"] == (2, 3)
    ref_pol = dataclasses.replace(pol, st_sparse=False)
    ref = G.generate(params, cfg, ids, mask, policy=ref_pol, max_new_tokens=N_NEW, return_cache=True,
                     attention=_reference_attention(cfg, pol, ids, mask, mm), **mm)
    _compare(got, ref)
    dense = G.generate(params, cfg, ids, mask, policy=ref_pol, max_new_tokens=N_NEW, return_cache=True, **mm)
    assert _max_diff_from(got, dense) > 1e-3  # the sparse mask does change the video rows
    # layers below st_start are untouched (layer 3's keys are the first to see layer 2's attention)
    np.testing.assert_array_equal(np.asarray(got.cache.k)[:3], np.asarray(dense.cache.k)[:3])


def test_st_with_clie_image_and_video(model4):
    """CLIE at 50% with ST-SpAttn (union default), on an image + video prompt: the image is not in the
    layout (its rows and keys stay dense), and the kept cache equals the reference's."""
    cfg, params = model4
    rng = np.random.default_rng(2)
    rows = [[6, ("image", (1, 4, 6)), 4, ("video", (4, 8, 8)), 9]]
    ids, mask, mm = _batch(cfg, rng, rows)
    pol = PureKVConfig(budget=0.5, st_sparse=True, cross_layer=True, **SMALL)
    n = -(-ids.shape[1] // 64) * 64
    ids_al, valid = G.realign_left(ids, mask.astype(bool), n, 0)
    ((off, lay),) = row_layouts(cfg, ids_al, valid, ((4, 8, 8),))
    assert lay.videos == (VideoSpan(6 + 1 + 6 + 1 + 4 + 1, 4, 4, 4),)  # only the video; image = dense
    got = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=N_NEW, return_cache=True, **mm)
    assert got.stats["kv_bytes_kept"] < got.stats["kv_bytes_full"]
    ref_pol = dataclasses.replace(pol, st_sparse=False)
    ref = G.generate(params, cfg, ids, mask, policy=ref_pol, max_new_tokens=N_NEW, return_cache=True,
                     attention=_reference_attention(cfg, pol, ids, mask, mm), **mm)
    _compare(got, ref)


def test_text_only_is_exactly_dense(model4):
    cfg, params = model4
    rng = np.random.default_rng(3)
    ids, mask, _ = _batch(cfg, rng, [[50], [33]])
    for base in (dict(budget=1.0, cross_layer=False), dict(budget=0.4, cross_layer=True)):
        pol = PureKVConfig(st_sparse=True, **base, **SMALL)
        got = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=N_NEW, return_cache=True)
        ref = G.generate(params, cfg, ids, mask, policy=dataclasses.replace(pol, st_sparse=False),
                         max_new_tokens=N_NEW, return_cache=True)
        assert got.stats["st_layers"] == ()
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_array_equal(np.asarray(got.cache.k), np.asarray(ref.cache.k))
        np.testing.assert_array_equal(np.asarray(got.cache.v), np.asarray(ref.cache.v))


def test_st_config_errors(model4, tmp_path):
    cfg, params = model4
    bad_file = tmp_path / "bad.json"
    bad_file.write_text('{"head_patterns": [null, ["sideways"]]}')
    # the file is read at resolution, not at construction
    bad_pol = PureKVConfig(budget=1.0, st_sparse=True, head_patterns_file=str(bad_file))
    with pytest.raises(PureKVConfigError, match="head_patterns_file.*layer 1.*sideways"):
        bad_pol.resolve(cfg.text, 64)
    missing_pol = PureKVConfig(budget=1.0, st_sparse=True, head_patterns_file=str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="head patterns file not found"):
        missing_pol.resolve(cfg.text, 64)
    rng = np.random.default_rng(4)
    ids, mask, mm = _batch(cfg, rng, [[5, ("video", (2, 8, 8)), 5]])
    with pytest.raises(PureKVConfigError, match="st_start=4"):
        G.generate(params, cfg, ids, mask, policy=PureKVConfig(budget=1.0, st_sparse=True, st_start=4, **SMALL), **mm)
    with pytest.raises(PureKVConfigError, match=r"head_patterns has 2 layer entries"):
        G.generate(params, cfg, ids, mask, policy=PureKVConfig(budget=1.0, st_sparse=True, head_patterns=(None, None),
                                                               **SMALL), **mm)
    with pytest.raises(PureKVConfigError, match=r"head_patterns\[3\] has 2 entries"):
        G.generate(params, cfg, ids, mask, policy=PureKVConfig(budget=1.0,
            st_sparse=True, head_patterns=(None, None, None, ("spatial", "union")), **SMALL), **mm)
    with pytest.raises(PureKVConfigError, match="unknown head pattern"):
        PureKVConfig(budget=1.0, st_sparse=True, head_patterns=(None, ("diagonal",)))
    with pytest.raises(PureKVConfigError, match="h2o"):
        G.generate(params, cfg, ids, mask, policy=PureKVConfig(budget=1.0, st_sparse=True, base="h2o", cross_layer=False,
                                                               **SMALL), **mm)
    with pytest.raises(PureKVConfigError, match="st_backend"):
        PureKVConfig(budget=1.0, st_sparse=True, st_backend="cuda")
    # a grid that does not match its (contiguous) video tokens
    cut = np.concatenate([ids[:, :8], ids[:, 9:]], axis=1)
    bad = np.where(cut == cfg.vision_end_token_id, cfg.video_token_id, cut)
    bad[0, 7] = 5
    with pytest.raises(LayoutError, match="contiguous"):
        row_layouts(cfg, bad, np.ones(bad.shape, bool), ((2, 8, 8),))


# ----------------------------------------------------------------------------------- calibration
def _place_frame_heads(cfg, params, layer, a=32.0):
    """Layer ``layer``: q/k weights zeroed, biases set so that (after M-RoPE) q head 0 scores keys by
    their (h, w) position only (peaked on the same place: purely temporal attention among the video
    keys) and q head 1 by their t position only (peaked on the same temporal slot: purely spatial).
    Needs a small rope_theta so that the h / w frequencies separate neighbouring places."""
    tc = cfg.text
    hd, half = tc.head_dim, tc.head_dim // 2
    n_t = tc.mrope_section[0]
    u_t, u_hw = np.zeros(hd, np.float32), np.zeros(hd, np.float32)
    for f in range(half):
        target = u_t if f < n_t else u_hw
        target[f] = target[f + half] = a
    lay = params.text.layers
    q_b = np.array(lay.q_b)
    k_b = np.array(lay.k_b)
    q_b[layer, 0:hd], q_b[layer, hd:2 * hd] = u_hw, u_t   # q heads 0, 1 share KV head 0
    k_b[layer, 0:hd] = u_hw + u_t
    new = dict(q_w=jnp.asarray(lay.q_w).at[layer].set(0), k_w=jnp.asarray(lay.k_w).at[layer].set(0),
               q_b=jnp.asarray(q_b), k_b=jnp.asarray(k_b))
    params = jax.tree.map(lambda x: x, params)  # a copy: the fixture's state stays as it is
    nnx.replace_by_pure_dict(params, {"text": {"layers": new}})
    return params


def test_calibration_picks_lowest_error_and_the_constructed_patterns(model4, tmp_path):
    cfg, params = model4
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, rope_theta=10.0))
    params = _place_frame_heads(cfg, params, layer=3)
    rng = np.random.default_rng(5)
    ids, _, mm = _batch(cfg, rng, [[7, ("video", (4, 8, 8)), 6]])
    pol = PureKVConfig(st_sparse=True, **SMALL)   # st_start = 2
    atol = 1e-5  # errors below float32 noise are ties (union ~ temporal for a purely temporal head)
    res = calibrate_model(params, cfg, ids, policy=pol, num_rows=48, atol=atol, per_kv_group=False, **mm)
    assert res.st_start == 2 and res.head_patterns[:2] == (None, None)
    assert np.isnan(res.errors[:2]).all() and np.isfinite(res.errors[2:]).all()
    for l in (2, 3):  # the choice is the lowest error (up to atol; ties: the cheapest, listed first)
        for h, p in enumerate(res.head_patterns[l]):
            c = res.candidates.index(p)
            assert res.errors[l, c, h] <= res.errors[l, :, h].min() + atol
            assert (res.errors[l, :c, h] > res.errors[l, :, h].min() + atol).all()
    exact = calibrate_model(params, cfg, ids, policy=pol, num_rows=48, per_kv_group=False, **mm)  # strict argmin
    np.testing.assert_array_equal(exact.errors, res.errors)
    for l in (2, 3):
        assert [exact.candidates.index(p) for p in exact.head_patterns[l]] == \
            list(np.argmin(exact.errors[l], axis=0))
    # the default: one pattern per KV head's q heads (2 here), the lowest summed error of the pair
    grouped = calibrate_model(params, cfg, ids, policy=pol, num_rows=48, **mm)
    np.testing.assert_array_equal(grouped.errors, exact.errors)
    for l in (2, 3):
        pair_errors = exact.errors[l].reshape(len(exact.candidates), 2, 2).sum(-1)
        want = [exact.candidates[int(i)] for i in np.argmin(pair_errors, axis=0)]
        assert grouped.head_patterns[l] == (want[0], want[0], want[1], want[1])
    # constructed layer 3: head 0 attends by place only -> temporal; head 1 by slot only -> spatial
    e = dict(zip(res.candidates, res.errors[3]))
    assert res.head_patterns[3][:2] == (T, S), (res.head_patterns[3], res.errors[3])
    assert e[T][0] < 1e-4 and e[S][0] > 0.1 and e[S][1] < 1e-4 and e[T][1] > 0.1
    # static data in the config, through a JSON file
    path = tmp_path / "patterns.json"
    save_head_patterns(path, res.head_patterns, errors=res.errors, candidates=res.candidates)
    doc = json.loads(path.read_text())
    assert doc["head_patterns"][3][:2] == ["temporal", "spatial"] and doc["head_patterns"][0] is None
    assert load_head_patterns(path) == res.head_patterns
    from_file = PureKVConfig(st_sparse=True, head_patterns_file=str(path), **SMALL)
    assert from_file.st_plan(cfg.text) == res.config(pol).st_plan(cfg.text)
    hash(from_file)
    got = G.generate(params, cfg, ids, policy=from_file, max_new_tokens=2, **mm)
    assert got.stats["st_layers"] == (2, 3)


def test_calibrate_command(model4, tmp_path, monkeypatch):
    """``purekv calibrate`` on a tiny checkpoint folder, with the prompt built by the caller-side hook
    (a video file needs the tokenizer files; here the command's ``prepare`` hook is replaced)."""
    from models.qwen2_5_vl import save_hf_checkpoint
    from purekv_jax import cli
    from purekv_jax.commands import calibrate as cmd

    cfg, params = model4
    save_hf_checkpoint(tmp_path / "m", cfg, params)
    rng = np.random.default_rng(6)
    ids, _, mm = _batch(cfg, rng, [[7, ("video", (4, 8, 8)), 6]])
    monkeypatch.setattr(cmd, "prepare_inputs", lambda *a, **k: dict(input_ids=ids, **mm))
    out = tmp_path / "p.json"
    rc = cli.main(["calibrate", "--model", str(tmp_path / "m"), "--video", "unused.mp4", "--out", str(out),
                   "--num-rows", "32", "--anchor-layers", "1"])
    assert rc == 0
    pats = load_head_patterns(out)
    assert len(pats) == 4 and pats[:2] == (None, None) and all(len(p) == 4 for p in pats[2:])
    doc = json.loads(out.read_text())
    assert doc["st_start"] == 2 and doc["num_videos"] == 1
