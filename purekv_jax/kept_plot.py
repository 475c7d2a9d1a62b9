"""The picture of what a compressed cache kept (``purekv generate --show-kept kept.png``, or from Python).

A video prompt: each video's sampled frames (one per temporal patch, as the model saw them) with the kept
fraction of every merged 28 x 28 patch overlaid (the fraction of the ``layers x KV heads`` caches holding that
video token: :mod:`purekv_jax.kept_map`), and a strip of the text tokens' fractions in prompt order. A text
prompt: the text itself, each token shaded by its kept fraction. The figure is built with matplotlib's object
API (no pyplot, no global backend change) and written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PatchCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .kept_map import KeptMapError, kept_fraction, pixel_map, text_positions, video_maps
from .processing.image import VisionSpec, unpatchify

#: the colour map of every kept fraction (0 = no layer / head kept the token, 1 = all of them).
CMAP = "inferno"
#: characters per line of the shaded text.
LINE_CHARS = 110


@dataclasses.dataclass(frozen=True)
class KeptPicture:
    """What the picture shows, for one row: ``fraction [N]`` (per real token), ``video_maps`` (per video
    ``[t, h / merge, w / merge]``), ``frames`` (per video ``[t, H, W, 3]`` uint8: the first frame of each
    temporal patch), ``text_positions [n]`` (the non-media tokens), and the ``figure``."""

    fraction: np.ndarray
    video_maps: tuple[np.ndarray, ...]
    frames: tuple[np.ndarray, ...]
    text_positions: np.ndarray
    figure: Figure


def video_frames(pixel_values_videos: np.ndarray, video_grid, spec: VisionSpec) -> list[np.ndarray]:
    """Each video's frames as the model saw them, one per temporal patch: ``[t, H, W, 3]`` uint8 per video,
    from the processor's ``pixel_values_videos [P, patch_dim]`` and ``video_grid_thw [n, 3]``."""
    out, at = [], 0
    for grid in np.asarray(video_grid).reshape(-1, 3):
        n = int(np.prod(grid))
        frames = unpatchify(np.asarray(pixel_values_videos)[at:at + n], tuple(grid), spec)
        out.append(frames[::spec.temporal_patch_size])
        at += n
    return out


def token_texts(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[str]:
    """Each token's text (``decode([id])``), empty ones shown as a middle dot."""
    return [decode([int(i)]) or "\u00b7" for i in ids]


def text_layout(texts: Sequence[str], line_chars: int = LINE_CHARS) -> list[tuple[int, int, str]]:
    """Each token's ``(column, line, shown text)`` in reading order: a token that would run past
    ``line_chars`` starts a new line, and a newline in a token ends its line (shown as a return arrow)."""
    out, col, line = [], 0, 0
    for text in texts:
        shown = text.replace("\n", "\u21b5").replace("\t", " ")
        if col and col + len(shown) > line_chars:
            col, line = 0, line + 1
        out.append((col, line, shown))
        col += len(shown)
        if "\n" in text:
            col, line = 0, line + 1
    return out


def draw_text(ax, layout: list[tuple[int, int, str]], fraction: np.ndarray, line_chars: int = LINE_CHARS) -> None:
    """Draws the laid-out tokens (:func:`text_layout`) on ``ax``, each on a box shaded by its ``fraction``."""
    cmap = colormaps[CMAP]
    boxes = [Rectangle((col, line), len(shown), 1) for col, line, shown in layout]
    ax.add_collection(PatchCollection(boxes, facecolors=[cmap(float(f)) for f in fraction], edgecolors="none"))
    for (col, line, shown), f in zip(layout, fraction):
        ax.text(col, line + 0.8, shown, family="monospace", fontsize=7, color="white" if f < 0.6 else "black")
    ax.set_xlim(0, line_chars)
    ax.set_ylim(1 + max((line for _, line, _ in layout), default=0), 0)
    ax.axis("off")


def show_kept(kept_index: np.ndarray, input_ids: np.ndarray, decode: Callable[[list[int]], str], *,
              attention_mask: np.ndarray | None = None, row: int = 0, pixel_values_videos: np.ndarray | None = None,
              video_grid_thw: np.ndarray | None = None, video_token_id: int = 151656, image_token_id: int = 151655,
              spec: VisionSpec = VisionSpec(), path: str | None = None, title: str | None = None) -> KeptPicture:
    """The picture of one row's kept tokens.

    Args:
      kept_index: ``[L, B, Hkv, S]`` (``GenerateResult.kept_index``).
      input_ids / attention_mask: the prompt as given to ``generate`` (``[B, N]``; the mask marks real tokens).
      decode: token ids -> text (``proc.decode(ids, skip_special_tokens=False)``, a tokenizer's ``decode``).
      pixel_values_videos / video_grid_thw: the processor's video inputs (a video prompt: frames + heat map).
      video_token_id / image_token_id: the placeholders (the model config's).
      spec: the processor's patch geometry and normalisation.
      path: where to write the picture (``.png``, ``.pdf``, ``.svg``, ...; written to a temporary file
        beside it, then renamed); ``None``: only returned.

    Returns: :class:`KeptPicture`.
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if ids.ndim != 2 or mask.shape != ids.shape or not 0 <= row < ids.shape[0]:
        raise KeptMapError(f"input_ids {ids.shape} / attention_mask {mask.shape} must be [batch, seq] holding "
                           f"row {row}")
    if np.asarray(kept_index).shape[1] != ids.shape[0]:
        raise KeptMapError(f"kept_index {np.asarray(kept_index).shape} has another batch than input_ids {ids.shape}")
    real = ids[row][mask[row]]
    fraction = kept_fraction(np.asarray(kept_index)[:, row:row + 1], len(real))[0]
    texts_at = text_positions(real, (video_token_id, image_token_id))
    texts = token_texts(real[texts_at], decode)
    maps, frames = (), ()
    if video_grid_thw is not None:
        maps = tuple(video_maps(fraction, real, video_token_id, video_grid_thw, spec.merge_size))
        frames = tuple(video_frames(pixel_values_videos, video_grid_thw, spec))
    figure = (video_figure(maps, frames, texts, fraction[texts_at], spec) if maps
              else text_figure(texts, fraction[texts_at]))
    figure.suptitle(title or f"kept fraction of layers x KV heads per token (row {row})", fontsize=10)
    if path is not None:
        save_figure(figure, path)
    return KeptPicture(fraction, maps, frames, texts_at, figure)


def text_figure(texts: Sequence[str], fraction: np.ndarray) -> Figure:
    """The shaded text, with a colour bar."""
    layout = text_layout(texts)
    n_lines = 1 + max((line for _, line, _ in layout), default=0)
    figure = Figure(figsize=(8.5, 0.9 + 0.17 * n_lines))
    FigureCanvasAgg(figure)
    draw_text(figure.add_axes((0.01, 0.02, 0.88, 0.9)), layout, fraction)
    colour_bar(figure, (0.91, 0.1, 0.015, 0.75))
    return figure


#: the text strip names its tokens when it has at most this many.
STRIP_LABELS = 80


def video_figure(maps: Sequence[np.ndarray], frames: Sequence[np.ndarray], texts: Sequence[str],
                 text_fraction: np.ndarray, spec: VisionSpec) -> Figure:
    """Every video's frames with the kept fraction overlaid per merged patch, then the text tokens' strip."""
    cols = max(m.shape[0] for m in maps)
    figure = Figure(figsize=(2.2 * cols + 0.8, 2.0 * len(maps) + 1.8))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(maps) + 1, cols, height_ratios=[1.0] * len(maps) + [0.25], hspace=0.35,
                               bottom=0.22, top=0.88, left=0.03, right=0.9)
    patch = spec.patch_size * spec.merge_size
    for v, (tokens_map, video) in enumerate(zip(maps, frames)):
        heat = pixel_map(tokens_map, patch)
        for t in range(tokens_map.shape[0]):
            ax = figure.add_subplot(grid[v, t])
            ax.imshow(video[t])
            ax.imshow(heat[t], cmap=CMAP, vmin=0, vmax=1, alpha=0.55, interpolation="nearest")
            ax.set_title(f"video {v}, t={t}: {tokens_map[t].mean():.0%}", fontsize=7)
            ax.axis("off")
    strip = figure.add_subplot(grid[len(maps), :])
    strip.imshow(np.asarray(text_fraction)[None], cmap=CMAP, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    strip.set_yticks([])
    if len(texts) <= STRIP_LABELS:
        strip.set_xticks(np.arange(len(texts)), [t.replace("\n", "\u21b5") for t in texts], rotation=90,
                         fontsize=6, family="monospace")
    strip.set_title(f"{len(text_fraction)} text tokens in prompt order", fontsize=7)
    colour_bar(figure, (0.93, 0.3, 0.012, 0.5))
    return figure


def colour_bar(figure: Figure, rect: tuple[float, float, float, float]) -> None:
    """The kept-fraction colour bar at ``rect`` (figure coordinates)."""
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), CMAP), cax=figure.add_axes(rect))
    bar.set_label("kept by layers x heads", fontsize=7)


def save_figure(figure: Figure, path: str) -> None:
    """Writes ``figure`` to ``path`` through a temporary file in the same folder (nothing half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".kept-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=120, format=suffix.lstrip("."))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
