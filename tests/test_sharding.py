"""Sharding: mesh specs, the per-leaf rule, the KV-cache rule, multi-host detection (in process), and on 8
simulated CPU devices (a subprocess: this process's jax may already hold 1 device) generate's tokens on
meshes 8x1, 4x2, 2x4 identical to one device for the full cache, SnapKV and CLIE, with the parameters and
the returned cache really sharded, and an orbax checkpoint restored straight onto a mesh."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from models.qwen2_5_vl import init_params, tiny_config
from purekv_jax import cache as C
from purekv_jax import sharding as S
from purekv_jax.kv_quant import QuantLayout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_heads(config, heads: int, kv_heads: int):
    """A copy of a ``Qwen25VLConfig`` with ``heads`` query / ``kv_heads`` KV heads of the same head_dim (the
    text width, the MLP width and the vision merger's output scale along), e.g. ``tiny_config()`` with 8 / 4
    heads so that a model axis of 4 holds whole query and KV heads."""
    text = config.text
    hidden = heads * text.head_dim
    new = dataclasses.replace(
        text, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=text.intermediate_size * hidden // text.hidden_size,
    )
    return dataclasses.replace(config, text=new, vision=dataclasses.replace(config.vision, out_hidden_size=hidden))


# ------------------------------------------------------------------------------------------ in process
def test_parse_mesh_spec():
    assert S.parse_mesh_spec("data=4,model=2") == {"data": 4, "model": 2}
    assert S.parse_mesh_spec("model=2") == {"data": 1, "model": 2}
    assert S.parse_mesh_spec(" data = -1 , model=4 ") == {"data": -1, "model": 4}
    assert S.parse_mesh_spec(None) == {"data": -1, "model": 1}
    assert S.parse_mesh_spec({"model": 2, "data": 2}) == {"data": 2, "model": 2}
    for bad, msg in (("data=4,tensor=2", "unknown axis 'tensor'"), ("data4", "not NAME=SIZE"),
                     ("data=x", "not an integer"), ("data=0", "sizes are >= 1"), ("data=-1,model=-1", "only one"),
                     ("data=2,data=2", "given twice")):
        with pytest.raises(S.ShardingError, match=msg):
            S.parse_mesh_spec(bad)


def test_make_mesh_counts_devices():
    n = len(jax.devices())
    mesh = S.make_mesh(f"data={n}")
    assert dict(mesh.shape) == {"data": n, "model": 1}
    assert S.make_mesh("data=-1").shape["data"] == n
    with pytest.raises(S.ShardingError, match=rf"needs {8 * n} devices, but there are {n}.*device_count={8 * n}"):
        S.make_mesh(f"data={4 * n},model=2")


def test_param_rule_text_and_vision():
    cfg = tiny_config()  # 4 query / 2 KV heads, F=128, vocab 1024; vision 2 heads, F=64
    spec = lambda name, nd, m: S.param_spec(name, nd, cfg, m)  # noqa: E731
    # model=2: every head count divides
    assert spec("text.layers.q_w", 3, 2) == P(None, None, "model")
    assert spec("text.layers.q_b", 2, 2) == P(None, "model")
    assert spec("text.layers.k_w", 3, 2) == P(None, None, "model")
    assert spec("text.layers.o_w", 3, 2) == P(None, "model", None)
    assert spec("text.layers.down_w", 3, 2) == P(None, "model", None)
    assert spec("text.layers.up_w", 3, 2) == P(None, None, "model")
    assert spec("text.layers.input_norm", 2, 2) == P()
    assert spec("text.embed", 2, 2) == P("model", None)
    assert spec("text.lm_head", 2, 2) == P(None, "model")
    assert spec("text.norm", 1, 2) == P()
    assert spec("vision.blocks.qkv_w", 3, 2) == P(None, None, "model")
    assert spec("vision.blocks.proj_w", 3, 2) == P(None, "model", None)
    assert spec("vision.merger_fc2_w", 2, 2) == P("model", None)
    assert spec("vision.patch_embed", 2, 2) == P()
    # model=4: 2 KV heads do not divide -> K/V replicated; 4 query heads still sharded; vision 2 heads replicated
    assert spec("text.layers.k_w", 3, 4) == P()
    assert spec("text.layers.v_b", 2, 4) == P()
    assert spec("text.layers.q_w", 3, 4) == P(None, None, "model")
    assert spec("vision.blocks.qkv_w", 3, 4) == P()
    assert spec("vision.blocks.up_w", 3, 4) == P(None, None, "model")  # F=64 divides
    # a text model's state names its leaves without the "text." prefix; model=1 replicates nothing away
    assert spec("layers.q_w", 3, 2) == P(None, None, "model")
    assert spec("text.layers.q_w", 3, 1) == P(None, None, "model")  # size-1 axis: harmless
    # vocab that does not divide
    odd = with_heads(tiny_config(vocab_size=1001), 4, 2)
    assert S.param_spec("text.embed", 2, odd, 2) == P()
    # every leaf of the real tree gets a spec of its rank
    specs = S.param_specs(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), cfg, 2)
    assert specs.text.layers.gate_w == P(None, None, "model")


def test_cache_rule():
    cfg = tiny_config().text  # 2 KV heads
    c = S.cache_specs(cfg, 8, {"data": 4, "model": 2})
    assert c.k == P(None, "data", "model", None, None) and c.valid == P(None, "data", "model", None)
    assert c.length == P("data") and c.rope_delta == P("data")
    c = S.cache_specs(cfg, 6, {"data": 4, "model": 4})  # 6 rows over 4, 2 KV heads over 4: both replicated
    assert c.k == P(None, None, None, None, None) and c.length == P(None)
    c = S.cache_specs(cfg, 8, S.make_mesh("data=-1"))
    assert c.k[2] is None
    # a quantised cache: its codes, scales and zero points follow the same rule, and the specs have the
    # cache's own tree structure (so they map over it leaf by leaf)
    cache = C.create(cfg.num_hidden_layers, 8, cfg.num_key_value_heads, 24, cfg.head_dim, quant=QuantLayout(4, 8, 16))
    c = S.cache_specs(cfg, 8, {"data": 4, "model": 2}, kv_bits=4)
    assert jax.tree.structure(c) == jax.tree.structure(cache)
    assert c.quant.k_codes == P(None, "data", "model", None, None) and c.quant.valid == P(None, "data", "model", None)
    assert S.cache_specs(cfg, 8, {"data": 4}).quant is None


def test_multihost_env_detection():
    assert S.multihost_env({}) is None
    assert S.multihost_env({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}) == "jax"
    assert S.multihost_env({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    assert S.multihost_env({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"}) == "slurm"
    assert S.multihost_env({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert S.multihost_env({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
    assert S.multihost_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert S.initialize_distributed({}) is False  # single process: nothing to do


# ------------------------------------------------------------------------------------------ 8 devices
# with_heads' source goes first: the script runs in a fresh interpreter that cannot import this test module.
SCRIPT = inspect.getsource(with_heads) + textwrap.dedent(r"""
    import dataclasses, json, os, sys, tempfile, time
    T0 = time.time()
    def tick(what):
        print(f"{time.time() - T0:6.1f} s  {what}", file=sys.stderr, flush=True)
    import jax, numpy as np
    from models.qwen2_5_vl import init_params, save_hf_checkpoint, tiny_config
    from purekv_jax import generate, PureKVConfig, sharding as S
    from purekv_jax.checkpoint import convert, load_checkpoint

    assert len(jax.devices()) == 8, jax.devices()
    cfg = with_heads(tiny_config(num_hidden_layers=3), heads=8, kv_heads=4)  # 8 q / 4 kv heads, hidden 128
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(7))  # one compile, not one per leaf
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 990, (8, 60)).astype(np.int32)
    mask = np.ones_like(ids)
    for r, pad in enumerate([0, 25, 3, 0, 40, 11, 0, 7]):
        mask[r, :pad] = 0
    policies = {
        "full": None,
        "snapkv": PureKVConfig(budget=32, window=8, sink=2, cross_layer=False),
        "clie": PureKVConfig(budget=32, window=8, sink=2, cross_layer=True, anchor_layers=(1,)),
    }
    kw = dict(max_new_tokens=8, new_tokens_bucket=8, cache_capacity=72, eos_token_id=(), return_cache=True)
    spec = lambda x: str(x.sharding.spec)
    out = {"tokens": {}, "params": {}, "cache": {}, "shard_shapes": {}}
    ref = {}
    for name, pol in policies.items():
        r = generate(params, cfg, ids, mask, policy=pol, **kw)
        ref[name] = r.tokens
        out["ref_" + name] = r.tokens.tolist()
        tick("reference " + name)
    for mesh_spec in ("data=8,model=1", "data=4,model=2", "data=2,model=4"):
        mesh = S.make_mesh(mesh_spec)
        sp = S.shard_params(params, cfg, mesh)
        out["params"][mesh_spec] = {n: spec(x) for n, x in (
            ("q_w", sp.text.layers.q_w), ("k_w", sp.text.layers.k_w), ("o_w", sp.text.layers.o_w),
            ("down_w", sp.text.layers.down_w), ("lm_head", sp.text.lm_head), ("embed", sp.text.embed),
            ("norm", sp.text.layers.input_norm), ("vision_qkv_w", sp.vision.blocks.qkv_w))}
        out["shard_shapes"][mesh_spec] = list(sp.text.layers.q_w.addressable_shards[0].data.shape)
        for name, pol in policies.items():
            r = generate(sp, cfg, ids, mask, policy=pol, **kw)
            out["tokens"][f"{mesh_spec}/{name}"] = bool((r.tokens == ref[name]).all())
            out["cache"][f"{mesh_spec}/{name}"] = [spec(r.cache.k), spec(r.cache.valid), spec(r.cache.length),
                                                   list(r.cache.k.addressable_shards[0].data.shape)]
            tick(mesh_spec + " " + name)

    # the KV-replication rule: 4 KV heads on model=8 (K/V projections and the cache replicated, queries sharded)
    mesh = S.make_mesh("data=1,model=8")
    sp2 = S.shard_params(params, cfg, mesh)
    r2 = generate(sp2, cfg, ids, mask, policy=policies["clie"], **kw)
    out["kv_replicated"] = [bool((r2.tokens == ref["clie"]).all()), spec(sp2.text.layers.k_w), spec(sp2.text.layers.q_w),
                            spec(r2.cache.k)]
    tick("kv replicated")
    # an orbax checkpoint restored straight into the shards (4x2), then the same tokens
    tmp = tempfile.mkdtemp()
    save_hf_checkpoint(os.path.join(tmp, "hf"), cfg, params)
    convert(os.path.join(tmp, "hf"), os.path.join(tmp, "orbax"), dtype="float32", progress=False)
    mesh = S.make_mesh("data=4,model=2")
    cfg3, lp = load_checkpoint(os.path.join(tmp, "orbax"), shardings=S.sharding_for_leaf(cfg, mesh))
    r = generate(lp, cfg3, ids, mask, policy=policies["clie"], **kw)
    out["orbax"] = [bool((r.tokens == ref["clie"]).all()), spec(lp.text.layers.q_w), spec(lp.text.lm_head),
                    spec(lp.vision.blocks.qkv_w), lp.text.layers.q_w.sharding.mesh.shape["model"]]
    tick("orbax")
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    script = tmp_path_factory.mktemp("sharding") / "run8.py"
    script.write_text(SCRIPT)
    # opt level 0: about half the XLA:CPU compile time; the reference and the meshes share the flags
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stderr[-2000:])  # the timings (shown with -s or on failure)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_tokens_identical_on_every_mesh(eight_devices):
    toks = eight_devices["tokens"]
    assert len(toks) == 9 and all(toks.values()), toks
    # the policies really differ from each other (so "identical" compares different computations)
    assert eight_devices["ref_full"] != eight_devices["ref_snapkv"] or eight_devices["ref_full"] != eight_devices["ref_clie"]


def test_params_really_sharded(eight_devices):
    p = eight_devices["params"]
    assert p["data=8,model=1"]["q_w"] == "P(None, None, 'model')"  # a size-1 axis: whole leaf per device
    for mesh in ("data=4,model=2", "data=2,model=4"):
        assert p[mesh]["q_w"] == "P(None, None, 'model')"
        assert p[mesh]["k_w"] == "P(None, None, 'model')"  # 4 KV heads divide 2 and 4
        assert p[mesh]["o_w"] == "P(None, 'model', None)"
        assert p[mesh]["down_w"] == "P(None, 'model', None)"
        assert p[mesh]["lm_head"] == "P(None, 'model')"
        assert p[mesh]["embed"] == "P('model', None)"
        assert p[mesh]["norm"] == "P()"
    assert p["data=4,model=2"]["vision_qkv_w"] == "P(None, None, 'model')"  # 2 vision heads
    assert p["data=2,model=4"]["vision_qkv_w"] == "P()"  # 2 heads over 4: replicated
    # q_w [3, 128, 128]: each device holds 128 / model columns
    assert eight_devices["shard_shapes"] == {"data=8,model=1": [3, 128, 128], "data=4,model=2": [3, 128, 64],
                                             "data=2,model=4": [3, 128, 32]}


def test_cache_really_sharded(eight_devices):
    c = eight_devices["cache"]
    for pol in ("full", "snapkv", "clie"):
        k, valid, length, shard = c[f"data=8,model=1/{pol}"]
        assert "'data'" in k and shard[1] == 1  # [L, B/8, Hkv, C, hd]
        k, valid, length, shard = c[f"data=4,model=2/{pol}"]
        assert k.startswith("P(None, 'data', 'model'") and shard[1:3] == [2, 2]
        assert valid.startswith("P(None, 'data', 'model'") and length == "P('data',)"
        k, valid, length, shard = c[f"data=2,model=4/{pol}"]
        assert k.startswith("P(None, 'data', 'model'") and shard[1:3] == [4, 1]
        assert shard[3] == 72  # the whole capacity on every device


def test_kv_heads_replicated_when_not_divisible(eight_devices):
    same, k_w, q_w, cache_k = eight_devices["kv_replicated"]
    assert same
    assert k_w == "P()" and q_w == "P(None, None, 'model')"
    assert "'model'" not in cache_k  # [L, B, Hkv, C, hd] whole on every device (data=1)


def test_orbax_restore_onto_mesh(eight_devices):
    same, q_w, lm_head, vision_qkv, model = eight_devices["orbax"]
    assert same and model == 2
    assert q_w == "P(None, None, 'model')" and lm_head == "P(None, 'model')"
    assert vision_qkv == "P(None, None, 'model')"
