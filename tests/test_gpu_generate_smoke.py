"""``benchmarks/gpu_generate.py --smoke`` (the end-to-end generate benchmark the GPU session runs) still runs
on the CPU: every row completes without error, writes its JSON and markdown, and the KV columns say what
the policies promise (full = 1x, budget 0.2 = 5x less; ST-SpAttn rows report their ST layers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_generate_smoke(tmp_path):
    out = tmp_path / "gg"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_generate.py"), "--smoke", "--sizes", "640", "--reps", "1",
         "--new", "4", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gg.json").read_text())
    rows = {r["key"]: r for r in doc["results"]}
    assert set(rows) == {"full", "purekv", "st-xla", "paper", "full-sdpa", "st-xla-sdpa"}
    for key, r in rows.items():
        assert "error" not in r and "skipped" not in r, (key, r)
        assert r["prompt_len"] == r["N"] == 640 and r["prefill_s"] > 0 and r["decode_steps"] == 3
        assert r["kv_bytes_full"] == rows["full"]["kv_bytes_kept"]
        if key.startswith("full"):
            assert r["kv_compression"] == 1.0 and r["st_layers"] == []
        else:
            assert abs(r["kv_compression"] - 5.0) < 0.05, (key, r["kv_compression"])
        assert r["st_layers"] == ([3] if key.startswith("st-") else [])
    md = (tmp_path / "gg.md").read_text()
    assert "| 640 | 25x4x6 | full cache (policy=None) |" in md and "error" not in md
