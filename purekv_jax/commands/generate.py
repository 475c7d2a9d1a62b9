"""``purekv generate``: one prompt with images / videos through a checkpoint, with a KV-cache policy.

Order of work (every user error surfaces before the weights are read):

1. the arguments alone: policy name, budget range, window, sampling values, media files exist and are readable
   files, the checkpoint folder holds weights, ``config.json`` and ``tokenizer.json``;
2. the prompt: ``config.json``, the tokenizer and processor settings are read, the media decoded and patched
   (:class:`~purekv_jax.processing.Qwen25VLProcessor`), the chat template rendered; then the token ids are
   checked against the vocabulary and the processor's vision tokens against the config, the positions
   (M-RoPE, ``get_rope_index``) against ``max_position_embeddings``, and the budget against the window;
3. the weights are loaded (orbax or Hugging Face folder) and :func:`purekv_jax.generate` runs.

The helpers here (:func:`build_policy`, :func:`make_processor`, :func:`check_prompt`, :func:`run_policy`,
:func:`format_stats`) are shared with ``purekv demo``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20

#: ``--policy`` names -> one-line help. The base names map to ``PureKVConfig(base=..., cross_layer=False)``.
POLICIES = {
    "full": "the full KV cache, nothing dropped (baseline)",
    "purekv": "the library's default policy, PureKVConfig(budget=...), chosen by measurement on a real LM "
              "(docs/retrieval.md): every layer's own SnapKV window score (flash-compatible), the window aligned "
              "to the question (the prompt text after the video / image, at most --window tokens), avg pooling "
              "15; add "
              "--st-sparse for the ST-SpAttn prefill",
    "clie": "the paper's CLIE: SnapKV window score at the --anchors layers, carried to the layers above "
            "(times value norms)",
    "snapkv": "SnapKV: every layer ranks its entries by the attention of the last --window prompt tokens",
    "pyramid": "PyramidKV: SnapKV scores with budgets decreasing from the bottom layers to the top",
    "streaming": "StreamingLLM: the first --sink tokens plus the most recent ones",
    "random": "random entries (plus the window and the sinks); a control",
    "h2o": "H2O: accumulated attention over all queries (evaluation only: needs the full attention matrix)",
}

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
      --prompt "Describe the video." --max-pixels 200704

The answer is printed, then one stats line: prefill time, decode tokens/s, the prompt's KV cache in
MiB without compression (full) and as kept by the policy, prompt tokens, and the one-time compile time."""


class GenerateArgsError(ValueError):
    """A command-line value that cannot work (raised before any weights are read)."""


# ------------------------------------------------------------------------------------- argument parsing
def _budget(text: str) -> float | int:
    """``--budget``: ``0.2`` -> fraction, ``512`` -> count, ``1`` / ``1.0`` -> everything (fraction 1)."""
    try:
        value = float(text)
    except ValueError:
        raise GenerateArgsError(f"--budget {text!r} is not a number; give a fraction in (0, 1] or a count > 1") from None
    if not math.isfinite(value) or value <= 0:
        raise GenerateArgsError(f"--budget {text} is outside (0, 1]; give a fraction in (0, 1] or a count > 1")
    if value <= 1:
        return float(value)
    if not value.is_integer() or any(c in text for c in ".eE"):
        raise GenerateArgsError(
            f"--budget {text} is outside (0, 1]; a budget above 1 is a token count and must be an integer"
        )
    return int(value)


def _pixels(text: str) -> int:
    """``--max-pixels``: an integer, or a product such as ``448*448`` / ``448x448``."""
    parts = text.lower().replace("x", "*").split("*")
    try:
        value = math.prod(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pixel count (e.g. 200704 or 448*448)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _anchors(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(a) for a in text.replace(" ", "").split(",") if a)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers (e.g. 2 or 1,8)") from None


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report bad arguments in one line (``PROG: error: ...; see PROG --help``), exit 2."""

    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``generate`` on the ``purekv`` sub-command action ``sub``."""
    p = sub.add_parser(
        "generate",
        help="answer a prompt about images / a video with a checkpoint and a KV-cache policy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a Qwen2.5-VL checkpoint (a Hugging Face folder or one written by `purekv convert`),\n"
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

    media = p.add_argument_group("media sampling")
    media.add_argument("--fps", type=float, default=None,
                       help="video frames sampled per second (default: the checkpoint's video processor, else 2)")
    media.add_argument("--max-frames", type=int, default=None, metavar="N",
                       help="at most N frames per video (default: the processor's, 768)")
    media.add_argument("--max-pixels", type=_pixels, default=None, metavar="PX",
                       help="pixel cap per image and per video frame, e.g. 200704 or 448*448 (default: the "
                            "processor's; images 1003520, video frames 602112). Lowers --min-pixels to match")
    media.add_argument("--min-pixels", type=_pixels, default=None, metavar="PX",
                       help="smaller images / frames are upscaled to this (default: the processor's; images 3136, "
                            "video frames 100352)")

    kv = p.add_argument_group("KV cache")
    kv.add_argument("--policy", default="purekv", metavar="NAME",
                    help="one of: " + ", ".join(POLICIES) + " (default purekv; see below)")
    kv.add_argument("--budget", type=str, default="0.2", metavar="B",
                    help="kept KV entries per layer and KV head: a fraction in (0, 1] of the prompt or a count "
                         "(default 0.2)")
    kv.add_argument("--window", type=int, default=32, metavar="W",
                    help="observation window: the last W prompt tokens score the rest and are kept (default 32)")
    kv.add_argument("--sink", type=int, default=4, metavar="N", help="first tokens always kept (default 4)")
    kv.add_argument("--anchors", type=_anchors, default=(2,), metavar="L[,L...]",
                    help="CLIE anchor layers, 0-based (purekv, clie; default 2); ST-SpAttn starts after the last")
    kv.add_argument("--st-sparse", action="store_true",
                    help="spatial-temporal block-sparse prefill attention for video tokens (ST-SpAttn) from "
                         "--st-start on; works with every policy (with full: every entry kept)")
    kv.add_argument("--st-start", type=int, default=None, metavar="L",
                    help="first ST-SpAttn layer (default: the layer after the last --anchors layer)")
    kv.add_argument("--head-patterns", default=None, metavar="FILE",
                    help="per-head ST-SpAttn patterns from `purekv calibrate` (default: union for every head)")

    gen = p.add_argument_group("decoding")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="stop after N tokens (or at the end-of-turn token; default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default 0)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--seed", type=int, default=0, metavar="N", help="sampling and random-policy seed (default 0)")
    p.set_defaults(func=run)
    p.epilog = EPILOG + "\n\npolicies:\n" + "\n".join(
        textwrap.fill(v, 100, initial_indent=f"  {k:<10} ", subsequent_indent=" " * 13) for k, v in POLICIES.items())
    return p


# ------------------------------------------------------------------------------------- cheap checks
def check_file(path: str, what: str) -> None:
    """A media file that exists, is a regular file and can be opened for reading."""
    from purekv_jax.processing import MediaFileError

    if not os.path.exists(path):
        raise MediaFileError(f"{what} file not found: {path}")
    if not os.path.isfile(path):
        raise MediaFileError(f"{what} path is not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise MediaFileError(f"{what} file cannot be read: {path} ({err.strerror or err})") from None
    if os.path.getsize(path) == 0:
        raise MediaFileError(f"{what} file is empty: {path}")


def check_checkpoint_folder(path: str) -> None:
    """The folder exists and holds weights (orbax marker or safetensors), ``config.json`` and ``tokenizer.json``."""
    from models.qwen2_5_vl.loader import INDEX_FILE, SINGLE_FILE, CheckpointError
    from purekv_jax.checkpoint import MARKER_FILE, PARAMS_DIR

    if not os.path.exists(path):
        raise CheckpointError(f"--model {path}: no such folder")
    if not os.path.isdir(path):
        raise CheckpointError(f"--model {path}: not a folder (give the checkpoint folder, not a file in it)")
    has = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
    if not (has(MARKER_FILE) or has(SINGLE_FILE) or has(INDEX_FILE)):
        if has(PARAMS_DIR):
            raise CheckpointError(f"--model {path}: incomplete orbax checkpoint (params/ without {MARKER_FILE}; an "
                                  "interrupted `purekv convert`?): convert again")
        raise CheckpointError(f"--model {path}: no weights found (neither {SINGLE_FILE}, {INDEX_FILE} nor an orbax "
                              f"checkpoint's {MARKER_FILE})")
    for name in ("config.json", "tokenizer.json"):
        if not has(name):
            raise CheckpointError(f"--model {path}: no {name} in the checkpoint folder")


def build_policy(name: str, budget: float | int, window: int = 32, sink: int = 4, anchors=(2,),
                 st_sparse: bool = False, seed: int = 0, st_start: int | None = None,
                 head_patterns: str | None = None):
    """``--policy`` name -> ``None`` (full cache) or a :class:`~purekv_jax.config.PureKVConfig`
    (``full`` with ``st_sparse``: ``PureKVConfig(budget=1.0, cross_layer=False, st_sparse=True)``)."""
    from purekv_jax.config import PureKVConfig

    if name not in POLICIES:
        raise GenerateArgsError(f"unknown --policy {name!r}; choose one of: {', '.join(POLICIES)}")
    if window < 1:
        raise GenerateArgsError(f"--window {window} must be >= 1")
    if sink < 0:
        raise GenerateArgsError(f"--sink {sink} must be >= 0")
    if not st_sparse and (st_start is not None or head_patterns is not None):
        raise GenerateArgsError("--st-start and --head-patterns configure ST-SpAttn: add --st-sparse")
    st = {}
    if st_sparse:
        st["st_sparse"] = True
        if st_start is not None:
            if st_start < 0:
                raise GenerateArgsError(f"--st-start {st_start} must be >= 0")
            st["st_start"] = int(st_start)
        if head_patterns is not None:
            check_file(head_patterns, "head patterns")
            st["head_patterns_file"] = head_patterns
    if name == "full":
        if not st_sparse:
            return None
        return PureKVConfig(budget=1.0, window=window, sink=sink, cross_layer=False, anchor_layers=tuple(anchors), **st)
    if isinstance(budget, int) and budget < window + sink:
        raise GenerateArgsError(f"--budget {budget} is below the --window {window} + --sink {sink} = "
                                f"{window + sink} tokens that are always kept; raise --budget or lower --window")
    common = dict(budget=budget, window=window, sink=sink, seed=seed, **st)
    if name == "purekv":
        extra = {} if tuple(anchors) == (2,) else dict(anchor_layers=tuple(anchors))
        return PureKVConfig(**common, **extra)
    if name == "clie":
        return PureKVConfig(**common, base="snapkv", cross_layer=True, anchor_layers=tuple(anchors), value_norm=True,
                            question_window=False, kernel_size=7)
    # the baselines as published: a fixed window of the last --window tokens, SnapKV's avg pooling 7
    return PureKVConfig(**common, base=name, cross_layer=False, anchor_layers=tuple(anchors), question_window=False,
                        kernel_size=7)


def policy_label(name: str, policy) -> str:
    st = "+st-sparse" if getattr(policy, "st_sparse", False) else ""
    if policy is None or name == "full":
        return "full" + st
    return f"{name} budget={policy.budget}{st}"


def validate_args(args: argparse.Namespace):
    """Everything checkable without reading the model: returns the policy (None = full cache)."""
    budget = _budget(args.budget)
    policy = build_policy(args.policy, budget, args.window, args.sink, args.anchors, args.st_sparse, args.seed,
                          args.st_start, args.head_patterns)
    if args.max_new_tokens < 1:
        raise GenerateArgsError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        raise GenerateArgsError(f"--temperature {args.temperature} must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise GenerateArgsError(f"--top-k {args.top_k} must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise GenerateArgsError(f"--top-p {args.top_p} must lie in (0, 1]")
    if args.fps is not None and not (args.fps > 0 and math.isfinite(args.fps)):
        raise GenerateArgsError(f"--fps {args.fps} must be > 0")
    if args.max_frames is not None and args.max_frames < 2:
        raise GenerateArgsError(f"--max-frames {args.max_frames} must be >= 2 (frames go in pairs)")
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise GenerateArgsError(f"--min-pixels {args.min_pixels} is larger than --max-pixels {args.max_pixels}")
    if not args.prompt.strip():
        raise GenerateArgsError("--prompt is empty")
    for v in args.video:
        check_file(v, "video")
    for im in args.image:
        check_file(im, "image")
    check_checkpoint_folder(args.model)
    return policy


# ------------------------------------------------------------------------------------- the prompt
def make_processor(model_dir: str, *, fps: float | None = None, max_frames: int | None = None,
                   max_pixels: int | None = None, min_pixels: int | None = None):
    """The checkpoint's processor with the command line's sampling overrides."""
    from purekv_jax.processing import Qwen25VLProcessor

    proc = Qwen25VLProcessor.from_pretrained(model_dir)
    if fps is not None:
        proc.fps = float(fps)
    if max_frames is not None:
        proc.max_frames = int(max_frames)
        proc.min_frames = min(proc.min_frames, proc.max_frames)
    if max_pixels is not None:
        proc.image_max_pixels = proc.video_max_pixels = int(max_pixels)
        proc.image_min_pixels = min(proc.image_min_pixels, int(max_pixels))
        proc.video_min_pixels = min(proc.video_min_pixels, int(max_pixels))
    if min_pixels is not None:
        proc.image_min_pixels = proc.video_min_pixels = int(min_pixels)
    return proc


def build_inputs(proc, prompt: str, images=(), videos=(), system: str | None = None) -> dict:
    from purekv_jax.processing import user_message

    messages = user_message(prompt, images=list(images), videos=list(videos))
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return proc(messages=messages)


@dataclass(frozen=True)
class PromptInfo:
    tokens: int
    image_tokens: int
    video_tokens: int
    last_position: int


def check_prompt(config, proc, inputs: dict, policy, max_new_tokens: int) -> PromptInfo:
    """Token ids in the vocabulary, vision token ids as in the config, positions and budget that fit."""
    import numpy as np

    from models.qwen2_5_vl import get_rope_index

    ids = inputs["input_ids"]
    n = int(ids.shape[1])
    vocab = config.text.vocab_size
    if int(ids.max()) >= vocab:
        raise GenerateArgsError(f"the tokenizer produced token id {int(ids.max())} but the model's vocab_size is {vocab}; "
                                "tokenizer.json does not belong to this checkpoint")
    for kind, tok_id, cfg_id in (("image", proc.image_token_id, config.image_token_id),
                                 ("video", proc.video_token_id, config.video_token_id)):
        if tok_id != cfg_id:
            raise GenerateArgsError(f"the tokenizer's {kind} pad token has id {tok_id} but config.json's "
                                    f"{kind}_token_id is {cfg_id}; tokenizer.json does not belong to this checkpoint")
    n_img = int((ids == config.image_token_id).sum())
    n_vid = int((ids == config.video_token_id).sum())
    pos, _ = get_rope_index(config, ids, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                            inputs.get("second_per_grid_ts"))
    last_prompt = int(np.max(pos))
    limit = config.text.max_position_embeddings
    media = ", ".join(f"{c} {k}" for c, k in ((n_vid, "video"), (n_img, "image")) if c)
    media = f" ({media} tokens)" if media else ""
    hint = "shorten the prompt" + (", lower --fps / --max-frames / --max-pixels" if n_img or n_vid else "")
    if last_prompt >= limit:
        raise GenerateArgsError(
            f"the prompt does not fit the model's positions: {n} tokens{media} take positions 0..{last_prompt} but "
            f"max_position_embeddings is {limit}; {hint}")
    if last_prompt + max_new_tokens >= limit:
        raise GenerateArgsError(
            f"the prompt does not fit the model's positions: {n} tokens{media} take positions 0..{last_prompt} and "
            f"--max-new-tokens {max_new_tokens} would reach {last_prompt + max_new_tokens}, but "
            f"max_position_embeddings is {limit}; {hint} or lower --max-new-tokens")
    if policy is not None:
        keep = math.ceil(policy.budget * n) if isinstance(policy.budget, float) else int(policy.budget)
        floor = policy.window + policy.sink
        if n > floor and keep < floor:
            raise GenerateArgsError(
                f"--budget {policy.budget} keeps {keep} of the prompt's {n} tokens, below the --window "
                f"{policy.window} + --sink {policy.sink} = {floor} tokens that are always kept; raise --budget "
                f"(at least {floor / n:.3f}) or lower --window")
        layers = config.text.num_hidden_layers
        if policy.cross_layer and any(a >= layers for a in policy.anchor_layers):
            raise GenerateArgsError(
                f"--anchors {','.join(map(str, policy.anchor_layers))}: the model has {layers} layers "
                f"(0..{layers - 1}); pick anchors below {layers}")
        if getattr(policy, "st_sparse", False) and hasattr(policy, "st_first_layer"):
            start = policy.st_first_layer()
            if start >= layers:
                raise GenerateArgsError(
                    f"--st-sparse: ST-SpAttn would start at layer {start} (after the last --anchors layer unless "
                    f"--st-start is given) but the model has {layers} layers (0..{layers - 1}); pass --st-start "
                    f"below {layers} or lower --anchors")
        policy.resolve(config.text, n)  # any other combination error, still before the weights
    return PromptInfo(n, n_img, n_vid, last_prompt)


def eos_ids(model_dir: str, config) -> tuple[int, ...]:
    """EOS ids: generation_config.json's when present, else config.json's."""
    path = os.path.join(model_dir, "generation_config.json")
    ids = list(config.eos_token_id)
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        more = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        ids += [int(e) for e in more if int(e) not in ids]
    except (OSError, ValueError, TypeError):
        pass
    return tuple(ids)


# ------------------------------------------------------------------------------------- running
@dataclass
class PolicyRun:
    label: str
    answer: str
    tokens: Any
    stats: dict


def run_policy(params, config, proc, inputs: dict, policy, *, label: str = "", max_new_tokens: int = 64,
               temperature: float = 0.0, top_k=None, top_p=None, seed: int = 0, eos=None) -> PolicyRun:
    """``generate`` on the processor's inputs; returns the decoded answer (cut at EOS) and the stats."""
    import numpy as np

    from purekv_jax.generation import generate

    res = generate(
        params, config, inputs["input_ids"], inputs.get("attention_mask"),
        pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
        pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        policy=policy, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed, eos_token_id=eos,
    )
    row = np.asarray(res.tokens[0])
    stop = set(eos if eos is not None else config.eos_token_id)
    cut = next((i for i, t in enumerate(row.tolist()) if t in stop), len(row))
    answer = proc.decode(row[:cut], skip_special_tokens=True)
    stats = dict(res.stats)
    stats["generated_tokens"] = min(cut + 1, len(row))  # including the EOS token that ended the answer
    return PolicyRun(label, answer, row[:cut], stats)


def decode_rate(stats: dict) -> float | None:
    """Decode tokens per second: one layer-stack step per token after the first (sampled from the prefill)."""
    steps, secs = stats.get("decode_steps", 0), stats.get("decode_s", 0.0)
    return steps / secs if steps and secs > 0 else None


def format_stats(stats: dict, info: PromptInfo | None = None, label: str | None = None) -> str:
    """One line: prefill time, decode tokens/s, KV MiB full vs kept, prompt tokens, compile time."""
    rate = decode_rate(stats)
    full, kept = stats["kv_bytes_full"] / MIB, stats["kv_bytes_kept"] / MIB
    pct = 100 * stats["kv_bytes_kept"] / max(stats["kv_bytes_full"], 1)
    parts = [
        f"prefill {stats['prefill_s']:.3f} s",
        f"decode {rate:.1f} tok/s ({stats.get('generated_tokens', stats['decode_steps'] + 1)} tokens)"
        if rate else f"decode {stats.get('generated_tokens', 1)} token(s)",
        f"KV {full:.2f} MiB full vs {kept:.2f} MiB kept ({pct:.0f}%)",
    ]
    if info is not None:
        media = [f"{info.video_tokens} video" if info.video_tokens else "",
                 f"{info.image_tokens} image" if info.image_tokens else ""]
        media = ", ".join(m for m in media if m)
        parts.append(f"prompt {info.tokens} tokens" + (f" ({media})" if media else ""))
    if label:
        parts.append(label)
    parts.append(f"compile {stats['prefill_compile_s'] + stats['decode_compile_s']:.1f} s")
    return " | ".join(parts)


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a multi-line message joined with spaces)."""
    return " ".join(str(err).split("\n")).strip() or type(err).__name__


def run_guarded(prog: str, body) -> int:
    """``body()`` -> exit status. User errors (``ValueError`` / ``OSError``: bad files, arguments, prompts,
    checkpoints) print ``PROG: error: ...`` as one line on stderr and return 2, Ctrl-C returns 130, an XLA
    runtime error (e.g. out of device memory) prints one line and returns 1; anything else is a bug and
    keeps its traceback."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "Xla" not in type(err).__name__ and "Jax" not in type(err).__name__:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"{prog}: device error: {first}; try a smaller --max-pixels / --fps or a lower --budget",
              file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """The ``purekv generate`` command (see :func:`run_guarded` for the exit statuses)."""
    return run_guarded("purekv generate", lambda: _generate(args))


def _generate(args: argparse.Namespace) -> int:
    policy = validate_args(args)
    from models.qwen2_5_vl import Qwen25VLConfig

    config = Qwen25VLConfig.from_json(args.model)
    proc = make_processor(args.model, fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                          min_pixels=args.min_pixels)
    inputs = build_inputs(proc, args.prompt, images=args.image, videos=args.video, system=args.system)
    info = check_prompt(config, proc, inputs, policy, args.max_new_tokens)

    from purekv_jax.checkpoint import load_checkpoint  # only now: every check above is done

    config, params = load_checkpoint(args.model, dtype=None if args.dtype == "auto" else args.dtype)
    result = run_policy(params, config, proc, inputs, policy, label=args.policy,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, eos=eos_ids(args.model, config))
    print(result.answer.strip())
    print(format_stats(result.stats, info, policy_label(args.policy, policy)), flush=True)
    return 0
