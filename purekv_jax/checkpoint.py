"""Orbax checkpoints of a Flax model's state (Qwen2.5-VL or VideoLLaMA2, the family ``config.json`` names:
:mod:`models.family`): conversion from safetensors and loading.

:func:`convert` turns a safetensors folder (``model.safetensors`` or shards + index; Qwen2.5-VL's Hub or
transformers-5 tensor names, VideoLLaMA2's release names) into a folder::

    DST/
      config.json, tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, chat_template*,
      generation_config.json, preprocessor_config.json, video_preprocessor_config.json, ...  (copied)
      params/                  the orbax checkpoint of the model's state (``nnx.State.to_pure_dict()``'s
                               nesting, e.g. params["text"]["layers"]["q_w"], every leaf in our [in, out]
                               layout)
      purekv_checkpoint.json   format, dtype, every leaf's shape / dtype / sha256, every params file's size
                               and sha256 (written last)

It streams: one params leaf at a time is read tensor by tensor from the safetensors files into a
preallocated array, checksummed and appended to the orbax checkpoint (orbax partial saves, finalized at the
end), so the peak memory is about the largest stacked leaf plus what orbax is writing, never the model.
Everything is written into a hidden temporary sibling ``.DST.tmp-*``; after the whole checkpoint has been
restored leaf by leaf and every checksum matched, ``purekv_checkpoint.json`` is written and the folder is
renamed to ``DST``. A run killed at any point therefore leaves no ``DST`` (or the old one, with ``force``)
and no folder with the marker. The temporary folder carries an owner lock, so the next conversion into the
same parent removes the folders of killed runs and leaves live ones alone
(:mod:`purekv_jax.owned_folders`); ``force`` replaces only an empty folder or one of our checkpoints.

:func:`load_checkpoint` takes either kind of folder and can restore straight onto a device mesh; an orbax
folder's files are checked against the marker first (:mod:`purekv_jax.checkpoint_files`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import shutil
import signal
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import v1 as ocp1
from tqdm.auto import tqdm

from models.family import config_from_json, family_of, family_of_file
from models.qwen2_5_vl.loader import INDEX_FILE, SINGLE_FILE, CheckpointError, read_hf_leaf

from .checkpoint_files import (FORMAT, FORMAT_VERSION, MARKER_FILE, PARAMS_DIR, PYTREE_SUBDIR, check_file_table,
                               file_table, read_marker)
from .heap import trim_heap
from .owned_folders import OwnedTempFolder, install_folder, replace_refusal, sweep_temp_folders, write_marker
from .param_tree import abstract_params, leaf_names, path_name

# Copied beside the params when present in the source folder (config.json is required).
COPY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "LICENSE",
)
COPY_GLOBS = ("chat_template*",)

# Test hook: seconds to sleep after each tensor (lets a test kill a convert halfway). Not for users.
_DELAY_ENV = "PUREKV_CONVERT_TEST_DELAY"

_DTYPES = {
    "bf16": np.dtype(ml_dtypes.bfloat16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32), "f32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "f16": np.dtype(np.float16), "fp16": np.dtype(np.float16),
}


class ConvertError(CheckpointError):
    """A conversion that cannot start: missing source, existing destination without ``force``, ..."""


def _np_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower()
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of bf16, float32, float16")
        return _DTYPES[key]
    out = np.dtype(dtype)
    if out not in set(_DTYPES.values()):
        raise ValueError(f"unsupported dtype {out}; expected bfloat16, float32 or float16")
    return out


def _dtype_name(dtype: np.dtype) -> str:
    return {np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(np.dtype(dtype), np.dtype(dtype).name)


# ------------------------------------------------------------------------------------------- pytrees
def _nest(flat: Mapping[str, Any]) -> dict:
    """``{"a.b": x}`` -> ``{"a": {"b": x}}``."""
    out: dict = {}
    for name, value in flat.items():
        node = out
        *parents, last = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _fill(config, values: Mapping[str, Any]):
    """The model's state (``nnx.State``) with every leaf taken from ``values`` by its dotted name."""
    return jax.tree_util.tree_map_with_path(lambda p, _: values[path_name(p)], abstract_params(config))


def _checked_specs(config):
    """The loader's leaf table (of the config's model family) in params flatten order, checked against the
    params structure (a mismatch is a bug, not user input)."""
    specs = {s.name: s for s in family_of(config).leaf_specs(config)}
    abstract = {path_name(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]}
    if {n: tuple(s.shape) for n, s in specs.items()} != abstract:
        raise RuntimeError(f"the family's leaf_specs do not match the model's state: {sorted(set(specs) ^ set(abstract))}")
    return [specs[n] for n in abstract]


def _sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.reshape(-1).view(np.uint8).data).hexdigest()


# ------------------------------------------------------------------------------------------- convert
@dataclasses.dataclass(frozen=True)
class ConvertResult:
    path: str
    dtype: str
    n_leaves: int
    n_tensors: int
    source_bytes: int
    params_bytes: int
    copied_files: tuple[str, ...]
    seconds: float
    removed_temp_folders: tuple[str, ...] = ()  # of earlier conversions into DST that were killed
    stale_temp_folders: tuple[str, ...] = ()  # of conversions into DST still running (or without an owner lock)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete checkpoint written by :func:`convert` (its marker file exists)."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER_FILE))


def _is_within(inner: str, outer: str) -> bool:
    inner, outer = os.path.realpath(inner), os.path.realpath(outer)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_paths(src: str, dst: str, force: bool) -> None:
    if not os.path.exists(src):
        raise ConvertError(f"{src}: no such folder")
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: not a folder")
    if is_orbax_checkpoint(src):
        raise ConvertError(f"{src}: already a converted orbax checkpoint (it has {MARKER_FILE})")
    if not any(os.path.isfile(os.path.join(src, n)) for n in (SINGLE_FILE, INDEX_FILE)):
        raise ConvertError(f"{src}: no weights found (neither {SINGLE_FILE} nor {INDEX_FILE})")
    if _is_within(src, dst) or _is_within(dst, src):
        raise ConvertError(f"the destination {dst} must be outside the source {src} (and not contain it)")
    if os.path.lexists(dst):
        if not force:
            raise ConvertError(f"{dst} already exists; pass force=True (--force) to replace it")
        refusal = replace_refusal(dst, (MARKER_FILE,), "a converted checkpoint")
        if refusal:
            raise ConvertError(refusal)


def _copy_side_files(src: str, tmp: str) -> tuple[str, ...]:
    names = [n for n in COPY_FILES if os.path.isfile(os.path.join(src, n))]
    for pattern in COPY_GLOBS:
        names += sorted(os.path.basename(p) for p in glob.glob(os.path.join(src, pattern)) if os.path.isfile(p))
    names = list(dict.fromkeys(names))
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(tmp, n))
    return tuple(names)


def _orbax_context(compress: bool):
    """orbax v1 context for the partial saves: no defensive copy of the host arrays (we write each leaf
    once and wait for the write), and no compression unless asked: uncompressed, tensorstore writes straight
    from the leaf, while zstd needs a second leaf-sized buffer (and saves little on trained weights)."""
    ctx = ocp1.Context()
    for obj, attr, value in ((lambda: ctx.memory, "deepcopy_host_arrays", False),
                             (lambda: ctx.array.saving, "use_compression", compress)):
        try:
            setattr(obj(), attr, value)
        except (AttributeError, dataclasses.FrozenInstanceError):  # an older orbax: keep its default
            pass
    return ctx


@contextlib.contextmanager
def _deferred_signals():
    """Holds SIGINT / SIGTERM back while an orbax call runs (its background writer threads must not be
    abandoned halfway) and delivers them to the previous handlers right after it: Ctrl-C or a
    KeyboardInterrupt-raising SIGTERM handler then unwinds through :func:`convert`'s cleanup; a default
    SIGTERM still terminates the process (the hidden temporary folder stays, never a checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: set outside Python, leave it
    pending: list[int] = []
    for s in previous:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            h = previous[s]
            if callable(h):
                h(s, None)
            elif h == signal.SIG_DFL:
                os.kill(os.getpid(), s)


def _restore_one(pytree_dir: str, name: str, restore_arg):
    """One leaf of the orbax pytree (a partial restore: nothing else is read); a leaf that cannot be read
    (a missing or short data file) is a :class:`CheckpointError` naming it."""
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(pytree_dir, args=ocp.args.PyTreeRestore(
                item=_nest({name: 0}), restore_args=_nest({name: restore_arg}), partial_restore=True))
    except Exception as e:  # noqa: BLE001 - tensorstore raises bare Exceptions for missing / short files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{pytree_dir}: cannot read leaf {name} ({first[:200]}); the checkpoint is damaged: "
                              "convert it again") from None
    for part in name.split("."):
        out = out[part]
    return out


def _restore_leaf(pytree_dir: str, name: str) -> np.ndarray:
    """One leaf as a host array, as stored (the verification read)."""
    return np.asarray(_restore_one(pytree_dir, name, ocp.RestoreArgs(restore_type=np.ndarray)))


def _verify(pytree_dir: str, leaves: Mapping[str, Mapping[str, Any]], progress: bool) -> None:
    """Restores every leaf on its own (peak: one leaf) and compares shape, dtype and sha256."""
    with _progress(len(leaves), "verify", progress, unit="leaf") as bar:
        for name, meta in leaves.items():
            with _deferred_signals():
                got = _restore_leaf(pytree_dir, name)
            if (list(got.shape) != list(meta["shape"]) or _dtype_name(got.dtype) != meta["dtype"]
                    or _sha256(got) != meta["sha256"]):
                raise CheckpointError(f"verification failed: leaf {name} restored from {pytree_dir} differs from "
                                      f"what was written ({list(got.shape)} {_dtype_name(got.dtype)} vs "
                                      f"{meta['shape']} {meta['dtype']}, or its sha256)")
            del got
            trim_heap()
            bar.update(1)


def verify_checkpoint(path: str | os.PathLike, progress: bool = False) -> None:
    """Re-reads every leaf of a converted checkpoint and checks it against the shapes, dtypes and sha256
    recorded in its ``purekv_checkpoint.json``; raises :class:`CheckpointError` on any difference."""
    path = os.path.abspath(os.fspath(path))
    if not is_orbax_checkpoint(path):
        raise CheckpointError(f"{path}: not a converted checkpoint (no {MARKER_FILE})")
    marker = read_marker(path)
    _verify(marker["params"], marker["leaves"], progress)


def _progress(total: int, desc: str, enabled: bool, unit: str = "B"):
    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                disable=not enabled, dynamic_ncols=True, leave=True)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype="bf16", force: bool = False,
            progress: bool = True, compress: bool = False) -> ConvertResult:
    """Converts the safetensors folder ``src`` (Qwen2.5-VL in the Hub layout, or VideoLLaMA2 in the release's:
    the family its ``config.json`` names) into an orbax checkpoint folder ``dst``.

    Args:
      src: a folder with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json`` +
        shards (Hub or transformers-5 tensor names; bf16 / float32 / float16 tensors).
      dst: the folder to create. It must not exist, unless ``force`` (then it is replaced only once the
        new checkpoint is complete and verified).
      dtype: ``"bf16"`` (default) or ``"float32"`` (also ``"float16"``, or a numpy / jnp dtype): the
        stored params dtype. Casting rounds to nearest even, exactly like ``jnp.asarray(x, dtype)``.
      progress: show tqdm progress bars (on stderr).
      compress: zstd-compress the stored arrays (smaller on disk, slower to load; the write then needs a
        second buffer the size of the leaf being written).

    Raises :class:`ConvertError` (missing source, existing destination, source == destination), and the
    loader's :class:`~models.qwen2_5_vl.loader.CheckpointError` / ``ConfigError`` for a bad source folder
    (no weights, missing / unexpected / wrong-shape tensors, bad config) -- all before anything is written.
    """
    t0 = time.perf_counter()
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    np_dtype = _np_dtype(dtype)
    if np_dtype is None:
        raise ValueError("dtype must be given (bf16 or float32)")
    _check_paths(src, dst, force)
    ckpt = family_of_file(src).inspect_checkpoint(src)
    specs = _checked_specs(ckpt.config)
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)

    parent, base = os.path.dirname(dst), os.path.basename(dst)
    os.makedirs(parent, exist_ok=True)
    removed, stale = sweep_temp_folders(parent, base)
    owned = OwnedTempFolder(parent, base)
    tmp = owned.path
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the checkpoint's mode
        copied = _copy_side_files(src, tmp)
        params_dir = os.path.join(tmp, PARAMS_DIR)
        leaves: dict[str, dict[str, Any]] = {}
        n_tensors = 0
        bar = _progress(ckpt.nbytes, f"convert -> {_dtype_name(np_dtype)}", progress)
        with bar, _orbax_context(compress):
            def on_tensor(name: str, nbytes: int) -> None:
                bar.update(nbytes)
                if delay:
                    time.sleep(delay)

            for spec in specs:
                bar.set_postfix_str(spec.name, refresh=False)
                leaf = read_hf_leaf(ckpt, spec, np_dtype, on_tensor)
                leaves[spec.name] = {"shape": list(leaf.shape), "dtype": _dtype_name(leaf.dtype),
                                     "sha256": _sha256(leaf)}
                with _deferred_signals():
                    ocp1.partial.save(params_dir, _nest({spec.name: leaf}))
                n_tensors += len(spec.sources)
                del leaf
                trim_heap()
            with _deferred_signals():
                ocp1.partial.finalize(params_dir)

        _verify(os.path.join(params_dir, PYTREE_SUBDIR), leaves, progress)

        params_bytes = sum(int(np.prod(m["shape"])) * np_dtype.itemsize for m in leaves.values())
        marker = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": _dtype_name(np_dtype),
            "params": f"{PARAMS_DIR}/{PYTREE_SUBDIR}",
            "source": src,
            "source_bytes": ckpt.nbytes,
            "params_bytes": params_bytes,
            "compressed": bool(compress),
            "copied_files": list(copied),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "leaves": leaves,
            "files": file_table(tmp),
        }
        write_marker(tmp, MARKER_FILE, marker)
        owned.disown()
        _fsync_file(tmp)

        install_folder(tmp, dst)  # force: swap in the new folder, then drop the old one
        _fsync_file(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        owned.close()
    return ConvertResult(dst, _dtype_name(np_dtype), len(leaves), n_tensors, ckpt.nbytes, params_bytes, copied,
                         time.perf_counter() - t0, removed, stale)


# ------------------------------------------------------------------------------------------- loading
Shardings = Any  # None | jax.sharding.Sharding | Callable[[str], Sharding] | pytree of Sharding


def _sharding_table(shardings: Shardings, names: list[str]) -> dict[str, jax.sharding.Sharding | None]:
    """Leaf name -> sharding (None: the default device)."""
    if shardings is None:
        return dict.fromkeys(names)
    if isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(names, shardings)
    if callable(shardings) and not isinstance(shardings, Mapping):
        table = {n: shardings(n) for n in names}
    else:
        flat = jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding) or x is None)[0]
        # None: the default device (and a tied model's absent lm_head).
        given = {path_name(p): s for p, s in flat if s is not None or path_name(p) in names}
        missing = [n for n in names if n not in given]
        extra = [n for n in given if n not in names]
        if missing or extra:
            raise ValueError(f"shardings do not match the params: missing {missing[:6]}, unexpected {extra[:6]}")
        table = {n: given[n] for n in names}
    bad = {n: s for n, s in table.items() if s is not None and not isinstance(s, jax.sharding.Sharding)}
    if bad:
        n, s = next(iter(bad.items()))
        raise ValueError(f"sharding for {n} is {type(s).__name__}, not a jax.sharding.Sharding")
    return table


def _load_orbax(path: str, dtype: np.dtype | None, shardings: Shardings, verify: bool):
    marker = read_marker(path)
    if "files" in marker:
        check_file_table(path, marker["files"], verify)
    elif verify:  # a marker from before the file table: every leaf read on the host and its sha256 compared
        _verify(marker["params"], marker["leaves"], progress=False)
    config = config_from_json(path)
    abstract = abstract_params(config)
    names = leaf_names(abstract)
    stored = marker["leaves"]
    shapes = {n: tuple(x.shape) for n, x in zip(names, jax.tree_util.tree_leaves(abstract))}
    wrong = [f"{n}: config wants {shapes[n]}, checkpoint has {tuple(stored[n]['shape'])}"
             for n in names if n in stored and tuple(stored[n]["shape"]) != shapes[n]]
    missing, extra = [n for n in names if n not in stored], [n for n in stored if n not in shapes]
    if wrong or missing or extra:
        raise CheckpointError(f"{path}: params do not fit config.json: "
                              + "; ".join(wrong + [f"missing {n}" for n in missing[:6]]
                                          + [f"unexpected {n}" for n in extra[:6]]))
    table = _sharding_table(shardings, names)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    values = {}
    for n in names:  # leaf by leaf: the host never holds more than one leaf's read buffers
        args = ocp.ArrayRestoreArgs(sharding=table[n] or default, global_shape=shapes[n],
                                    dtype=dtype if dtype is not None else _np_dtype(stored[n]["dtype"]))
        values[n] = _restore_one(marker["params"], n, args)
        trim_heap()
    return config, _fill(config, values)


def _load_hf(path: str, dtype: np.dtype | None, shardings: Shardings):
    ckpt = family_of_file(path).inspect_checkpoint(path)
    specs = _checked_specs(ckpt.config)
    if dtype is None:
        dtype = ckpt.stored_dtype or np.dtype(np.float32)
    table = _sharding_table(shardings, [s.name for s in specs])
    values = {}
    for spec in specs:  # one host leaf at a time, placed (and sliced over the mesh) before the next one
        leaf = read_hf_leaf(ckpt, spec, dtype)
        values[spec.name] = jax.device_put(leaf, table[spec.name]) if table[spec.name] else jnp.asarray(leaf)
        del leaf
    return ckpt.config, _fill(ckpt.config, values)


def load_checkpoint(path: str | os.PathLike, dtype=None, shardings: Shardings = None, verify: bool = True
                    ) -> tuple[Any, Any]:
    """Loads ``(config, state)`` (the Flax model's state: ``nnx.merge`` it with the model's graph, or pass it
    to the pure functions) from a folder written by :func:`convert` or from a Hugging Face folder.

    Args:
      path: an orbax folder (with ``purekv_checkpoint.json``) or a Hugging Face folder (``config.json`` +
        ``model.safetensors`` or a sharded index).
      dtype: the params dtype (``"bf16"``, ``"float32"``, a numpy / jnp dtype); None keeps the stored dtype
        (an HF folder with mixed dtypes loads as float32).
      shardings: where to put each leaf: None (the default device), one ``jax.sharding.Sharding`` for every
        leaf, a callable ``leaf name -> Sharding`` (names like ``"text.layers.q_w"``, see
        :func:`~purekv_jax.param_tree.leaf_names`), or a pytree of shardings with the params' structure (a
        state of ``NamedSharding`` (an ``nnx.State``), or the same nested dict of field names). An orbax
        folder is restored straight into the shards (each device reads its slice); an HF folder is read
        one leaf at a time and each leaf placed before the next is read.
      verify: for an orbax folder, compare every params file's sha256 with the marker's before restoring
        (:mod:`purekv_jax.checkpoint_files`; False skips the hashes, the names and sizes are still checked).

    Raises :class:`~models.qwen2_5_vl.loader.CheckpointError` for a folder with no weights, an
    interrupted conversion (orbax params without the marker file) or params that do not fit the config.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint folder" if os.path.exists(path) else f"{path}: no such folder")
    np_dtype = _np_dtype(dtype)
    if is_orbax_checkpoint(path):
        return _load_orbax(path, np_dtype, shardings, verify)
    if os.path.exists(os.path.join(path, SINGLE_FILE)) or os.path.exists(os.path.join(path, INDEX_FILE)):
        return _load_hf(path, np_dtype, shardings)
    if glob.glob(os.path.join(path, PARAMS_DIR + "*")):
        raise CheckpointError(f"{path}: incomplete orbax checkpoint (no {MARKER_FILE}; an interrupted "
                              f"`purekv convert`?): convert again")
    raise CheckpointError(f"{path}: no weights found (neither {MARKER_FILE} of an orbax checkpoint nor "
                          f"{SINGLE_FILE} / {INDEX_FILE})")
