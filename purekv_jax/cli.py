"""The ``purekv`` command line.

Sub-commands (each in ``purekv_jax/commands/``):
  demo       write a tiny random Qwen2.5-VL checkpoint (real Qwen tokenizer), load it back and answer a
             built-in video prompt with the full cache and with PureKV, printing a stats table.
  generate   answer a prompt about images / a video with a checkpoint and a KV-cache policy; prints the
             answer and one stats line.
  convert    a Hugging Face Qwen2.5-VL safetensors folder -> an orbax checkpoint folder (streamed,
             verified, written atomically), with the config, tokenizer and preprocessor files beside it.
  calibrate  per-head ST-SpAttn patterns of a model on video prompts, written to a JSON file.
  batch      a JSONL file of requests in static-shape batches, optionally on a device mesh; resumable.
  bench      measurements: on the real trained LM (fidelity: perplexity / agreement / KL per policy), and
             speed / peak memory next to transformers (speed).
  cache      compress once, ask many: `cache save` prefills a video once and saves the compressed cache,
             `cache ask` answers questions from it (`--update`: the conversation goes on).
"""

from __future__ import annotations

import argparse
import sys

from purekv_jax.commands import batch, bench, cache, calibrate, convert, demo, generate
from purekv_jax.heap import map_large_buffers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="purekv",
        description="PureKV-JAX: KV-cache compression and sparse prefill for Qwen2.5-VL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, generate, convert, calibrate, batch, bench, cache):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    map_large_buffers()  # freed XLA buffers back to the OS at once (before any large allocation)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (the batch launcher passes it on)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"purekv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
