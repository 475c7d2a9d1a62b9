"""Corrupt safetensors files and config.json values: one CheckpointError / ConfigError naming the file or
the field (and the allowed range), never a traceback or a silently accepted value; absurd sizes refused at
once."""

from __future__ import annotations

import json
import math
import os
import struct
import time

import jax
import numpy as np
import pytest

from models.qwen2_5_vl import CheckpointError, init_params, load_hf_checkpoint, save_hf_checkpoint, tiny_config
from models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig
from models.qwen2_5_vl.loader import SINGLE_FILE


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(int(np.random.default_rng().integers(1 << 30))))
    return save_hf_checkpoint(tmp_path_factory.mktemp("hf") / "m", cfg, params)


def _copy_with(hf, tmp_path, data: bytes) -> str:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(open(os.path.join(hf, "config.json"), "rb").read())
    (folder / SINGLE_FILE).write_bytes(data)
    return str(folder)


def _header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    n, _ = _header(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + n:]


def _corruptions(data: bytes) -> dict[str, bytes]:
    n, header = _header(data)
    name = next(k for k in header if k != "__metadata__")
    far = dict(header, **{name: dict(header[name], data_offsets=[0, 1 << 40])})
    return {
        "zero-byte": b"",
        "truncated": data[: len(data) - 1000],
        "header-only": data[: 8 + n],
        "huge-header-length": struct.pack("<Q", 1 << 62) + data[8:],
        "header-length-past-end": struct.pack("<Q", len(data)) + data[8:],
        "garbage-header": struct.pack("<Q", n) + np.random.default_rng().bytes(n) + data[8 + n:],
        "offsets-out-of-range": _with_header(data, far),
    }


@pytest.mark.parametrize("case", ["zero-byte", "truncated", "header-only", "huge-header-length",
                                  "header-length-past-end", "garbage-header", "offsets-out-of-range"])
def test_corrupt_safetensors_is_one_named_error(hf, tmp_path, case):
    data = open(os.path.join(hf, SINGLE_FILE), "rb").read()
    folder = _copy_with(hf, tmp_path, _corruptions(data)[case])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        load_hf_checkpoint(folder)
    assert SINGLE_FILE in str(err.value) and "\n" not in str(err.value)


def test_index_may_not_name_shards_outside_the_folder(hf, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(open(os.path.join(hf, "config.json"), "rb").read())
    os.symlink(os.path.join(hf, SINGLE_FILE), tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../outside.safetensors", "model.embed_tokens.weight": "/etc/hostname"}}))
    with pytest.raises(CheckpointError, match="lists shard .* which is not in"):
        load_hf_checkpoint(folder)


def _config(hf) -> dict:
    return json.load(open(os.path.join(hf, "config.json")))


BAD_VALUES = [
    ("num_attention_heads", 0, "'num_attention_heads' must be an integer in [1, 1024]"),
    ("num_key_value_heads", 0, "'num_key_value_heads' must be an integer in [1, 1024]"),
    ("num_key_value_heads", "2", "'num_key_value_heads' must be an integer"),
    ("rope_theta", float("nan"), "'rope_theta' must be a number in"),
    ("rope_theta", -1.0, "'rope_theta' must be a number in"),
    ("max_position_embeddings", -1, "'max_position_embeddings' must be an integer in [1,"),
    ("eos_token_id", "x", "'eos_token_id' must be a list of integers"),
    ("eos_token_id", [1, True], "'eos_token_id' must be an integer"),
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false"),
    ("vocab_size", 1e30, "'vocab_size' must be an integer in"),
    ("rms_norm_eps", 0, "'rms_norm_eps' must be a number in"),
    ("hidden_size", True, "'hidden_size' must be an integer"),
    ("rope_scaling", [16, 24, 24], "'rope_scaling' must be an object"),
]


@pytest.mark.parametrize("field,value,words", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_config_value_names_the_field_and_range(hf, field, value, words):
    raw = _config(hf)
    raw[field] = value
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("(", r"\(")) as err:
        Qwen25VLConfig.from_hf_dict(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value,words", [
    ("num_heads", 0, "'vision_config.num_heads' must be an integer in [1, 1024]"),
    ("depth", -3, "'vision_config.depth' must be an integer in [1, 1024]"),
    ("fullatt_block_indexes", [0, 99], "below depth="),
    ("tokens_per_second", math.inf, "'vision_config.tokens_per_second' must be a number"),
])
def test_bad_vision_value_names_the_field(hf, field, value, words):
    raw = _config(hf)
    raw["vision_config"][field] = value
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        Qwen25VLConfig.from_hf_dict(raw)


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"config"', "null", "[" * 50_000, '{"a": 1}',
                                  '{"vision_config": [], "vocab_size": 5}'])
def test_config_that_is_not_an_object_is_refused(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Qwen25VLConfig.from_json(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_absurd_layer_count_is_refused_at_once(hf, tmp_path):
    raw = _config(hf)
    raw["num_hidden_layers"] = 1e6
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    os.symlink(os.path.join(hf, SINGLE_FILE), folder / SINGLE_FILE)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"'num_hidden_layers' must be an integer in \[1, 1024\], got 1000000.0"):
        load_hf_checkpoint(folder)
    assert time.perf_counter() - t0 < 1.0
