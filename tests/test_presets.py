"""Named policies (``purekv_jax.presets``): one definition per policy, shared by the command line, batch
requests, the fidelity harness and the retrieval study."""

from __future__ import annotations

import dataclasses

import pytest

from purekv_jax import batch as B
from purekv_jax.config import BudgetBelowWindowError, PureKVConfig, PureKVConfigError, budget_tokens
from purekv_jax.fidelity.harness import ABLATIONS, MAIN_POLICIES, default_policy_spec
from purekv_jax.fidelity.retrieval import RETRIEVAL_POLICIES, policy_grid
from purekv_jax.presets import (CLI_POLICIES, GROUPS, PRESETS, PresetError, build_policy, policy_label, preset,
                                presets_in)

BUDGETS = (0.1, 0.2, 0.4, 96)
N_LAYERS = 30


def test_every_name_is_defined_once_and_makes_its_config():
    assert len(PRESETS) == len({p.name for p in PRESETS.values()})
    for name, p in PRESETS.items():
        assert p.name == name and p.group in GROUPS and p.help.strip()
        for b in BUDGETS:
            cfg = p.make(b, N_LAYERS)
            assert cfg is None if p.origin == "full" else (isinstance(cfg, PureKVConfig) and cfg.budget == b)


def test_clie_is_the_paper_and_purekv_the_library_default():
    for b in BUDGETS:
        assert preset("clie").make(b) == PureKVConfig.paper(b)
        assert preset("purekv").make(b) == PureKVConfig(budget=b)
        assert build_policy("clie", b) == PureKVConfig.paper(b)
        assert build_policy("purekv", b) == PureKVConfig(budget=b)


@pytest.mark.parametrize("base", ["snapkv", "pyramid", "streaming", "random", "h2o"])
def test_cli_baselines_are_published_ones(base):
    for b in BUDGETS:
        assert build_policy(base, b) == PureKVConfig.paper(b, cross_layer=False, base=base)


def test_cli_names_resolve_to_the_studies_configs():
    """The command line, the fidelity harness and the retrieval study build the same config for a policy
    they share, whatever each calls it."""
    fidelity = {p.name: p for p in MAIN_POLICIES + ABLATIONS}
    retrieval = policy_grid(N_LAYERS)
    same = {  # command line -> (fidelity row, retrieval row)
        "full": ("full", "full"),
        "clie": ("clie", "clie (paper, anchor 2)"),
        "snapkv": ("snapkv", "snapkv"),
        "pyramid": ("pyramidkv", "pyramidkv"),
        "streaming": ("streaming", "streaming"),
        "random": ("random", None),
        "h2o": ("h2o", None),
        "purekv": (None, "default PureKVConfig()"),
    }
    assert set(same) == set(CLI_POLICIES)
    for cli, (fid, ret) in same.items():
        for b in BUDGETS:
            want = build_policy(cli, b)
            if fid is not None:
                assert fidelity[fid].make(b, N_LAYERS) == want, (cli, fid)
            if ret is not None:
                assert retrieval[ret](b) == want, (cli, ret)
    assert default_policy_spec().make(0.2) == build_policy("purekv", 0.2)


def test_aliases_share_their_target_config():
    pairs = [("pyramid", "pyramidkv"), ("clie (paper, anchor 2)", "clie"), ("clie anchor 2, no vnorm", "clie_no_vnorm"),
             ("clie anchor 8", "clie_anchor8"), ("clie anchor 15", "clie_anchor15"),
             ("clie anchor 15, no vnorm", "clie_anchor15_no_vnorm"), ("snapkv adakv", "snapkv_adakv"),
             ("snapkv max pool", "snapkv_pool_max7"), ("snapkv pool 15", "snapkv_pool_avg15"),
             ("default PureKVConfig()", "purekv"), ("purekv_default", "purekv")]
    for alias, target in pairs:
        a, t = preset(alias), preset(target)
        assert (a.origin, a.fields, a.anchors_every, a.anchors_from) == (t.origin, t.fields, t.anchors_every,
                                                                         t.anchors_from)


def test_study_tables_come_from_the_presets():
    assert [p.name for p in MAIN_POLICIES] == ["full", "random", "streaming", "snapkv", "pyramidkv", "h2o", "clie",
                                               "clie_no_vnorm"]
    assert all(p.group == "main" for p in MAIN_POLICIES) and ABLATIONS == presets_in("ablation")
    assert default_policy_spec() is preset("purekv_default")  # the default differs from every pinned row
    assert set(RETRIEVAL_POLICIES) <= set(PRESETS) and list(policy_grid(N_LAYERS)) == list(RETRIEVAL_POLICIES)
    assert {p.name for p in presets_in("retrieval")} <= set(RETRIEVAL_POLICIES)
    assert "h2o" not in RETRIEVAL_POLICIES  # needs the N x N matrix


def test_anchor_every_presets_follow_the_model_depth():
    assert preset("clie_every8").make(0.2, 30).anchor_layers == (2, 10, 18, 26)
    assert preset("clie every 2").make(0.2, 6).anchor_layers == (0, 2, 4)
    with pytest.raises(PresetError, match="n_layers"):
        preset("clie_every4").make(0.2)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(PresetError, match=r"unknown policy 'lru'; known: full, random, .*clie_anchor8"):
        preset("lru")
    with pytest.raises(PresetError, match=r"unknown --policy 'clie_anchor8'; choose one of: full, purekv, clie"):
        build_policy("clie_anchor8", 0.2)  # the command line offers its own names only
    with pytest.raises(PresetError, match="unknown preset group"):
        presets_in("nope")


def test_overrides_are_applied_once_for_every_name():
    for name in CLI_POLICIES:
        pol = build_policy(name, 0.3, window=16, sink=2, anchors=(1, 3), seed=7)
        if name == "full":
            assert pol is None
            continue
        assert (pol.window, pol.sink, pol.anchor_layers, pol.seed, pol.budget) == (16, 2, (1, 3), 7, 0.3)
        assert pol == dataclasses.replace(build_policy(name, 0.3), window=16, sink=2, anchor_layers=(1, 3), seed=7)
    st = build_policy("snapkv", 0.2, st_sparse=True, st_start=3)
    assert st.st_sparse and st.st_start == 3 and policy_label("snapkv", st) == "snapkv budget=0.2+st-sparse"
    full_st = build_policy("full", 0.2, window=8, st_sparse=True)
    assert full_st == PureKVConfig(budget=1.0, window=8, cross_layer=False, st_sparse=True)
    assert policy_label("full", full_st) == "full+st-sparse" and policy_label("full", None) == "full"
    with pytest.raises(PresetError, match="add --st-sparse"):
        build_policy("purekv", 0.2, st_start=2)
    with pytest.raises(PresetError, match="--window 0 must be >= 1"):
        build_policy("full", 0.2, window=0)


def test_batch_requests_resolve_through_the_presets():
    s = B.BatchSettings(policy="clie", budget=0.2, window=16, sink=2, anchors=(1,))
    pol, label = B.resolve_policy({"name": "pyramid", "budget": "0.3"}, s)
    assert pol == build_policy("pyramid", 0.3, window=16, sink=2, anchors=(1,)) and label == "pyramid budget=0.3"
    assert B.resolve_policy(None, s)[0] == build_policy("clie", 0.2, window=16, sink=2, anchors=(1,))


def test_budget_rule_is_decided_in_one_place():
    assert budget_tokens(40, 32, 4) == 40 and budget_tokens(0.2, 32, 4) is None
    assert budget_tokens(0.2, 32, 4, prompt_len=1000) == 200
    with pytest.raises(BudgetBelowWindowError) as err:
        budget_tokens(0.02, 32, 4, prompt_len=1000)
    assert (err.value.kept, err.value.prompt_len, err.value.window, err.value.sink) == (20, 1000, 32, 4)
    assert isinstance(err.value, PureKVConfigError)
    with pytest.raises(BudgetBelowWindowError, match=r"window \+ sink = 32 \+ 4 = 36"):
        PureKVConfig(budget=20)
    with pytest.raises(PresetError, match=r"--budget 20 is below the --window 32 \+ --sink 4 = 36 tokens"):
        build_policy("snapkv", 20)
    assert build_policy("full", 20) is None  # nothing is dropped, so no window to cover


def test_named_constructors_come_from_the_one_table():
    """``PureKVConfig.snapkv()`` and the others are the preset table's policies (the same configuration as the
    command line's ``--policy`` name), not a second definition; each is a different policy."""
    made = {}
    for name, ctor in (("snapkv", PureKVConfig.snapkv), ("pyramid", PureKVConfig.pyramid),
                       ("streaming", PureKVConfig.streaming), ("h2o", PureKVConfig.h2o),
                       ("random", PureKVConfig.random)):
        for b in BUDGETS:
            assert ctor(b) == PRESETS[name].make(b) == build_policy(name, b) == PureKVConfig.named(name, b), name
        made[name] = ctor()
        assert made[name].budget == 0.2 and not made[name].cross_layer
    assert len({(c.base, c.kernel_size) for c in made.values()}) == len(made)
    assert PureKVConfig.snapkv(0.3, window=16).window == 16  # overrides
    assert PureKVConfig.named("clie anchor 8", 0.3) == PureKVConfig.paper(0.3, anchor_layers=(8,))
    with pytest.raises(PureKVConfigError, match="unknown named policy 'snap'.*snapkv"):
        PureKVConfig.named("snap")
