"""Reading and writing VideoLLaMA2 safetensors checkpoints in the release's key layout.

The release saves the whole torch module tree of ``Videollama2{Mistral,Qwen2}ForCausalLM``:

* the LM as transformers names it (``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``,
  ``lm_head.weight``): the same table as Qwen2.5-VL's text half
  (:func:`models.qwen2_5_vl.loader.text_leaf_specs`);
* the tower under ``model.vision_tower.vision_tower.vision_model.*`` (transformers' CLIP / SigLIP names);
  its ``post_layernorm``, SigLIP's pooling ``head`` and the ``position_ids`` buffer are never used and are
  skipped;
* the connector under ``model.mm_projector.*``: ``s1.bK.*`` / ``s2.bK.*`` (timm's RegStage blocks:
  ``conv1.conv``, ``conv1.bn``, ``conv2.*``, ``se.fc1``, ``se.fc2``, ``conv3.*``, ``downsample.*``),
  ``sampler.0`` (the Conv3d) and ``readout.0`` / ``readout.2`` (the MLP's linears).

Names and shapes are checked from the headers before any tensor is read; the state is filled leaf by leaf
(:func:`models.qwen2_5_vl.loader.read_hf_leaf`), as for Qwen2.5-VL.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.qwen2_5_vl.loader import (CheckpointError, HFCheckpoint, HFLeafSpec, ST_DTYPES, check_tensors,
                                      read_headers, read_hf_leaf, text_leaf_specs, weight_files, write_hf_folder)
from models.host_buffers import to_device
from models.qwen2_5_vl.state import state_from_leaves

from .config import VideoLLaMA2Config
from .connector import block_shapes, connector_top_shapes
from .vision import (TOWER_LAYER_HF_NAMES, TOWER_PREFIX, TOWER_TOP_HF_NAMES, TOWER_UNUSED_PREFIXES,
                     patch_to_jax, patch_to_torch, tower_hf_shape, tower_layer_shapes, tower_top_shapes)
from .model import abstract_state

PROJECTOR_PREFIX = "model.mm_projector."

#: block weight -> name inside ``s1.bK.`` / ``s2.bK.`` (timm's Bottleneck attribute names).
BLOCK_HF_NAMES: dict[str, str] = {
    "conv1_w": "conv1.conv.weight", "ln1_w": "conv1.bn.weight", "ln1_b": "conv1.bn.bias",
    "conv2_w": "conv2.conv.weight", "ln2_w": "conv2.bn.weight", "ln2_b": "conv2.bn.bias",
    "se_fc1_w": "se.fc1.weight", "se_fc1_b": "se.fc1.bias", "se_fc2_w": "se.fc2.weight", "se_fc2_b": "se.fc2.bias",
    "conv3_w": "conv3.conv.weight", "ln3_w": "conv3.bn.weight", "ln3_b": "conv3.bn.bias",
    "down_w": "downsample.conv.weight", "down_ln_w": "downsample.bn.weight", "down_ln_b": "downsample.bn.bias",
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One weight's torch <-> our layout conversion and its torch shape from ours."""

    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


SAME = Layout(lambda x: x, lambda x: x, lambda s: s)
LINEAR = Layout(lambda x: x.T, lambda x: x.T, lambda s: s[::-1])
CONV1X1 = Layout(lambda x: x[:, :, 0, 0].T, lambda x: x.T[:, :, None, None], lambda s: (s[1], s[0], 1, 1))
DEPTHWISE = Layout(lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1),
                   lambda s: (s[3], s[2], s[0], s[1]))
CONV3D = Layout(lambda x: x.transpose(2, 3, 4, 1, 0), lambda x: x.transpose(4, 3, 0, 1, 2),
                lambda s: (s[4], s[3], s[0], s[1], s[2]))


def block_layout(field: str) -> Layout:
    if field == "conv2_w":
        return DEPTHWISE
    return CONV1X1 if field.endswith("_w") and not field.startswith(("ln", "down_ln")) else SAME


@dataclasses.dataclass(frozen=True)
class VL2LeafSpec:
    """A leaf's :class:`~models.qwen2_5_vl.loader.HFLeafSpec` plus the inverse layout and the torch shapes."""

    spec: HFLeafSpec
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: tuple[int, ...]


def _leaf(path, sources, stacked, layout: Layout, shape) -> VL2LeafSpec:
    one = shape[1:] if stacked else shape
    return VL2LeafSpec(HFLeafSpec(tuple(path), tuple(sources), stacked, layout.to_jax, tuple(shape)),
                       layout.to_torch, tuple(layout.torch_shape(tuple(one))))


def leaf_specs(config: VideoLLaMA2Config) -> list[VL2LeafSpec]:
    """The leaf <-> release-name table of the whole model (LM, tower, connector), one entry per state leaf."""
    t, v, c = config.text, config.vision, config.connector
    out = []
    for spec in text_leaf_specs(t):
        transposed = spec.to_jax(np.zeros((2, 3))).shape == (3, 2)
        one = spec.shape[1:] if spec.stacked else spec.shape
        out.append(VL2LeafSpec(spec, LINEAR.to_torch if transposed else SAME.to_torch,
                               one[::-1] if transposed else one))
    for field, shape in tower_top_shapes(v).items():
        if field == "patch_w":
            out.append(VL2LeafSpec(HFLeafSpec(("vision", field), (TOWER_PREFIX + TOWER_TOP_HF_NAMES[field],), False,
                                              lambda x: patch_to_jax(x, v), shape),
                                   lambda x: patch_to_torch(x, v), tower_hf_shape(field, shape, v)))
        else:
            out.append(_leaf(("vision", field), (TOWER_PREFIX + TOWER_TOP_HF_NAMES[field],), False, SAME, shape))
    n = v.num_hidden_layers
    for field, shape in tower_layer_shapes(v).items():
        name, transposed = TOWER_LAYER_HF_NAMES[field]
        out.append(_leaf(("vision", "layers", field), [f"{TOWER_PREFIX}encoder.layers.{i}.{name}" for i in range(n)],
                         True, LINEAR if transposed else SAME, (n, *shape)))
    stages = (("s1_first", "s1", (1,), c.in_hidden), ("s1_rest", "s1", range(2, c.depth + 1), c.hidden),
              ("s2", "s2", range(1, c.depth + 1), c.hidden))
    for attr, stage, blocks, in_chs in stages:
        for field, shape in block_shapes(in_chs, c.hidden).items():
            names = [f"{PROJECTOR_PREFIX}{stage}.b{k}.{BLOCK_HF_NAMES[field]}" for k in blocks]
            if attr == "s1_first":
                out.append(_leaf(("connector", attr, field), names, False, block_layout(field), shape))
            else:
                out.append(_leaf(("connector", attr, field), names, True, block_layout(field), (len(names), *shape)))
    top = connector_top_shapes(c)
    out.append(_leaf(("connector", "sampler_w"), (PROJECTOR_PREFIX + "sampler.0.weight",), False, CONV3D,
                     top["sampler_w"]))
    out.append(_leaf(("connector", "sampler_b"), (PROJECTOR_PREFIX + "sampler.0.bias",), False, SAME, top["sampler_b"]))
    linears = [2 * i for i in range(c.mlp_depth)]  # GELUs sit between them in the Sequential
    out.append(_leaf(("connector", "readout_w"), [f"{PROJECTOR_PREFIX}readout.{i}.weight" for i in linears], True,
                     LINEAR, top["readout_w"]))
    out.append(_leaf(("connector", "readout_b"), [f"{PROJECTOR_PREFIX}readout.{i}.bias" for i in linears], True,
                     SAME, top["readout_b"]))
    return out


def hf_leaf_specs(config: VideoLLaMA2Config) -> list[HFLeafSpec]:
    """The loader's side of :func:`leaf_specs` (what ``purekv convert`` and the checkpoint loader read)."""
    return [s.spec for s in leaf_specs(config)]


def expected_hf_shapes(config: VideoLLaMA2Config) -> dict[str, tuple[int, ...]]:
    """Release name -> torch shape for every tensor the model uses."""
    return {name: s.torch_shape for s in leaf_specs(config) for name in s.spec.sources}


def inspect_checkpoint(path: str | os.PathLike) -> HFCheckpoint:
    """Reads ``config.json`` and the safetensors headers and checks every tensor's presence and shape (the
    tower's unused tensors are skipped); reads no tensor data."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint folder")
    config = VideoLLaMA2Config.from_json(path)
    files, where, weight_map = weight_files(path)
    found = {k: v for k, v in read_headers(files).items() if not k.startswith(TOWER_UNUSED_PREFIXES)}
    expected = expected_hf_shapes(config)
    check_tensors(found, expected, where, config.text.tie_word_embeddings, weight_map)
    bad = [n for n in expected if found[n][3] not in ST_DTYPES]
    if bad:
        raise CheckpointError(f"{where}: tensor {found[bad[0]][1]} (in {found[bad[0]][0]}) has dtype "
                              f"{found[bad[0]][3]}; expected one of {', '.join(ST_DTYPES)}")
    return HFCheckpoint(path, config, files, {n: found[n] for n in expected})


def load_checkpoint(path: str | os.PathLike, dtype=jnp.float32) -> tuple[VideoLLaMA2Config, nnx.State]:
    """A VideoLLaMA2 checkpoint folder -> ``(config, state)`` in ``dtype``, leaf by leaf.

    Raises :class:`~models.qwen2_5_vl.config_fields.ConfigError` for a bad ``config.json`` and
    :class:`~models.qwen2_5_vl.loader.CheckpointError` for missing / unexpected / wrong-shape tensors."""
    ckpt = inspect_checkpoint(path)
    _, abstract = abstract_state(ckpt.config, dtype)
    leaves = {}
    for s in leaf_specs(ckpt.config):
        leaves[s.spec.path] = to_device(read_hf_leaf(ckpt, s.spec, dtype), dtype)
    return ckpt.config, state_from_leaves(abstract, leaves)


def params_to_hf(params: nnx.State, config: VideoLLaMA2Config) -> dict[str, np.ndarray]:
    """Release-named torch-layout host arrays of the whole state."""
    flat = {tuple(path): np.asarray(leaf) for path, leaf in nnx.to_flat_state(params)}
    out = {}
    for s in leaf_specs(config):
        arr = flat[s.spec.path]
        parts = list(arr) if s.spec.stacked else [arr]
        for name, part in zip(s.spec.sources, parts):
            out[name] = np.ascontiguousarray(s.to_torch(part))
    return out


def save_checkpoint(path: str | os.PathLike, config: VideoLLaMA2Config, params: nnx.State, dtype=None) -> str:
    """Writes ``config.json`` + ``model.safetensors`` in the release's layout (cast to ``dtype`` when given),
    atomically. Returns the path."""
    path = os.path.abspath(os.fspath(path))
    tensors = params_to_hf(params, config)
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(dtype)) for k, v in tensors.items()}
    write_hf_folder(path, config.to_hf_dict(), tensors)
    return path
