"""The bench-small Qwen2.5-VL and its synthetic video prompts, shared by ``purekv bench speed`` and the
benchmark scripts.

bench-small: the Qwen2.5-VL text stack at hidden 512, 8 layers, 8 query / 2 KV heads (head_dim 64), MLP 1536,
untied LM head, and the tiny random vision tower (hidden 32, depth 2) projecting to 512; random weights.
A video prompt is ``text_before`` random text tokens, ``<|vision_start|>``, ``t * h * w`` video tokens (the
merged grid), ``<|vision_end|>`` and ``text_after`` random text tokens, with random patches for the tower.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.qwen2_5_vl.config import Qwen25VLConfig, TextConfig, tiny_config

#: the vocabulary of ``purekv bench speed``'s model (random text ids stay below the tiny config's special ids).
BENCH_VOCAB = 32_768


class GridError(ValueError):
    """A video grid that is not ``T x H x W`` positive integers."""


def bench_small_config(vocab_size: int = BENCH_VOCAB) -> Qwen25VLConfig:
    """The bench-small configuration (see the module docstring)."""
    text = TextConfig(
        vocab_size=vocab_size, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12), max_position_embeddings=32768,
    )
    cfg = tiny_config(vocab_size=vocab_size)
    return dataclasses.replace(cfg, text=text, vision=dataclasses.replace(cfg.vision, out_hidden_size=512))


def parse_grid(text: str) -> tuple[int, int, int]:
    """``"16x24x24"`` -> ``(16, 24, 24)``: a merged video grid ``t x h x w`` (tokens)."""
    parts = text.lower().split("x")
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise GridError(f"video grid {text!r} must be T x H x W positive integers, e.g. 4x12x10")
    return grid


@dataclasses.dataclass(frozen=True)
class VideoPrompt:
    """One video prompt: ``input_ids [1, N]`` int32, ``pixel_values_videos [P, patch_dim]`` float32 (``P`` =
    ``t * h * w * merge**2`` patches), ``video_grid_thw [1, 3]`` (in patches), ``second_per_grid_ts [1]``."""

    input_ids: np.ndarray
    pixel_values_videos: np.ndarray
    video_grid_thw: np.ndarray
    second_per_grid_ts: np.ndarray

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]

    def media(self) -> dict:
        """The media keyword arguments of ``generate`` / transformers' model."""
        return dict(pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw,
                    second_per_grid_ts=self.second_per_grid_ts)


def video_prompt(config: Qwen25VLConfig, grid: tuple[int, int, int], text_before: int = 48, text_after: int = 40,
                 seed: int = 0) -> VideoPrompt:
    """A video prompt for ``config`` whose video has the merged grid ``grid = (t, h, w)`` (tokens)."""
    t, h, w = grid
    m = config.vision.spatial_merge_size
    rng = np.random.default_rng(seed)
    ids = np.concatenate([
        rng.integers(0, 900, text_before), [config.vision_start_token_id],
        np.full(t * h * w, config.video_token_id), [config.vision_end_token_id], rng.integers(0, 900, text_after),
    ]).astype(np.int32)[None]
    pixels = rng.standard_normal((t * h * m * w * m, config.vision.patch_dim), dtype=np.float32)
    return VideoPrompt(ids, pixels, np.array([[t, h * m, w * m]]), np.ones(1, np.float32))
