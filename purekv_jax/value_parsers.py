"""Values written as text (command-line flags, batch request fields) -> the numbers the library takes.

The errors name the flag, so ``purekv generate``, ``purekv batch`` and a batch request's error record say the
same thing. :class:`ValueParseError` is both an ``argparse.ArgumentTypeError`` (argparse prints its message
when a parser is an argument's ``type``) and a ``ValueError`` (the library's user errors).
"""

from __future__ import annotations

import argparse
import math

from .processing.image import PIXELS_LIMIT


class ValueParseError(argparse.ArgumentTypeError, ValueError):
    """A value that does not parse or lies outside its range (raised before any weights are read)."""


def parse_budget(text: str) -> float | int:
    """``--budget``: ``0.2`` -> fraction, ``512`` -> count, ``1`` / ``1.0`` -> everything (fraction 1)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueParseError(f"--budget {text!r} is not a number; give a fraction in (0, 1] or a count > 1") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueParseError(f"--budget {text} is outside (0, 1]; give a fraction in (0, 1] or a count > 1")
    if value <= 1:
        return float(value)
    if not value.is_integer() or any(c in text for c in ".eE"):
        raise ValueParseError(
            f"--budget {text} is outside (0, 1]; a budget above 1 is a token count and must be an integer"
        )
    return int(value)


def parse_kv_bits(text: str) -> int | str:
    """``--kv-bits``: ``8``, ``4``, ``2`` or ``auto``."""
    if text == "auto":
        return text
    if text not in ("8", "4", "2"):
        raise ValueParseError(f"--kv-bits {text!r} is not one of 8, 4, 2, auto")
    return int(text)


def parse_pixels(text: str) -> int:
    """``--max-pixels`` / ``--min-pixels``: an integer, or a product such as ``448*448`` / ``448x448``."""
    parts = text.lower().replace("x", "*").split("*")
    try:
        value = math.prod(int(p) for p in parts)
    except ValueError:
        raise ValueParseError(f"{text!r} is not a pixel count (e.g. 200704 or 448*448)") from None
    if not 0 < value <= PIXELS_LIMIT:
        raise ValueParseError(f"{text} must lie in [1, {PIXELS_LIMIT}] pixels (8192*8192)")
    return value


def parse_anchors(text: str) -> tuple[int, ...]:
    """``--anchors``: comma-separated 0-based layer numbers, e.g. ``2`` or ``1,8``."""
    try:
        return tuple(int(a) for a in text.replace(" ", "").split(",") if a)
    except ValueError:
        raise ValueParseError(f"{text!r} is not a comma-separated list of layer numbers (e.g. 2 or 1,8)") from None
