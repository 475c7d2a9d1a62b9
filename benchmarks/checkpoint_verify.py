"""What checking an orbax checkpoint's files at load costs (not a test).

Converts convert_memory.py's bench-sized random checkpoint (~186 M params, float32: ~744 MB) and times,
with the page cache warm (each case run once untimed first, then the median of ``--reps``):

* ``load_checkpoint(verify=True)``: the file table's names and sizes, every file's sha256 (parallel
  threads), then the restore;
* ``load_checkpoint(verify=False)``: names and sizes only, then the restore;
* ``check_file_table`` alone (the hashing), and the hash throughput;
* ``verify_checkpoint`` (every leaf restored on the host and hashed: what a marker without the file table
  costs on top of the load).

    JAX_PLATFORMS=cpu python benchmarks/checkpoint_verify.py [--workdir DIR] [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convert_memory import bench_config  # noqa: E402

from models.qwen2_5_vl import save_hf_checkpoint  # noqa: E402
from purekv_jax.checkpoint import convert, load_checkpoint, verify_checkpoint  # noqa: E402
from purekv_jax.checkpoint_files import check_file_table, read_marker  # noqa: E402
from purekv_jax.commands.tiny import random_params  # noqa: E402


def median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="purekv-verify-")
    try:
        config = bench_config()
        src = save_hf_checkpoint(os.path.join(work, "hf"), config, random_params(config, seed=0))
        dst = os.path.join(work, "ox")
        convert(src, dst, dtype="float32", force=True, progress=False)
        marker = read_marker(dst)
        nbytes = sum(f["size"] for f in marker["files"].values())
        rows = [
            ("load_checkpoint(verify=True)", median_s(lambda: load_checkpoint(dst), args.reps)),
            ("load_checkpoint(verify=False)", median_s(lambda: load_checkpoint(dst, verify=False), args.reps)),
            ("check_file_table (hashes only)", median_s(lambda: check_file_table(dst, marker["files"]), args.reps)),
            ("verify_checkpoint (per leaf, host)", median_s(lambda: verify_checkpoint(dst), args.reps)),
        ]
        lines = [f"checkpoint: {nbytes / 2**20:.0f} MiB in {len(marker['files'])} files, {os.cpu_count()} CPU cores, "
                 f"page cache warm, median of {args.reps}", "", "| case | seconds |", "| --- | --- |"]
        lines += [f"| {name} | {s:.2f} |" for name, s in rows]
        lines += ["", f"hash throughput: {nbytes / rows[2][1] / 2**20:.0f} MiB/s; verify adds "
                      f"{rows[0][1] - rows[1][1]:+.2f} s ({(rows[0][1] / rows[1][1] - 1) * 100:+.0f}%) to the load"]
        print("\n".join(lines))
        if args.out:
            with open(args.out, "w") as f:
                f.write("# Checking an orbax checkpoint's files at load\n\n"
                        "`JAX_PLATFORMS=cpu python benchmarks/checkpoint_verify.py --out "
                        f"{os.path.relpath(args.out, REPO)}`\n\n" + "\n".join(lines) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
