"""``purekv convert``: a safetensors checkpoint folder (Qwen2.5-VL or VideoLLaMA2, by its config.json) -> an orbax
checkpoint folder."""

from __future__ import annotations

import argparse
import signal
import sys

from purekv_jax.checkpoint import convert


def run(args: argparse.Namespace) -> int:
    """The ``purekv convert`` command: 0 when written, 1 on a disk / permission error, 130 when interrupted."""

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
    if result.removed_temp_folders:
        print(f"note: removed the temporary folders of killed conversions: {' '.join(result.removed_temp_folders)}",
              file=sys.stderr)
    if result.stale_temp_folders:
        print("note: left alone, temporary folders of conversions still running (or of an older purekv, without "
              f"an owner lock): {' '.join(result.stale_temp_folders)}", file=sys.stderr)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    conv = sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint folder to an orbax checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a Qwen2.5-VL (Hugging Face) or VideoLLaMA2 (the release's layout) folder (config.json "
                    "+ model.safetensors, or shards with model.safetensors.index.json; the model family is read "
                    "from config.json) into an orbax checkpoint for fast, sharded loading.",
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
                      help="replace DST if it exists and is empty or a converted checkpoint (only after the new "
                           "checkpoint is complete)")
    conv.add_argument("--compress", action="store_true",
                      help="zstd-compress the stored arrays (smaller, slower to load, more memory while writing)")
    conv.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    conv.set_defaults(func=run)
    return conv
