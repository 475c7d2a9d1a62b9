"""The ST-SpAttn cost model: hand-counted cells, the choice it makes, and generate following it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from kernels.block_sparse_attention import HeadPattern, STLayout, VideoSpan, block_tables
from models.qwen2_5_vl import init_params, tiny_config
from purekv_jax import generation as G
from purekv_jax.config import PureKVConfig
from purekv_jax.st_sparse import cost
from purekv_jax.st_sparse import prefill as stp
from purekv_jax.st_sparse.cost import CostProfile, choose_path, dense_path_cells, sparse_cells
from test_st_generate import SMALL, _batch

S, U, T = HeadPattern.SPATIAL, HeadPattern.UNION, HeadPattern.TEMPORAL


def test_dense_path_cells_by_hand():
    assert dense_path_cells(300, "auto") == (300 * 300, "dense")
    assert dense_path_cells(300, "dense") == (300 * 300, "dense")
    # 1,000 tokens: 8 key blocks of 128; the causal ones are 1 + 2 + ... + 8 = 36
    assert dense_path_cells(1000, "auto") == (36 * 128 * 128, "flash")
    assert dense_path_cells(1000, "flash") == (36 * 128 * 128, "flash")


def test_sparse_cells_count_every_pass_of_every_head_group():
    lay = STLayout(40 + 4 * 6 * 6, (VideoSpan(20, 4, 6, 6),))
    tab = lambda p, perm: block_tables(lay, p, 16, 16, permuted=perm)  # noqa: E731
    listed = lambda t: int(t.kv_count.sum()) * 16 * 16  # noqa: E731
    # triton counts listed blocks; a union head is two passes (spatial, strict temporal on the permutation)
    cells, passes = sparse_cells(lay, (S, U, U, T), 4, "triton", 16, 16)
    want = (listed(tab(S, False)) * 1 + (listed(tab(S, False)) + listed(tab(HeadPattern.TEMPORAL_STRICT, True))) * 2
            + listed(tab(T, True)) * 1)
    assert (cells, passes) == (want, 4)
    # the XLA fallback pads each query block's list to its bucket: never fewer cells than listed
    xla_cells, _ = sparse_cells(lay, (S, U, U, T), 4, "xla", 16, 16)
    assert xla_cells >= cells


def _profile(sparse_cell_s):
    return CostProfile("xla", dense_cell_s=1e-10, flash_cell_s=1e-10, sparse_cell_s=sparse_cell_s, sparse_pass_s=0.0)


def test_choose_path_prices_both_paths():
    lay = STLayout(16 + 8 * 16 * 16, (VideoSpan(8, 8, 16, 16),))
    groups = (((0,), 0, lay),)
    n = lay.seq_len
    cells, _ = sparse_cells(lay, (S,) * 4, 4, "xla", None, None)
    dense_cells, _ = dense_path_cells(n, "auto")
    cheap = choose_path(_profile(1e-10), (S,) * 4, groups, n, 4, 64, "xla", None, None, "auto")
    assert cheap.sparse
    assert cheap.dense_s == pytest.approx(4 * 64 * dense_cells * 1e-10)
    assert cheap.sparse_s == pytest.approx(64 * cells * 1e-10)
    # a sparse cell priced above dense cells / sparse cells x the dense price loses
    ratio = 4 * dense_cells / cells
    dear = choose_path(_profile(1e-10 * ratio * 1.01), (S,) * 4, groups, n, 4, 64, "xla", None, None, "auto")
    assert not dear.sparse
    # within the margin (10 %) the dense path keeps the layer
    near = choose_path(_profile(1e-10 * ratio * 0.95), (S,) * 4, groups, n, 4, 64, "xla", None, None, "auto")
    assert not near.sparse
    # no measured profile: the dense path, and the choice says why
    unpriced = choose_path(None, (S,) * 4, groups, n, 4, 64, "xla", None, None, "auto")
    assert not unpriced.sparse and "no measured cost profile for backend 'xla'" in unpriced.note


@pytest.fixture(scope="module")
def model4():
    cfg = tiny_config(num_hidden_layers=4)
    return cfg, init_params(cfg, jax.random.key(11))


@pytest.mark.parametrize("sparse_pays", [False, True])
def test_generate_follows_the_cost_model(model4, monkeypatch, sparse_pays):
    cfg, params = model4
    ids, mask, mm = _batch(cfg, np.random.default_rng(13), [[9, ("video", (4, 8, 8)), 7]])
    profile = dataclasses.replace(_profile(1e-14 if sparse_pays else 1e-6), backend="segments")
    monkeypatch.setattr(stp, "load_profiles", lambda: {"segments": profile})
    pol = PureKVConfig(budget=1.0, cross_layer=False, st_sparse=True, st_backend="segments",
                       **{**SMALL, "st_select": "auto"})
    got = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=4, eos_token_id=(), **mm)
    (path,) = got.stats["st_paths"]
    assert path["layers"] == [2, 3] and path["path"] == ("sparse" if sparse_pays else "dense")
    if sparse_pays:
        always = G.generate(params, cfg, ids, mask, policy=dataclasses.replace(pol, st_select="always"),
                            max_new_tokens=4, eos_token_id=(), **mm)
        assert got.stats["st_layers"] == (2, 3) == always.stats["st_layers"]
        np.testing.assert_array_equal(got.tokens, always.tokens)
    else:  # every layer on the dense path: the prefill is the one without ST-SpAttn, to the bit
        off = G.generate(params, cfg, ids, mask, policy=dataclasses.replace(pol, st_sparse=False), max_new_tokens=4,
                         eos_token_id=(), return_cache=True, **mm)
        got_c = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=4, eos_token_id=(), return_cache=True,
                           **mm)
        assert got.stats["st_layers"] == ()
        np.testing.assert_array_equal(np.asarray(got_c.cache.k), np.asarray(off.cache.k))
        np.testing.assert_array_equal(got.tokens, off.tokens)


def test_the_stored_xla_profile_keeps_small_prompts_dense():
    """The measured CPU profile: a 2 x 8 x 8 video in a short prompt is cheaper on the dense path."""
    profile = cost.load_profiles().get("xla")
    if profile is None:
        pytest.skip("no measured xla profile in purekv_jax/st_sparse/cost_profiles.json")
    lay = STLayout(40 + 2 * 8 * 8, (VideoSpan(20, 2, 8, 8),))
    choice = choose_path(profile, (U,) * 4, (((0,), 0, lay),), lay.seq_len, 4, 64, "xla", None, None, "auto")
    assert not choice.sparse and choice.dense_s < choice.sparse_s


def test_verbose_plan_lines_name_the_chosen_path():
    from purekv_jax.run_stats import format_plan

    stats = {"prompt_len": 570, "padded_len": 576, "budgets": (128,) * 8, "capacity": 160,
             "st_paths": [{"layers": [3, 4, 5, 6, 7], "patterns": ["union"], "sparse_s": 0.069, "dense_s": 0.021,
                           "path": "dense"}]}
    text = format_plan(stats)
    assert "prompt 570 tokens padded to 576" in text and "budget 128 tokens" in text and "cache 160 slots" in text
    assert "ST-SpAttn layers 3-7, union heads: dense (predicted per layer: sparse 69.0 ms, dense 21.0 ms)" in text


def test_head_groups_choose_their_own_path(model4, monkeypatch):
    """On the XLA block fallback a split union head computes more cells than a causal DENSE pass on this small
    video, a spatial head fewer: with cheap kernel cells the spatial heads run block-sparse and the union heads
    DENSE in the same call (``mixed``); generate follows that plan exactly."""
    cfg, params = model4
    ids, mask, mm = _batch(cfg, np.random.default_rng(13), [[9, ("video", (4, 8, 8)), 7]])
    lay = STLayout(9 + 4 * 4 * 4 + 7, (VideoSpan(9, 4, 4, 4),))
    spatial, _ = sparse_cells(lay, (S,) * 4, 4, "xla", 16, 16)
    union, _ = sparse_cells(lay, (U,) * 4, 4, "xla", 16, 16)
    dense, _ = sparse_cells(lay, (HeadPattern.DENSE,) * 4, 4, "xla", 16, 16)
    assert spatial < dense < union
    profile = _profile(1e-14)
    choice = choose_path(profile, (S, S, U, U), (((0,), 0, lay),), lay.seq_len, 4, 16, "xla", 16, 16, "auto")
    D = HeadPattern.DENSE
    assert choice.chosen == (S, S, D, D) and choice.path == "mixed"
    assert [g.sparse for g in choice.groups] == [True, False]
    assert choice.chosen_s == pytest.approx(sum(min(g.sparse_s, g.in_kernel_dense_s) for g in choice.groups))

    monkeypatch.setattr(stp, "load_profiles", lambda: {"xla": profile})
    pats = (None, None, (S, S, U, U), (S, S, U, U))
    pol = PureKVConfig(budget=1.0, cross_layer=False, st_sparse=True, st_backend="xla", head_patterns=pats,
                       **{**SMALL, "st_select": "auto"})
    got = G.generate(params, cfg, ids, mask, policy=pol, max_new_tokens=4, eos_token_id=(), return_cache=True, **mm)
    (path,) = got.stats["st_paths"]
    assert path["path"] == "mixed" and [g["path"] for g in path["groups"]] == ["sparse", "dense"]
    plan = dataclasses.replace(pol, head_patterns=(None, None, (S, S, D, D), (S, S, D, D)), st_select="always")
    want = G.generate(params, cfg, ids, mask, policy=plan, max_new_tokens=4, eos_token_id=(), return_cache=True,
                      **mm)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(np.asarray(got.cache.k), np.asarray(want.cache.k))


def test_verbose_plan_lines_show_each_head_group_of_a_mixed_layer():
    from purekv_jax.run_stats import format_plan

    stats = {"prompt_len": 9306, "padded_len": 9312, "budgets": (1862,) * 8, "capacity": 1900,
             "st_paths": [{"layers": [3, 4], "patterns": ["spatial", "union"], "sparse_s": 0.5, "dense_s": 1.0,
                           "chosen_s": 0.4, "path": "mixed",
                           "groups": [{"pattern": "spatial", "heads": [0, 1], "path": "sparse"},
                                      {"pattern": "union", "heads": [2, 3], "path": "dense"}]}]}
    text = format_plan(stats)
    assert "ST-SpAttn layers 3-4, spatial/union heads: mixed" in text
    assert "spatial heads [0, 1]: sparse; union heads [2, 3]: dense" in text


def test_profiles_by_device_kind_and_the_users_file_over_the_repositorys(tmp_path, monkeypatch):
    generic, h200 = _profile(1e-10), dataclasses.replace(_profile(2e-10), backend="triton")
    user = tmp_path / "mine" / "profiles.json"
    monkeypatch.setenv(cost.USER_PROFILES_ENV, str(user))
    assert cost.user_profiles_file() == str(user)
    cost.save_profiles({"triton@NVIDIA H200": h200, "xla": generic}, str(user))
    profiles = cost.load_profiles()
    assert cost.find_profile(profiles, "triton", "NVIDIA H200") == h200
    assert cost.find_profile(profiles, "triton", "NVIDIA A100") is None
    # the user's generic xla profile overrides the repository's
    assert cost.find_profile(profiles, "xla", "cpu") == generic
    user.write_text("[1, 2]")
    cost.read_profiles.cache_clear()
    with pytest.raises(ValueError, match="not a purekv cost profiles file"):
        cost.load_profiles()
    cost.read_profiles.cache_clear()


def test_calibrate_cost_profile_command_stores_the_users_profile(tmp_path, monkeypatch, capsys):
    from purekv_jax import cli
    from purekv_jax.commands import calibrate as calibrate_cmd

    user = tmp_path / "profiles.json"
    monkeypatch.setenv(cost.USER_PROFILES_ENV, str(user))
    measured = dataclasses.replace(_profile(3e-10), backend="segments")
    monkeypatch.setattr(calibrate_cmd, "calibrate_profile", lambda backend: dataclasses.replace(measured,
                                                                                               backend=backend))
    assert cli.main(["calibrate", "--cost-profile", "--backend", "segments"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = cost.find_profile(cost.load_profiles(), "segments", "cpu")
    assert got.sparse_cell_s == 3e-10 and got.backend == "segments"
    assert cli.main(["calibrate", "--out", str(tmp_path / "p.json")]) == 2   # no --model / --video
    assert "--model and --video are required" in capsys.readouterr().err
    cost.read_profiles.cache_clear()
