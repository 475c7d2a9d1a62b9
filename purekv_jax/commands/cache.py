"""``purekv cache save / ask``: a video prefilled and compressed once into a saved cache, then asked questions.

``save`` renders the chat prompt up to and including the media (the question not known yet:
:func:`purekv_jax.chat_cache.context_inputs`), prefills it once into a
:class:`~purekv_jax.prompt_state.PromptState` and saves it (:func:`purekv_jax.prompt_state_files.save_state`:
written into a hidden temporary folder, renamed into place). ``ask`` loads it for the same model (refused,
naming what differs, otherwise), appends the question in the chat markup, answers and prints the answer and
one stats line; ``--update`` saves the state with the answer back (the same atomic way), so the next ``ask``
continues the conversation.

Order of work as in ``purekv generate``: the arguments, the files and the prompt (or the saved state's
marker against the model's config.json) are checked before the weights are read.
"""

from __future__ import annotations

import argparse
import sys

from models.qwen2_5_vl import Qwen25VLConfig
from models.qwen2_5_vl.model import text_part
from purekv_jax import cache as C
from purekv_jax import checkpoint
from purekv_jax.chat_cache import ask, context_inputs, prefill_context, probe_ids
from purekv_jax.decode_budget import DecodeBudget
from purekv_jax.presets import CACHE_POLICIES, policy_label
from purekv_jax.prompt_state_files import check_config, check_destination, load_state, save_state
from purekv_jax.requests import (check_checkpoint_folder, check_policy, check_prompt, check_text, eos_ids,
                                 make_processor)
from purekv_jax.run_stats import MIB

from .errors import ArgumentsError, one_line_errors, run_guarded
from .generate import (add_decoding_arguments, add_kv_arguments, add_media_arguments, check_decoding_args,
                       check_media_args, policies_help, policy_from_args)

DEFAULT_POLICY = "agnostic_probe"

SAVE_EPILOG = f"""\
policy: a saved cache is compressed before any question is known, so the default is {DEFAULT_POLICY}:
generic probe queries ("Describe everything above in detail: ... every name, code, number and fact",
or --probe TEXT) stand where a question would and score the cache, and are never kept. On the text
multi-fact retrieval study with the real SmolLM2 (docs/prompt_state.md) it kept the asked fact at
least as often as agnostic_tail (a fixed window over the prompt's own last tokens). The question-aware policies
(purekv, ...) have no question to align to here and score with the prompt's last --window tokens.
Neither question-agnostic scoring keeps look-alike facts reliably at a 20% budget: for exact recall
keep more (--budget) or keep everything (--policy full) and bound the growth with --decode-budget.

examples:
  purekv cache save --model ~/models/Qwen2.5-VL-7B-Instruct --video clip.mp4 --out clip.cache
  purekv cache ask --model ~/models/Qwen2.5-VL-7B-Instruct --cache clip.cache --prompt "Who enters first?"
  purekv cache ask --model ~/models/Qwen2.5-VL-7B-Instruct --cache clip.cache --prompt "And then?" --update

The stats line: the prefill's time (and compile time apart), the prompt's KV cache in MiB without
compression (full) and as kept, the prompt's tokens, the policy."""

ASK_EPILOG = """\
The answer is printed, then one stats line: the answer's time (compile time apart) next to the time the
prefill took when the cache was saved (what asking with `purekv generate` would repeat for every
question), the cache's MiB held and allocated, the conversation's turn and the policy. The question is
appended in Qwen's chat markup: QUESTION<|im_end|>\\n<|im_start|>assistant\\n after the saved media, or,
after an answer kept with --update, a new user turn first."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``cache`` (``save``, ``ask``) on the ``purekv`` sub-command action ``sub``."""
    p = sub.add_parser("cache", help="compress a video once into a saved cache, then ask it many questions",
                       description="Compress once, ask many: `purekv cache save` prefills the prompt up to the "
                                   "media and saves the compressed cache; `purekv cache ask` answers questions "
                                   "from it without encoding the video again.")
    kinds = p.add_subparsers(dest="cache", required=True, metavar="ACTION")
    save = kinds.add_parser(
        "save", help="prefill a video / images once and save the compressed cache",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SAVE_EPILOG + "\n\n" + policies_help(CACHE_POLICIES),
        description="Render the chat prompt up to and including the media (system turn, the user turn opened, the\n"
                    "media tokens; the question comes later with `purekv cache ask`), prefill it once with the\n"
                    "KV-cache policy and save the compressed cache to a folder (written atomically).")
    one_line_errors(save)
    io = save.add_argument_group("model, media and output")
    io.add_argument("--model", required=True, metavar="DIR",
                    help="checkpoint folder: Hugging Face or orbax (from `purekv convert`); needs tokenizer.json")
    io.add_argument("--video", action="append", default=[], metavar="PATH", help="a video file; repeat for several")
    io.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several")
    io.add_argument("--system", metavar="TEXT", default=None,
                    help="system prompt (default: the template's 'You are a helpful assistant.')")
    io.add_argument("--dtype", choices=("auto", "float32", "bf16"), default="auto",
                    help="params dtype (default auto: as stored); `cache ask` must load the same")
    io.add_argument("--no-verify", action="store_true", help="skip the checksums of an orbax checkpoint's files")
    io.add_argument("--out", required=True, metavar="CACHE_DIR", help="the folder the cache is saved to")
    io.add_argument("--force", action="store_true", help="replace CACHE_DIR if it holds a saved cache")
    add_media_arguments(save)
    kv = add_kv_arguments(save, CACHE_POLICIES, DEFAULT_POLICY)
    kv.add_argument("--probe", metavar="TEXT", default=None,
                    help=f"with --policy {DEFAULT_POLICY}: the probe queries' text, appended like a question "
                         "(default: the preset's generic request for every detail)")
    kv.add_argument("--decode-budget", type=int, default=None, metavar="N",
                    help="a fixed cache of N slots per layer and KV head for the prompt, the questions and the "
                         "answers: when full, the lowest-scored entry outside the 32 most recent is evicted "
                         "(default: the cache grows with every question and answer)")
    kv.add_argument("--seed", type=int, default=0, metavar="N", help="random-policy seed (default 0)")
    save.set_defaults(func=run_save)

    q = kinds.add_parser(
        "ask", help="answer a question from a saved cache",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ASK_EPILOG,
        description="Load a cache saved by `purekv cache save` for the same model, append the question, answer it\n"
                    "and print the answer and one stats line.")
    one_line_errors(q)
    io = q.add_argument_group("model and cache")
    io.add_argument("--model", required=True, metavar="DIR", help="the checkpoint folder the cache was saved with")
    io.add_argument("--cache", required=True, metavar="CACHE_DIR", help="a folder written by `purekv cache save`")
    io.add_argument("--prompt", required=True, metavar="TEXT", help="the question")
    io.add_argument("--dtype", choices=("auto", "float32", "bf16"), default="auto",
                    help="params dtype (default auto: as stored); as when the cache was saved")
    io.add_argument("--no-verify", action="store_true", help="skip the checksums of an orbax checkpoint's files")
    io.add_argument("--update", action="store_true",
                    help="save the state with the question and the answer back to CACHE_DIR (atomically): the "
                         "next ask continues the conversation")
    add_decoding_arguments(q)
    q.set_defaults(func=run_ask)
    return p


# ------------------------------------------------------------------------------------------------ save
def run_save(args: argparse.Namespace) -> int:
    """``purekv cache save`` (exit statuses: :func:`~purekv_jax.commands.errors.run_guarded`)."""
    return run_guarded("purekv cache save", lambda: save_cache(args))


def save_cache(args: argparse.Namespace) -> int:
    """Checks everything, then loads the weights, prefills the context, saves it and prints one stats line."""
    policy = policy_from_args(args, CACHE_POLICIES)
    check_media_args(args)
    if not args.video and not args.image:
        raise ArgumentsError("give at least one --video or --image: the saved cache holds the media")
    if args.probe is not None:
        if args.policy != DEFAULT_POLICY:
            raise ArgumentsError(f"--probe sets the probe queries of --policy {DEFAULT_POLICY}, not of {args.policy}")
        if not check_text(args.probe, "--probe").strip():
            raise ArgumentsError("--probe is empty")
    if args.decode_budget is not None and args.decode_budget < 1:
        raise ArgumentsError(f"--decode-budget {args.decode_budget} must be >= 1 (cache slots)")
    budget = None if args.decode_budget is None else DecodeBudget(slots=args.decode_budget)
    check_checkpoint_folder(args.model)
    out = check_destination(args.out, args.force)
    config = Qwen25VLConfig.from_json(args.model)
    proc = make_processor(args.model, fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                          min_pixels=args.min_pixels)
    inputs = context_inputs(proc, images=args.image, videos=args.video, system=args.system)
    info = check_prompt(config, proc, inputs, policy, max_new_tokens=1)
    probe = probe_ids(proc, args.probe) if args.policy == DEFAULT_POLICY else None
    # only now, every check above done; called through the module so tests can watch it
    config, params = checkpoint.load_checkpoint(args.model, dtype=None if args.dtype == "auto" else args.dtype,
                                                verify=not args.no_verify)
    kv_dtype = text_part(params).embed.dtype
    if policy is not None:  # a byte budget counts in the loaded weights' dtype
        check_policy(policy, config.text, info.tokens, kv_dtype=kv_dtype)
    run = prefill_context(params, config, inputs, policy, probe, budget)
    state = run.value
    label = policy_label(args.policy, policy)
    cfg = config.text
    full = C.kv_bytes_full(info.tokens, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kv_dtype)
    kept = C.kv_bytes_kept(state.kv)
    notes = dict(prefill_s=run.run_s, prefill_compile_s=run.compile_s, prompt_tokens=info.tokens,
                 video_tokens=info.video_tokens, image_tokens=info.image_tokens, policy_label=label,
                 kv_bytes_full=full)
    save_state(out, state, force=args.force, notes=notes)
    media = ", ".join(f"{n} {kind}" for n, kind in ((info.video_tokens, "video"), (info.image_tokens, "image")) if n)
    print(f"saved {out} | prefill {run.run_s:.3f} s (compile {run.compile_s:.1f} s) | KV {full / MIB:.2f} MiB full "
          f"vs {kept / MIB:.2f} MiB kept ({100 * kept / max(full, 1):.0f}%) | prompt {info.tokens} tokens ({media}) "
          f"| {label}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ ask
def run_ask(args: argparse.Namespace) -> int:
    """``purekv cache ask`` (exit statuses: :func:`~purekv_jax.commands.errors.run_guarded`)."""
    return run_guarded("purekv cache ask", lambda: ask_cache(args))


def ask_cache(args: argparse.Namespace) -> int:
    """Checks the arguments and the saved state's config, then loads the weights and the state, answers,
    prints the answer and one stats line, and with ``--update`` saves the state back."""
    check_decoding_args(args)
    if not check_text(args.prompt, "--prompt").strip():
        raise ArgumentsError("--prompt is empty")
    check_checkpoint_folder(args.model)
    config = Qwen25VLConfig.from_json(args.model)
    marker = check_config(args.cache, config)  # another model's cache is refused before the weights are read
    proc = make_processor(args.model)
    config, params = checkpoint.load_checkpoint(args.model, dtype=None if args.dtype == "auto" else args.dtype,
                                                verify=not args.no_verify)
    state = load_state(args.cache, params, config)
    run = ask(params, state, proc, args.prompt, eos_ids(args.model, config), max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    result = run.value
    print(result.text.strip())
    notes = marker.get("notes") or {}
    saved = ("" if "prefill_s" not in notes else
             f" vs prefill {notes['prefill_s']:.3f} s when saved (compile {notes['prefill_compile_s']:.1f} s)")
    kv = result.state.kv
    print(f"answer {run.run_s:.3f} s ({len(result.tokens)} tokens, compile {run.compile_s:.1f} s){saved} | cache "
          f"{C.kv_bytes_kept(kv) / MIB:.2f} MiB held, {C.kv_bytes_allocated(kv) / MIB:.2f} MiB allocated | turn "
          f"{result.state.turns} | {notes.get('policy_label', 'full' if state.policy is None else f'budget={state.policy.budget}')}", flush=True)
    if args.update:
        save_state(args.cache, result.state, force=True, notes=notes)
        print(f"kept turn {result.state.turns} in {args.cache}", file=sys.stderr, flush=True)
    return 0
