"""Per-layer, per-q-head ST-SpAttn patterns as static data, and their JSON file (calibration's output).

In memory: ``[layer] -> None | [q head] -> HeadPattern`` as nested tuples (hashable: a static jit
argument). On disk: a JSON object ``{"format": HEAD_PATTERNS_FORMAT, "head_patterns": [null |
[pattern name, ...], ...], ...}`` (extra fields are metadata), or a bare list of per-layer lists.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from kernels.block_sparse_attention.layout import HeadPattern

__all__ = ["HEAD_PATTERNS_FORMAT", "normalize_layer_patterns", "save_head_patterns", "load_head_patterns"]

HEAD_PATTERNS_FORMAT = "purekv-st-head-patterns/1"


def normalize_layer_patterns(pats) -> tuple:
    """``[layer] -> None | [head] -> pattern`` (names, ints or HeadPattern) to a hashable tuple."""
    if isinstance(pats, (str, bytes)) or not hasattr(pats, "__iter__"):
        raise ValueError(f"expected one entry per decoder layer (a list), got {pats!r}")
    out = []
    for l, entry in enumerate(pats):
        if entry is None:
            out.append(None)
            continue
        if isinstance(entry, (str, bytes, int)) or not hasattr(entry, "__iter__"):
            raise ValueError(f"layer {l}: expected None or one pattern per q head, got {entry!r}")
        try:
            out.append(tuple(HeadPattern.parse(p) for p in entry))
        except ValueError as e:
            raise ValueError(f"layer {l}: {e}") from None
    return tuple(out)


def save_head_patterns(path, head_patterns, *, errors=None, candidates=None, **meta) -> None:
    """Writes calibrated patterns as JSON (pattern names; ``null`` for layers without ST).

    ``errors`` ``[layers, candidates, q heads]`` (rows with a NaN are written as ``null``),
    ``candidates`` and ``meta`` are stored alongside. The file is replaced atomically."""
    pats = normalize_layer_patterns(head_patterns)
    doc: dict[str, Any] = {
        "format": HEAD_PATTERNS_FORMAT,
        "head_patterns": [None if p is None else [x.name.lower() for x in p] for p in pats],
    }
    if candidates is not None:
        doc["candidates"] = [HeadPattern.parse(c).name.lower() for c in candidates]
    if errors is not None:
        e = np.asarray(errors, np.float64)
        doc["errors"] = [None if not np.isfinite(el).all() else el.round(6).tolist() for el in e]
    doc.update(meta)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def load_head_patterns(path) -> tuple:
    """Reads a JSON written by :func:`save_head_patterns` (or a bare list of per-layer lists).

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for bad contents."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"head patterns file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"head patterns file {path} is not valid JSON: {e}") from None
    if isinstance(doc, dict):
        if "head_patterns" not in doc:
            raise ValueError(f"head patterns file {path} has no 'head_patterns' field")
        doc = doc["head_patterns"]
    try:
        return normalize_layer_patterns(doc)
    except ValueError as e:
        raise ValueError(f"head patterns file {path}: {e}") from None
