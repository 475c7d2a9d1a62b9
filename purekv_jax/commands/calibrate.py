"""``purekv calibrate``: per-layer, per-head ST-SpAttn patterns for a model, written to a JSON file.

    purekv calibrate --model DIR --video clip.mp4 [--video more.mp4 ...] --out patterns.json

For every video: the prompt (the chat template around the video and ``--prompt``) runs through a dense
prefill; in each layer ``>= st_start`` ``--num-rows`` video query rows are sampled and each candidate
pattern's output is compared with dense attention per q head
(:func:`purekv_jax.st_sparse.prefill.calibrate_model`). Errors are averaged over the videos and the
lowest-error pattern kept (ties to the cheaper one). Use the file with
``PureKVConfig(st_sparse=True, head_patterns_file="patterns.json")``.

    purekv calibrate --cost-profile [--backend auto]

measures instead when block-sparse attention pays on this machine's device (the cost model's per-cell and
per-pass seconds of the dense, flash and block-sparse paths, :func:`purekv_jax.st_sparse.cost.calibrate_profile`)
and stores it in the user's profiles file, which ``st_select="auto"`` reads.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from kernels.block_sparse_attention import BACKEND_NAMES, resolve_backend

from purekv_jax.checkpoint import load_checkpoint
from purekv_jax.config import PureKVConfig
from purekv_jax.processing import Qwen25VLProcessor, user_message
from purekv_jax.st_sparse import save_head_patterns
from purekv_jax.requests import check_output_file, check_text
from purekv_jax.st_sparse.cost import (calibrate_profile, profile_key, read_profiles, save_profiles,
                                       user_profiles_file)
from purekv_jax.st_sparse.prefill import calibrate_model, choose_patterns

from .errors import ArgumentsError, run_guarded


def prepare_inputs(model_dir: str, video: str, prompt: str, args: argparse.Namespace) -> dict:
    """The processor's inputs for one video prompt (a hook: tests replace it)."""
    overrides = {}
    if args.fps is not None:
        overrides["fps"] = args.fps
    if args.max_frames is not None:
        overrides["max_frames"] = args.max_frames
    if args.max_pixels is not None:
        overrides["video_max_pixels"] = args.max_pixels
    proc = Qwen25VLProcessor.from_pretrained(model_dir, **overrides)
    out = proc(messages=user_message(prompt, videos=[video]))
    out.pop("attention_mask", None)
    return out


def run(args: argparse.Namespace) -> int:
    """The ``purekv calibrate`` command (see :func:`~purekv_jax.commands.errors.run_guarded` for the exit
    statuses)."""
    return run_guarded("purekv calibrate", lambda: calibrate(args))


def measure_cost_profile(args: argparse.Namespace) -> int:
    """``--cost-profile``: measures the ST-SpAttn cost model's profile of ``--backend`` on this machine's device
    and stores it in the user's profiles file, under the backend and the device kind."""
    backend = resolve_backend(args.backend).name
    kind = jax.devices()[0].device_kind
    print(f"measuring the cost profile of backend {backend!r} on {kind} ({jax.default_backend()}) ...", flush=True)
    t0 = time.perf_counter()
    profile = calibrate_profile(backend)
    path = user_profiles_file()
    save_profiles({**read_profiles(path), profile_key(backend, kind): profile}, path)
    print(f"wrote {path} ({time.perf_counter() - t0:.1f} s): per cell x head x lane: dense "
          f"{profile.dense_cell_s:.3g} s, flash {profile.flash_cell_s:.3g} s, {backend} {profile.sparse_cell_s:.3g} s"
          f" + {profile.sparse_pass_s * 1e3:.2f} ms per pass")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    """Checks ``--out`` (writable) and ``--prompt`` (valid text) before the weights are read, then calibrates
    on every ``--video`` and writes ``--out`` (or, with ``--cost-profile``, measures the backend's cost
    profile)."""
    if args.cost_profile:
        return measure_cost_profile(args)
    if not args.model or not args.video:
        raise ArgumentsError("--model and --video are required (unless --cost-profile)")
    check_output_file(args.out, "--out")
    check_text(args.prompt, "--prompt")
    anchors = tuple(int(a) for a in args.anchor_layers.split(",") if a.strip()) if args.anchor_layers else (2,)
    policy = PureKVConfig(st_sparse=True, anchor_layers=anchors, st_start=args.st_start,
                          spatial_radius=args.spatial_radius, temporal_window=args.temporal_window)
    t0 = time.perf_counter()
    config, params = load_checkpoint(args.model, dtype=args.dtype)
    print(f"loaded {args.model}: {config.text.num_hidden_layers} layers, {config.text.num_attention_heads} q heads "
          f"({time.perf_counter() - t0:.1f} s)")
    errs, res = [], None
    for video in args.video:
        inputs = prepare_inputs(args.model, video, args.prompt, args)
        t0 = time.perf_counter()
        res = calibrate_model(params, config, inputs["input_ids"], policy=policy, num_rows=args.num_rows,
                              seed=args.seed, pixel_values=inputs.get("pixel_values"),
                              image_grid_thw=inputs.get("image_grid_thw"),
                              pixel_values_videos=inputs.get("pixel_values_videos"),
                              video_grid_thw=inputs.get("video_grid_thw"),
                              second_per_grid_ts=inputs.get("second_per_grid_ts"))
        errs.append(res.errors)
        v = res.layout.videos
        print(f"{video}: {inputs['input_ids'].shape[1]} tokens, video grid(s) {[(x.t, x.h, x.w) for x in v]}, "
              f"{res.rows_per_layer} rows per layer ({time.perf_counter() - t0:.1f} s)")
    errors = np.mean(np.stack(errs), axis=0)
    text = config.text
    group = 1 if args.per_q_head else text.num_attention_heads // text.num_key_value_heads
    pats = choose_patterns(errors, res.candidates, args.rel_tol, args.atol, group)
    save_head_patterns(args.out, pats, errors=errors, candidates=res.candidates, st_start=res.st_start,
                       num_videos=len(args.video), videos=list(args.video), num_rows=args.num_rows,
                       seed=args.seed, spatial_radius=args.spatial_radius,
                       temporal_window=args.temporal_window, model=str(args.model))
    counts = {}
    for p in pats:
        for x in p or ():
            counts[x.name.lower()] = counts.get(x.name.lower(), 0) + 1
    print(f"wrote {args.out}: layers {res.st_start}..{len(pats) - 1}, head patterns {counts}")
    return 0


def add_parser(sub) -> None:
    """Registers ``calibrate`` on an ``argparse`` sub-parsers object."""
    p = sub.add_parser("calibrate", help="calibrate per-head ST-SpAttn patterns on video prompts",
                       description=__doc__.split("\n\n")[0] + ".",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (HF or orbax, with the tokenizer files)")
    p.add_argument("--video", action="append", help="a video file (repeat for more)")
    p.add_argument("--cost-profile", action="store_true",
                   help="instead: measure when block-sparse attention pays on this device (the cost model's profile "
                        "of --backend), stored in $PUREKV_COST_PROFILES or ~/.cache/purekv/cost_profiles.json")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                   help="with --cost-profile: the block-sparse backend to measure (default: this platform's)")
    p.add_argument("--out", default="st_head_patterns.json", help="JSON to write (default st_head_patterns.json)")
    p.add_argument("--prompt", default="Describe this video.", help="the text after the video")
    p.add_argument("--num-rows", type=int, default=256, help="video query rows sampled per layer (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anchor-layers", default="2", help="CLIE anchors, comma-separated (fix st_start's default)")
    p.add_argument("--st-start", type=int, default=None, help="first ST layer (default: after the last anchor)")
    p.add_argument("--spatial-radius", type=int, default=None)
    p.add_argument("--temporal-window", type=int, default=None)
    p.add_argument("--rel-tol", type=float, default=0.0, help="prefer a cheaper pattern within this relative error")
    p.add_argument("--atol", type=float, default=1e-5, help="errors closer than this are ties (default 1e-5)")
    p.add_argument("--per-q-head", action="store_true",
                   help="one pattern per q head (default: one per KV head's q heads, which keeps grouped-query "
                        "attention whole in the kernel)")
    p.add_argument("--dtype", choices=("bf16", "float32"), default="float32")
    p.add_argument("--fps", type=float, default=None, help="video sampling fps (default: the processor's)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel limit")
    p.set_defaults(func=run)
