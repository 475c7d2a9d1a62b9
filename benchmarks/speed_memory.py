"""Where a ``generate`` process's resident memory goes (not a test): RSS and each stage's own peak, ours
next to transformers, on the bench-small Qwen2.5-VL and one video prompt (``purekv bench speed``'s model).

Each side runs in a fresh process. Stages (each stage's peak measured alone: ``/proc/self/clear_refs``
resets ``VmHWM`` before it): imports (+ jax's CPU client), loading the checkpoint, for ours the prefill
compile, the prefill run, the decode compile and the decode run (``generate``'s compiled programs, wrapped
to read the RSS around them), with XLA's memory analysis of each program (arguments, outputs, temporaries,
aliased = donated bytes, generated code); for transformers the first ``generate`` and a second one.

    JAX_PLATFORMS=cpu python benchmarks/speed_memory.py [--grid 8x16x16] [--policy full|purekv] [--new 32] \
        [--sides ours,hf]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# by its path, not through the purekv_jax package: the transformers child must not import jax
sys.path.insert(0, os.path.join(REPO, "purekv_jax", "speed"))
from standalone import PROMPT_FIELDS, load_prompt, memory_status  # noqa: E402
MIB = 2**20


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Stages:
    """Records (stage, RSS after, the stage's own peak) as the child walks through its stages."""

    def __init__(self):
        self.rows = []

    def start(self):
        reset_peak()

    def done(self, name: str, **extra):
        s = memory_status(("VmRSS", "VmHWM", "RssAnon", "RssFile"))
        self.rows.append(dict(stage=name, rss=s["VmRSS"], anon=s["RssAnon"], file=s["RssFile"], peak=s["VmHWM"],
                              **extra))
        reset_peak()


def child_ours(args, ckpt: str, prompt: str, stages: Stages) -> None:
    stages.start()
    import jax

    from models.qwen2_5_vl import load_hf_checkpoint
    from purekv_jax import decode as D
    from purekv_jax import generation as G
    from purekv_jax.compile_cache import peak_bytes
    from purekv_jax.config import PureKVConfig
    from purekv_jax.heap import map_large_buffers

    map_large_buffers()  # as the purekv command and purekv bench speed's worker do
    jax.devices()
    stages.done("imports + jax CPU client")
    config, params = load_hf_checkpoint(ckpt)
    stages.done("load_hf_checkpoint", weights=sum(x.nbytes for x in jax.tree.leaves(params)))
    original = G.compiled

    def traced(name, fn, statics, fargs, donate=()):
        stages.done(f"(host work before the {name} compile)")
        program = original(name, fn, statics, fargs, donate)
        m = program.memory
        stages.done(f"{name}: compile", args=m.argument_size_in_bytes, out=m.output_size_in_bytes,
                    temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes, code=m.generated_code_size_in_bytes,
                    program_peak=peak_bytes(m))

        def run(*a):
            out = jax.block_until_ready(program.run(*a))
            stages.done(f"{name}: run")
            return out

        return dataclasses.replace(program, run=run)

    G.compiled = D.compiled = traced
    inputs = load_prompt(prompt)
    ids = inputs.pop("input_ids")
    policy = None if args.policy == "full" else PureKVConfig(budget=0.2)
    for call in range(args.calls):
        res = G.generate(params, config, ids, policy=policy, max_new_tokens=args.new, eos_token_id=(), **inputs)
        stages.done(f"(after generate {call + 1})", kv_kept=res.stats["kv_bytes_kept"],
                    kv_allocated=res.stats["kv_bytes_allocated"])


def child_hf(args, ckpt: str, prompt: str, stages: Stages) -> None:
    stages.start()
    import torch
    import transformers

    stages.done("imports (torch, transformers)")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    stages.done("from_pretrained")
    f = load_prompt(prompt)
    ids = torch.from_numpy(f["input_ids"].astype(np.int64))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values_videos=torch.from_numpy(f["pixel_values_videos"]),
                  video_grid_thw=torch.from_numpy(f["video_grid_thw"].astype(np.int64)),
                  second_per_grid_ts=torch.from_numpy(f["second_per_grid_ts"]))
    for name in (f"generate {call + 1}" for call in range(args.calls)):
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                           pad_token_id=0)
        stages.done(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="8x16x16")
    ap.add_argument("--policy", default="full", choices=("full", "purekv"))
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--sides", default="ours,hf", help="which processes to run: ours, hf or both")
    ap.add_argument("--calls", type=int, default=2,
                    help="generate calls per process (purekv bench speed's worker: 1 + --reps)")
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "CKPT", "PROMPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, ckpt, prompt = args.child
        stages = Stages()
        (child_hf if side == "hf" else child_ours)(args, ckpt, prompt, stages)
        print(json.dumps(stages.rows))
        return

    import jax

    from models.qwen2_5_vl import init_params, save_hf_checkpoint
    from purekv_jax.speed.model import bench_small_config, parse_grid, video_prompt

    config = bench_small_config()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(save_hf_checkpoint(os.path.join(tmp, "m"), config, init_params(config, jax.random.key(0))))
        p = video_prompt(config, parse_grid(args.grid))
        prompt = os.path.join(tmp, "prompt.npz")
        np.savez(prompt, **{k: getattr(p, k) for k in PROMPT_FIELDS})
        print(f"# generate memory by stage: bench-small, video {args.grid} ({p.n_tokens} tokens), "
              f"{args.new} new tokens, ours: {args.policy}\n")
        env = {**os.environ, "PYTHONPATH": REPO}
        for side in args.sides.split(","):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--grid", args.grid, "--policy", args.policy, "--new",
                                  str(args.new), "--calls", str(args.calls), "--child", side, ckpt, prompt],
                                 env=env, capture_output=True,
                                 text=True, check=True)
            rows = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"## {side} ({time.perf_counter() - t0:.0f} s)\n")
            print("| stage | RSS after MiB | anon / file MiB | stage peak MiB | "
                  "XLA: args / out / temp / alias / code MiB |")
            print("| --- | ---: | ---: | ---: | --- |")
            for r in rows:
                xla = " / ".join(f"{r[k] / MIB:.1f}" for k in ("args", "out", "temp", "alias", "code")) \
                    if "code" in r else ""
                print(f"| {r['stage']} | {r['rss'] / MIB:.0f} | {r['anon'] / MIB:.0f} / {r['file'] / MIB:.0f} | "
                      f"{r['peak'] / MIB:.0f} | {xla} |")
            print(f"\nprocess peak (max of the stage peaks): {max(r['peak'] for r in rows) / MIB:.0f} MiB\n")


if __name__ == "__main__":
    main()
