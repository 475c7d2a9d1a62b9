"""The Flax NNX module tree and its bridge to the pure functions: split / state paths, ``TextModel.__call__``
against the pure decoder, the functional init against the modules, state filling and its errors, and the
checkpoint round trip on states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.qwen2_5_vl import (
    Qwen25VLModel,
    StateLeafError,
    TextDecoderLayers,
    TextModel,
    VisionBlocks,
    VisionModel,
    abstract_state,
    abstract_text_state,
    init_params,
    init_text_params,
    load_hf_checkpoint,
    model_from_state,
    save_hf_checkpoint,
    state_from_leaves,
    text_part,
    tiny_config,
)
from models.qwen2_5_vl.text import decoder_forward, lm_logits

LAYER_FIELDS = ("input_norm", "q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "o_w", "post_norm", "gate_w", "up_w",
                "down_w")


def _leaves(state: nnx.State) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


def _assert_same_state(a: nnx.State, b: nnx.State) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for path in la:
        assert la[path].dtype == lb[path].dtype, path
        np.testing.assert_array_equal(la[path], lb[path], err_msg=".".join(path))


@pytest.fixture(scope="module")
def model():
    return Qwen25VLModel(tiny_config(), rngs=nnx.Rngs(params=jax.random.key(4)))


def test_module_tree_and_state_paths(model):
    cfg = model.config
    assert isinstance(model.text, TextModel) and isinstance(model.text.layers, TextDecoderLayers)
    assert isinstance(model.vision, VisionModel) and isinstance(model.vision.blocks, VisionBlocks)
    graphdef, state = nnx.split(model)
    paths = set(_leaves(state))
    L, d = cfg.text.num_hidden_layers, cfg.text.hidden_size
    assert {("text", "layers", f) for f in LAYER_FIELDS} <= paths
    assert {("text", "embed"), ("text", "norm"), ("text", "lm_head"), ("vision", "patch_embed"),
            ("vision", "blocks", "qkv_w"), ("vision", "merger_fc2_b")} <= paths
    assert all(isinstance(v, nnx.Param) for _, v in nnx.to_flat_state(state))
    assert state.text.layers.q_w.shape == (L, d, cfg.text.num_attention_heads * cfg.text.head_dim)
    assert state.vision.blocks.norm1.shape == (cfg.vision.depth, cfg.vision.hidden_size)
    # The configs are static (in the graphdef), not leaves; merge rebuilds the same module.
    rebuilt = nnx.merge(graphdef, state)
    assert rebuilt.config == cfg and rebuilt.text.config == cfg.text and rebuilt.vision.config == cfg.vision
    # The abstract state has the same tree, with shapes only.
    _, abstract = abstract_state(cfg)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert text_part(state) is not None and set(text_part(state)) == set(text_part(state.text))


def test_tied_head_is_absent_from_the_state():
    cfg = tiny_config(tie_word_embeddings=True)
    model = TextModel(cfg.text, rngs=nnx.Rngs(params=jax.random.key(0)))
    assert model.lm_head is None
    state = nnx.state(model)
    assert "lm_head" not in state and getattr(state, "lm_head", None) is None
    _, abstract = abstract_text_state(cfg.text)
    assert set(_leaves(abstract)) == set(_leaves(state))


@pytest.mark.parametrize("tied", [False, True])
def test_text_model_call_under_jit_equals_the_pure_functions(tied):
    cfg = tiny_config(tie_word_embeddings=tied).text
    model = TextModel(cfg, rngs=nnx.Rngs(params=jax.random.key(1)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    mask = jnp.ones((2, 9), jnp.int32).at[1, 6:].set(0)  # right padding in row 1
    got = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))(model, ids, mask)

    state = nnx.state(model)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    embeds = jnp.take(state.embed, ids, axis=0)
    want = lm_logits(state, decoder_forward(state, embeds, positions, mask, cfg))
    assert got.shape == (2, 9, cfg.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # inputs_embeds in place of ids gives the same logits.
    by_embeds = nnx.jit(lambda m, e, mask: m(inputs_embeds=e, attention_mask=mask))(model, embeds, mask)
    np.testing.assert_allclose(np.asarray(by_embeds), np.asarray(got), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=embeds)


def test_init_functions_equal_the_modules_built_from_the_same_key():
    cfg = tiny_config()
    key = jax.random.key(9)
    module_key = nnx.Rngs(params=key).params()  # the key the constructor takes from its rngs
    model = Qwen25VLModel(cfg, rngs=nnx.Rngs(params=key))
    _assert_same_state(init_params(cfg, module_key), nnx.state(model))
    text = TextModel(cfg.text, std=0.15, rngs=nnx.Rngs(params=key))
    _assert_same_state(init_text_params(cfg.text, module_key, std=0.15), nnx.state(text))
    bf16 = init_params(cfg, module_key, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_state_from_leaves_fills_and_names_misfits(model):
    cfg = model.config
    _, abstract = abstract_state(cfg)
    leaves = {path: jnp.asarray(a) for path, a in _leaves(nnx.state(model)).items()}
    _assert_same_state(state_from_leaves(abstract, leaves), nnx.state(model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))  # left unchanged

    missing = dict(leaves)
    del missing[("text", "layers", "up_w")]
    with pytest.raises(StateLeafError, match=r"missing .*text\.layers\.up_w"):
        state_from_leaves(abstract, missing)
    wrong = {**leaves, ("vision", "merger_fc1_b"): jnp.zeros((3,))}
    with pytest.raises(StateLeafError, match=r"vision\.merger_fc1_b: expected shape \(\d+,\), got \(3,\)"):
        state_from_leaves(abstract, wrong)
    extra = {**leaves, ("text", "bias"): jnp.zeros((3,))}
    with pytest.raises(StateLeafError, match=r"unexpected .*text\.bias"):
        state_from_leaves(abstract, extra)
    # model_from_state checks the same way against the config.
    assert isinstance(model_from_state(cfg, nnx.state(model)), Qwen25VLModel)
    with pytest.raises(StateLeafError, match=r"missing .*text\.lm_head"):
        model_from_state(cfg, init_params(tiny_config(tie_word_embeddings=True), jax.random.key(0)))


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_round_trip_is_exact(tied, tmp_path):
    cfg = tiny_config(tie_word_embeddings=tied)
    state = nnx.state(Qwen25VLModel(cfg, rngs=nnx.Rngs(params=jax.random.key(5))))
    path = save_hf_checkpoint(tmp_path / "ckpt", cfg, state)
    loaded_cfg, loaded = load_hf_checkpoint(path)
    assert loaded_cfg == cfg
    _assert_same_state(loaded, state)
    rebuilt = model_from_state(loaded_cfg, loaded)
    _assert_same_state(nnx.state(rebuilt), state)
