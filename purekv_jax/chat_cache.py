"""Compress once, ask many in Qwen's chat markup: the prompt split at the question (``purekv cache save / ask``).

Qwen's chat template renders a question about a video (or images) as::

    <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<|vision_start|><|video_pad|>...<|vision_end|>QUESTION<|im_end|>\\n<|im_start|>assistant\\n

The saved context (:func:`context_inputs`) is everything up to and including the last media: the user turn is
open, the question not known yet. Each first question (:func:`question_ids`) appends
``QUESTION<|im_end|>\\n<|im_start|>assistant\\n``. The template tokenises the question text as a piece of its
own (between two special tokens), so context + question are token for token the prompt ``purekv generate``
reads for the same question. A question that follows a kept answer (a state saved back after answering)
first closes the answer's turn and opens a user turn: ``[<|im_end|>]\\n<|im_start|>user\\nQUESTION<|im_end|>\\n
<|im_start|>assistant\\n``, the template's rendering of an assistant answer followed by a user message (the
``<|im_end|>`` only when the answer did not end with it).

:func:`prefill_context` and :func:`ask` run :func:`~purekv_jax.prompt_state.prefill_prompt` /
:func:`~purekv_jax.prompt_state.answer` and time them, compile time apart (the programs compiled during the
call, from :mod:`purekv_jax.compile_cache`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from models.qwen2_5_vl.config import Qwen25VLConfig

from .compile_cache import compiled_programs
from .config import PureKVConfig
from .decode_budget import DecodeBudget
from .presets import GENERIC_PROBE
from .processing import Qwen25VLProcessor, user_message
from .processing.tokenizer import IM_END, IM_START, VISION_END
from .prompt_state import PromptState, PromptStateError, answer, prefill_prompt


class ChatCacheError(PromptStateError):
    """A context or question that cannot go through a saved chat cache (no media, an empty question, a batch)."""


def context_inputs(proc: Qwen25VLProcessor, images=(), videos=(), system: str | None = None) -> dict:
    """The processor's inputs (``input_ids [1, N]``, ``attention_mask``, pixels, grids) of a chat prompt up to
    and including its last media: an optional system turn, then the user turn opened with the videos and the
    images, the question left out."""
    if not images and not videos:
        raise ChatCacheError("a saved chat cache holds a video or images: give at least one --video or --image")
    messages = user_message("", images=list(images), videos=list(videos))
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    inputs = proc(messages=messages, add_generation_prompt=False)
    ids = np.asarray(inputs["input_ids"])
    ends = np.flatnonzero(ids[0] == proc.tokenizer.token_to_id(VISION_END))
    if ends.size == 0:  # a system text spelling the vision markers with --allow-special would not get here
        raise ChatCacheError("the rendered prompt holds no <|vision_end|> token after the media")
    cut = int(ends[-1]) + 1
    return {**inputs, "input_ids": ids[:, :cut], "attention_mask": np.asarray(inputs["attention_mask"])[:, :cut]}


def question_segments(question: str, after_answer: bool = False, answer_closed: bool = False) -> list[tuple[str, bool]]:
    """The chat markup that appends ``question`` (module doc) as ``(text, special)`` pieces for
    :meth:`~purekv_jax.processing.Qwen25VLProcessor.segment_ids`: ``after_answer``: a user turn opened
    first, after closing the answer's turn unless ``answer_closed`` (it ended with ``<|im_end|>``)."""
    segments: list[tuple[str, bool]] = [(question, False)]
    if after_answer:
        segments = ([] if answer_closed else [(IM_END, True)]) + [("\n", False), (IM_START, True),
                                                                  (f"user\n{question}", False)]
    return segments + [(IM_END, True), ("\n", False), (IM_START, True), ("assistant\n", False)]


def question_ids(proc: Qwen25VLProcessor, question: str, state: PromptState) -> np.ndarray:
    """``[T]`` token ids that append ``question`` to ``state`` in the chat markup (:func:`question_segments`;
    a user turn opened first when ``state`` holds an answer, ``state.turns > 0``)."""
    if not question.strip():
        raise ChatCacheError("the question is empty")
    if state.kv.batch != 1:
        raise ChatCacheError(f"a chat cache holds one conversation; this state holds a batch of {state.kv.batch}")
    closed = int(np.asarray(state.pending)[0]) == proc.tokenizer.token_to_id(IM_END)
    return np.asarray(proc.segment_ids(question_segments(question, state.turns > 0, closed)), np.int32)


def probe_ids(proc: Qwen25VLProcessor, probe: str | None = None) -> np.ndarray:
    """``[P]`` token ids of the probe queries that score a question-agnostic cache: ``probe`` appended like a
    first question (:func:`question_segments`), or by default the ``agnostic_probe`` preset's
    :data:`~purekv_jax.presets.GENERIC_PROBE` (written in chat markup: special-token strings honoured)."""
    if probe is None:
        return np.asarray(proc.tokenizer.encode(GENERIC_PROBE).ids, np.int32)
    return np.asarray(proc.segment_ids(question_segments(probe)), np.int32)


@dataclasses.dataclass(frozen=True)
class Timed:
    """A call's result, its seconds without compiling and the seconds spent compiling programs during it."""

    value: Any
    run_s: float
    compile_s: float


def timed(fn: Callable[[], Any]) -> Timed:
    """``fn()`` timed to its results being ready; compile time counted from the programs it compiled."""
    def compile_total() -> float:
        return sum(p.compile_s for programs in compiled_programs().values() for p in programs)

    before, t0 = compile_total(), time.perf_counter()
    value = jax.block_until_ready(fn())
    wall = time.perf_counter() - t0
    spent = compile_total() - before
    return Timed(value, max(wall - spent, 0.0), spent)


def prefill_context(params, config: Qwen25VLConfig, inputs: dict, policy: PureKVConfig | None,
                    probe: np.ndarray | None = None, decode_budget: DecodeBudget | None = None) -> Timed:
    """:func:`context_inputs`' prompt prefilled once -> ``Timed`` of the :class:`PromptState`."""
    return timed(lambda: prefill_prompt(
        params, config, inputs["input_ids"], inputs.get("attention_mask"), pixel_values=inputs.get("pixel_values"),
        image_grid_thw=inputs.get("image_grid_thw"), pixel_values_videos=inputs.get("pixel_values_videos"),
        video_grid_thw=inputs.get("video_grid_thw"), second_per_grid_ts=inputs.get("second_per_grid_ts"),
        policy=policy, probe_ids=probe, decode_budget=decode_budget))


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answer: its tokens up to its end (the EOS that ended it included), the text (special tokens
    skipped) and the state that holds it."""

    tokens: np.ndarray
    text: str
    state: PromptState


def ask(params, state: PromptState, proc: Qwen25VLProcessor, question: str, eos: tuple[int, ...], *,
        max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
        seed: int = 0) -> Timed:
    """``question`` appended to ``state`` in the chat markup and answered -> ``Timed`` of an :class:`Answer`."""
    ids = question_ids(proc, question, state)
    run = timed(lambda: answer(params, state, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos))
    tokens, new_state = run.value
    row = np.asarray(tokens[0])
    stop = next((i for i, t in enumerate(row.tolist()) if t in eos), None)
    kept = row if stop is None else row[: stop + 1]
    text = proc.decode(kept if stop is None else kept[:-1], skip_special_tokens=True)
    return dataclasses.replace(run, value=Answer(kept, text, new_state))
