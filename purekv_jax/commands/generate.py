"""``purekv generate``: one prompt with images / videos through a checkpoint, with a KV-cache policy.

Order of work (every user error surfaces before the weights are read):

1. the arguments alone: policy name and overrides (:func:`purekv_jax.presets.build_policy`), budget range,
   sampling values, media files exist and are readable files, the checkpoint folder holds weights,
   ``config.json`` and ``tokenizer.json``;
2. the prompt: the media decoded and patched, the chat template rendered, then the token ids, vision tokens,
   positions and the policy checked against the model (:func:`purekv_jax.requests.check_prompt`);
3. the weights are loaded (orbax or Hugging Face folder) and :func:`purekv_jax.requests.run_policy` runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap

from models.family import config_from_json
from models.qwen2_5_vl.model import text_part
from purekv_jax import checkpoint
from purekv_jax.config import PureKVConfig
from purekv_jax.kept_plot import show_kept
from purekv_jax.processing import Qwen25VLProcessor
from purekv_jax.presets import CLI_POLICIES, build_policy, policy_label, preset
from purekv_jax.requests import (build_inputs, check_checkpoint_folder, check_file, check_output_file, check_policy,
                                 check_prompt, check_text, eos_ids, make_processor, run_policy)
from purekv_jax.run_stats import format_plan, format_stats
from purekv_jax.value_parsers import parse_anchors, parse_budget, parse_kv_bits, parse_pixels

from .errors import ArgumentsError, one_line_errors, run_guarded

EPILOG = """\
budget: a fraction in (0, 1] of the prompt's tokens kept per layer and KV head (e.g. 0.2), or an
integer count > 1 (e.g. 512). The last --window tokens and the first --sink tokens are always kept,
so the budget must cover at least window + sink tokens.

examples:
  purekv generate --model ~/models/Qwen2.5-VL-7B-Instruct --video clip.mp4 \\
      --prompt "What happens in this video?" --policy purekv --budget 0.2
  purekv generate --model ~/models/qwen25vl-7b-orbax --image a.jpg --image b.jpg \\
      --prompt "What differs between the two pictures?" --policy snapkv --budget 512
  purekv demo --save /tmp/tiny && purekv generate --model /tmp/tiny --video clip.mp4 \\
      --prompt "Describe the video." --max-pixels 200704 --show-kept kept.png

The answer is printed, then one stats line: prefill time, decode tokens/s, the prompt's KV cache in
MiB without compression (full) and as kept by the policy, prompt tokens, and the one-time compile time."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``generate`` on the ``purekv`` sub-command action ``sub``."""
    p = sub.add_parser(
        "generate",
        help="answer a prompt about images / a video with a checkpoint and a KV-cache policy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a Qwen2.5-VL or VideoLLaMA2 checkpoint (a safetensors folder, the family named by its\n"
                    "config.json, or one written by `purekv convert`),\n"
                    "read the images / videos, render the chat template, generate with the chosen KV-cache\n"
                    "policy, and print the answer and one stats line.",
        epilog=EPILOG,
    )
    one_line_errors(p)
    io = p.add_argument_group("model and inputs")
    io.add_argument("--model", required=True, metavar="DIR",
                    help="checkpoint folder: Hugging Face (config.json + model.safetensors[.index.json]) or orbax "
                         "(from `purekv convert`); needs tokenizer.json")
    io.add_argument("--video", action="append", default=[], metavar="PATH",
                    help="a video file (mp4, mkv, webm, ...; decoded with PyAV); repeat for several")
    io.add_argument("--image", action="append", default=[], metavar="PATH",
                    help="an image file (jpg, png, ...); repeat for several")
    io.add_argument("--prompt", required=True, metavar="TEXT", help="the question / instruction")
    io.add_argument("--system", metavar="TEXT", default=None,
                    help="system prompt (default: the template's 'You are a helpful assistant.')")
    io.add_argument("--dtype", choices=("auto", "float32", "bf16"), default="auto",
                    help="params dtype (default auto: as stored)")
    io.add_argument("--allow-special", action="store_true",
                    help="honour special-token strings (<|im_start|>, ...) in --prompt / --system (default: "
                         "tokenised as plain text)")
    io.add_argument("--no-verify", action="store_true",
                    help="skip the checksums of an orbax checkpoint's files at load (sizes are still checked)")

    add_media_arguments(p)
    add_kv_arguments(p)
    add_decoding_arguments(p)
    p.add_argument("--show-kept", metavar="FILE", default=None,
                   help="draw what the cache kept into FILE (.png, .pdf, .svg): for a video, its frames with the "
                        "fraction of layers x KV heads keeping each 28x28 patch overlaid, and a strip of the text "
                        "tokens; for a text prompt, the text shaded token by token")
    p.add_argument("--verbose", action="store_true",
                   help="also print the resolved plan on stderr: budgets, cache slots, and per ST-SpAttn pattern "
                        "set the path the cost model chose (block-sparse or dense) with its predicted times")
    p.set_defaults(func=run)
    p.epilog = EPILOG + "\n\n" + policies_help(CLI_POLICIES)
    return p


def policies_help(names: tuple[str, ...]) -> str:
    """The ``policies:`` section of a command's epilog: each name with its preset's one-line help."""
    width = max(len(k) for k in names) + 1
    return "policies:\n" + "\n".join(
        textwrap.fill(preset(k).help, 100, initial_indent=f"  {k:<{width}} ", subsequent_indent=" " * (width + 3))
        for k in names)


def add_media_arguments(p: argparse.ArgumentParser) -> None:
    """The media sampling flags (``--fps``, ``--max-frames``, ``--max-pixels``, ``--min-pixels``), shared by
    the commands that read videos / images (checked by :func:`check_media_args`)."""
    media = p.add_argument_group("media sampling")
    media.add_argument("--fps", type=float, default=None,
                       help="video frames sampled per second (default: the checkpoint's video processor, else 2)")
    media.add_argument("--max-frames", type=int, default=None, metavar="N",
                       help="at most N frames per video (default: the processor's, 768; VideoLLaMA2: the frames sampled "
                            "per video, default its config's num_frames)")
    media.add_argument("--max-pixels", type=parse_pixels, default=None, metavar="PX",
                       help="pixel cap per image and per video frame, e.g. 200704 or 448*448 (default: the "
                            "processor's; images 1003520, video frames 602112). Lowers --min-pixels to match")
    media.add_argument("--min-pixels", type=parse_pixels, default=None, metavar="PX",
                       help="smaller images / frames are upscaled to this (default: the processor's; images 3136, "
                            "video frames 100352)")


def add_kv_arguments(p: argparse.ArgumentParser, policies: tuple[str, ...] = CLI_POLICIES,
                     default: str = "purekv"):
    """The KV-cache policy flags (``--policy`` among ``policies``, ``--budget``, ``--window``, ...), shared
    by the commands that compress a prompt (read by :func:`policy_from_args`); returns the argument group,
    for a command's own KV-cache flags."""
    kv = p.add_argument_group("KV cache")
    kv.add_argument("--policy", default=default, metavar="NAME",
                    help="one of: " + ", ".join(policies) + f" (default {default}; see below)")
    kv.add_argument("--budget", type=str, default="0.2", metavar="B",
                    help="kept KV entries per layer and KV head: a fraction in (0, 1] of the prompt or a count "
                         "(default 0.2)")
    kv.add_argument("--window", type=int, default=32, metavar="W",
                    help="observation window: the last W prompt tokens score the rest and are kept (default 32)")
    kv.add_argument("--sink", type=int, default=4, metavar="N", help="first tokens always kept (default 4)")
    kv.add_argument("--anchors", type=parse_anchors, default=(2,), metavar="L[,L...]",
                    help="CLIE anchor layers, 0-based (purekv, clie; default 2); ST-SpAttn starts after the last")
    kv.add_argument("--budget-unit", choices=("tokens", "bytes"), default="tokens",
                    help="what --budget counts: KV entries (default) or bytes of the full cache in the model's "
                         "dtype (then as many entries are kept as fit at --kv-bits)")
    kv.add_argument("--kv-bits", type=parse_kv_bits, default=None, metavar="{8,4,2,auto}",
                    help="store the kept prompt entries as KIVI codes of this width (the most recent window "
                         "stays in the model's dtype); auto (byte budgets): the width the measured tables "
                         "favour (docs/kv_bytes.md)")
    kv.add_argument("--st-sparse", action="store_true",
                    help="spatial-temporal block-sparse prefill attention for video tokens (ST-SpAttn) from "
                         "--st-start on; works with every policy (with full: every entry kept)")
    kv.add_argument("--st-start", type=int, default=None, metavar="L",
                    help="first ST-SpAttn layer (default: the layer after the last --anchors layer)")
    kv.add_argument("--head-patterns", default=None, metavar="FILE",
                    help="per-head ST-SpAttn patterns from `purekv calibrate` (default: union for every head)")
    return kv


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The decoding flags (``--max-new-tokens``, sampling, ``--seed``; checked by :func:`check_decoding_args`)."""
    gen = p.add_argument_group("decoding")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="stop after N tokens (or at the end-of-turn token; default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default 0)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--seed", type=int, default=0, metavar="N", help="sampling and random-policy seed (default 0)")


def policy_from_args(args: argparse.Namespace, names: tuple[str, ...] = CLI_POLICIES) -> PureKVConfig | None:
    """The policy :func:`add_kv_arguments`' flags name (None = full cache), ``--head-patterns`` checked."""
    policy = build_policy(args.policy, parse_budget(args.budget), args.window, args.sink, args.anchors,
                          args.st_sparse, args.seed, args.st_start, args.head_patterns, args.budget_unit,
                          args.kv_bits, names=names)
    if args.head_patterns is not None:
        check_file(args.head_patterns, "head patterns")
    return policy


def check_decoding_args(args: argparse.Namespace) -> None:
    """:func:`add_decoding_arguments`' values in range."""
    if args.max_new_tokens < 1:
        raise ArgumentsError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise ArgumentsError(f"--temperature {args.temperature} must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise ArgumentsError(f"--top-k {args.top_k} must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ArgumentsError(f"--top-p {args.top_p} must lie in (0, 1]")


def check_media_args(args: argparse.Namespace) -> None:
    """:func:`add_media_arguments`' values in range, ``--video`` / ``--image`` readable files, ``--system``
    valid text."""
    if args.fps is not None and not (args.fps > 0 and math.isfinite(args.fps)):
        raise ArgumentsError(f"--fps {args.fps} must be > 0")
    if args.max_frames is not None and args.max_frames < 2:
        raise ArgumentsError(f"--max-frames {args.max_frames} must be >= 2 (frames go in pairs)")
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise ArgumentsError(f"--min-pixels {args.min_pixels} is larger than --max-pixels {args.max_pixels}")
    if args.system is not None:
        check_text(args.system, "--system")
    for v in args.video:
        check_file(v, "video")
    for im in args.image:
        check_file(im, "image")


def validate_args(args: argparse.Namespace) -> PureKVConfig | None:
    """Everything checkable without reading the model: returns the policy (None = full cache)."""
    policy = policy_from_args(args)
    check_decoding_args(args)
    check_media_args(args)
    if not check_text(args.prompt, "--prompt").strip():
        raise ArgumentsError("--prompt is empty")
    check_checkpoint_folder(args.model)
    if args.show_kept is not None:
        check_output_file(args.show_kept, "--show-kept")
    return policy


def run(args: argparse.Namespace) -> int:
    """The ``purekv generate`` command (see :func:`~purekv_jax.commands.errors.run_guarded` for the exit
    statuses)."""
    return run_guarded("purekv generate", lambda: generate_answer(args))


def generate_answer(args: argparse.Namespace) -> int:
    """Checks everything, then loads the weights, generates, prints the answer and the stats line."""
    policy = validate_args(args)
    config = config_from_json(args.model)
    proc = make_processor(args.model, fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                          min_pixels=args.min_pixels, allow_special=args.allow_special)
    if args.show_kept is not None and not isinstance(proc, Qwen25VLProcessor):
        raise ArgumentsError("--show-kept draws Qwen2.5-VL's patch layout; it is not built for this checkpoint's "
                             "model family")
    inputs = build_inputs(proc, args.prompt, images=args.image, videos=args.video, system=args.system)
    info = check_prompt(config, proc, inputs, policy, args.max_new_tokens)
    # only now, every check above done; called through the module so tests can watch it
    config, params = checkpoint.load_checkpoint(args.model, dtype=None if args.dtype == "auto" else args.dtype,
                                                verify=not args.no_verify)
    if policy is not None:  # a byte budget counts in the loaded weights' dtype
        check_policy(policy, config.text, info.tokens, kv_dtype=text_part(params).embed.dtype)
    result = run_policy(params, config, proc, inputs, policy, label=args.policy,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, eos=eos_ids(args.model, config))
    print(result.answer.strip())
    print(format_stats(result.stats, info, policy_label(args.policy, policy)), flush=True)
    if args.verbose:
        print(format_plan(result.stats), file=sys.stderr, flush=True)
    if args.show_kept is not None:
        decode = lambda ids: proc.decode(ids, skip_special_tokens=False)  # noqa: E731
        show_kept(result.stats["kept_index"], inputs["input_ids"], decode,
                  pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=inputs.get("video_grid_thw"),
                  video_token_id=config.video_token_id, image_token_id=config.image_token_id, spec=proc.spec,
                  path=args.show_kept, title=f"{policy_label(args.policy, policy)}: what the KV cache kept")
        print(f"kept tokens drawn to {args.show_kept}", file=sys.stderr, flush=True)
    return 0
