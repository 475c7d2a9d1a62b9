"""The Python ``generate`` and the commands around it: every bad input refused before any device work (the
prefill is never compiled), and unwritable output paths found before the weights are read."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from .adv_files import write_video

from models.qwen2_5_vl import init_params, tiny_config
from purekv_jax import checkpoint, generation
from purekv_jax.cli import main
from purekv_jax.generation import GenerateError, generate


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, init_params(cfg, jax.random.key(int(np.random.default_rng().integers(1 << 30))))


@pytest.fixture
def no_device_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a program was compiled for a bad input")

    monkeypatch.setattr(generation, "compiled", fail)


def _ids(cfg, n=12):
    return np.random.default_rng().integers(0, cfg.vision_start_token_id - 10, (2, n))


@pytest.mark.parametrize("change,words", [
    (lambda ids, v: ids.__setitem__((0, 3), v), "token id 1024, outside the vocabulary [0, 1024)"),
    (lambda ids, v: ids.__setitem__((1, 0), -5), "token id -5, outside the vocabulary"),
])
def test_ids_outside_the_vocabulary(tiny, no_device_work, change, words):
    cfg, params = tiny
    ids = _ids(cfg)
    change(ids, cfg.text.vocab_size)
    with pytest.raises(GenerateError, match=words.replace("[", r"\[").replace(")", r"\)")):
        generate(params, cfg, ids, max_new_tokens=2)


def test_padding_may_hold_anything(tiny):
    """Only real tokens are checked: a padded slot's id is never read."""
    cfg, params = tiny
    ids, mask = _ids(cfg), np.ones((2, 12), np.int32)
    ids[0, :3], mask[0, :3] = -1, 0
    assert generate(params, cfg, ids, mask, max_new_tokens=2).tokens.shape == (2, 2)


@pytest.mark.parametrize("kwargs,words", [
    (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), "top_p=0.0 must be None or a number in"),
    (dict(top_p=-1), "top_p=-1"),
    (dict(top_p=float("nan")), "top_p=nan"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=0), "top_k=0 must be None or an int >= 1"),
    (dict(top_k=-3), "top_k=-3"),
    (dict(prompt_bucket=0), "prompt_bucket=0 must be an int >= 1"),
    (dict(new_tokens_bucket=0), "new_tokens_bucket=0 must be an int >= 1"),
    (dict(cache_capacity=0), "cache_capacity=0 must be an int >= 1"),
])
def test_sampling_and_bucket_values(tiny, no_device_work, kwargs, words):
    cfg, params = tiny
    with pytest.raises(GenerateError, match=words.replace("(", r"\(")):
        generate(params, cfg, _ids(cfg), max_new_tokens=2, **kwargs)


# ------------------------------------------------------------------------------------------ the commands
@pytest.fixture
def no_weights_read(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the weights were read before the input was checked")

    monkeypatch.setattr(checkpoint, "load_checkpoint", fail)
    monkeypatch.setattr("purekv_jax.commands.calibrate.load_checkpoint", fail)


def test_prompt_that_is_not_utf8(tiny_model_dir, no_weights_read, capsys):
    bad = os.fsdecode(b"what is \xff\xfe here?")  # how Python hands over an undecodable argv byte
    for flag in ("--prompt", "--system"):
        argv = ["generate", "--model", tiny_model_dir, "--prompt", "hello", "--policy", "full"] + [flag, bad]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("purekv generate: error:") and f"{flag} is not valid UTF-8" in err, err
        assert "\n" not in err


def test_unwritable_outputs_found_before_the_work(tiny_model_dir, tmp_path, no_weights_read, capsys):
    video = write_video(tmp_path / "clip.mp4", np.random.default_rng())
    for out in (tmp_path / "missing" / "p.json", tmp_path):
        argv = ["calibrate", "--model", tiny_model_dir, "--video", video, "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("purekv calibrate: error: --out") and "\n" not in err, err
