"""``purekv bench``: quality measurements on the real trained LM (``fidelity``, see ``docs/fidelity.md``) and
speed / memory next to transformers (``speed``, see ``docs/speed.md``)."""

from __future__ import annotations

import argparse
import shlex

from purekv_jax.fidelity import main
from purekv_jax.requests import check_file
from purekv_jax.speed.model import parse_grid
from purekv_jax.speed.runner import CONFIGS, SpeedSettings, run_speed_bench, write_results

from .errors import ArgumentsError, run_guarded

#: the prompts of issue-sized runs: 570 and 2,138 tokens (48 + 40 text tokens around the video).
ISSUE_GRIDS = "4x12x10,8x16x16"


def _fidelity(args: argparse.Namespace) -> int:
    return main(args.extra)


def _speed(args: argparse.Namespace) -> int:
    return run_guarded("purekv bench speed", lambda: speed(args))


def speed(args: argparse.Namespace) -> int:
    """Checks the options, runs the configurations and prints / writes the table."""
    grids = tuple(parse_grid(g) for g in (ISSUE_GRIDS if args.issue_sizes else args.grids).split(",") if g.strip())
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise ArgumentsError(f"--configs {args.configs!r}: each must be one of {', '.join(CONFIGS)}")
    for name, value, least in (("--new", args.new, 2), ("--rounds", args.rounds, 1), ("--reps", args.reps, 1),
                               ("--cores", args.cores, 0)):
        if value < least:
            raise ArgumentsError(f"{name}={value} must be >= {least}")
    if not 0 < args.budget <= 1:
        raise ArgumentsError(f"--budget={args.budget} must be a fraction in (0, 1]")
    if args.patterns is not None:
        check_file(args.patterns, "--patterns")
    settings = SpeedSettings(grids=grids, new=args.new, rounds=args.rounds, reps=args.reps, budget=args.budget,
                             patterns=args.patterns, configs=configs, cores=args.cores)
    out = run_speed_bench(settings)
    command = (f"purekv bench speed --grids {','.join('x'.join(map(str, g)) for g in grids)} --new {args.new} "
               f"--rounds {args.rounds} --reps {args.reps} --cores {args.cores} --budget {args.budget} "
               f"--configs {','.join(configs)}"
               + (f" --patterns {shlex.quote(args.patterns)}" if args.patterns else ""))
    paths = write_results(out, args.out, command)
    print(open(paths["md"]).read())
    print(f"wrote {paths['json']}, {paths['md']}, {paths['plot']}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="measure quality on a real trained LM, or speed and memory next to transformers",
        description="`purekv bench fidelity`: each KV policy on SmolLM2-135M-Instruct (the real LM of DATA.md). "
                    "`purekv bench speed`: prefill / decode speed and process peak memory of our full cache, "
                    "PureKV and PureKV + ST-SpAttn next to transformers, on the bench-small Qwen2.5-VL.")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    fid = kinds.add_parser(
        "fidelity", add_help=False,
        help="perplexity, top-1 agreement and KL of every policy at 10/20/40%% budgets, plus ablations",
        description="Forwards its options to python -m purekv_jax.fidelity.")
    fid.set_defaults(func=_fidelity, takes_extra=True)
    spd = kinds.add_parser(
        "speed", help="prefill / decode speed and peak memory: ours (full, PureKV, PureKV + ST) and transformers",
        description="Every configuration in a fresh process per round (peak RSS its own), order rotating between "
                    "rounds; medians of every timed call; compile time apart. bench-small Qwen2.5-VL: hidden 512, "
                    "8 layers, 8 / 2 heads, random weights, float32; synthetic video prompts (48 text tokens, "
                    "the video, 40 text tokens).")
    spd.add_argument("--grids", default="2x8x8",
                     help="comma-separated merged video grids T x H x W, one prompt each (default: %(default)s, "
                          "218 tokens)")
    spd.add_argument("--issue-sizes", action="store_true",
                     help=f"the issue's prompt sizes instead of --grids: {ISSUE_GRIDS} (570 and 2,138 tokens)")
    spd.add_argument("--new", type=int, default=32, help="tokens generated per call (default: %(default)s)")
    spd.add_argument("--rounds", type=int, default=2, help="fresh processes per configuration and prompt")
    spd.add_argument("--reps", type=int, default=2, help="timed calls per process, after one compile call")
    spd.add_argument("--budget", type=float, default=0.2, help="PureKV's budget (default: %(default)s)")
    spd.add_argument("--patterns", default=None, help="a `purekv calibrate` file for the ST-SpAttn row")
    spd.add_argument("--configs", default=",".join(CONFIGS),
                     help="comma-separated rows (default: %(default)s; hf is skipped without transformers)")
    spd.add_argument("--cores", type=int, default=1,
                     help="CPUs each worker process is pinned to (default: %(default)s, as the issue's table; 0: all)")
    spd.add_argument("--out", default="docs/speed", help="folder for speed.json, speed_table.md, speed.png")
    spd.set_defaults(func=_speed)
    return p
