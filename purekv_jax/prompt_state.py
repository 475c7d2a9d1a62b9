"""Compress once, ask many: a prompt's compressed cache kept as a :class:`PromptState` and asked questions.

``prefill_prompt(params, config, prompt..., policy=...)`` runs ``generate``'s own jitted prefill once (the video is
encoded and the cache pruned as it is written) and keeps the result; ``answer(params, state, question_ids)``
appends the question to that cache with the append-prefill (:mod:`purekv_jax.question_prefill`: the
question's tokens attend to the kept cache and, causally, to themselves; positions continue from the
prompt's logical next position), decodes with ``generate``'s decode loop, and returns the tokens and a new
state that holds the answer too (multi-turn). A state is immutable: answering the same state twice asks two
independent questions. The programs are compiled once per (question bucket, token bucket, cache slots) and
reused across questions.

The last token of an answer is not in the new state's cache yet (the decode samples it but never runs it
through the model): the state keeps it as ``pending`` and the next ``answer`` puts it in front of its
question, so a conversation's cache is exactly the one ``generate`` would build for the whole transcript.

Question-agnostic compression (the cache must serve questions not asked yet): ``probe_ids`` are generic
probe queries placed after the prompt for the prefill only: with a question-window policy they are the
observation window that scores the cache, and they are never kept (``PrefillInputs.keep_valid``); the
question then continues from the prompt's own last position. A policy with a fixed window scores by the
prompt's own tail instead. Presets: ``agnostic_probe`` / ``agnostic_tail`` (:mod:`purekv_jax.presets`);
measured in docs/prompt_state.md.

Under a :class:`~purekv_jax.decode_budget.DecodeBudget` the cache has a fixed number of slots for the prompt,
the questions and the answers, and evicts by score (:mod:`purekv_jax.decode_budget`); without one it grows,
in steps of ``capacity_bucket`` slots. Saving and loading: :mod:`purekv_jax.prompt_state_files`.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen2_5_vl.config import Qwen25VLConfig
from models.qwen2_5_vl.model import text_part

from . import cache as C
from . import sharding as S
from .attention import prefill_attention_impl
from .compile_cache import compiled, count_trace
from .config import PureKVConfig
from .decode import AppendKV, SamplingSettings, decode_loop
from .decode_budget import BudgetedCache, DecodeBudget, EvictingKV, budgeted
from .generation import (GenerateError, check_sampling, eos_and_pad, layout_attention, observation_windows,
                         prefill_inputs, prefill_program, prepare_prompt, resolve_plan, round_up)
from .layer_weights import per_layer
from .param_tree import path_name
from .question_prefill import ContiguousAppend, question_prefill


class PromptStateError(GenerateError):
    """A prompt state used with the wrong model, batch, budget or question."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptState:
    """A prompt's compressed cache and what answering from it needs.

    cache: a :class:`~purekv_jax.cache.KVCache` (growing) or a
      :class:`~purekv_jax.decode_budget.BudgetedCache` (fixed size, with ``budget``).
    pending: ``[B]`` int32, each row's last answer token, not yet in the cache (-1: none, after ``prefill_prompt``).
    config, policy, budget: the model's config, the compression policy (None: the full cache) and the decode
      budget (None: the cache grows).
    model_id: :func:`model_identity` of the weights the cache was computed with.
    prompt_len: real tokens of the longest prompt row (without probes); turns: answers given so far.
    """

    cache: C.KVCache | BudgetedCache
    pending: jax.Array
    config: Qwen25VLConfig = dataclasses.field(metadata=dict(static=True))
    policy: PureKVConfig | None = dataclasses.field(metadata=dict(static=True))
    budget: DecodeBudget | None = dataclasses.field(metadata=dict(static=True))
    model_id: str = dataclasses.field(metadata=dict(static=True))
    prompt_len: int = dataclasses.field(metadata=dict(static=True))
    turns: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def kv(self) -> C.KVCache:
        """The KV cache itself (without a budget's scores)."""
        return self.cache.kv if isinstance(self.cache, BudgetedCache) else self.cache


def model_identity(config: Qwen25VLConfig, params) -> str:
    """A short fingerprint of the text model: its config and, per parameter leaf, the name, shape, dtype and
    64 strided values (cheap: a few small device reads). The answers run on the text model, so two
    checkpoints that differ anywhere in it differ here unless they agree at every sampled value."""
    digest = hashlib.sha256(repr(config.text).encode())
    leaves = jax.tree_util.tree_flatten_with_path(text_part(params))[0]
    for path, leaf in sorted(leaves, key=lambda item: path_name(item[0])):
        flat = leaf.reshape(-1)
        sample = np.asarray(flat[:: max(1, flat.size // 64)][:64].astype(jnp.float32))
        digest.update(f"{path_name(path)}{leaf.shape}{leaf.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:20]


def with_probe(ids: np.ndarray, mask: np.ndarray, probe: np.ndarray):
    """Each row's real tokens followed by ``probe`` -> ``(ids [B, n + P], mask, prompt lengths [B])``."""
    lengths = mask.sum(axis=1)
    rows = [np.concatenate([ids[r][mask[r]], probe]) for r in range(ids.shape[0])]
    width = max(len(r) for r in rows)
    out = np.zeros((ids.shape[0], width), ids.dtype)
    valid = np.zeros(out.shape, bool)
    for r, row in enumerate(rows):
        out[r, : len(row)], valid[r, : len(row)] = row, True
    return out, valid, lengths


def prefill_prompt(params, config: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
            policy: PureKVConfig | None = None, probe_ids=None, decode_budget: DecodeBudget | None = None,
            prompt_bucket: int = 64, attention="auto", fused_prefill: bool = True) -> PromptState:
    """Prefills a prompt batch once with ``policy`` and keeps the compressed cache.

    Args as :func:`purekv_jax.generate` (the prompt, its media, the policy, ``prompt_bucket``, ``attention``,
    ``fused_prefill``), and:
      probe_ids: ``[P]`` token ids of generic probe queries (question-agnostic scoring, module doc), or None.
        Needs a policy whose window is the question (``question_window=True``).
      decode_budget: a fixed cache size for prompt + questions + answers (None: the cache grows).
    """
    if policy is not None and not isinstance(policy, PureKVConfig):
        raise PromptStateError(f"policy must be None (full cache) or a PureKVConfig, got {type(policy).__name__}")
    if decode_budget is not None and not isinstance(decode_budget, DecodeBudget):
        raise PromptStateError(f"decode_budget must be None or a DecodeBudget, got {type(decode_budget).__name__}")
    ids = np.asarray(input_ids)
    mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    probe = None
    if probe_ids is not None:
        probe = np.asarray(probe_ids).reshape(-1).astype(ids.dtype)
        if probe.size == 0:
            raise PromptStateError("probe_ids is empty")
        if policy is None or not policy.question_window:
            raise PromptStateError("probe_ids score the cache as its question window: they need a policy with "
                                   "question_window=True (e.g. the 'agnostic_probe' preset)")
        mask = np.ones(ids.shape, bool) if mask is None else mask
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise PromptStateError(f"with probe_ids, input_ids must be [batch, seq] and attention_mask the same "
                                   f"shape, got {ids.shape} and {mask.shape}")
        ids, mask, context_len = with_probe(ids, mask, probe)
    prompt = prepare_prompt(config, ids, mask, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                            second_per_grid_ts=second_per_grid_ts, has_pixels=pixel_values is not None,
                            has_video_pixels=pixel_values_videos is not None, prompt_bucket=prompt_bucket)
    if prompt.multimodal and "vision" not in params:
        raise PromptStateError("image / video inputs need the whole model's state (with the vision tower), got a "
                               "text model's state")
    text = text_part(params)
    scored = prompt if probe is None else dataclasses.replace(prompt, lengths=context_len)
    plan = resolve_plan(policy, config, scored, attention, text.embed.dtype)
    prefill_attention_impl(attention, prompt.padded_len)  # validates the name
    capacity = plan.slots
    if decode_budget is not None:
        if plan.quant is not None:
            raise PromptStateError(f"a decode budget needs a cache in the model's dtype; the policy quantises to "
                                   f"kv_bits={plan.kv_bits}")
        if decode_budget.slots < plan.slots:
            raise PromptStateError(f"DecodeBudget.slots={decode_budget.slots} is smaller than the prompt's "
                                   f"{plan.slots} kept slots (prompt of {scored.prompt_len} tokens)")
        capacity = decode_budget.slots
    if probe is None:
        window_len = observation_windows(plan, prompt, config)
    else:
        window_len = np.full((prompt.ids.shape[0],), probe.size, np.int32)
    st_attn = layout_attention(plan, config, prompt, attention)
    inputs = prefill_inputs(prompt, window_len, pixel_values, pixel_values_videos, text.embed.dtype,
                            S.params_mesh(params))
    if probe is not None:  # the probe is scored with, never kept; the question starts where the probe did
        keep = prompt.valid.copy()
        keep[:, -probe.size:] = False
        first_probe = prompt.positions[0, :, -probe.size].astype(np.int64)
        inputs = dataclasses.replace(inputs, keep_valid=jnp.asarray(keep),
                                     next_position=jnp.asarray(context_len, jnp.int32),
                                     rope_delta=jnp.asarray(first_probe - context_len, jnp.int32))
    program, run_params = prefill_program(params, config, prompt, plan, inputs, capacity, attention, st_attn,
                                          fused_prefill)
    cache, _ = program.run(run_params, inputs)
    return PromptState(cache=cache if decode_budget is None else budgeted(cache),
                       pending=jnp.full((prompt.ids.shape[0],), -1, jnp.int32), config=config, policy=policy,
                       budget=decode_budget, model_id=model_identity(config, params),
                       prompt_len=scored.prompt_len)


def question_block(question_ids, attention_mask, pending: np.ndarray, batch: int, vocab: int, bucket: int):
    """Each row's pending token (if any) and real question tokens, left-aligned and right-padded to a multiple
    of ``bucket`` -> ``(ids [B, T] int32, valid [B, T], real tokens [B])``."""
    ids = np.asarray(question_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != batch or not np.issubdtype(ids.dtype, np.integer):
        raise PromptStateError(f"question_ids must be integer ids [batch={batch}, seq] (or [seq] for one row), "
                               f"got shape {np.asarray(question_ids).shape}, dtype {ids.dtype}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise PromptStateError(f"question attention_mask shape {mask.shape} differs from question_ids {ids.shape}")
    rows = [np.concatenate([[pending[r]] if pending[r] >= 0 else [], ids[r][mask[r]]]).astype(np.int64)
            for r in range(batch)]
    if any(row.size == 0 for row in rows):
        raise PromptStateError(f"question rows {[r for r, row in enumerate(rows) if row.size == 0]} hold no token")
    real = np.concatenate(rows)
    if real.min() < 0 or real.max() >= vocab:
        bad = int(real.min()) if real.min() < 0 else int(real.max())
        raise PromptStateError(f"question_ids hold token id {bad}, outside the vocabulary [0, {vocab})")
    counts = np.array([row.size for row in rows])
    width = round_up(int(counts.max()), bucket)
    out = np.zeros((batch, width), np.int32)
    for r, row in enumerate(rows):
        out[r, : row.size] = row
    return out, np.arange(width)[None] < counts[:, None], counts


def grown(cache: C.KVCache, capacity: int) -> C.KVCache:
    """``cache`` with its model-dtype slots padded (empty, invalid) to ``capacity``."""
    extra = capacity - cache.capacity
    pad = lambda a, tail: jnp.pad(a, ((0, 0),) * 3 + ((0, extra),) + ((0, 0),) * tail)
    return dataclasses.replace(cache, k=pad(cache.k, 1), v=pad(cache.v, 1), valid=pad(cache.valid, 0))


def kept_to(cache, next_position):
    """The cache with every token at or past ``next_position [B]`` (a logical position) dropped: what a decode
    wrote after a row's answer ended (rows of a batch stop at different steps)."""
    count_trace("kept_to")
    if isinstance(cache, BudgetedCache):
        valid = cache.kv.valid & (cache.slot_pos < next_position[None, :, None, None])
        return dataclasses.replace(cache, kv=dataclasses.replace(cache.kv, valid=valid, next_position=next_position))
    length = cache.length - (cache.next_position - next_position)
    valid = cache.valid & (jnp.arange(cache.capacity) < length[None, :, None, None])
    return dataclasses.replace(cache, valid=valid, length=length, next_position=next_position)


def answer_lengths(tokens: np.ndarray, eos: tuple[int, ...], max_new: int) -> np.ndarray:
    """``[B]``: each row's answer up to and including its first EOS, else ``max_new`` tokens."""
    hit = np.isin(tokens[:, :max_new], eos) if eos else np.zeros((tokens.shape[0], max_new), bool)
    return np.where(hit.any(axis=1), np.argmax(hit, axis=1) + 1, max_new)


def answer(params, state: PromptState, question_ids, attention_mask=None, *, max_new_tokens: int = 32,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           eos_token_id=None, pad_token_id: int | None = None, question_bucket: int = 32,
           new_tokens_bucket: int = 32, capacity_bucket: int = 256) -> tuple[np.ndarray, PromptState]:
    """Appends a question to ``state``'s cache and decodes an answer; the state is not changed.

    Args:
      params: the model's state (or its text part) that ``state`` was prefilled with (checked).
      state: a :class:`PromptState` from :func:`prefill_prompt`, :func:`answer` or a loaded file.
      question_ids: ``[B, T]`` (or ``[T]`` for one row) token ids of the question, chat markup included;
        attention_mask ``[B, T]`` (1 = token, any padding).
      max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, pad_token_id: as :func:`generate`.
      question_bucket / new_tokens_bucket: the question block and the token buffer are padded to multiples
        of these (compile bucketing); capacity_bucket: a growing cache grows in steps of this many slots.

    Returns:
      ``(tokens [B, max_new_tokens] int32, new_state)``: ``pad_token_id`` after a row's EOS; ``new_state``
      holds the question and the answer (multi-turn).
    """
    if not isinstance(state, PromptState):
        raise PromptStateError(f"state must be a PromptState, got {type(state).__name__}")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    for name, value in (("question_bucket", question_bucket), ("new_tokens_bucket", new_tokens_bucket),
                        ("capacity_bucket", capacity_bucket)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise PromptStateError(f"{name}={value!r} must be an int >= 1")
    config, cfg = state.config, state.config.text
    found = model_identity(config, params)
    if found != state.model_id:
        raise PromptStateError(f"these weights (model id {found}) are not the ones the prompt state was prefilled "
                               f"with (model id {state.model_id})")
    kv = state.kv
    ids, valid, counts = question_block(question_ids, attention_mask, np.asarray(state.pending), kv.batch,
                                        cfg.vocab_size, question_bucket)
    start = np.asarray(kv.decode_positions())
    last = start + counts + max_new_tokens - 1
    if int(last.max()) >= cfg.max_position_embeddings:
        r = int(np.argmax(last))
        raise PromptStateError(f"question + max_new_tokens={max_new_tokens} run past the model's positions: row {r} "
                               f"would reach position {int(last[r])}, max_position_embeddings="
                               f"{cfg.max_position_embeddings}")
    n_tokens = round_up(max_new_tokens, new_tokens_bucket)
    cache = state.cache
    if state.budget is None:
        need = int(np.asarray(kv.length).max()) + ids.shape[1] + n_tokens
        if need > kv.capacity:
            cache = grown(kv, round_up(need, capacity_bucket))
        block_step, decode_step = ContiguousAppend(), AppendKV()
    else:
        state.budget.check_block(ids.shape[1])
        block_step = decode_step = EvictingKV(state.budget)
    text = text_part(params)
    args = (text, cache, jnp.asarray(ids), jnp.asarray(valid))
    cache, logits = compiled("question_prefill", question_prefill, dict(cfg=cfg, kv_step=block_step), args).run(*args)
    eos, pad_id = eos_and_pad(config, eos_token_id, pad_token_id)
    sampling = SamplingSettings(n_tokens=n_tokens, temperature=float(temperature), top_k=top_k,
                                top_p=None if top_p is None else float(top_p), eos=eos, pad_id=pad_id)
    args = (text, cache, logits, jnp.int32(max_new_tokens), jax.random.PRNGKey(seed), per_layer(text.layers))
    final = compiled("decode", decode_loop, dict(cfg=cfg, sampling=sampling, kv_step=decode_step), args,
                     donate=(1,)).run(*args)  # (the question prefill's fresh cache: the state's own is kept)
    tokens = np.asarray(final.tokens)[:, :max_new_tokens]
    lengths = answer_lengths(tokens, eos, max_new_tokens)
    end = jnp.asarray(np.asarray(kv.next_position) + counts + lengths - 1, jnp.int32)
    cache = compiled("kept_to", kept_to, {}, (final.cache, end)).run(final.cache, end)
    pending = jnp.asarray(tokens[np.arange(tokens.shape[0]), lengths - 1], jnp.int32)
    return tokens, dataclasses.replace(state, cache=cache, pending=pending, turns=state.turns + 1)
