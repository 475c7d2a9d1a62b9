"""Decode per token of two checkouts side by side, alternating in one run (not a test).

Each measurement is ``benchmarks/decode_cpu_time.py --json`` (this tree's script) in a fresh process pinned to
one core, with ``PYTHONPATH`` set to the checkout under test; per round and prompt size the two checkouts run
one after the other, the order alternating between rounds. Reports the medians of every call's CPU and wall
ms per token and their ratios, with the load average, as a markdown table:

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/decode_ab.py /tmp/before . --prompts 570,2138 --rounds 4 --out benchmarks/results/decode_cpu_time.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_cpu_time.py")


def measure(tree: str, prompt: int, reps: int, core: int) -> dict:
    """One fresh process of ``tree``'s code: ``{"cpu_ms": [...], "wall_ms": [...]}`` per token."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = ["taskset", "-c", str(core), sys.executable, SCRIPT, str(prompt), "--reps", str(reps), "--json"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--prompts", default="570,2138")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the table here (markdown) as well as printing it")
    args = ap.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]
    trees = {"before": args.before, "after": args.after}
    got = {(name, p): {"cpu_ms": [], "wall_ms": []} for name in trees for p in prompts}
    load_start = os.getloadavg()
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for p in prompts:
            for name in order:
                m = measure(trees[name], p, args.reps, args.core)
                for key in ("cpu_ms", "wall_ms"):
                    got[(name, p)][key] += m[key]
                print(f"round {r + 1} prompt {p} {name}: cpu {statistics.median(m['cpu_ms']):.2f} "
                      f"wall {statistics.median(m['wall_ms']):.2f} ms/token", flush=True)
    load_end = os.getloadavg()
    med = lambda name, p, key: statistics.median(got[(name, p)][key])
    lines = [f"`python benchmarks/decode_ab.py {args.before} {args.after} --prompts {args.prompts} --rounds "
             f"{args.rounds} --reps {args.reps}` (load average {load_start[0]:.1f} at the start, "
             f"{load_end[0]:.1f} at the end; {args.rounds * args.reps} calls per cell)", "",
             "| prompt | CPU ms/token before | after | after / before | wall ms/token before | after | "
             "after / before | decode tok/s (wall) before | after |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in prompts:
        cb, ca = med("before", p, "cpu_ms"), med("after", p, "cpu_ms")
        wb, wa = med("before", p, "wall_ms"), med("after", p, "wall_ms")
        lines.append(f"| {p} | {cb:.2f} | {ca:.2f} | {ca / cb:.2f} | {wb:.2f} | {wa:.2f} | {wa / wb:.2f} | "
                     f"{1e3 / wb:.1f} | {1e3 / wa:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(table + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
