"""config.json values, each read with its JSON type and its allowed range.

A bad value is one :class:`ConfigError` that names the field, the range and what was found, raised before
anything is built from it. Integers are JSON integers (an integral float such as ``28.0`` is taken, ``true``
and ``"28"`` are not); floats are finite numbers; booleans are ``true`` / ``false``. The upper bounds
(:data:`LIMITS`) lie far above every released Qwen2.5-VL (72B: 80 layers, hidden 8192, 64 heads,
vocabulary 152,064, 128,000 positions; vision depth 32) and refuse an absurd size (a million layers) at
once, instead of after building a million-layer table.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

_MISSING = object()

#: field name -> (lowest, highest) allowed value.
LIMITS: dict[str, tuple[float, float]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (2, 4096),
    "max_position_embeddings": (1, 1 << 24),
    "mrope_section": (0, 4096),
    "rope_theta": (1e-6, 1e12),
    "rms_norm_eps": (1e-12, 0.5),
    "depth": (1, 1024),
    "num_heads": (1, 1024),
    "out_hidden_size": (1, 1 << 16),
    "patch_size": (1, 1024),
    "spatial_merge_size": (1, 64),
    "temporal_patch_size": (1, 64),
    "window_size": (1, 1 << 16),
    "in_channels": (1, 64),
    "tokens_per_second": (1e-6, 1e6),
    "token_id": (0, (1 << 31) - 1),
    "layer_norm_eps": (1e-12, 0.5),
    "image_size": (1, 1 << 16),
    "num_frames": (1, 1024),
}


def text_stack_hub_fields(t) -> dict[str, Any]:
    """The decoder's fields in the Hub's spelling, the same for every Qwen2-style text stack (Qwen2.5-VL's LM,
    VideoLLaMA2's Mistral / Qwen2): ``t`` a ``TextConfig``."""
    return {
        "hidden_act": "silu",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "rope_theta": t.rope_theta,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
    }


class ConfigError(ValueError):
    """A config.json that lacks a needed field or holds an inconsistent one."""


def read_config_json(path: str | os.PathLike) -> tuple[str, Any]:
    """``(the file's path, its parsed JSON)`` of ``config.json`` (or the ``config.json`` inside a folder); a
    missing file or bad JSON is a :class:`ConfigError` naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return path, json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


class Fields:
    """Typed, range-checked reads of one JSON object (``where``: the prefix of its field names, e.g.
    ``"vision_config."``; ``source``: the file, for the message)."""

    def __init__(self, raw: Mapping[str, Any], where: str, source: str):
        self.raw, self.where, self.source = raw, where, source

    def _get(self, key: str, default):
        value = self.raw.get(key)
        if value is None:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: missing required field '{self.where}{key}'")
            return None if default is None else default
        return value

    def _bad(self, key: str, what: str, value) -> ConfigError:
        return ConfigError(f"{self.source}: field '{self.where}{key}' must be {what}, got {value!r:.60}")

    def integer(self, key: str, default=_MISSING, limit: str | None = None) -> int | None:
        value = self._get(key, default)
        return None if value is None else self.check_int(key, value, limit or key)

    def check_int(self, key: str, value, limit: str) -> int:
        lo, hi = LIMITS[limit]
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral or not lo <= value <= hi:
            raise self._bad(key, f"an integer in [{int(lo)}, {int(hi)}]", value)
        return int(value)

    def number(self, key: str, default=_MISSING) -> float:
        value = self._get(key, default)
        lo, hi = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi:
            raise self._bad(key, f"a number in [{lo:g}, {hi:g}]", value)
        return float(value)

    def boolean(self, key: str, default=_MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def integers(self, key: str, default=_MISSING, limit: str | None = None, length: int | None = None
                 ) -> tuple[int, ...]:
        """A list of integers (``length`` of them when given); a single integer counts as a list of one."""
        value = self._get(key, default)
        values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(values, (list, tuple)) or (length is not None and len(values) != length):
            raise self._bad(key, "a list of integers" + (f" of length {length}" if length else ""), value)
        return tuple(self.check_int(key, v, limit or key) for v in values)

    def obj(self, key: str) -> Mapping[str, Any] | None:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise self._bad(key, "an object", value)
        return value
