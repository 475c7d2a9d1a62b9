"""``purekv batch``: bucketing helpers, the resume rule, batch tokens equal one-request generate, and the
command killed (SIGKILL) in the middle and run again writing every request exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import jsonl_records, sample_video_path
from models.qwen2_5_vl import init_params, tiny_config
from purekv_jax import batch as B
from purekv_jax.config import PureKVConfig
from purekv_jax.generation import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ helpers
def test_read_done_ids_repairs_a_cut_line(tmp_path):
    out = tmp_path / "out.jsonl"
    assert B.read_done_ids(out) == set()
    out.write_text('{"id": "a", "text": "x"}\n{"id": 7, "error": "e"}\nnot json\n{"id": "b", "te')
    assert B.read_done_ids(out) == {'"a"', "7"}  # ids keep their JSON type: 7 is not "7"
    assert out.read_text().endswith("not json\n")  # the cut line is gone, so appending starts a fresh line
    with B.ResultWriter(out) as w:
        w.write({"id": "b", "text": "y"})
    assert B.read_done_ids(out) == {'"a"', "7", '"b"'}


def test_padded_batch_size():
    assert [B.padded_batch_size(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert B.padded_batch_size(3, 8, data=4) == 4 and B.padded_batch_size(1, 8, data=4) == 4
    assert B.padded_batch_size(5, 6, data=4) == 8  # more rows than the batch size only to fill the data axis


def test_resolve_policy_overrides():
    s = B.BatchSettings(policy="purekv", budget=0.2, window=8, sink=2, anchors=(1,))
    pol, label = B.resolve_policy(None, s)
    assert pol == PureKVConfig(budget=0.2, window=8, sink=2, anchor_layers=(1,)) and label == "purekv budget=0.2"
    assert B.resolve_policy("full", s) == (None, "full")
    pol, _ = B.resolve_policy({"name": "snapkv", "budget": 48}, s)
    assert pol.base == "snapkv" and not pol.cross_layer and pol.budget == 48 and pol.window == 8
    with pytest.raises(B.RequestError, match="unknown field"):
        B.resolve_policy({"name": "snapkv", "bugdet": 0.1}, s)
    with pytest.raises(ValueError, match="unknown --policy"):
        B.resolve_policy("nope", s)


def test_collate_left_pads_and_copies_the_first_row():
    mk = lambda i, n: B.Prepared(i, i, {"input_ids": np.arange(1, n + 1)[None]}, n, None, "full", 4, ())  # noqa: E731
    out = B.collate([mk(0, 3), mk(1, 5)], 4)
    assert out["input_ids"].shape == (4, 5)
    assert out["input_ids"][0].tolist() == [0, 0, 1, 2, 3] and out["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert out["input_ids"][1].tolist() == [1, 2, 3, 4, 5] and out["input_ids"][3].tolist() == [0, 0, 1, 2, 3]


# ------------------------------------------------------------------------------------------ in process
def test_batch_tokens_equal_single_requests(tmp_path):
    """Token-id requests (no tokenizer): three prompts of one bucket run as one padded batch of 4; each
    row's tokens equal generate on that prompt alone (full cache, greedy); bad requests become records."""
    cfg = tiny_config()
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(3))
    rng = np.random.default_rng(1)
    prompts = {f"r{i}": rng.integers(0, 990, n).tolist() for i, n in enumerate((20, 35, 50))}
    lines = [json.dumps({"id": k, "input_ids": v, "policy": "full"}) for k, v in prompts.items()]
    lines += [json.dumps({"id": "neg", "input_ids": [1, -2]}), json.dumps({"id": "txt", "prompt": "needs a tokenizer"}),
              json.dumps({"id": "r0", "input_ids": [1, 2]}), "[1, 2]"]
    req = tmp_path / "in.jsonl"
    req.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    settings = B.BatchSettings(policy="full", batch_size=4, max_new_tokens=8)
    summary = B.run_batch(params, cfg, None, req, out, settings, eos=(), progress=False)
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert summary.completed == 3 and summary.errors == 3 and summary.duplicates == 1 and summary.batches == 1
    assert summary.padded_rows == 1 and summary.generated_tokens == 24
    assert recs["neg"]["error_type"] == "RequestError" and "outside [0, 1024)" in recs["neg"]["error"]
    assert "no tokenizer" in recs["txt"]["error"] and recs["line-7"]["error_type"] == "RequestError"
    for k, ids in prompts.items():
        single = generate(params, cfg, np.asarray([ids], np.int32), max_new_tokens=8, eos_token_id=())
        assert recs[k]["tokens"] == single.tokens[0].tolist(), k
        assert recs[k]["batch"]["padded_rows"] == 4 and recs[k]["finish_reason"] == "length"
    # a rerun has nothing left to do
    again = B.run_batch(params, cfg, None, req, out, settings, eos=(), progress=False)
    assert again.completed == again.errors == 0 and again.skipped == 6


# ------------------------------------------------------------------------------------------ the command
def test_killed_and_restarted_writes_every_request_once(tiny_model_dir, tmp_path):
    short = lambda i: {"id": f"a{i}", "prompt": f"Say something about {i}."}  # noqa: E731  (bucket 64)
    longer = lambda i: {"id": f"b{i}", "prompt": "Count: " + " ".join(str(i + j) for j in range(40))}  # bucket 128
    reqs = [short(1), short(2), {"id": "e-missing", "prompt": "x", "video": str(tmp_path / "nope.mp4")},
            short(3), short(4), longer(1), longer(2), {"id": "e-long", "prompt": "word " * 300},
            longer(3), longer(4), None, {"id": "v1", "prompt": "Describe the video.", "video": "clip.mp4"},
            short(5), {"id": "a1", "prompt": "a duplicate id"}, short(6),
            {"id": "p1", "prompt": "Say something about 1.", "policy": {"name": "snapkv", "budget": 1.0}}]
    shutil.copy(sample_video_path(), tmp_path / "clip.mp4")  # media lie under --media-root, the requests' folder
    req = tmp_path / "in.jsonl"
    req.write_text("".join(("{broken json" if r is None else json.dumps(r)) + "\n" for r in reqs))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "purekv_jax.cli", "batch", "--model", tiny_model_dir, "--requests", str(req),
           "--out", str(out), "--batch-size", "2", "--max-new-tokens", "4", "--policy", "full", "--window", "8",
           "--max-prompt-tokens", "200", "--fps", "2", "--max-frames", "4", "--max-pixels", "12544", "-q"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),  # the rerun reuses the first run's programs
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    expected = {"a1", "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b3", "b4", "e-missing", "e-long", "line-11", "v1", "p1"}

    # first run: SIGKILL as soon as two results are written (the next bucket is still compiling)
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if sum("text" in r for r in jsonl_records(out)) >= 2:
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, first.stderr.read().decode()[-3000:]
    written = jsonl_records(out)
    assert 2 <= len(written) < len(expected), [r["id"] for r in written]
    # a write cut by a crash: a partial last line (for an id not yet written) must not survive or count
    missing = sorted(expected - {r["id"] for r in written})
    with open(out, "a") as f:
        f.write(json.dumps({"id": missing[0], "text": "cut"})[:15])

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(written)} already in the output" in second.stderr and "1 duplicate ids skipped" in second.stderr
    recs = jsonl_records(out)  # every line parses: the cut line was truncated away
    ids = [r["id"] for r in recs]
    assert sorted(ids) == sorted(expected), ids  # each exactly once
    by_id = {r["id"]: r for r in recs}
    assert by_id["e-missing"]["error_type"] == "MediaFileError"
    assert "more than --max-prompt-tokens 200" in by_id["e-long"]["error"]
    assert by_id["line-11"]["error_type"] == "RequestError"
    for k in expected - {"e-missing", "e-long", "line-11"}:
        assert len(by_id[k]["tokens"]) <= 4 and isinstance(by_id[k]["text"], str), by_id[k]
    assert by_id["v1"]["prompt_tokens"] > 20 and by_id["p1"]["policy"].startswith("snapkv")
    assert by_id["a1"]["text"] != "cut"
