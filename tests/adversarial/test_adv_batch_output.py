"""A second process on the same ``--out``, ``--out`` equal to ``--requests``, records that are not valid
Unicode, and a file of bad lines that must not cost one fsync each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from .adv_files import read_records, write_requests

from models.qwen2_5_vl import tiny_config
from purekv_jax import batch as B
from purekv_jax import batch_output, checkpoint
from purekv_jax.batch_output import OutputFileError, OutputLockedError, ResultWriter
from purekv_jax.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _holder(out, ready):
    """A separate process holding the output lock (as a running ``purekv batch`` does) until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from purekv_jax.batch_output import ResultWriter
        w = ResultWriter({str(out)!r})
        open({str(ready)!r}, "w").close()
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(600):
        if os.path.exists(ready):
            return proc
        proc.poll()
        assert proc.returncode is None
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the lock holder did not start")


def test_second_run_on_the_same_out_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    cfg = tiny_config()
    req = write_requests(tmp_path / "in.jsonl", [{"id": f"r{i}", "input_ids": rng.integers(0, 990, 5).tolist()}
                                                  for i in range(4)])
    out = tmp_path / "out.jsonl"
    holder = _holder(out, tmp_path / "ready")
    try:
        with pytest.raises(OutputLockedError, match="being written by another purekv batch run"):
            B.run_batch(None, cfg, None, req, out, B.BatchSettings(policy="full"), eos=(), progress=False)
        with pytest.raises(OutputLockedError):
            batch_output.probe_output_lock(out)
    finally:
        holder.kill()
        holder.wait()
    assert out.read_bytes() == b""  # nothing written by the refused run
    with ResultWriter(out) as w:  # the lock died with its process
        w.write({"id": "x"})


def test_out_equal_to_requests_is_refused(tmp_path):
    req = write_requests(tmp_path / "in.jsonl", [{"id": "a", "input_ids": [1, 2]}])
    before = open(req, "rb").read()
    os.symlink(req, tmp_path / "link.jsonl")
    os.link(req, tmp_path / "hard.jsonl")
    for out in (req, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", str(tmp_path / "." / "in.jsonl")):
        with pytest.raises(OutputFileError, match="is the requests file"):
            B.run_batch(None, tiny_config(), None, req, out, B.BatchSettings(policy="full"), progress=False)
    with pytest.raises(OutputFileError, match="is a folder"):
        batch_output.check_output_path(req, tmp_path)
    assert open(req, "rb").read() == before


def test_command_refuses_bad_outputs_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def fail(*a, **k):
        raise AssertionError("the weights were read before the files were checked")

    monkeypatch.setattr(sys.modules["purekv_jax.commands.batch"], "load_checkpoint", fail)
    monkeypatch.setattr(checkpoint, "load_checkpoint", fail)
    req = write_requests(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hello"}])
    base = ["batch", "--model", tiny_model_dir, "--requests", req, "-q"]
    cases = [(["--out", req], "is the requests file"),
             (["--out", str(tmp_path / "o.jsonl"), "--summary-json", str(tmp_path / "no" / "s.json")],
              "--summary-json"),
             (["--out", str(tmp_path / "in.jsonl" / "o.jsonl")], "--out"),  # a folder under a file
             (["--out", str(tmp_path / "o.jsonl"), "--media-root", str(tmp_path / "none")], "--media-root")]
    for extra, words in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("purekv batch: error:") and words in err and "\n" not in err, err
    assert not os.path.exists(tmp_path / "o.jsonl")  # the writability probe leaves no file behind
    assert main(base + ["--out", str(tmp_path / "new" / "o.jsonl"), "--summary-json", str(tmp_path / "no" / "s")]) == 2
    assert os.path.isdir(tmp_path / "new") and not os.listdir(tmp_path / "new")  # a new --out folder is made


def test_records_with_lone_surrogates_stay_utf8(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(out) as w:
        w.write({"id": "a\udc80", "error": "x"})
        w.write({"id": "é", "error": "y"})
    data = out.read_bytes()
    data.decode("utf-8")  # valid UTF-8 throughout
    assert [r["id"] for r in read_records(out)] == ["a\udc80", "é"]
    assert "é".encode() in data  # ordinary text is not escaped


def test_bad_lines_do_not_cost_one_fsync_each(tmp_path, monkeypatch):
    n = 3000
    rng = np.random.default_rng(8)
    lines = [{"id": f"bad{i}", "input_ids": [int(x) for x in -rng.integers(1, 9, 2)]} for i in range(n)]
    req = write_requests(tmp_path / "in.jsonl", lines)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    summary = B.run_batch(None, tiny_config(), None, req, tmp_path / "out.jsonl", B.BatchSettings(policy="full"),
                          eos=(), progress=False)
    assert summary.errors == n and len(read_records(tmp_path / "out.jsonl")) == n
    assert len(calls) < 50, len(calls)  # once a second at most, plus the close (was: one per record)
    assert json.loads((tmp_path / "out.jsonl").read_text().splitlines()[-1])["error_type"] == "RequestError"
