"""Batch request records: the requests file read line by line, and every field of a record type-checked
before anything uses it.

A line is bytes until it is known to be UTF-8 (a bad byte is named with its line and column), then JSON
(nesting too deep for the parser is an error, not a crash), then an object. Each field has one type:
strings are strings, integers are integers (``true`` is not ``1``), booleans are ``true`` / ``false`` (the
string ``"no"`` is not false), and a wrong type is a :class:`RequestError` that names the field. Ids keep
their JSON type: ``7`` and ``"7"`` are two requests (:func:`id_key`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from .requests import check_text

#: The ``policy`` object's fields and the JSON types each accepts (a budget may be a number or text).
POLICY_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "budget": (int, float, str), "window": (int,), "sink": (int,), "anchors": (int, list),
    "st_sparse": (bool,), "st_select": (str,),
}
#: Keys of a ``messages`` content item that name a media file.
MEDIA_KEYS = ("image", "image_url", "video")


class RequestError(ValueError):
    """A request that cannot run (bad JSON, a field of the wrong type, a prompt too long, ...): becomes an
    error record."""


def id_key(rid) -> str:
    """The id as the output file stores it (JSON text), so ``7`` and ``"7"`` stay two ids."""
    return json.dumps(rid)


def valid_id(rid) -> bool:
    return isinstance(rid, (str, int)) and not isinstance(rid, bool)


def parse_line(raw: bytes, lineno: int) -> Any:
    """One line of the requests file -> the parsed JSON value, or the :class:`RequestError` that says why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RequestError(f"line {lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    try:
        return json.loads(text)
    except RecursionError:
        return RequestError(f"line {lineno}: JSON nested too deeply")
    except ValueError as e:
        return RequestError(f"line {lineno}: not valid JSON ({e})")


def iter_request_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value or the RequestError)`` for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, parse_line(raw, lineno)


def count_requests(path: str | os.PathLike) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true / false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return " or ".join(names[t] for t in types)


def typed(value, types: tuple[type, ...], field: str, rid):
    """``value`` when its JSON type is one of ``types`` (a bool is never an int or a number), else a
    :class:`RequestError` naming ``field``."""
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise RequestError(f"request {rid!r}: field {field!r} must be {_type_names(types)}, got {value!r:.80}")
    if isinstance(value, str):
        check_text(value, f"field {field!r}")
    return value


def policy_spec(spec, rid) -> dict:
    """A request's ``policy`` (absent, a name, or an object) -> its fields, each type-checked."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        spec = {"name": spec}
    elif not isinstance(spec, dict):
        raise RequestError(f"request {rid!r}: field 'policy' must be a policy name or an object, got {spec!r:.80}")
    unknown = sorted(set(spec) - set(POLICY_TYPES))
    if unknown:
        raise RequestError(f"policy has unknown field(s) {unknown}; known: {list(POLICY_TYPES)}")
    out = {k: typed(v, POLICY_TYPES[k], f"policy.{k}", rid) for k, v in spec.items()}
    if isinstance(out.get("anchors"), list):
        out["anchors"] = [typed(a, (int,), "policy.anchors[]", rid) for a in out["anchors"]]
    return out


def media_list(req: dict, one: str, many: str, rid) -> list[str]:
    """The paths of ``one`` (a path) and ``many`` (a list of paths)."""
    out: list[str] = []
    for key in (one, many):
        v = req.get(key)
        if v is None:
            continue
        vals = [v] if isinstance(v, str) else v
        if not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
            raise RequestError(f"request {rid!r}: field {key!r} must be a path or a list of paths, got {v!r:.80}")
        out += [typed(x, (str,), key, rid) for x in vals]
    return out


def check_messages(messages, rid) -> list[dict]:
    """``messages``: a non-empty list of ``{"role": str, "content": str | [item, ...]}``, each item an object
    whose ``text`` is a string and whose ``image`` / ``image_url`` / ``video`` is a path."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"request {rid!r}: field 'messages' must be a non-empty list of messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RequestError(f"request {rid!r}: {where} must be an object with 'role' and 'content'")
        typed(msg["role"], (str,), f"{where}.role", rid)
        content = typed(msg["content"], (str, list), f"{where}.content", rid)
        for j, item in enumerate(content if isinstance(content, list) else ()):
            typed(item, (dict,), f"{where}.content[{j}]", rid)
            for key in ("type", "text", *MEDIA_KEYS):
                if key in item:
                    typed(item[key], (str,), f"{where}.content[{j}].{key}", rid)
    return messages


def with_media(messages: list[dict], resolve) -> list[dict]:
    """A copy of checked ``messages`` whose media paths are replaced by ``resolve(path, kind)`` (``kind``:
    ``"image"`` or ``"video"``)."""
    out = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, list):
            content = [{k: resolve(v, "video" if k == "video" else "image") if k in MEDIA_KEYS else v
                        for k, v in item.items()} for item in content]
        out.append({**msg, "content": content})
    return out


def input_id_list(ids, vocab_size: int, rid) -> list[int]:
    """``input_ids``: a non-empty list of integers in ``[0, vocab_size)`` (checked before any array is made)."""
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError(f"request {rid!r}: input_ids must be a non-empty list of integers")
    if not all(0 <= t < vocab_size for t in ids):
        raise RequestError(f"request {rid!r}: input_ids hold ids outside [0, {vocab_size})")
    return ids
