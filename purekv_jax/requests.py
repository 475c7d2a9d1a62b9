"""One request through a checkpoint: the files it names, its model inputs, the checks that need the prompt,
and the run.

Order of work (every user error surfaces before the weights are read): :func:`check_file` /
:func:`check_checkpoint_folder` on the paths alone; :func:`make_processor` and :func:`build_inputs` decode
and patch the media and render the chat template; :func:`check_prompt` checks the token ids against the
vocabulary, the processor's vision tokens against the config, the positions (M-RoPE) against
``max_position_embeddings`` (each through the config's model family, :mod:`models.family`), and resolves the policy for this model and prompt (:func:`check_policy`:
``PureKVConfig.resolve`` decides the budget, anchor and ST-SpAttn rules); then :func:`run_policy` generates.
Shared by ``purekv generate``, ``purekv demo`` and ``purekv batch``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from models.family import family_name_of_file, family_of
from models.qwen2_5_vl.config import TextConfig
from models.qwen2_5_vl.loader import INDEX_FILE, SINGLE_FILE, CheckpointError
from models.qwen2_5_vl.model import static_grid

from .checkpoint import MARKER_FILE, PARAMS_DIR
from .config import BudgetBelowWindowError, KVPlan, PureKVConfig, PureKVConfigError
from .generation import generate
from .processing import MediaFileError, Qwen25VLProcessor, VideoLLaMA2Processor, user_message
from .processing.errors import require_readable_file


class RequestCheckError(ValueError):
    """A prompt or a policy that cannot run with this checkpoint (raised before any weights are read)."""


class MediaRootError(MediaFileError):
    """A media path that leads outside ``--media-root`` (refused before the file is looked at)."""


# ------------------------------------------------------------------------------------------ files
def check_file(path: str, what: str) -> None:
    """A media file that exists, is a regular, readable file and is not empty (``what``: ``"image"``,
    ``"video"``, ... names it in the message)."""
    require_readable_file(Path(path), what)
    if os.path.getsize(path) == 0:
        raise MediaFileError(f"{what} file is empty: {path}")


def confined_media(path: str, root: str, what: str) -> str:
    """``path`` (relative paths are taken from ``root``) with every link resolved, when it lies inside
    ``root``; else :class:`MediaRootError`, with the same message whether or not the file exists. The
    result is then checked by :func:`check_file`."""
    if "\x00" in path:
        raise MediaRootError(f"{what} path {path!r} holds a NUL character")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, path))
    if os.path.commonpath([base, real]) != base:
        raise MediaRootError(f"{what} path {path!r} leads outside --media-root {root}")
    check_file(real, what)
    return real


def check_text(text: str, what: str) -> str:
    """Text that is valid Unicode (an undecodable byte of a command-line argument arrives as a lone
    surrogate, which no tokenizer takes); ``what`` names the flag or field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestCheckError(f"{what} is not valid UTF-8 text (character {e.start + 1})") from None
    return text


def check_output_file(path: str, what: str) -> None:
    """A file that can be written (opened for appending, and removed again if this made it), checked before
    the work so that a bad path does not cost the run; ``what`` names the flag."""
    if os.path.isdir(path):
        raise RequestCheckError(f"{what} {path} is a folder; give a file path")
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise RequestCheckError(f"{what} {path}: cannot be written ({e.strerror})") from None
    if not existed:
        os.remove(path)


def check_checkpoint_folder(path: str) -> None:
    """The folder exists and holds weights (orbax marker or safetensors), ``config.json`` and ``tokenizer.json``."""
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


def eos_ids(model_dir: str, config) -> tuple[int, ...]:
    """EOS ids: ``config.json``'s, and ``generation_config.json``'s when present."""
    path = os.path.join(model_dir, "generation_config.json")
    ids = list(config.eos_token_id)
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        more = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        ids += [int(e) for e in more if int(e) not in ids]
    except (OSError, ValueError, TypeError):  # no (readable) generation_config.json: config.json's ids
        pass
    return tuple(ids)


# ------------------------------------------------------------------------------------------ the prompt
def qwen25vl_processor(model_dir: str, *, fps: float | None = None, max_frames: int | None = None,
                       max_pixels: int | None = None, min_pixels: int | None = None,
                       allow_special: bool = False) -> Qwen25VLProcessor:
    """Qwen2.5-VL's processor from the folder, with the request's sampling overrides (``max_pixels`` lowers
    the minimums above it)."""
    proc = Qwen25VLProcessor.from_pretrained(model_dir, allow_special=allow_special)
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


def videollama2_processor(model_dir: str, *, fps: float | None = None, max_frames: int | None = None,
                          max_pixels: int | None = None, min_pixels: int | None = None,
                          allow_special: bool = False) -> VideoLLaMA2Processor:
    """VideoLLaMA2's processor from the folder: ``max_frames`` sets the frames sampled per video (default the
    config's ``num_frames``); the release samples a fixed count at the tower's fixed size, so a frame rate
    or pixel bounds are refused."""
    given = [flag for flag, v in (("--fps", fps), ("--max-pixels", max_pixels), ("--min-pixels", min_pixels))
             if v is not None]
    if given:
        raise RequestCheckError(f"{', '.join(given)}: VideoLLaMA2 samples a fixed number of frames (--max-frames) "
                                "at its vision tower's fixed size; these options apply to Qwen2.5-VL only")
    return VideoLLaMA2Processor.from_pretrained(model_dir, allow_special=allow_special, num_frames=max_frames)


#: each model family's processor builder, by the family name a checkpoint's config.json gives.
PROCESSOR_BUILDERS = {"qwen2_5_vl": qwen25vl_processor, "videollama2": videollama2_processor}


def make_processor(model_dir: str, **options):
    """The checkpoint's processor (of the family its ``config.json`` names) with the request's sampling
    options (``fps``, ``max_frames``, ``max_pixels``, ``min_pixels``, ``allow_special``: honour special-token
    strings in user text; default plain text)."""
    return PROCESSOR_BUILDERS[family_name_of_file(model_dir)](model_dir, **options)


def build_inputs(proc, prompt: str, images=(), videos=(), system: str | None = None) -> dict:
    """The processor's inputs (``input_ids [1, N]``, pixels, grids) for a user turn with the media, after
    an optional system prompt."""
    messages = user_message(prompt, images=list(images), videos=list(videos))
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return proc(messages=messages)


@dataclasses.dataclass(frozen=True)
class PromptInfo:
    """What a checked prompt holds: its tokens, the image and video tokens among them, its last position."""

    tokens: int
    image_tokens: int
    video_tokens: int
    last_position: int


def check_prompt(config, proc, inputs: dict, policy: PureKVConfig | None, max_new_tokens: int) -> PromptInfo:
    """Token ids in the vocabulary (the family's media placeholders aside), vision token ids as in the
    config, media tokens that match the media, positions that fit the model, and a policy that resolves
    for this model and prompt (:func:`check_policy`)."""
    family = family_of(config)
    ids = inputs["input_ids"]
    n = int(ids.shape[1])
    vocab = config.text.vocab_size
    real = ids[~np.isin(ids, family.placeholder_ids(config))]
    if real.size and (int(real.max()) >= vocab or int(real.min()) < 0):
        bad = int(real.max()) if int(real.max()) >= vocab else int(real.min())
        raise RequestCheckError(f"the tokenizer produced token id {bad} but the model's vocab_size is "
                                f"{vocab}; tokenizer.json does not belong to this checkpoint")
    for kind, tok_id, cfg_id in (("image", proc.image_token_id, config.image_token_id),
                                 ("video", proc.video_token_id, config.video_token_id)):
        if tok_id != cfg_id:
            raise RequestCheckError(f"the tokenizer's {kind} pad token has id {tok_id} but config.json's "
                                    f"{kind}_token_id is {cfg_id}; tokenizer.json does not belong to this checkpoint")
    n_img = int((ids == config.image_token_id).sum())
    n_vid = int((ids == config.video_token_id).sum())
    image_grid, video_grid = static_grid(inputs.get("image_grid_thw")), static_grid(inputs.get("video_grid_thw"))
    family.check_media(config, ids, image_grid, video_grid)
    pos, _ = family.prompt_positions(config, ids, np.ones(ids.shape, bool), image_grid, video_grid,
                                     inputs.get("second_per_grid_ts"))
    last_prompt = int(np.max(pos))
    limit = config.text.max_position_embeddings
    media = ", ".join(f"{c} {k}" for c, k in ((n_vid, "video"), (n_img, "image")) if c)
    media = f" ({media} tokens)" if media else ""
    hint = "shorten the prompt" + (", lower --fps / --max-frames / --max-pixels" if n_img or n_vid else "")
    if last_prompt >= limit:
        raise RequestCheckError(
            f"the prompt does not fit the model's positions: {n} tokens{media} take positions 0..{last_prompt} but "
            f"max_position_embeddings is {limit}; {hint}")
    if last_prompt + max_new_tokens >= limit:
        raise RequestCheckError(
            f"the prompt does not fit the model's positions: {n} tokens{media} take positions 0..{last_prompt} and "
            f"--max-new-tokens {max_new_tokens} would reach {last_prompt + max_new_tokens}, but "
            f"max_position_embeddings is {limit}; {hint} or lower --max-new-tokens")
    if policy is not None:
        check_policy(policy, config.text, n)
    return PromptInfo(n, n_img, n_vid, last_prompt)


def check_policy(policy: PureKVConfig, text_config: TextConfig, n_tokens: int, kv_dtype=jnp.float32) -> KVPlan:
    """``policy.resolve`` for a model and an ``n_tokens`` prompt (the budget, anchor and ST-SpAttn rules are
    decided there), its error as a :class:`RequestCheckError` in the command line's terms. ``kv_dtype``: the
    model's dtype, which a byte budget counts in (before the weights are read: float32, the widest, so the
    check is repeated with the loaded weights' dtype)."""
    try:
        return policy.resolve(text_config, n_tokens, kv_dtype=kv_dtype)
    except BudgetBelowWindowError as err:  # a fraction of this prompt (an int count fails at construction)
        floor = err.window + err.sink
        raise RequestCheckError(
            f"--budget {err.budget} keeps {err.kept} of the prompt's {err.prompt_len} tokens, below the --window "
            f"{err.window} + --sink {err.sink} = {floor} tokens that are always kept; raise --budget (at least "
            f"{floor / err.prompt_len:.3f}) or lower --window") from None
    except PureKVConfigError as err:
        raise RequestCheckError(f"the KV-cache policy does not fit this model and prompt: {err}") from None


# ------------------------------------------------------------------------------------------ running
@dataclasses.dataclass
class PolicyRun:
    """One generate run: its label, the decoded answer (cut at EOS), the answer's tokens and the run's stats."""

    label: str
    answer: str
    tokens: Any
    stats: dict


def run_policy(params, config, proc, inputs: dict, policy: PureKVConfig | None,
               *, label: str = "", max_new_tokens: int = 64, temperature: float = 0.0, top_k=None, top_p=None,
               seed: int = 0, eos=None) -> PolicyRun:
    """``generate`` on the processor's inputs; returns the decoded answer (cut at EOS) and the stats
    (``generated_tokens`` counts the EOS token that ended the answer)."""
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
    stats["generated_tokens"] = min(cut + 1, len(row))
    return PolicyRun(label, answer, row[:cut], stats)
