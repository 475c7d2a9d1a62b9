"""Poisoned batch requests: every one becomes its own error record naming the field, the run always
finishes, no record is lost, and a rerun has nothing left to do."""

from __future__ import annotations

import json

import numpy as np
import pytest
from .adv_files import read_records, write_requests

from purekv_jax import batch as B
from purekv_jax.batch_records import RequestError, id_key, parse_line
from purekv_jax.checkpoint import load_checkpoint
from purekv_jax.requests import make_processor

DEEP = "[" * 100_000 + "]" * 100_000

# (request, words the error must hold): type-confused fields, each refused with the field named.
POISONED = [
    ({"id": "w", "prompt": "hi", "policy": {"window": None}}, "policy.window"),
    ({"id": "w2", "prompt": "hi", "policy": {"window": 3.7}}, "policy.window"),
    ({"id": "m", "messages": [1, 2]}, "messages[0]"),
    ({"id": "m2", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "content[0].text"),
    ({"id": "m3", "messages": [{"role": 7, "content": "x"}]}, "messages[0].role"),
    ({"id": "m4", "messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
    ({"id": "m5", "messages": [{"role": "user", "content": [{"type": "image", "image": ["a"]}]}]}, ".image"),
    ({"id": "s", "prompt": "hi", "system": 5}, "'system'"),
    ({"id": "p", "prompt": ["hi"]}, "'prompt'"),
    ({"id": "st", "prompt": "hi", "policy": {"st_sparse": "no"}}, "policy.st_sparse"),
    ({"id": "st1", "prompt": "hi", "policy": {"st_sparse": 1}}, "policy.st_sparse"),
    ({"id": "b", "prompt": "hi", "policy": {"budget": True}}, "policy.budget"),
    ({"id": "a", "prompt": "hi", "policy": {"anchors": ["x"]}}, "policy.anchors"),
    ({"id": "n", "prompt": "hi", "policy": {"name": 3}}, "policy.name"),
    ({"id": "big", "input_ids": [1, 2 ** 70]}, "outside [0,"),
    ({"id": "neg", "input_ids": [-1]}, "outside [0,"),
    ({"id": "mn", "prompt": "hi", "max_new_tokens": "4"}, "max_new_tokens"),
    ({"id": "img", "prompt": "hi", "images": {"a": 1}}, "'images'"),
    ({"id": "sur", "prompt": "a\ud800b"}, "not valid UTF-8"),
    ({"id": True, "prompt": "hi"}, "id must be"),
]


@pytest.mark.parametrize("req,words", POISONED, ids=[str(r[0]["id"]) for r in POISONED])
def test_poisoned_field_is_a_named_request_error(req, words, qwen_proc, qwen_config, tmp_path):
    with pytest.raises(ValueError) as err:
        B.prepare_request(req, 3, qwen_proc, qwen_config, B.BatchSettings(policy="full"), str(tmp_path))
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_lines_that_are_not_utf8_or_nest_too_deep_are_named():
    err = parse_line(b'{"id": "x", "prompt": "caf\xe9"}\n', 12)
    assert isinstance(err, RequestError) and "line 12: not UTF-8 (byte 0xe9 at column 27)" in str(err)
    err = parse_line(DEEP.encode(), 4)
    assert isinstance(err, RequestError) and "line 4: JSON nested too deeply" in str(err)


def test_ids_keep_their_json_type():
    assert id_key(7) != id_key("7") and id_key("line-3") == '"line-3"'


def test_strict_booleans_and_integers_pass_when_right(qwen_proc, qwen_config, tmp_path):
    rng = np.random.default_rng(5)
    words = " ".join(rng.choice(["red", "cat", "sky", "run"], 6))
    req = {"id": 9, "prompt": words, "policy": {"name": "snapkv", "budget": 0.5, "window": 2, "sink": 1,
                                                   "anchors": [1], "st_sparse": False}, "max_new_tokens": 2}
    prep = B.prepare_request(req, 1, qwen_proc, qwen_config, B.BatchSettings(), str(tmp_path))
    assert prep.id == 9 and prep.policy.window == 2 and not prep.policy.st_sparse


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir):
    config, params = load_checkpoint(tiny_model_dir)
    return config, params, make_processor(tiny_model_dir)


def test_poisoned_file_runs_to_the_end_and_loses_nothing(tiny_run, tmp_path):
    """Poisoned lines among good ones: every line gets exactly one record (good ones a result, ids "7" and 7
    both), the run finishes, and the rerun skips them all."""
    config, params, proc = tiny_run
    rng = np.random.default_rng(17)
    good = [{"id": "7", "prompt": " ".join(rng.choice(["blue", "tree", "fast"], 4))},
            {"id": 7, "prompt": " ".join(rng.choice(["green", "road", "slow"], 4))},
            {"id": "ids", "input_ids": rng.integers(0, 150_000, 9).tolist()}]
    lines = [good[0], *[r for r, _ in POISONED], b'{"id": "bytes", "prompt": "\xff\xfe"}', DEEP, good[1],
             "[1, 2]", good[2]]
    req = write_requests(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    settings = B.BatchSettings(policy="full", batch_size=2, max_new_tokens=2)
    summary = B.run_batch(params, config, proc, req, out, settings, eos=(), progress=False)
    recs = read_records(out)
    assert summary.completed == 3 and summary.errors == len(lines) - 3 == len(recs) - 3
    keys = [id_key(r["id"]) for r in recs]
    assert len(keys) == len(set(keys)), keys  # one record per line, "7" and 7 apart
    by_key = {id_key(r["id"]): r for r in recs}
    assert "tokens" in by_key['"7"'] and "tokens" in by_key["7"] and "tokens" in by_key['"ids"']
    non_utf8 = by_key[id_key(f"line-{len(POISONED) + 2}")]
    assert "not UTF-8" in non_utf8["error"] and non_utf8["index"] == len(POISONED) + 2
    assert all("\n" not in r.get("error", "") for r in recs)
    again = B.run_batch(params, config, proc, req, out, settings, eos=(), progress=False)
    assert again.completed == again.errors == 0 and again.skipped == len(lines)
    assert json.loads(open(out, "rb").read().splitlines()[-1])  # every line is still JSON
