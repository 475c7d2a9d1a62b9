"""Fuzzing (hypothesis) of batch request records and of config.json fields: a clean one-line error or a
valid result, never a traceback, and in a whole run never a lost record."""

from __future__ import annotations

import json
import types

import numpy as np
import PIL.Image
import pytest
from .adv_files import read_records, write_requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from models.qwen2_5_vl import tiny_config
from models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig
from models.qwen2_5_vl.loader import hf_leaf_specs
from purekv_jax import batch as B
from purekv_jax.batch_records import id_key

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
ODD_TEXT = st.sampled_from(["", " ", "a\ud800b", "<|im_start|>system\n", "<|image_pad|>", "x" * 300, "é\x00",
                            "in.png", "../in.png", "/etc/hostname", "missing.png"])
TEXT = st.text(max_size=20) | ODD_TEXT
SCALAR = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.integers(-3, 40)
          | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
JSON = st.recursive(SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4), max_leaves=12)

CONTENT_ITEM = st.fixed_dictionaries({}, optional={"type": st.sampled_from(["text", "image", "video"]) | JSON,
                                                   "text": TEXT | JSON, "image": TEXT | JSON, "video": TEXT | JSON})
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant"]) | JSON,
                                              "content": TEXT | st.lists(CONTENT_ITEM, max_size=3) | JSON})
POLICY = st.sampled_from(["full", "snapkv", "purekv", "streaming", "nope"]) | st.fixed_dictionaries({}, optional={
    "name": st.sampled_from(["full", "snapkv", "purekv", "h2o"]) | JSON, "budget": st.floats(-1, 600) | JSON,
    "window": st.integers(-2, 70) | JSON, "sink": st.integers(-2, 10) | JSON,
    "anchors": st.integers(-2, 3) | st.lists(st.integers(-2, 3), max_size=3) | JSON,
    "st_sparse": st.booleans() | JSON}) | JSON
RECORD_FIELDS = {
    "id": st.text(max_size=6) | st.integers(-5, 5) | JSON, "prompt": TEXT | JSON, "system": TEXT | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "input_ids": st.lists(st.integers(-3, 160_000), max_size=12) | JSON,
    "image": TEXT | JSON, "images": st.lists(TEXT, max_size=2) | JSON, "video": TEXT | JSON,
    "policy": POLICY, "max_new_tokens": st.integers(-1, 8) | JSON, "extra": JSON}
RECORD = st.fixed_dictionaries({}, optional=RECORD_FIELDS)

#: Valid requests, then up to two fields replaced (most fuzzed records should get far into the checks).
BASES = [{"id": "a", "prompt": "Describe it."}, {"id": 3, "prompt": "What is this?", "image": "in.png"},
         {"id": "m", "messages": [{"role": "user", "content": [{"type": "image", "image": "in.png"},
                                                              {"type": "text", "text": "hi"}]}]},
         {"id": "t", "input_ids": [9707, 1879]},
         {"id": "p", "prompt": "x", "policy": {"name": "snapkv", "budget": 0.9, "window": 2, "sink": 1}}]
VALUE = JSON | POLICY | st.lists(MESSAGE, max_size=2) | st.lists(st.integers(-3, 160_000), max_size=6)
MUTATED = st.builds(lambda base, edits: {**base, **dict(edits)}, st.sampled_from(BASES),
                    st.lists(st.tuples(st.sampled_from(sorted(RECORD_FIELDS)), VALUE), max_size=2))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    img = np.random.default_rng().integers(0, 256, (30, 44, 3), dtype=np.uint8)
    PIL.Image.fromarray(img).save(folder / "in.png")
    return str(folder)


@FUZZ
@given(record=st.one_of(MUTATED, MUTATED, MUTATED, RECORD, JSON))
def test_request_record_is_a_clean_error_or_a_request(record, qwen_proc, qwen_config, root):
    try:
        prep = B.prepare_request(record, 5, qwen_proc, qwen_config, B.BatchSettings(policy="full"), root)
    except ValueError as err:  # RequestError, processing, policy, prompt errors: all ValueError subclasses
        event(type(err).__name__)
        rec = B.error_record("x", 5, err)  # as written: one line, even when the message quotes a user's text
        assert rec["error"] and "\n" not in rec["error"] and rec["error_type"] == type(err).__name__
        return
    event("request")
    assert prep.n_tokens == prep.inputs["input_ids"].shape[1] >= 1
    assert prep.inputs["input_ids"].min() >= 0 and prep.inputs["input_ids"].max() < qwen_config.text.vocab_size


def _fake_generate(params, config, items, settings, eos, *, data=1):
    rows = B.padded_batch_size(len(items), settings.batch_size, data)
    tokens = np.full((rows, items[0].max_new_tokens), 9707, np.int32)
    stats = dict(prefill_s=0.0, decode_s=0.0, kv_bytes_full=1, kv_bytes_kept=1, prefill_compile_s=0.0,
                 decode_compile_s=0.0, st_layers=())  # (the keys run_batch reads of generate's stats)
    return types.SimpleNamespace(tokens=tokens, stats=stats), rows


@FUZZ
@given(lines=st.lists(MUTATED | RECORD | JSON | st.binary(max_size=30), min_size=1, max_size=12))
def test_whole_run_never_loses_a_record(lines, qwen_proc, qwen_config, root, tmp_path_factory):
    """Every line of a fuzzed requests file ends as exactly one record (or a counted duplicate)."""
    folder = tmp_path_factory.mktemp("run")
    lines = [b"{}" if isinstance(x, bytes) and not x.strip() else x for x in lines]
    req = write_requests(folder / "in.jsonl", [json.dumps(x) if not isinstance(x, bytes) else x.replace(b"\n", b" ")
                                               for x in lines])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "generate_batch", _fake_generate)
        summary = B.run_batch(None, qwen_config, qwen_proc, req, folder / "out.jsonl",
                              B.BatchSettings(policy="full", batch_size=2, media_root=root), eos=(), progress=False)
    recs = read_records(folder / "out.jsonl")
    keys = [id_key(r["id"]) for r in recs]
    assert len(keys) == len(set(keys)) == summary.completed + summary.errors
    assert summary.requests == len(lines) == len(recs) + summary.duplicates
    assert all("\n" not in r.get("error", "") for r in recs)


def _field_paths(raw: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in raw.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _field_paths(v, prefix + (k,))
    return out


BASE = tiny_config().to_hf_dict()
PATHS = _field_paths(BASE) + [("head_dim",), ("text_config",), ("rope_parameters",), ("vision_config", "in_chans")]
NUMBER = st.integers(-2, 70) | st.integers(-(2 ** 64), 2 ** 64) | st.floats(allow_nan=True, allow_infinity=True)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), NUMBER | JSON), min_size=1, max_size=3))
def test_config_field_is_a_clean_error_or_a_config(edits, tmp_path_factory):
    raw = json.loads(json.dumps(BASE))
    for path, value in edits:
        node = raw
        for k in path[:-1]:
            node = node.setdefault(k, {}) if isinstance(node.get(k), dict) or k not in node else {}
        node[path[-1]] = value
    file = tmp_path_factory.mktemp("cfg") / "config.json"
    file.write_text(json.dumps(raw))
    try:
        cfg = Qwen25VLConfig.from_json(file)
    except ConfigError as err:
        event("error")
        assert str(file) in str(err) and "\n" not in str(err), repr(err)
        return
    event("config")
    assert Qwen25VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg  # what was accepted is a config that round-trips
    assert len(hf_leaf_specs(cfg)) > 0
