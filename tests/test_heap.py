"""heap.map_large_buffers: freed large buffers leave the process at once, even after glibc's adaptive mmap
threshold would have risen (measured in a fresh process, since the setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from purekv_jax.heap import LIBC

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child frees one 8 MiB buffer (glibc's default threshold would rise above 4 MiB), then allocates 20
# buffers of 4 MiB and a 256 KiB one after them (it keeps the heap's top in place), frees the 20 and prints
# the resident growth in MiB after allocating and after freeing.
CHILD = """
import json
import numpy as np
from purekv_jax.heap import map_large_buffers

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

took = map_large_buffers()
big = np.ones(2 << 20, np.float32)
del big
base = rss()
arrays = [np.ones(1 << 20, np.float32) for _ in range(20)]
pin = np.ones(1 << 16, np.float32)
grown = rss() - base
del arrays
print(json.dumps(dict(took=took, grown=grown / 2**20, held=(rss() - base) / 2**20)))
"""


@pytest.mark.skipif(LIBC is None or not os.path.exists("/proc/self/status"), reason="glibc and Linux /proc only")
def test_freed_large_buffers_leave_the_process():
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["took"]
    assert m["grown"] >= 75  # the 20 buffers were resident
    assert m["held"] <= 4, m  # and all of them left with their free (glibc's default keeps all 80 MiB)
