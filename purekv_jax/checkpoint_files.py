"""A converted checkpoint's marker (``purekv_checkpoint.json``) and what it promises about the files.

:func:`read_marker` checks every field the loader uses (types, the leaf table, a ``params`` path that
stays inside the folder). :func:`file_table` records, at convert time, every file of the params folder
with its size and sha256; :func:`check_file_table` checks them at load time, before any weight is read:
a missing, truncated, grown or unexpected file is one error naming it (a stat each, no reading), and
with ``verify`` every file's sha256 is compared (the files are read once, in parallel threads; the page
cache then serves the restore). The cost is measured in ``docs/robustness.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from models.qwen2_5_vl.loader import CheckpointError

FORMAT = "purekv-orbax"
FORMAT_VERSION = 1
MARKER_FILE = "purekv_checkpoint.json"
PARAMS_DIR = "params"
#: The pytree checkpoint inside PARAMS_DIR (orbax's layout for a pytree saved through orbax.checkpoint.v1).
PYTREE_SUBDIR = "state"
DTYPE_NAMES = ("bfloat16", "float32", "float16")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20


class MarkerError(CheckpointError):
    """A ``purekv_checkpoint.json`` that is not one this version wrote, or that points outside its folder."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that is missing, has another size, or whose sha256 differs from the marker's."""


def inside(folder: str, relpath, field: str, where: str) -> str:
    """``folder/relpath`` when ``relpath`` is a relative path that stays inside ``folder`` (links resolved)."""
    if not isinstance(relpath, str) or not relpath or os.path.isabs(relpath):
        raise MarkerError(f"{where}: {field} must be a relative path inside the folder, got {relpath!r:.80}")
    base = os.path.realpath(folder)
    full = os.path.realpath(os.path.join(base, relpath))
    if os.path.commonpath([base, full]) != base or full == base:
        raise MarkerError(f"{where}: {field} {relpath!r:.80} leads outside the checkpoint folder")
    return full


def _check_leaf(name, meta, where: str) -> None:
    ok = (isinstance(meta, dict) and isinstance(meta.get("shape"), list)
          and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"])
          and meta.get("dtype") in DTYPE_NAMES and isinstance(meta.get("sha256"), str)
          and _SHA256.fullmatch(meta["sha256"]))
    if not ok:
        raise MarkerError(f"{where}: leaf {name!r:.80} must hold a shape (list of sizes), a dtype "
                          f"({', '.join(DTYPE_NAMES)}) and a sha256")


def _check_files(files, where: str) -> None:
    if not isinstance(files, dict):
        raise MarkerError(f"{where}: 'files' must be an object")
    for rel, meta in files.items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("size"), int) and not isinstance(meta["size"], bool)
              and meta["size"] >= 0 and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"]))
        if not ok or os.path.normpath(rel).split(os.sep)[0] != PARAMS_DIR:
            raise MarkerError(f"{where}: file entry {rel!r:.80} must lie under {PARAMS_DIR}/ and hold a size and "
                              "a sha256")


def read_marker(path: str) -> dict:
    """The marker of the checkpoint folder ``path``, every field the loader reads checked."""
    where = os.path.join(path, MARKER_FILE)
    try:
        with open(where, encoding="utf-8") as f:
            marker = json.load(f)
    except (ValueError, RecursionError) as e:
        raise MarkerError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("leaves"), dict):
        raise MarkerError(f"{where}: not a {FORMAT} marker")
    version = marker.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise MarkerError(f"{where}: version must be an integer, got {version!r:.80}")
    if version > FORMAT_VERSION:
        raise MarkerError(f"{where}: format version {version} is newer than this purekv ({FORMAT_VERSION}); "
                          "upgrade purekv-jax")
    for name, meta in marker["leaves"].items():
        _check_leaf(name, meta, where)
    if "files" in marker:
        _check_files(marker["files"], where)
    marker["params"] = inside(path, marker.get("params", f"{PARAMS_DIR}/{PYTREE_SUBDIR}"), "params", where)
    return marker


def hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(hash_file, paths))


def _files_under(folder: str, sub: str) -> list[str]:
    out = []
    for parent, _, names in os.walk(os.path.join(folder, sub)):
        out += [os.path.relpath(os.path.join(parent, n), folder) for n in names]
    return sorted(out)


def file_table(folder: str) -> dict[str, dict]:
    """Every file under ``folder/params`` -> ``{"size", "sha256"}`` (paths relative to ``folder``)."""
    rels = _files_under(folder, PARAMS_DIR)
    hashes = _hash_all([os.path.join(folder, r) for r in rels])
    return {r: {"size": os.path.getsize(os.path.join(folder, r)), "sha256": h} for r, h in zip(rels, hashes)}


def check_file_table(folder: str, files: dict[str, dict], verify: bool = True) -> None:
    """The params files are the marker's (names and sizes; with ``verify`` their sha256 too), else a
    :class:`DamagedCheckpointError` naming the first file that is not."""
    for rel, meta in files.items():
        full = inside(folder, rel, "file", os.path.join(folder, MARKER_FILE))
        if not os.path.isfile(full):
            raise DamagedCheckpointError(f"{folder}: {rel} is missing; the checkpoint is damaged: convert it again")
        size = os.path.getsize(full)
        if size != meta["size"]:
            raise DamagedCheckpointError(f"{folder}: {rel} has {size} bytes, the marker records {meta['size']} "
                                         "(truncated or changed); the checkpoint is damaged: convert it again")
    extra = sorted(set(_files_under(folder, PARAMS_DIR)) - set(files))
    if extra:
        raise DamagedCheckpointError(f"{folder}: {extra[0]} is not one of the checkpoint's files"
                                     + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    if verify:
        rels = list(files)
        for rel, h in zip(rels, _hash_all([os.path.join(folder, r) for r in rels])):
            if h != files[rel]["sha256"]:
                raise DamagedCheckpointError(f"{folder}: {rel} differs from what was written (sha256); the "
                                             "checkpoint is damaged: convert it again")

