"""Reading and writing Hugging Face Qwen2.5-VL safetensors checkpoints.

* :func:`load_hf_checkpoint` reads ``config.json`` and either one ``model.safetensors`` or the shards
  listed in ``model.safetensors.index.json``; Hub names (``model.layers.*``, ``visual.*``) and the
  transformers-5 names (``model.language_model.*``, ``model.visual.*``) are both accepted; bf16 and
  float32 files alike (numpy + ml_dtypes). The tensor names and shapes are checked against the model's
  specs from the safetensors headers *before* any tensor data is read.
* :func:`inspect_hf_checkpoint` does the config + header checks alone (no tensor data), and
  :func:`iter_hf_leaves` then reads the model's state one leaf at a time (a stacked ``[L, ...]`` leaf from
  its ``L`` per-layer tensors, read one by one), so a converter or a sharded loader never holds the whole
  model; :func:`hf_leaf_specs` is the leaf <-> Hub-name table they share. :func:`load_hf_checkpoint`
  fills the abstract state (:func:`~models.qwen2_5_vl.model.abstract_state`) the same way, leaf by leaf.
* :func:`save_hf_checkpoint` writes ``config.json`` + ``model.safetensors`` in the Hub spelling,
  atomically (a temporary folder next to the target, then a rename), loadable by transformers'
  ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and by :func:`load_hf_checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator, Mapping

import jax.numpy as jnp
import ml_dtypes  # registers bfloat16 with numpy, for bf16 safetensors files
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..host_buffers import aligned_empty, to_device
from .config import Qwen25VLConfig, TextConfig
from .model import abstract_state
from .state import state_from_leaves
from .text import text_hf_shapes, text_layer_hf_names, text_layer_shapes, text_params_to_hf
from .vision import (
    VISION_TOP_HF_NAMES,
    vision_block_hf_names,
    vision_param_shapes,
    vision_to_jax_layout,
    vision_hf_shapes,
    vision_params_to_hf,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# transformers-5 prefixes -> Hub prefixes (the longest match first).
_NAME_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


class CheckpointError(ValueError):
    """A checkpoint folder whose tensors do not fit the config (missing, unexpected, wrong shape) or that
    holds no weights."""


def hub_name(name: str) -> str:
    """Normalises a tensor name to the Hub spelling (``model.language_model.x`` -> ``model.x``,
    ``model.visual.x`` -> ``visual.x``)."""
    for old, new in _NAME_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def expected_hf_shapes(config: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
    """Hub name -> torch shape for every tensor of the model (text and vision halves)."""
    return {**text_hf_shapes(config.text), **vision_hf_shapes(config.vision)}


def weight_files(path: str) -> tuple[dict[str, str], str, dict[str, str]]:
    """The files to read: ({file name: full path}, where (the index or the single file), the index's
    weight map with Hub names (empty for a single file))."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        for name in files:
            full = os.path.realpath(os.path.join(path, name))
            if os.path.dirname(full) != os.path.realpath(path) or not os.path.isfile(full):
                raise CheckpointError(f"{index} lists shard {name!r}, which is not in {path} (as a file)")
        return {name: os.path.join(path, name) for name in files}, index, {hub_name(k): v for k, v in weight_map.items()}
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return {SINGLE_FILE: single}, single, {}
    raise CheckpointError(f"{path}: no weights found (neither {SINGLE_FILE} nor {INDEX_FILE})")


# safetensors dtype codes -> numpy dtypes (the floating types a checkpoint can hold).
ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16)}


@contextlib.contextmanager
def open_safetensors(path: str):
    """``safe_open`` of one file, its errors (empty or truncated file, a bad or huge header, offsets outside
    the data: all checked when the file is opened) as a :class:`CheckpointError` naming the file."""
    try:
        with safe_open(path, framework="numpy") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_headers(files: Mapping[str, str]) -> dict[str, tuple[str, str, tuple[int, ...], str]]:
    """Hub name -> (file, original name, torch shape, safetensors dtype code), from the headers only."""
    found: dict[str, tuple[str, str, tuple[int, ...], str]] = {}
    for fname, fpath in files.items():
        with open_safetensors(fpath) as f:
            for name in f.keys():
                key = hub_name(name)
                if key in found:
                    raise CheckpointError(
                        f"tensor {key!r} appears twice: as {found[key][1]!r} in {found[key][0]} and as "
                        f"{name!r} in {fname}"
                    )
                sl = f.get_slice(name)
                found[key] = (fname, name, tuple(sl.get_shape()), sl.get_dtype())
    return found


def check_tensors(found, expected: Mapping[str, tuple[int, ...]], where: str, tied: bool, weight_map) -> None:
    missing = [n for n in expected if n not in found]
    if missing:
        listed = ", ".join(
            n + (f" (the index puts it in {weight_map[n]}, which lacks it)" if n in weight_map else "")
            for n in missing[:8]
        ) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointError(f"{where}: missing tensor(s) {listed}")
    wrong = [
        f"{n} (in {found[n][0]}): expected shape {tuple(s)}, found {found[n][2]}"
        for n, s in expected.items()
        if tuple(found[n][2]) != tuple(s)
    ]
    if wrong:
        raise CheckpointError(f"{where}: wrong tensor shape(s): " + "; ".join(wrong))
    extra = [n for n in found if n not in expected and not (tied and n == "lm_head.weight")]
    if extra:
        listed = ", ".join(f"{found[n][1]} (in {found[n][0]})" for n in extra[:8])
        more = f" (and {len(extra) - 8} more)" if len(extra) > 8 else ""
        raise CheckpointError(f"{where}: unexpected tensor(s) not used by this config: {listed}{more}")


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A checked Hugging Face checkpoint folder (config and safetensors headers; no tensor data read).

    ``tensors`` maps every tensor the model uses (Hub name) to ``(file, stored name, torch shape,
    safetensors dtype code)``; ``files`` maps file names to full paths."""

    path: str
    config: Qwen25VLConfig
    files: dict[str, str]
    tensors: dict[str, tuple[str, str, tuple[int, ...], str]]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the model uses, as stored."""
        return sum(int(np.prod(shape, dtype=np.int64)) * ST_DTYPES.get(code, np.dtype(np.float32)).itemsize
                   for _, _, shape, code in self.tensors.values())

    @property
    def stored_dtype(self) -> np.dtype | None:
        """The one floating dtype every used tensor is stored in, or None when they differ."""
        codes = {code for _, _, _, code in self.tensors.values()}
        return ST_DTYPES.get(codes.pop()) if len(codes) == 1 else None


def inspect_hf_checkpoint(path: str | os.PathLike) -> HFCheckpoint:
    """Reads ``config.json`` and the safetensors headers of ``path`` and checks every tensor's presence and
    shape against the config (the same errors as :func:`load_hf_checkpoint`); reads no tensor data."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint folder")
    config = Qwen25VLConfig.from_json(path)
    files, where, weight_map = weight_files(path)
    found = read_headers(files)
    expected = expected_hf_shapes(config)
    check_tensors(found, expected, where, config.text.tie_word_embeddings, weight_map)
    unsupported = sorted({found[n][3] for n in expected} - set(ST_DTYPES))
    if unsupported:
        bad = next(n for n in expected if found[n][3] in unsupported)
        raise CheckpointError(f"{where}: tensor {found[bad][1]} (in {found[bad][0]}) has dtype {found[bad][3]}; "
                              f"expected one of {', '.join(ST_DTYPES)}")
    return HFCheckpoint(path, config, files, {n: found[n] for n in expected})


def load_hf_checkpoint(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Qwen25VLConfig, nnx.State]:
    """Loads a Hugging Face Qwen2.5-VL checkpoint folder -> ``(config, state)``: the pure state of a
    :class:`~models.qwen2_5_vl.model.Qwen25VLModel`, in ``dtype``.

    The abstract state is built first and filled leaf by leaf (:func:`iter_hf_leaves`: each host leaf, read
    in ``dtype`` into an aligned buffer, becomes the device array before the next is read; on the CPU without
    a copy, :mod:`models.host_buffers`), so loading holds at most the weights plus one source tensor.

    Raises :class:`~models.qwen2_5_vl.config.ConfigError` for a bad ``config.json`` and
    :class:`CheckpointError` for missing weights, missing / unexpected / wrong-shape tensors (each
    named, with the file and both shapes). With a tied head (``tie_word_embeddings``), a stray
    ``lm_head.weight`` in the file is ignored (the embedding is used, as transformers does).
    """
    ckpt = inspect_hf_checkpoint(path)
    _, abstract = abstract_state(ckpt.config, dtype)
    leaves = {}
    for spec, host in iter_hf_leaves(ckpt, dtype):
        leaves[spec.path] = to_device(host, dtype)
        del host  # (elsewhere than the CPU) freed before the next leaf is read
    return ckpt.config, state_from_leaves(abstract, leaves)


# ------------------------------------------------------------------------------------- leaf by leaf
@dataclasses.dataclass(frozen=True)
class HFLeafSpec:
    """One leaf of the model's state and the Hub tensors it is built from.

    ``path`` is the leaf's attribute path in the :class:`~models.qwen2_5_vl.model.Qwen25VLModel` state
    (e.g. ``("text", "layers", "q_w")``);
    ``sources`` the Hub names, one per layer for a ``stacked`` leaf (the leading ``[L]`` axis) or a single
    one; ``to_jax`` turns one torch-layout source into our layout (transpose, patch-embed reshape);
    ``shape`` is the leaf's full shape in our layout."""

    path: tuple[str, ...]
    sources: tuple[str, ...]
    stacked: bool
    to_jax: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return ".".join(self.path)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def text_leaf_specs(t: TextConfig) -> list[HFLeafSpec]:
    """The leaf <-> Hub-name table of a text stack (state paths under ``text``; Hub names ``model.*`` and
    ``lm_head.weight``), shared by every model whose LM is this stack."""
    d, L = t.hidden_size, t.num_hidden_layers
    layer_shapes = text_layer_shapes(t)
    specs = [HFLeafSpec(("text", "embed"), ("model.embed_tokens.weight",), False, _identity, (t.vocab_size, d))]
    for field, (name, transposed) in text_layer_hf_names(t).items():
        specs.append(HFLeafSpec(("text", "layers", field), tuple(f"model.layers.{i}.{name}" for i in range(L)), True,
                                _transpose if transposed else _identity, (L, *layer_shapes[field])))
    specs.append(HFLeafSpec(("text", "norm"), ("model.norm.weight",), False, _identity, (d,)))
    if not t.tie_word_embeddings:
        specs.append(HFLeafSpec(("text", "lm_head"), ("lm_head.weight",), False, _transpose, (d, t.vocab_size)))
    return specs


def hf_leaf_specs(config: Qwen25VLConfig) -> list[HFLeafSpec]:
    """The leaf <-> Hub-name table of the whole model (text, then vision), one entry per state leaf,
    built from the text and vision halves' name tables and layout functions, so a caller can build the
    state one leaf at a time (:func:`load_hf_checkpoint`, :func:`params_from_hf`)."""
    v = config.vision
    specs = text_leaf_specs(config.text)
    top, blocks = vision_param_shapes(v)
    block_names = [vision_block_hf_names(i) for i in range(v.depth)]
    for field, name in VISION_TOP_HF_NAMES.items():
        specs.append(HFLeafSpec(("vision", field), (name,), False,
                                lambda x, field=field: vision_to_jax_layout(field, x, v), top[field]))
    for field, shape in blocks.items():
        specs.append(HFLeafSpec(("vision", "blocks", field), tuple(names[field] for names in block_names), True,
                                lambda x, field=field: vision_to_jax_layout(field, x, v), shape))
    return specs


def read_hf_leaf(ckpt: HFCheckpoint, spec: HFLeafSpec, dtype=None, on_tensor: Callable[[str, int], None] | None = None
                 ) -> np.ndarray:
    """One leaf as a host array in ``dtype`` (default: the stored dtype of its first source), read tensor by
    tensor into a preallocated ``spec.shape`` array (peak: the leaf plus one source tensor), aligned so that
    the CPU device can take it without a copy (:func:`models.host_buffers.to_device`).

    ``on_tensor(hub_name, stored_bytes)`` is called after each source tensor is placed (progress)."""
    first = ckpt.tensors[spec.sources[0]]
    np_dtype = np.dtype(dtype) if dtype is not None else ST_DTYPES[first[3]]
    out = aligned_empty(spec.shape, np_dtype)
    for i, name in enumerate(spec.sources):
        fname, stored, _, _ = ckpt.tensors[name]
        # Opened per tensor: the file's memory map (resident pages included) goes away with the tensor.
        with open_safetensors(ckpt.files[fname]) as f:
            x = f.get_tensor(stored)
        nbytes = x.nbytes
        if spec.stacked:
            out[i] = spec.to_jax(x)
        else:
            out[...] = spec.to_jax(x)
        del x
        if on_tensor is not None:
            on_tensor(name, nbytes)
    return out


def iter_hf_leaves(ckpt: HFCheckpoint, dtype=None, on_tensor: Callable[[str, int], None] | None = None
                   ) -> Iterator[tuple[HFLeafSpec, np.ndarray]]:
    """Yields ``(spec, host array)`` for every leaf of :func:`hf_leaf_specs`, one leaf at a time."""
    for spec in hf_leaf_specs(ckpt.config):
        yield spec, read_hf_leaf(ckpt, spec, dtype, on_tensor)


def params_from_hf(tensors: Mapping[str, np.ndarray], config: Qwen25VLConfig, dtype=jnp.float32) -> nnx.State:
    """The model's state in ``dtype`` from Hub-named torch-layout arrays (names and shapes already
    checked), through the same leaf table as :func:`load_hf_checkpoint`."""

    def leaf(spec: HFLeafSpec) -> np.ndarray:
        parts = [spec.to_jax(np.asarray(tensors[name])) for name in spec.sources]
        return np.stack(parts) if spec.stacked else parts[0]

    leaves = {spec.path: jnp.asarray(leaf(spec), dtype) for spec in hf_leaf_specs(config)}
    return state_from_leaves(abstract_state(config, dtype)[1], leaves)


def params_to_hf(params: nnx.State, config: Qwen25VLConfig) -> dict[str, np.ndarray]:
    """Hub-named torch-layout host arrays for the whole model's state."""
    return {**text_params_to_hf(params.text, config.text), **vision_params_to_hf(params.vision, config.vision)}


def save_hf_checkpoint(
    path: str | os.PathLike, config: Qwen25VLConfig, params: nnx.State, dtype=None
) -> str:
    """Writes the model's state ``params`` as ``config.json`` and ``model.safetensors`` (Hub names; cast to
    ``dtype`` when given, e.g. ``jnp.bfloat16``) into the folder ``path``, replacing it atomically. Returns
    the path."""
    path = os.path.abspath(os.fspath(path))
    tensors = params_to_hf(params, config)
    if dtype is not None:
        np_dtype = np.dtype(dtype)
        tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
    hf = config.to_hf_dict()
    write_hf_folder(path, hf, tensors)
    return path


def write_hf_folder(path: str, hf: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``config.json`` (``hf``, with ``torch_dtype`` when every tensor has one dtype) and
    ``model.safetensors`` (``tensors``) into the folder ``path``, replacing it atomically (a temporary folder
    next to it, then a rename)."""
    hf = dict(hf)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        stored = {np.dtype(v.dtype) for v in tensors.values()}
        if len(stored) == 1:
            hf["torch_dtype"] = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                                 np.dtype(np.float16): "float16"}.get(stored.pop(), "float32")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, SINGLE_FILE),
                  metadata={"format": "pt"})
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

