"""The ``purekv`` command line.

Sub-commands:
  demo      write a tiny random Qwen2.5-VL checkpoint, load it back and run the model on a built-in
            prompt (text + a synthetic video), with the full cache and with PureKV, printing stats.
  convert   a Hugging Face Qwen2.5-VL safetensors folder -> an orbax checkpoint folder (streamed,
            verified, written atomically), with the config, tokenizer and preprocessor files beside it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time


def _demo(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from models.qwen2_5_vl import forward, init_params, load_hf_checkpoint, save_hf_checkpoint, tiny_config

    config = tiny_config(num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="purekv-demo-") as tmp:
        params = init_params(config, jax.random.key(args.seed))
        save_hf_checkpoint(tmp, config, params)
        config, params = load_hf_checkpoint(tmp)
        print(f"wrote and reloaded a tiny random checkpoint: {config.text.num_hidden_layers} layers, "
              f"hidden {config.text.hidden_size}, vision depth {config.vision.depth}")

    rng = np.random.default_rng(args.seed)
    vis = config.vision
    grid = (args.frames // vis.temporal_patch_size, 8, 8)  # temporal slots, patch rows, patch cols
    n_patches = grid[0] * grid[1] * grid[2]
    n_video_tokens = n_patches // vis.merge_unit
    pixel_values_videos = rng.standard_normal((n_patches, vis.patch_dim), dtype=np.float32)
    prefix = rng.integers(0, 900, size=12)
    suffix = rng.integers(0, 900, size=20)
    input_ids = np.concatenate([
        prefix,
        [config.vision_start_token_id],
        np.full(n_video_tokens, config.video_token_id),
        [config.vision_end_token_id],
        suffix,
    ])[None].astype(np.int32)
    video_grid_thw = np.array([grid], dtype=np.int64)
    print(f"prompt: {input_ids.shape[1]} tokens, of which {n_video_tokens} video tokens "
          f"(grid t={grid[0]} h={grid[1]} w={grid[2]} patches)")

    kwargs = dict(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                  second_per_grid_ts=np.array([1.0]))
    t0 = time.perf_counter()
    logits = forward(params, config, input_ids, **kwargs)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    logits = forward(params, config, input_ids, **kwargs)
    jax.block_until_ready(logits)
    t2 = time.perf_counter()
    print(f"forward: logits {tuple(logits.shape)}, first call {t1 - t0:.2f} s (compile), "
          f"second call {1e3 * (t2 - t1):.1f} ms; next token {int(np.argmax(logits[0, -1]))}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from purekv_jax.checkpoint import convert

    def on_term(signum, frame):  # let `kill` clean up like Ctrl-C does (the temporary folder is removed)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet,
                         compress=args.compress)
    except KeyboardInterrupt:
        print(f"purekv convert: interrupted; {args.dst} was not written", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"purekv convert: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    mib = 1 << 20
    print(f"wrote {result.path}: {result.n_leaves} params leaves from {result.n_tensors} tensors, "
          f"{result.params_bytes / mib:.1f} MiB {result.dtype} (source {result.source_bytes / mib:.1f} MiB), "
          f"verified; copied {', '.join(result.copied_files)}; {result.seconds:.1f} s")
    if result.stale_temp_folders:
        print(f"note: left by an earlier interrupted convert, safe to delete: {' '.join(result.stale_temp_folders)}",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="purekv",
        description="PureKV-JAX: KV-cache compression and sparse prefill for Qwen2.5-VL.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the built-in example on a tiny random checkpoint",
                          description="Write a tiny random Qwen2.5-VL checkpoint, load it back, and run "
                                      "the model on a built-in text + video prompt.")
    demo.add_argument("--layers", type=int, default=2, help="text decoder layers (default 2)")
    demo.add_argument("--frames", type=int, default=8, help="video frames, a multiple of 2 (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)

    conv = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint folder to an orbax checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a Hugging Face Qwen2.5-VL folder (config.json + model.safetensors, or shards "
                    "with model.safetensors.index.json) into an orbax checkpoint for fast, sharded loading.",
        epilog="The weights are streamed one stacked tensor group at a time (peak memory about the largest\n"
               "group, not the model), written to a hidden temporary folder next to DST, restored and\n"
               "checksummed, and only then renamed to DST: an interrupted run leaves no DST. config.json,\n"
               "the tokenizer files, chat template, generation and (video) preprocessor configs are copied.\n"
               "Load the result with purekv_jax.checkpoint.load_checkpoint(DST, shardings=...).\n\n"
               "example:\n  purekv convert ~/models/Qwen2.5-VL-7B-Instruct ~/models/qwen25vl-7b-orbax --dtype bf16")
    conv.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder to read")
    conv.add_argument("dst", metavar="DST", help="folder to create (must not exist unless --force)")
    conv.add_argument("--dtype", choices=("bf16", "float32"), default="bf16",
                      help="dtype of the stored params (default bf16; casting rounds to nearest even)")
    conv.add_argument("--force", action="store_true",
                      help="replace DST if it exists (only after the new checkpoint is complete)")
    conv.add_argument("--compress", action="store_true",
                      help="zstd-compress the stored arrays (smaller, slower to load, more memory while writing)")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    conv.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"purekv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
