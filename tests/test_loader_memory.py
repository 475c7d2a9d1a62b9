"""load_hf_checkpoint's memory: at most one copy of the weights plus one leaf while loading, one copy after
(measured in a fresh process from the kernel's resident-set counters), and the loaded values themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from models.host_buffers import XLA_CPU_ALIGNMENT, aligned_empty, to_device
from models.qwen2_5_vl import init_params, load_hf_checkpoint, save_hf_checkpoint, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20

# The child: jax's CPU client and the imports first, then the resident-set high-water mark is reset
# (/proc/self/clear_refs) and the checkpoint loaded; prints RSS before, the peak and RSS after, in bytes.
CHILD = """
import json, sys
import jax
from models.qwen2_5_vl import load_hf_checkpoint

def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (l.partition(":") for l in f) if k in ("VmRSS", "VmHWM")}

jax.devices()
before = status()["VmRSS"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
config, params = load_hf_checkpoint(sys.argv[1])
jax.block_until_ready(params)
after = status()
leaves = jax.tree.leaves(params)
print(json.dumps(dict(before=before, peak=after["VmHWM"], after=after["VmRSS"],
                      weights=sum(x.nbytes for x in leaves), largest=max(x.nbytes for x in leaves))))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc counters")
def test_loading_holds_one_copy_plus_one_leaf(tmp_path):
    # A large untied vocabulary, so the two 32 MiB vocabulary leaves dominate the ~66 MiB of weights
    # and a second copy of any leaf stands well above the allocator's noise.
    config = tiny_config(vocab_size=131_072)
    folder = save_hf_checkpoint(tmp_path / "ckpt", config, init_params(config, jax.random.key(3)))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CHILD, folder], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["largest"] == 32 * MIB
    slack = 6 * MIB  # the interpreter's own allocations while loading (config, headers, abstract state)
    peak, held = m["peak"] - m["before"], m["after"] - m["before"]
    assert peak <= m["weights"] + m["largest"] + slack, (peak / MIB, m["weights"] / MIB)
    assert held <= m["weights"] + slack, (held / MIB, m["weights"] / MIB)


def test_aligned_buffers_and_loaded_values(tmp_path):
    rng = np.random.default_rng(5)
    for shape, dtype in (((3, 5, 7), np.float32), ((1,), np.float16), ((129, 3), np.int8)):
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.ctypes.data % XLA_CPU_ALIGNMENT == 0
        a[...] = rng.standard_normal(shape).astype(dtype)
        want = a.copy()
        np.testing.assert_array_equal(np.asarray(to_device(a, dtype)), want)
        np.testing.assert_array_equal(np.asarray(to_device(a, np.float32)), want.astype(np.float32))
    # the loader's values, leaf by leaf, against what was saved (float32 and a bf16 load)
    config = tiny_config()
    params = init_params(config, jax.random.key(int(rng.integers(1 << 30))))
    folder = save_hf_checkpoint(tmp_path / "ckpt", config, params)
    for dtype in (np.float32, jax.numpy.bfloat16):
        _, loaded = load_hf_checkpoint(folder, dtype)
        for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
            assert x.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(dtype))
