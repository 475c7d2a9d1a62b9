"""``generate``: a jitted prefill that prunes the KV cache as it goes, then an on-device decode loop.

The walk of one call: the prompt is checked and prepared on the host (:func:`prepare_prompt`: real tokens
moved to the end of a bucketed row, M-RoPE positions and rope deltas, the media grids); the policy is
resolved into a static :class:`~purekv_jax.config.KVPlan` (budgets, layer segments, ST-SpAttn); every user
error is raised before any device work; then the prefill (:mod:`purekv_jax.prefill`) and the decode
(:mod:`purekv_jax.decode`) run as programs compiled once per bucket (:mod:`purekv_jax.compile_cache`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.family import family_of
from models.qwen2_5_vl.config import Qwen25VLConfig
from models.qwen2_5_vl.model import static_grid, text_part

from . import cache as C
from . import sharding as S
from .attention import prefill_attention_impl
from .compile_cache import compiled, peak_bytes
from .config import KVPlan, PureKVConfig
from .decode import AppendKV, SamplingSettings, decode_program
from .host_arrays import host_array
from .observation import question_window_lengths
from .prefill import PrefillInputs, compressed_prefill
from .st_sparse.prefill import st_prefill_attention


class GenerateError(ValueError):
    """Bad input to :func:`generate` (shapes, lengths, capacity, positions, policy combinations)."""


@dataclasses.dataclass
class GenerateResult:
    """``tokens [B, max_new_tokens]`` int32 (``pad_token_id`` after a row's EOS) and ``stats``."""

    tokens: np.ndarray
    stats: dict[str, Any]
    cache: C.KVCache | None = None

    @property
    def kept_index(self) -> np.ndarray:
        """``[L, B, Hkv, S]`` int32: the original token index (among the row's real prompt tokens) of every
        prompt entry the prefill kept, per layer and KV head, ``-1`` for an empty slot
        (``stats["kept_index"]``; :func:`purekv_jax.kept_map.kept_fraction` turns it into a per-token map)."""
        return self.stats["kept_index"]


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def realign_left(ids: np.ndarray, mask: np.ndarray, n: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens moved to the end of an ``n``-long row (left padding): ``(ids [B, n],
    valid [B, n])``. Left padding puts every row's question at the same final positions."""
    b = ids.shape[0]
    out = np.full((b, n), fill, ids.dtype)
    valid = np.zeros((b, n), bool)
    for r in range(b):
        real = ids[r][mask[r]]
        out[r, n - len(real):] = real
        valid[r, n - len(real):] = True
    return out, valid


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """A checked, left-padded prompt batch on the host.

    ids / valid ``[B, N]`` (``N`` = ``padded_len``, real tokens at the end); positions ``[3, B, N]``
    (M-RoPE); lengths ``[B]`` real tokens per row; rope_delta ``[B]``; the media grids (static tuples).
    """

    ids: np.ndarray
    valid: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray
    rope_delta: np.ndarray
    image_grid: tuple | None
    video_grid: tuple | None

    @property
    def prompt_len(self) -> int:
        """The longest row's number of real tokens (fractional budgets apply to it)."""
        return int(self.lengths.max())

    @property
    def padded_len(self) -> int:
        return self.ids.shape[1]

    @property
    def multimodal(self) -> bool:
        return self.image_grid is not None or self.video_grid is not None


def prepare_prompt(config: Qwen25VLConfig, input_ids, attention_mask=None, *, image_grid_thw=None,
                   video_grid_thw=None, second_per_grid_ts=None, has_pixels=False, has_video_pixels=False,
                   prompt_bucket: int = 64, max_new_tokens: int = 1) -> PreparedPrompt:
    """Checks a prompt batch and lays it out for the prefill (host numpy, no device work)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GenerateError(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GenerateError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise GenerateError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    lengths = mask.sum(axis=1)
    if (lengths == 0).any():
        raise GenerateError(f"attention_mask rows {np.flatnonzero(lengths == 0).tolist()} hold no token")
    family = family_of(config)
    real, vocab = ids[mask & ~np.isin(ids, family.placeholder_ids(config))], config.text.vocab_size
    if real.size and (real.min() < 0 or real.max() >= vocab):
        bad = int(real.min()) if real.min() < 0 else int(real.max())
        raise GenerateError(f"input_ids hold token id {bad}, outside the vocabulary [0, {vocab})")
    if not isinstance(prompt_bucket, (int, np.integer)) or prompt_bucket < 1:
        raise GenerateError(f"prompt_bucket={prompt_bucket!r} must be an int >= 1")
    image_grid, video_grid = static_grid(image_grid_thw), static_grid(video_grid_thw)
    if has_pixels != (image_grid is not None):
        raise GenerateError("pixel_values and image_grid_thw must be given together")
    if has_video_pixels != (video_grid is not None):
        raise GenerateError("pixel_values_videos and video_grid_thw must be given together")
    family.check_media(config, np.where(mask, ids, 0), image_grid, video_grid)
    padded = round_up(int(lengths.max()), prompt_bucket)
    ids_al, valid = realign_left(ids, mask, padded, 0)
    pos, rope_delta = family.prompt_positions(config, ids_al, valid, image_grid, video_grid, second_per_grid_ts)
    last_pos = lengths + rope_delta + max_new_tokens - 1
    limit = config.text.max_position_embeddings
    if int(last_pos.max()) >= limit:
        r = int(np.argmax(last_pos))
        raise GenerateError(
            f"max_new_tokens={max_new_tokens} runs past the model's positions: row {r} starts decoding at "
            f"position {int(lengths[r] + rope_delta[r])} and would reach {int(last_pos[r])}, but "
            f"max_position_embeddings={limit}")
    return PreparedPrompt(ids_al, valid, pos, lengths, rope_delta, image_grid, video_grid)


def resolve_plan(policy: PureKVConfig | None, config: Qwen25VLConfig, prompt: PreparedPrompt, attention,
                 kv_dtype=jnp.float32) -> KVPlan:
    """The static plan of ``policy`` for this model and prompt (``None``: the full cache), with the checks
    that tie it to the prefill's attention path; ``kv_dtype``: the model's dtype (a byte budget's
    reference)."""
    cfg = config.text
    if policy is None:
        return KVPlan.full(cfg.num_hidden_layers, prompt.padded_len)
    plan = policy.resolve(cfg, prompt.prompt_len, prompt.padded_len, kv_dtype)
    if plan.needs_full_probs and attention not in ("auto", "dense"):
        raise GenerateError(
            f"base='h2o' needs the full attention probabilities of every scoring layer (evaluation only); it "
            f"cannot run with attention={attention!r}")
    return plan


def cache_slots(plan: KVPlan, prompt: PreparedPrompt, max_new_tokens: int, n_tokens: int,
                cache_capacity: int | None) -> int:
    """The cache's static number of slots: the kept prompt plus room for the generated tokens."""
    if cache_capacity is None:
        return plan.slots + n_tokens
    need = plan.slots + max_new_tokens - 1
    if need > int(cache_capacity):
        raise GenerateError(
            f"the prompt does not fit cache_capacity={cache_capacity}: {plan.slots} prompt slots "
            f"(prompt of {prompt.prompt_len} tokens, padded to {prompt.padded_len}) + {max_new_tokens - 1} "
            f"decoded tokens = {need} slots")
    return int(cache_capacity)


def prefill_inputs(prompt: PreparedPrompt, window_len: np.ndarray, pixel_values, pixel_values_videos,
                   dtype, mesh=None) -> PrefillInputs:
    """The prefill's device inputs; with ``mesh`` (the params live on one) the batch goes over ``data``."""
    inputs = PrefillInputs(
        input_ids=jnp.asarray(prompt.ids, jnp.int32),
        positions=jnp.asarray(prompt.positions, jnp.int32),
        valid=jnp.asarray(prompt.valid),
        window_len=jnp.asarray(window_len, jnp.int32),
        next_position=jnp.asarray(prompt.lengths, jnp.int32),
        rope_delta=jnp.asarray(prompt.rope_delta, jnp.int32),
        pixel_values=None if pixel_values is None else jnp.asarray(pixel_values, dtype),
        pixel_values_videos=None if pixel_values_videos is None else jnp.asarray(pixel_values_videos, dtype),
    )
    if mesh is None:
        return inputs
    return dataclasses.replace(inputs, **{name: S.shard_batch(getattr(inputs, name), mesh, axis)
                                          for name, axis in PrefillInputs.BATCH_AXES.items()})


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    """The decode's settings, checked on the host (:class:`GenerateError` naming the bad one)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if not isinstance(temperature, (int, float, np.number)) or not 0 <= temperature < float("inf"):
        raise GenerateError(f"temperature={temperature!r} must be a finite number >= 0")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise GenerateError(f"top_k={top_k!r} must be None or an int >= 1")
    if top_p is not None and (not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1):
        raise GenerateError(f"top_p={top_p!r} must be None or a number in (0, 1]")


def observation_windows(plan: KVPlan, prompt: PreparedPrompt, config: Qwen25VLConfig, question_len=None) -> np.ndarray:
    """``[B]`` int32: each row's observation window (:mod:`purekv_jax.observation` when the plan aligns it to
    the question, else the plan's fixed window). ``question_len`` given to a plan that does not use it is an
    error, not silently ignored."""
    if question_len is not None and not plan.question_window:
        which = "the full cache" if plan.base is None else f"{type(plan.base).__name__} scoring, question_window=False"
        raise GenerateError(
            f"question_len={question_len!r} is given, but the policy does not align its window to the question "
            f"({which}): it would be ignored; drop it or use a policy with question_window=True (the default)")
    if not plan.question_window:
        return np.full((prompt.ids.shape[0],), plan.window, np.int32)
    return question_window_lengths(prompt.ids, prompt.valid, window=plan.window, question_len=question_len,
                                   vision_end_id=family_of(config).question_start_id(config))


def layout_attention(plan: KVPlan, config: Qwen25VLConfig, prompt: PreparedPrompt, attention):
    """ST-SpAttn's layout-aware prefill attention for this prompt (host work: layouts, cost model), or None
    when the plan has no ST-SpAttn."""
    if plan.st is None:
        return None
    return st_prefill_attention(plan.st, config, prompt.ids, prompt.valid, prompt.video_grid, attention)


def prefill_program(params, config: Qwen25VLConfig, prompt: PreparedPrompt, plan: KVPlan, inputs: PrefillInputs,
                    capacity: int, attention, st_attn, fused: bool):
    """The compiled prefill for these settings (compiled once per plan, bucket, grids and attention) and the
    params it takes (the whole model for media prompts, else the text part)."""
    sparse_attn = st_attn is not None and bool(st_attn.st_layers)  # (all-dense: reuse the program without ST)
    statics = dict(config=config, plan=plan, capacity=capacity, attention=st_attn if sparse_attn else attention,
                   image_grid=prompt.image_grid, video_grid=prompt.video_grid, fused=bool(fused))
    run_params = params if prompt.multimodal else text_part(params)
    return compiled("prefill", compressed_prefill, statics, (run_params, inputs)), run_params


def eos_and_pad(config: Qwen25VLConfig, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int]:
    eos = config.eos_token_id if eos_token_id is None else (
        (int(eos_token_id),) if np.ndim(eos_token_id) == 0 else tuple(int(e) for e in eos_token_id))
    pad_id = (eos[0] if eos else 0) if pad_token_id is None else int(pad_token_id)
    return tuple(eos), pad_id


def generate(
    params,
    config: Qwen25VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    *,
    policy: PureKVConfig | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    prompt_bucket: int = 64,
    new_tokens_bucket: int = 32,
    cache_capacity: int | None = None,
    attention="auto",
    fused_prefill: bool = True,
    return_cache: bool = False,
    question_len=None,
) -> GenerateResult:
    """Generates ``max_new_tokens`` tokens per row with a (compressed) KV cache.

    Args:
      params: the model's state (``nnx.state(Qwen25VLModel)``, or a text model's state for text-only prompts).
      config: the model's ``Qwen25VLConfig``.
      input_ids: ``[B, N]``; attention_mask ``[B, N]`` (1 = token, left or right padding).
      pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts: as in the
        model's ``forward``.
      policy: ``None`` = full cache; a :class:`PureKVConfig` (``PureKVConfig(budget=0.2)`` = PureKV).
      max_new_tokens: tokens generated per row (rows stop early at EOS, padded with ``pad_token_id``).
      temperature / top_k / top_p / seed: sampling (``temperature=0`` is greedy).
      eos_token_id / pad_token_id: default to the config's EOS ids / the first of them.
      prompt_bucket: the prompt is left-padded to a multiple of this (compile bucketing).
      new_tokens_bucket: the token buffer (and cache room) is a multiple of this.
      cache_capacity: a static number of cache slots; the kept prompt plus the generated tokens must fit.
      attention: prefill attention of non-scoring layers: ``"auto"``, ``"dense"``, ``"flash"``, a
        registered name, or a callable ``fn(q, k, v, valid, layer)`` (a static argument: keep the same
        object to reuse the compiled prefill).
      fused_prefill: run the prefill as one layer loop with a per-layer ``lax.cond`` for the score (less
        temporary memory and compile time, ``benchmarks/kv_budget.py``) instead of one loop per segment
        (:func:`purekv_jax.prefill.compressed_prefill`).
      return_cache: also return the final cache.
      question_len: the number of trailing prompt tokens that form the question (with the chat markup
        after it): an int, or one per row. With the default policy (``question_window``) the observation
        window of each row is its question (at most ``policy.window`` tokens). ``None``: the tokens after
        the row's last ``<|vision_end|>`` (video / image questions), else the fixed window
        (:mod:`purekv_jax.observation`). Given to a policy that does not align its window to the question
        (the full cache, ``question_window=False``, a base other than SnapKV / PyramidKV) it is an error,
        not silently ignored.

    The first generated token is sampled from the prefill's last logits, which the compression does not
    touch (every layer attends over the whole prompt during the prefill): a policy changes tokens 2 onwards.

    Returns:
      :class:`GenerateResult` with ``tokens [B, max_new_tokens]`` and ``stats`` (``kv_bytes_full``: the
      prompt's unpruned K/V in the model's dtype; ``kv_bytes_kept``: what the prefill's cache holds, counted
      from its arrays (codes, scales and zero points of quantised slots included), all layers;
      ``kv_compression`` = full / kept; ``kv_bits``: the code width (None: the model's dtype);
      ``kv_tokens_kept``: the prompt entries held, all layers and KV heads; ``kept_index [L, B, Hkv, S]`` int32:
      each kept prompt entry's original token index among its row's real tokens, ``-1`` for an empty slot
      (also :attr:`GenerateResult.kept_index`); ``kv_bytes_allocated``,
      ``prefill_s``, ``decode_s``, ``prefill_compile_s``, ``decode_compile_s``, ``decode_steps``, ``prompt_len``, ``padded_len``,
      ``budgets``, ``capacity``, ``prefill_peak_bytes``, ``prefill_temp_bytes``: XLA's compiled memory
      analysis of the prefill, ``st_layers``: the layers that ran block-sparse ST-SpAttn, ``st_paths``: the
      cost model's choice per pattern set, with its predicted seconds of each path).
    """
    # ---------------------------------------------------------------- host: every check before device work
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if policy is not None and not isinstance(policy, PureKVConfig):
        raise GenerateError(f"policy must be None (full cache) or a PureKVConfig, got {type(policy).__name__}")
    for name, value in (("new_tokens_bucket", new_tokens_bucket), ("cache_capacity", cache_capacity)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise GenerateError(f"{name}={value!r} must be an int >= 1")
    prompt = prepare_prompt(config, input_ids, attention_mask, image_grid_thw=image_grid_thw,
                            video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                            has_pixels=pixel_values is not None, has_video_pixels=pixel_values_videos is not None,
                            prompt_bucket=prompt_bucket, max_new_tokens=int(max_new_tokens))
    if prompt.multimodal and "vision" not in params:
        raise GenerateError("image / video inputs need the whole model's state (with the vision tower), got a "
                            "text model's state")
    text = text_part(params)
    plan = resolve_plan(policy, config, prompt, attention, text.embed.dtype)
    prefill_attention_impl(attention, prompt.padded_len)  # validates the name
    window_len = observation_windows(plan, prompt, config, question_len)
    st_attn = layout_attention(plan, config, prompt, attention)
    n_tokens = round_up(max_new_tokens, new_tokens_bucket)
    capacity = cache_slots(plan, prompt, max_new_tokens, n_tokens, cache_capacity)
    eos, pad_id = eos_and_pad(config, eos_token_id, pad_token_id)

    # ---------------------------------------------------------------- prefill
    inputs = prefill_inputs(prompt, window_len, pixel_values, pixel_values_videos, text.embed.dtype,
                            S.params_mesh(params))
    prefill, prefill_params = prefill_program(params, config, prompt, plan, inputs, capacity, attention, st_attn,
                                              fused_prefill)
    t0 = time.perf_counter()
    cache, logits = jax.block_until_ready(prefill.run(prefill_params, inputs))
    prefill_s = time.perf_counter() - t0
    kept_bytes = C.kv_bytes_kept(cache)
    kept_tokens = C.kv_tokens_kept(cache)
    kept_index = host_array(cache.token_index[..., :plan.slots])  # (before the decode donates the cache)

    # ---------------------------------------------------------------- decode
    sampling = SamplingSettings(n_tokens=n_tokens, temperature=float(temperature), top_k=top_k,
                                top_p=None if top_p is None else float(top_p), eos=eos, pad_id=pad_id)
    kv_step = AppendKV("xla" if policy is None else policy.kv_decode)
    decode, dargs = decode_program(text, cache, logits, max_new_tokens, seed, cfg=config.text, sampling=sampling,
                                   kv_step=kv_step)
    t0 = time.perf_counter()
    final = decode.run(*dargs)
    tokens = host_array(jax.block_until_ready(final.tokens))  # every process: all rows
    decode_s = time.perf_counter() - t0

    cfg = config.text
    full_bytes = C.kv_bytes_full(prompt.lengths, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                 text.embed.dtype)
    mem = prefill.memory
    stats = {
        "kv_bytes_full": full_bytes,
        "kv_bytes_kept": kept_bytes,
        "kv_compression": full_bytes / max(kept_bytes, 1),
        "kv_bytes_allocated": C.kv_bytes_allocated(final.cache),
        "kv_bits": plan.kv_bits,
        "kv_tokens_kept": kept_tokens,
        "kept_index": kept_index,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_compile_s": prefill.compile_s,
        "decode_compile_s": decode.compile_s,
        "decode_steps": int(final.step) - 1,
        "prompt_len": prompt.prompt_len,
        "padded_len": prompt.padded_len,
        "budgets": plan.budgets,
        "capacity": capacity,
        "prefill_peak_bytes": None if mem is None else peak_bytes(mem),
        "prefill_temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
        "st_layers": () if st_attn is None else st_attn.st_layers,
        "st_paths": [] if st_attn is None else st_attn.report(),
    }
    return GenerateResult(tokens=tokens[:, :max_new_tokens], stats=stats,
                          cache=final.cache if return_cache else None)


def prefill_jaxpr(params, config: Qwen25VLConfig, input_ids, policy: PureKVConfig | None = None,
                  attention: str = "auto", prompt_bucket: int = 64, fused: bool = False):
    """``(plan, the prefill's closed jaxpr)`` for a text prompt: to inspect which layers compute attention
    probabilities."""
    prompt = prepare_prompt(config, input_ids, prompt_bucket=prompt_bucket)
    plan = resolve_plan(policy, config, prompt, attention, text_part(params).embed.dtype)
    window_len = np.full((prompt.ids.shape[0],), plan.window, np.int32)
    inputs = prefill_inputs(prompt, window_len, None, None, text_part(params).embed.dtype)
    fn = lambda p, i: compressed_prefill(p, i, config=config, plan=plan, capacity=plan.slots + 1,
                                         attention=attention, image_grid=None, video_grid=None, fused=fused)
    return plan, jax.make_jaxpr(fn)(text_part(params), inputs)
