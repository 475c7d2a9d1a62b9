"""Qwen2.5-VL's chat template, placeholder expansion, and the processor that ties text, images and videos.

``render_chat`` is a Python transcription of the released Qwen2.5-VL ``chat_template`` (kept verbatim in
``QWEN25VL_CHAT_TEMPLATE`` for writing next to a checkpoint and for checking against a Jinja renderer):
a default system turn "You are a helpful assistant." when the first message is not a system one, each image as
``<|vision_start|><|image_pad|><|vision_end|>`` and each video as ``<|vision_start|><|video_pad|><|vision_end|>``.
``expand_placeholders`` then repeats the i-th image (video) pad ``prod(grid_thw[i]) // merge_size**2`` times,
as the reference processor does, before tokenising. Chat messages are tokenised in :func:`chat_segments`'
pieces: the special tokens the template inserts, and the roles, system and user text as plain text, so a
``<|im_start|>`` typed by a user stays text (``allow_special=True`` tokenises the rendered string whole,
honouring special-token strings anywhere, as the reference processor does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import MediaFileError, PromptError, UnsupportedFormatError
from .image import IMAGE_EXTENSIONS, IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, VisionSpec, process_images
from .tokenizer import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, encode_plain, load_tokenizer
from .video import (
    VIDEO_EXTENSIONS, VIDEO_FPS, VIDEO_MAX_FRAMES, VIDEO_MAX_PIXELS, VIDEO_MEMORY_LIMIT, VIDEO_MIN_FRAMES,
    VIDEO_MIN_PIXELS, process_videos,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

Message = Mapping[str, Any]


def media_kind(path: str | os.PathLike) -> str:
    """``"image"`` or ``"video"`` from a file's extension; anything else is an ``UnsupportedFormatError``."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    raise UnsupportedFormatError(
        f"{path}: unknown media format {ext or '(no extension)'!r}; images: {' '.join(sorted(IMAGE_EXTENSIONS))}; "
        f"videos: {' '.join(sorted(VIDEO_EXTENSIONS))}"
    )


def _is_image(c: Mapping) -> bool:
    return c.get("type") == "image" or "image" in c or "image_url" in c


def _is_video(c: Mapping) -> bool:
    return c.get("type") == "video" or "video" in c


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
    """The Qwen2.5-VL chat template, rendered in Python (same text as the Jinja template)."""
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt, add_vision_id))


def chat_segments(messages: Sequence[Message], add_generation_prompt: bool = True,
                  add_vision_id: bool = False) -> list[tuple[str, bool]]:
    """:func:`render_chat`'s text in pieces ``(text, special)``: ``special`` pieces are the special tokens the
    template puts there (turn markers, vision markers and pads), the others are plain text (roles, system
    and user text), which :meth:`Qwen25VLProcessor.__call__` tokenises without special tokens."""
    if not messages:
        raise PromptError("render_chat: no messages")
    out: list[tuple[str, bool]] = []
    plain = lambda text: out.append((text, False))  # noqa: E731
    special = lambda *tokens: out.extend((t, True) for t in tokens)  # noqa: E731
    n_img = n_vid = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise PromptError(f"message {i}: needs 'role' and 'content' keys")
        role, content = msg["role"], msg["content"]
        if i == 0 and role != "system":
            special(IM_START)
            plain(f"system\n{DEFAULT_SYSTEM_PROMPT}")
            special(IM_END)
            plain("\n")
        special(IM_START)
        plain(f"{role}\n")
        if isinstance(content, str):
            plain(content)
            special(IM_END)
            plain("\n")
            continue
        if not isinstance(content, Sequence):
            raise PromptError(f"message {i}: content must be a string or a list, got {type(content).__name__}")
        for j, c in enumerate(content):
            if not isinstance(c, Mapping):
                raise PromptError(f"message {i} content {j}: expected a dict, got {type(c).__name__}")
            if _is_image(c):
                n_img += 1
                if add_vision_id:
                    plain(f"Picture {n_img}: ")
                special(VISION_START, IMAGE_PAD, VISION_END)
            elif _is_video(c):
                n_vid += 1
                if add_vision_id:
                    plain(f"Video {n_vid}: ")
                special(VISION_START, VIDEO_PAD, VISION_END)
            elif "text" in c:
                plain(str(c["text"]))
        special(IM_END)
        plain("\n")
    if add_generation_prompt:
        special(IM_START)
        plain("assistant\n")
    merged: list[tuple[str, bool]] = []  # plain text between two special tokens is one piece, as when whole
    for text, sp in out:
        if merged and not sp and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        elif text:
            merged.append((text, sp))
    return merged


def user_message(prompt: str, images: Sequence[Any] = (), videos: Sequence[Any] = ()) -> list[dict]:
    """One user turn: the videos, then the images, then the prompt text (Qwen's documented order)."""
    content = [{"type": "video", "video": v} for v in videos] + [{"type": "image", "image": im} for im in images]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def media_from_messages(messages: Sequence[Message]) -> tuple[list[Any], list[Any]]:
    """The image and video sources named in the messages, in template order."""
    images, videos = [], []
    for msg in messages:
        if isinstance(msg.get("content"), str):
            continue
        for c in msg["content"]:
            if _is_image(c):
                images.append(c.get("image", c.get("image_url")))
            elif _is_video(c):
                videos.append(c.get("video"))
    return images, videos


def check_placeholder_counts(counts: Mapping[str, int], image_grid_thw, video_grid_thw) -> None:
    """One image (video) per ``<|image_pad|>`` (``<|video_pad|>``) placeholder; ``counts``: pad -> number."""
    for pad, grid in ((IMAGE_PAD, image_grid_thw), (VIDEO_PAD, video_grid_thw)):
        n_grid = 0 if grid is None else len(grid)
        kind = "image" if pad == IMAGE_PAD else "video"
        if counts[pad] != n_grid:
            raise PromptError(f"the prompt has {counts[pad]} {kind} placeholder(s) {pad} but {n_grid} {kind}(s) "
                              "were given")


def expand_placeholders(
    text: str,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    merge_size: int = 2,
) -> str:
    """Repeat the i-th ``<|image_pad|>`` / ``<|video_pad|>`` ``prod(grid_thw[i]) // merge_size**2`` times."""
    unit = merge_size * merge_size
    grids = {IMAGE_PAD: image_grid_thw, VIDEO_PAD: video_grid_thw}
    check_placeholder_counts({pad: text.count(pad) for pad in grids}, image_grid_thw, video_grid_thw)
    pieces = []
    counters = {IMAGE_PAD: 0, VIDEO_PAD: 0}
    pos = 0
    while True:
        nxt = [(text.find(p, pos), p) for p in (IMAGE_PAD, VIDEO_PAD)]
        nxt = [(i, p) for i, p in nxt if i >= 0]
        if not nxt:
            pieces.append(text[pos:])
            break
        i, pad = min(nxt)
        pieces.append(text[pos:i])
        g = grids[pad][counters[pad]]
        counters[pad] += 1
        pieces.append(pad * (int(np.prod(g)) // unit))
        pos = i + len(pad)
    return "".join(pieces)


class Qwen25VLProcessor:
    """Chat messages + images + videos -> ``input_ids`` and the vision tensors, as Qwen2.5-VL's processor."""

    def __init__(
        self,
        tokenizer,
        *,
        image_min_pixels: int = IMAGE_MIN_PIXELS,
        image_max_pixels: int = IMAGE_MAX_PIXELS,
        video_min_pixels: int = VIDEO_MIN_PIXELS,
        video_max_pixels: int = VIDEO_MAX_PIXELS,
        video_total_pixels: int | None = None,
        fps: float = VIDEO_FPS,
        min_frames: int = VIDEO_MIN_FRAMES,
        max_frames: int = VIDEO_MAX_FRAMES,
        spec: VisionSpec = VisionSpec(),
        allow_special: bool = False,
        video_memory_limit: int = VIDEO_MEMORY_LIMIT,
    ):
        self.tokenizer = tokenizer
        self.allow_special = allow_special
        self.video_memory_limit = video_memory_limit
        self.image_min_pixels, self.image_max_pixels = image_min_pixels, image_max_pixels
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels
        self.video_total_pixels = video_total_pixels
        self.fps, self.min_frames, self.max_frames = fps, min_frames, max_frames
        self.spec = spec
        for name in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END):
            if tokenizer.token_to_id(name) is None:
                raise PromptError(f"the tokenizer has no {name} token; a Qwen2.5-VL tokenizer needs the vision tokens")
        self.image_token_id = tokenizer.token_to_id(IMAGE_PAD)
        self.video_token_id = tokenizer.token_to_id(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "Qwen25VLProcessor":
        """From a checkpoint folder: ``tokenizer.json`` plus ``preprocessor_config.json`` /
        ``video_preprocessor_config.json`` when present (min/max pixels, patch sizes, mean/std)."""
        path = Path(path)
        if not path.is_dir():
            raise MediaFileError(f"checkpoint folder not found: {path}")
        tok = load_tokenizer(path)
        kw: dict[str, Any] = {}
        img = _read_json(path / "preprocessor_config.json")
        vid = _read_json(path / "video_preprocessor_config.json")
        src = img or vid
        if src:
            kw["spec"] = VisionSpec(
                patch_size=int(src.get("patch_size", 14)),
                temporal_patch_size=int(src.get("temporal_patch_size", 2)),
                merge_size=int(src.get("merge_size", 2)),
                image_mean=tuple(src.get("image_mean", VisionSpec.image_mean)),
                image_std=tuple(src.get("image_std", VisionSpec.image_std)),
                rescale_factor=float(src.get("rescale_factor", 1 / 255)),
            )
        mn, mx = _pixels(img)
        if mn is not None:
            kw["image_min_pixels"] = mn
        if mx is not None:
            kw["image_max_pixels"] = mx
        mn, mx = _pixels(vid)
        if mn is not None:
            kw["video_min_pixels"] = mn
        if mx is not None:
            kw["video_max_pixels"] = mx
        for key in ("fps", "min_frames", "max_frames"):
            if vid.get(key) is not None:
                kw[key] = vid[key]
        kw.update(overrides)
        return cls(tok, **kw)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt=add_generation_prompt)

    def __call__(
        self,
        text: str | None = None,
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        *,
        messages: Sequence[Message] | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, np.ndarray]:
        """Either ``text`` already in chat format (with placeholders) or ``messages``; images / videos default
        to the ones named in ``messages``. Returns ``input_ids`` [1, N] int64, ``attention_mask`` [1, N], and
        ``pixel_values``/``image_grid_thw`` and ``pixel_values_videos``/``video_grid_thw``/``second_per_grid_ts``
        when there are images / videos."""
        if (text is None) == (messages is None):
            raise PromptError("pass exactly one of text= or messages=")
        segments = None
        if messages is not None:
            segments = chat_segments(messages, add_generation_prompt)
            text = "".join(t for t, _ in segments)
            m_images, m_videos = media_from_messages(messages)
            images = m_images if images is None else images
            videos = m_videos if videos is None else videos
        out: dict[str, np.ndarray] = {}
        image_grid = video_grid = None
        if images:
            img = process_images(
                list(images), min_pixels=self.image_min_pixels, max_pixels=self.image_max_pixels, spec=self.spec
            )
            out["pixel_values"], out["image_grid_thw"] = img.pixel_values, img.image_grid_thw
            image_grid = img.image_grid_thw
        if videos:
            vid = process_videos(
                list(videos), fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames,
                min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels,
                total_pixels=self.video_total_pixels, spec=self.spec, memory_limit=self.video_memory_limit,
            )
            out["pixel_values_videos"], out["video_grid_thw"] = vid.pixel_values_videos, vid.video_grid_thw
            out["second_per_grid_ts"] = vid.second_per_grid_ts
            video_grid = vid.video_grid_thw
        if segments is None or self.allow_special:
            expanded = expand_placeholders(text, image_grid, video_grid, self.spec.merge_size)
            ids = np.asarray(self.tokenizer.encode(expanded).ids, dtype=np.int64)[None]
        else:
            ids = np.asarray(self.segment_ids(segments, image_grid, video_grid), dtype=np.int64)[None]
        out["input_ids"] = ids
        out["attention_mask"] = np.ones_like(ids)
        return out

    def segment_ids(self, segments: Sequence[tuple[str, bool]], image_grid=None, video_grid=None) -> list[int]:
        """Token ids of :func:`chat_segments`' pieces: the template's special tokens as their ids (each pad
        repeated for its image / video), the plain text without special tokens (:func:`encode_plain`)."""
        pads = {IMAGE_PAD: list(image_grid if image_grid is not None else ()),
                VIDEO_PAD: list(video_grid if video_grid is not None else ())}
        check_placeholder_counts({pad: sum(sp and t == pad for t, sp in segments) for pad in pads}, image_grid,
                                 video_grid)
        unit = self.spec.merge_size**2
        ids: list[int] = []
        for text, special in segments:
            if not special:
                ids += encode_plain(self.tokenizer, text)
            elif text in pads:
                ids += [self.tokenizer.token_to_id(text)] * (int(np.prod(pads[text].pop(0))) // unit)
            else:
                ids.append(self.tokenizer.token_to_id(text))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UnsupportedFormatError(f"{path}: cannot be read as JSON ({err})") from None


def _pixels(cfg: dict) -> tuple[int | None, int | None]:
    size = cfg.get("size") or {}
    mn = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    mx = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    return (None if mn is None else int(mn)), (None if mx is None else int(mx))
