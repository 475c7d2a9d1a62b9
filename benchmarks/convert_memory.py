"""Peak memory of `purekv convert` (streamed) against the checkpoint size (not a test).

Builds a bench-sized random Qwen2.5-VL checkpoint (text hidden 1024, 8 layers, 16/4 heads, MLP 2816,
vocab 32,000, untied head; vision depth 4, hidden 640; ~186 M params: ~372 MB in bf16, ~744 MB in
float32), then runs each case in a fresh subprocess and reports:

* baseline: resident memory after importing jax / orbax / the model and starting the CPU backend;
* peak: the process's resident high-water mark *after* the baseline (``/proc/self/clear_refs`` resets
  VmHWM once the imports are done), minus the baseline; also the peak anonymous (non file-backed) memory
  sampled every 5 ms by the parent, minus its baseline;
* the checkpoint size and the largest params leaf (in the output dtype) for comparison.

It also measures ``load_hf_checkpoint`` (the abstract state first, then filled one leaf at a time from the
safetensors files) and ``load_checkpoint`` on the orbax output (restored leaf by leaf).

    JAX_PLATFORMS=cpu python benchmarks/convert_memory.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NOTES = """Where the convert peak comes from (instrumented run, bf16): while writing, one leaf plus one source
tensor (the embedding: its bf16 source and the output leaf; a stacked leaf: the [L, ...] array plus one
layer); orbax writes uncompressed straight from the leaf (--compress: zstd needs a second leaf-sized buffer
while writing, which here stays under the verify peak). While verifying, one restored leaf plus orbax's
fixed 100 MB OCDBT cache pool. Peak anon ~ 2-3x the largest leaf here, i.e. ~0.4-0.6x the checkpoint; for
Qwen2.5-VL-7B (largest leaf: a stacked MLP weight, 28 x 3584 x 18944 bf16 = 3.8 GB, of a 16.6 GB
checkpoint) that projects to ~4-8 GB (not measured). `peak RSS` also counts the memory-mapped pages of the
one source tensor being read (file-backed, reclaimable). `load_hf_checkpoint` and `load_checkpoint` both fill the
model's abstract state leaf by leaf, so they hold the params plus one leaf.
"""


def bench_config():
    from models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, VisionConfig

    text = TextConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, mrope_section=(8, 12, 12),
                      max_position_embeddings=32_768)
    vision = VisionConfig(depth=4, hidden_size=640, num_heads=10, intermediate_size=1712, out_hidden_size=1024,
                          fullatt_block_indexes=(3,))
    return Qwen25VLConfig(text=text, vision=vision)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


# ------------------------------------------------------------------------------------------ child side
def child(argv: list[str]) -> None:
    """Runs one case and prints a JSON line. argv: case, then its arguments."""
    import jax
    import jax.numpy as jnp

    from models.qwen2_5_vl import load_hf_checkpoint
    from purekv_jax.checkpoint import convert, load_checkpoint

    jax.devices()  # start the backend before the baseline
    import orbax.checkpoint  # noqa: F401
    from orbax.checkpoint import v1  # noqa: F401

    base = _status()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    print("BASELINE " + json.dumps(base), flush=True)
    case = argv[0]
    t0 = time.perf_counter()
    if case == "convert":
        src, dst, dtype = argv[1:4]
        convert(src, dst, dtype=dtype, progress=False, compress="compress" in argv[4:])
    elif case == "load_hf":
        _, params = load_hf_checkpoint(argv[1], jnp.float32 if argv[2] == "float32" else jnp.bfloat16)
        jax.block_until_ready(params)
    elif case == "load_orbax":
        _, params = load_checkpoint(argv[1])
        jax.block_until_ready(params)
    else:
        raise SystemExit(f"unknown case {case}")
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"status": _status(), "seconds": seconds}), flush=True)


# ------------------------------------------------------------------------------------------ parent side
@dataclasses.dataclass
class Row:
    case: str
    ckpt_bytes: int
    largest_leaf: int
    baseline: int
    peak_delta: int
    anon_delta: int
    seconds: float
    out_bytes: int | None


def _run_case(args: list[str]) -> tuple[dict, dict, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = [0]
    stop = threading.Event()

    def sample():
        path = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: exit {proc.returncode}\n{err[-3000:]}")
    base = json.loads(out.split("BASELINE ", 1)[1].splitlines()[0])
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    return base, result, peak_anon[0]


def _disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _build(workdir: str) -> dict[str, str]:
    """Writes the bench checkpoint in float32 and bf16 (in a subprocess, so it does not count)."""
    code = f"""
import jax, jax.numpy as jnp, sys
sys.path.insert(0, {REPO!r})
from benchmarks.convert_memory import bench_config
from models.qwen2_5_vl import init_params, save_hf_checkpoint
cfg = bench_config()
params = init_params(cfg, jax.random.key(0))
save_hf_checkpoint({os.path.join(workdir, 'hf_f32')!r}, cfg, params)
save_hf_checkpoint({os.path.join(workdir, 'hf_bf16')!r}, cfg, params, dtype=jnp.bfloat16)
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return {"float32": os.path.join(workdir, "hf_f32"), "bf16": os.path.join(workdir, "hf_bf16")}


def _sizes(src: str, out_itemsize: int) -> tuple[int, int]:
    sys.path.insert(0, REPO)
    from models.qwen2_5_vl.loader import hf_leaf_specs, inspect_hf_checkpoint

    ckpt = inspect_hf_checkpoint(src)
    largest = max(int(np.prod(s.shape)) for s in hf_leaf_specs(ckpt.config)) * out_itemsize
    return ckpt.nbytes, largest


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, REPO)
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="purekv-convert-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        print(f"building the bench checkpoint in {workdir} ...", flush=True)
        src = _build(workdir)
        cases = [
            ("convert bf16 -> bf16", ["convert", src["bf16"], os.path.join(workdir, "ox_bf16"), "bf16"],
             src["bf16"], 2),
            ("convert bf16 -> bf16 --compress",
             ["convert", src["bf16"], os.path.join(workdir, "ox_bf16_z"), "bf16", "compress"], src["bf16"], 2),
            ("convert f32 -> f32", ["convert", src["float32"], os.path.join(workdir, "ox_f32"), "float32"],
             src["float32"], 4),
            ("convert f32 -> bf16", ["convert", src["float32"], os.path.join(workdir, "ox_f32_bf16"), "bf16"],
             src["float32"], 2),
            ("load_hf_checkpoint f32 (reference)", ["load_hf", src["float32"], "float32"], src["float32"], 4),
            ("load_checkpoint orbax f32", ["load_orbax", os.path.join(workdir, "ox_f32")], src["float32"], 4),
        ]
        rows = []
        for label, argv, source, itemsize in cases:
            base, result, peak_anon = _run_case(argv)
            ckpt_bytes, largest = _sizes(source, itemsize)
            out = _disk_bytes(argv[2]) if argv[0] == "convert" else None
            rows.append(Row(label, ckpt_bytes, largest, base["VmRSS"], result["status"]["VmHWM"] - base["VmRSS"],
                            peak_anon - base["RssAnon"], result["seconds"], out))
            print(f"  {label}: done in {result['seconds']:.1f} s", flush=True)
        mb = 1e6
        lines = ["| case | checkpoint MB | largest leaf MB | baseline RSS MB | peak RSS - baseline MB | "
                 "peak anon - baseline MB | peak / checkpoint | time s | output on disk MB |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r.case} | {r.ckpt_bytes / mb:.0f} | {r.largest_leaf / mb:.0f} | {r.baseline / mb:.0f} | "
                         f"{r.peak_delta / mb:.0f} | {r.anon_delta / mb:.0f} | {r.peak_delta / r.ckpt_bytes:.2f} | "
                         f"{r.seconds:.1f} | {'-' if r.out_bytes is None else f'{r.out_bytes / mb:.0f}'} |")
        table = "\n".join(lines)
        print("\n" + table)
        if args.out:
            with open(args.out, "w") as f:
                f.write("# `purekv convert` peak memory (benchmarks/convert_memory.py)\n\n"
                        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPU, {os.cpu_count()} cores; "
                        "bench checkpoint: text hidden 1024 x 8 layers, vocab 32,000, untied; vision depth 4 "
                        "(hidden 640); ~186 M params. Peaks are above the process's resident memory after "
                        "imports (the baseline column).\n\n" + table + "\n\n" + NOTES)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
