"""Checkpoint loader: name layouts, shards, tied / untied heads, bf16 files, and the error messages."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from models.qwen2_5_vl import (
    CheckpointError,
    ConfigError,
    init_params,
    load_hf_checkpoint,
    save_hf_checkpoint,
    tiny_config,
)
from models.qwen2_5_vl.loader import params_to_hf


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, init_params(config, jax.random.key(11))


def _write(folder, config, tensors: dict[str, np.ndarray], shards: int = 1):
    """A checkpoint folder with the given tensors, in one file or split into ``shards`` files + index."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(folder, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return folder


def _assert_same(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- layouts
def test_round_trip_hub_names(tiny, tmp_path):
    config, params = tiny
    path = save_hf_checkpoint(tmp_path / "ckpt", config, params)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    loaded_config, loaded = load_hf_checkpoint(path)
    assert loaded_config == config
    _assert_same(loaded, params)
    # Saving again over the same folder replaces it (and leaves no temporary folders behind).
    save_hf_checkpoint(path, config, params)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_transformers5_names_and_shards(tiny, tmp_path):
    config, params = tiny
    hub = params_to_hf(params, config)
    renamed = {re.sub(r"^model\.(?!visual)", "model.language_model.", re.sub(r"^visual\.", "model.visual.", k)): v
               for k, v in hub.items()}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in renamed
    assert "model.visual.blocks.0.attn.qkv.weight" in renamed and "lm_head.weight" in renamed
    for shards in (1, 3):
        _, loaded = load_hf_checkpoint(_write(tmp_path / f"t5_{shards}", config, renamed, shards))
        _assert_same(loaded, params)
    _, loaded = load_hf_checkpoint(_write(tmp_path / "hub_sharded", config, hub, shards=2))
    _assert_same(loaded, params)


def test_tied_and_untied(tmp_path):
    tied = tiny_config(tie_word_embeddings=True)
    params = init_params(tied, jax.random.key(12))
    path = save_hf_checkpoint(tmp_path / "tied", tied, params)
    cfg, loaded = load_hf_checkpoint(path)
    assert cfg.text.tie_word_embeddings and getattr(loaded.text, "lm_head", None) is None
    _assert_same(loaded, params)
    # A tied config whose file still carries lm_head.weight: ignored, as transformers does.
    extra = {**params_to_hf(params, tied), "lm_head.weight": np.ones((1024, 64), np.float32)}
    _, loaded = load_hf_checkpoint(_write(tmp_path / "tied_extra", tied, extra))
    assert getattr(loaded.text, "lm_head", None) is None
    # An untied config whose file lacks lm_head.weight: missing, named.
    untied = tiny_config()
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) lm_head\.weight"):
        load_hf_checkpoint(_write(tmp_path / "untied_missing", untied, params_to_hf(params, tied)))


def test_bf16_file(tiny, tmp_path):
    config, params = tiny
    path = save_hf_checkpoint(tmp_path / "bf16", config, params, dtype=jnp.bfloat16)
    _, as_f32 = load_hf_checkpoint(path, dtype=jnp.float32)
    _, as_bf16 = load_hf_checkpoint(path, dtype=jnp.bfloat16)
    rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    _assert_same(as_bf16, rounded)
    _assert_same(as_f32, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), rounded))
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- errors
def test_missing_tensor_names_it_and_the_file(tiny, tmp_path):
    config, params = tiny
    hub = params_to_hf(params, config)
    del hub["model.layers.1.mlp.up_proj.weight"]
    folder = _write(tmp_path / "missing", config, hub)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(folder)
    del hub["visual.blocks.0.attn.qkv.bias"]
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: missing .*visual\.blocks\.0\.attn\.qkv\.bias"):
        load_hf_checkpoint(_write(tmp_path / "missing_sharded", config, hub, shards=2))
    # Listed in the index, absent from the shard it names.
    folder = _write(tmp_path / "missing_in_shard", config, hub, shards=2)
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index) as f:
        raw = json.load(f)
    raw["weight_map"]["visual.blocks.0.attn.qkv.bias"] = "model-00001-of-00002.safetensors"
    with open(index, "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match=r"visual\.blocks\.0\.attn\.qkv\.bias \(the index puts it in model-00001-of-00002\.safetensors, which lacks it\)"):
        load_hf_checkpoint(folder)


def test_wrong_shape_names_both_shapes(tiny, tmp_path):
    config, params = tiny
    hub = params_to_hf(params, config)
    hub["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.weight \(in model\.safetensors\): expected shape \(32, 64\), found \(16, 64\)",
    ):
        load_hf_checkpoint(_write(tmp_path / "shape", config, hub))


def test_unexpected_tensors_named(tiny, tmp_path):
    config, params = tiny
    hub = params_to_hf(params, config)
    hub["model.layers.2.input_layernorm.weight"] = np.ones((64,), np.float32)  # a third layer: not in the config
    hub["model.language_model.rotary_emb.inv_freq"] = np.ones((8,), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\).*model\.language_model\.rotary_emb\.inv_freq.*model\.layers\.2\.input_layernorm\.weight"):
        load_hf_checkpoint(_write(tmp_path / "extra", config, hub))


def test_no_weights_and_bad_folders(tiny, tmp_path):
    config, params = tiny
    folder = tmp_path / "empty"
    folder.mkdir()
    with open(folder / "config.json", "w") as f:
        json.dump(config.to_hf_dict(), f)
    with pytest.raises(CheckpointError, match=r"no weights found \(neither model\.safetensors nor model\.safetensors\.index\.json\)"):
        load_hf_checkpoint(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_hf_checkpoint(tmp_path / "nowhere")
    sharded = _write(tmp_path / "lost_shard", config, params_to_hf(params, config), shards=2)
    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"lists shard 'model-00002-of-00002\.safetensors', which is not in"):
        load_hf_checkpoint(sharded)


def test_config_missing_field(tiny, tmp_path):
    config, params = tiny
    folder = save_hf_checkpoint(tmp_path / "cfg", config, params)
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    del raw["num_key_value_heads"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(ConfigError, match="missing required field 'num_key_value_heads'"):
        load_hf_checkpoint(folder)


# ----------------------------------------------------------------------------- transformers
@pytest.mark.hf
def test_transformers_loads_everything_and_saves_what_we_load(tiny_untied, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_untied.path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # transformers 5 writes its own config spelling (nested text_config); our loader reads it back.
    model.save_pretrained(tmp_path / "hf_saved")
    config, params = load_hf_checkpoint(tmp_path / "hf_saved")
    assert config.text == tiny_untied.config.text
    _assert_same(params, tiny_untied.params)
