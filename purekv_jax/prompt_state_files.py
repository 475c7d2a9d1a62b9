"""A :class:`~purekv_jax.prompt_state.PromptState` saved to a folder and read back (orbax for the arrays).

Layout::

    STATE/
      arrays/                     orbax pytree: kv (every array field of the KVCache), quant (its quantised
                                  slots, when any), budget (score, slot_pos, under a decode budget), pending
      purekv_prompt_state.json    format, version, model id, the model's config, the policy, the decode
                                  budget, prompt_len, turns, every array's shape and dtype, the caller's
                                  notes (written last)

Written into a hidden temporary sibling with an owner lock (:mod:`purekv_jax.owned_folders`), the marker
last, then renamed into place: a run killed at any point leaves the old folder or none, never a half state.
Only an empty folder or a saved prompt state is replaced, and only with ``force``.

Loading refuses, naming what differs: another format or version, another model config (the fields), other
weights (:func:`~purekv_jax.prompt_state.model_identity`), or, when the caller names the policy it expects,
another policy (the fields).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from models.qwen2_5_vl.config import Qwen25VLConfig

from . import cache as C
from .config import PureKVConfig
from .decode_budget import BudgetedCache, DecodeBudget
from .owned_folders import OwnedTempFolder, install_folder, replace_refusal, sweep_temp_folders, write_marker
from .prompt_state import PromptState, PromptStateError, model_identity

FORMAT = "purekv-prompt-state"
FORMAT_VERSION = 1
MARKER_FILE = "purekv_prompt_state.json"
ARRAYS_DIR = "arrays"


class PromptStateFileError(PromptStateError):
    """A prompt-state folder that cannot be written or read, or that belongs to another model or policy."""


def jsonable(value):
    """Config / policy values as JSON: dataclasses as dicts, tuples as lists, enums by value."""
    if dataclasses.is_dataclass(value):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def differences(saved, current, prefix: str = "") -> list[str]:
    """The dotted names of the fields where two :func:`jsonable` trees differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix[:-1] or 'value'}: saved {saved!r}, now {current!r}"]


def as_tuples(value):
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def policy_from_json(fields: dict | None) -> PureKVConfig | None:
    """The saved policy object again (lists back to tuples)."""
    if fields is None:
        return None
    return PureKVConfig(**{name: as_tuples(value) for name, value in fields.items()})


def state_arrays(state: PromptState) -> dict:
    """The state's arrays as a nested dict of host arrays (what orbax writes)."""
    kv = state.kv
    tree = {"kv": {f.name: np.asarray(getattr(kv, f.name)) for f in dataclasses.fields(kv)
                   if f.name != "quant" and getattr(kv, f.name) is not None},
            "pending": np.asarray(state.pending)}
    if kv.quant is not None:
        tree["quant"] = {f.name: np.asarray(getattr(kv.quant, f.name)) for f in dataclasses.fields(kv.quant)
                         if not f.metadata.get("static")}
    if isinstance(state.cache, BudgetedCache):
        tree["budget"] = {"score": np.asarray(state.cache.score), "slot_pos": np.asarray(state.cache.slot_pos)}
    return tree


def array_table(tree: dict) -> dict:
    return {group: ({name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in value.items()}
                    if isinstance(value, dict) else {"shape": list(value.shape), "dtype": str(value.dtype)})
            for group, value in tree.items()}


def check_destination(path: str | os.PathLike, force: bool = False) -> str:
    """The absolute ``path`` when a state may be saved there (nothing there, or, with ``force``, an empty folder
    or a saved prompt state); else :class:`PromptStateFileError`. Callable before the work that makes the state."""
    dst = os.path.abspath(os.fspath(path))
    if os.path.lexists(dst) and not force:
        raise PromptStateFileError(f"{dst} exists; pass force=True (--force) to replace a saved prompt state")
    refusal = replace_refusal(dst, (MARKER_FILE,), "a saved prompt state")
    if refusal:
        raise PromptStateFileError(refusal)
    return dst


def save_state(path: str | os.PathLike, state: PromptState, force: bool = False, notes: dict | None = None) -> str:
    """Writes ``state`` to the folder ``path`` (atomically; ``force``: replace a saved state) -> the path.
    ``notes``: JSON values kept in the marker for the caller (e.g. how long the prefill took), read back by
    :func:`read_marker`."""
    if not isinstance(state, PromptState):
        raise PromptStateFileError(f"save_state needs a PromptState, got {type(state).__name__}")
    dst = check_destination(path, force)
    parent, base = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    sweep_temp_folders(parent, base)
    tree = state_arrays(state)
    marker = {
        "format": FORMAT, "version": FORMAT_VERSION, "model_id": state.model_id,
        "config": jsonable(state.config), "policy": jsonable(state.policy), "budget": jsonable(state.budget),
        "quant_bits": None if state.kv.quant is None else state.kv.quant.bits,
        "prompt_len": state.prompt_len, "turns": state.turns, "arrays": array_table(tree), "notes": notes or {},
    }
    owned = OwnedTempFolder(parent, base)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(os.path.join(owned.path, ARRAYS_DIR), tree)
        write_marker(owned.path, MARKER_FILE, marker)
        owned.disown()
        install_folder(owned.path, dst)
    except BaseException:
        shutil.rmtree(owned.path, ignore_errors=True)
        raise
    finally:
        owned.close()
    return dst


def read_marker(path: str) -> dict:
    """The folder's marker, its format and version checked."""
    marker_path = os.path.join(path, MARKER_FILE)
    if not os.path.isfile(marker_path):
        raise PromptStateFileError(f"{path} is not a saved prompt state (no {MARKER_FILE})")
    try:
        with open(marker_path) as f:
            marker = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptStateFileError(f"{marker_path}: unreadable ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise PromptStateFileError(f"{marker_path}: format {marker.get('format') if isinstance(marker, dict) else None!r}"
                                   f" is not {FORMAT!r}")
    if marker.get("version") != FORMAT_VERSION:
        raise PromptStateFileError(f"{marker_path}: version {marker.get('version')!r}; this purekv reads version "
                                   f"{FORMAT_VERSION}")
    return marker


def check_config(path: str | os.PathLike, config: Qwen25VLConfig) -> dict:
    """The marker of the state saved at ``path``, refused (naming the fields) when it was saved for another
    model config: a check that needs no weights."""
    path = os.path.abspath(os.fspath(path))
    marker = read_marker(path)
    diff = differences(marker["config"], jsonable(config))
    if diff:
        raise PromptStateFileError(f"{path} was saved for another model config: {'; '.join(diff[:5])}")
    return marker


_MISSING = object()


def load_state(path: str | os.PathLike, params, config: Qwen25VLConfig, policy=_MISSING) -> PromptState:
    """Reads a saved state for the model ``params`` / ``config``; ``policy`` (when given, ``None`` = the full
    cache): the policy the caller expects the state to hold. Mismatches raise :class:`PromptStateFileError`
    naming the fields."""
    path = os.path.abspath(os.fspath(path))
    marker = check_config(path, config)
    found = model_identity(config, params)
    if marker["model_id"] != found:
        raise PromptStateFileError(f"{path} was saved with other weights (model id {marker['model_id']}, these "
                                   f"weights {found})")
    if policy is not _MISSING:
        diff = differences(marker["policy"], jsonable(policy))
        if diff:
            raise PromptStateFileError(f"{path} holds another policy: {'; '.join(diff[:5])}")
    table = marker["arrays"]
    item = {g: ({n: 0 for n in v} if "shape" not in v else 0) for g, v in table.items()}
    restore = {g: ({n: ocp.RestoreArgs(restore_type=np.ndarray) for n in v} if "shape" not in v
                   else ocp.RestoreArgs(restore_type=np.ndarray)) for g, v in table.items()}
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.restore(os.path.join(path, ARRAYS_DIR),
                                 args=ocp.args.PyTreeRestore(item=item, restore_args=restore))
    except Exception as e:  # noqa: BLE001 - tensorstore raises bare Exceptions for missing / short files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptStateFileError(f"{path}: cannot read the arrays ({first[:200]})") from None
    if array_table(tree) != table:
        raise PromptStateFileError(f"{path}: the arrays differ from the marker's table (a damaged folder)")
    as_jax = lambda group: {n: jnp.asarray(a) for n, a in tree[group].items()}
    quant = None if "quant" not in tree else C.QuantizedKV(**as_jax("quant"), bits=marker["quant_bits"])
    kv = C.KVCache(**as_jax("kv"), quant=quant)
    cache = kv if "budget" not in tree else BudgetedCache(kv, **as_jax("budget"))
    budget = None if marker["budget"] is None else DecodeBudget(**marker["budget"])
    return PromptState(cache=cache, pending=jnp.asarray(tree["pending"]), config=config,
                       policy=policy_from_json(marker["policy"]) if policy is _MISSING else policy, budget=budget,
                       model_id=found, prompt_len=int(marker["prompt_len"]), turns=int(marker["turns"]))
