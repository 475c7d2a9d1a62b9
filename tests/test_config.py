"""Reading Qwen2.5-VL config.json files in both spellings, and the errors on bad ones."""

import json

import pytest

from models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig, tiny_config

# The Hub spelling of Qwen2.5-VL-7B-Instruct's config.json (text fields flat, rope_scaling).
HUB_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def _nested(hub: dict) -> dict:
    """The transformers-5 spelling: text fields under text_config, rope_parameters with rope_theta."""
    text_keys = ["hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
                 "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "vocab_size"]
    out = {k: v for k, v in hub.items() if k not in text_keys + ["rope_scaling", "rope_theta"]}
    out["text_config"] = {k: hub[k] for k in text_keys}
    out["text_config"]["rope_parameters"] = {
        "rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": hub["rope_theta"]}
    return out


def test_hub_spelling_7b():
    cfg = Qwen25VLConfig.from_hf_dict(HUB_7B)
    assert cfg.text.head_dim == 128
    assert cfg.text.num_kv_groups == 7
    assert cfg.text.mrope_section == (16, 24, 24)
    assert cfg.vision.head_dim == 80
    assert cfg.vision.patch_dim == 1176
    assert cfg.vision.tokens_per_second == 2.0
    assert cfg.vision.in_channels == 3
    assert cfg.eos_token_id == (151645,)
    assert not cfg.text.tie_word_embeddings


def test_nested_spelling_equals_hub_spelling():
    assert Qwen25VLConfig.from_hf_dict(_nested(HUB_7B)) == Qwen25VLConfig.from_hf_dict(HUB_7B)


def test_round_trip_through_hf_dict(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert Qwen25VLConfig.from_json(tmp_path) == cfg


def test_config_is_hashable_for_jit():
    assert hash(tiny_config()) == hash(tiny_config())


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_text_field_is_named(field):
    raw = dict(HUB_7B)
    del raw[field]
    with pytest.raises(ConfigError, match=f"'{field}'"):
        Qwen25VLConfig.from_hf_dict(raw)


def test_missing_vision_field_is_named():
    raw = json.loads(json.dumps(HUB_7B))
    del raw["vision_config"]["depth"]
    with pytest.raises(ConfigError, match=r"'vision_config\.depth'"):
        Qwen25VLConfig.from_hf_dict(raw)


def test_missing_mrope_section_is_named():
    raw = dict(HUB_7B)
    raw["rope_scaling"] = {"type": "default"}
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen25VLConfig.from_hf_dict(raw)


def test_inconsistent_mrope_section():
    raw = dict(HUB_7B)
    raw["rope_scaling"] = {"type": "mrope", "mrope_section": [16, 24, 20]}
    with pytest.raises(ConfigError, match=r"head_dim/2=64"):
        Qwen25VLConfig.from_hf_dict(raw)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        Qwen25VLConfig.from_json(tmp_path / "absent.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen25VLConfig.from_json(bad)
