"""VideoLLaMA2 / VideoLLaMA2.1 inputs as the release prepares them (``videollama2/mm_utils.py``,
``mm_infer`` in ``videollama2/__init__.py``, ``conversation.py``), without torch or decord.

Frames. A video file is decoded with PyAV; of its ``duration`` frames, ``num_frames`` are taken uniformly:
frame ``i`` is ``round((duration - 1) / num_frames * (i + 0.5))`` (the release's ``frame_sample``, which adds
1e-6 before rounding so halves round up; a clip shorter than ``num_frames`` repeats frames). Frames passed
as arrays are used as given; fewer than ``num_frames`` are topped up with black frames as the release does
(of its transposed ``(width, height)`` size). Each frame is padded to a square with the tower's mean colour
(``expand2square``, when the aspect ratio is ``"pad"``), then goes through the tower's own image processor:
CLIP resizes the shortest side to ``size`` (PIL bicubic) and centre-crops ``crop`` x ``crop``; SigLIP resizes
to ``size`` x ``size``; both rescale by 1/255 and normalise with the tower's mean / std. An image is one
such frame (the model repeats it ``num_frames`` times).

Prompt. One ``<video>`` (``<image>``) tag per medium, each followed by a newline, before the user's text; the
chat template is the LM's: Mistral's ``[INST]`` turn with conversation.py's Llama-2 system prompt wrapped in
``<<SYS>>`` for VideoLLaMA2 (Mistral), Qwen2's ChatML with its default system prompt for VideoLLaMA2.1. Each
tag becomes the release's placeholder id (``-201`` / ``-200``), then one placeholder per connector token
(:func:`models.videollama2.expand_placeholders`), so shapes are known before any device work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from models.videollama2 import VideoLLaMA2Config, VisionTowerConfig, expand_placeholders

from .errors import NoFramesError, ProcessingError, PromptError, UnsupportedFormatError
from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_bicubic, to_rgb_uint8
from .tokenizer import IM_END, IM_START, encode_plain, load_tokenizer
from .video import VIDEO_MEMORY_LIMIT, check_video_memory, count_frames, grab_frames, probe_video

VIDEO_TAG, IMAGE_TAG = "<video>", "<image>"
MISTRAL_BOS = "<s>"
#: conversation.py's ``conv_llama_2`` system prompt (VideoLLaMA2's Mistral models).
MISTRAL_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
#: Qwen2's template default (conversation.py's ``conv_qwen``), VideoLLaMA2.1.
QWEN2_SYSTEM_PROMPT = "You are a helpful assistant."
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TowerImageSpec:
    """The vision tower's image processor: ``kind`` ``"clip"`` (resize the shortest side to ``size``, then a
    ``crop`` x ``crop`` centre crop) or ``"siglip"`` (resize to ``size`` x ``size``); rescale, normalise."""

    kind: str
    size: int
    crop: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    @classmethod
    def for_tower(cls, vision: VisionTowerConfig, preprocessor: Mapping[str, Any] | None = None) -> "TowerImageSpec":
        """The tower's defaults (the Hub processors of CLIP-L/14-336 and SigLIP so400m at the tower's image
        size), with ``preprocessor_config.json``'s ``image_mean`` / ``image_std`` / ``rescale_factor`` when given."""
        clip = vision.kind == "clip"
        p = dict(preprocessor or {})
        try:
            return cls(kind=vision.kind, size=vision.image_size, crop=vision.image_size,
                       image_mean=tuple(float(x) for x in p.get("image_mean", OPENAI_CLIP_MEAN if clip else SIGLIP_MEAN)),
                       image_std=tuple(float(x) for x in p.get("image_std", OPENAI_CLIP_STD if clip else SIGLIP_STD)),
                       rescale_factor=float(p.get("rescale_factor", 1 / 255)))
        except (TypeError, ValueError) as err:
            raise UnsupportedFormatError(f"preprocessor_config.json: image_mean / image_std / rescale_factor must be "
                                         f"numbers ({err})") from None

    @property
    def background(self) -> tuple[int, int, int]:
        """``expand2square``'s fill: the mean colour in 0..255, truncated as the release does."""
        return tuple(int(m * 255) for m in self.image_mean)


def uniform_frame_indices(duration: int, num_frames: int) -> np.ndarray:
    """The release's uniform sampling: the middle of each of ``num_frames`` equal segments of
    ``[0, duration - 1]``, rounded half up -> ``[num_frames]`` int64."""
    if duration < 1:
        raise NoFramesError(f"a video of {duration} frames has no frame to sample")
    if num_frames < 1:
        raise ProcessingError(f"num_frames={num_frames} must be >= 1")
    seg = float(duration - 1) / num_frames
    mids = np.array([(seg * i + seg * (i + 1)) / 2 for i in range(num_frames)])
    return np.round(mids + 1e-6).astype(np.int64)


def expand2square(rgb: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` centred on a ``max(H, W)`` square of ``background`` (offset ``(long - short) // 2``)."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(background, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out


def tower_pixels(rgb: np.ndarray, spec: TowerImageSpec) -> np.ndarray:
    """One RGB uint8 ``[H, W, 3]`` frame -> ``[3, S, S]`` float32 through the tower's image processor."""
    h, w = rgb.shape[:2]
    if spec.kind == "clip":
        short, long = min(h, w), max(h, w)
        new_long = int(spec.size * long / short)
        nh, nw = (new_long, spec.size) if w <= h else (spec.size, new_long)
        rgb = resize_bicubic(rgb, nh, nw)
        top, left = (nh - spec.crop) // 2, (nw - spec.crop) // 2
        rgb = rgb[top:top + spec.crop, left:left + spec.crop]
    else:
        rgb = resize_bicubic(rgb, spec.size, spec.size)
    x = (rgb.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    x = (x - np.asarray(spec.image_mean, np.float32)) / np.asarray(spec.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def read_uniform_frames(path: str | os.PathLike, num_frames: int, memory_limit: int = VIDEO_MEMORY_LIMIT
                        ) -> tuple[np.ndarray, np.ndarray]:
    """A video file's ``num_frames`` uniformly sampled frames -> ``(frames RGB uint8 [n, H, W, 3], indices [n])``
    (a header that over-counts is recounted by decoding)."""
    path = Path(path)
    meta = probe_video(path)
    check_video_memory(num_frames, meta.height, meta.width, memory_limit, f"video file {path}")
    total = meta.total_num_frames
    idx = uniform_frame_indices(total, num_frames)
    frames = grab_frames(path, idx)
    if len(frames) < len(set(idx.tolist())):
        total = count_frames(path)
        idx = uniform_frame_indices(total, num_frames)
        frames = grab_frames(path, idx)
    return np.stack([frames[int(i)] for i in idx]), idx


def pad_frame_count(frames: list[np.ndarray], num_frames: int) -> list[np.ndarray]:
    """Frames topped up to ``num_frames`` with black frames as the release does: ``np.zeros((*img.size, 3))``
    of the last PIL frame, i.e. of shape ``[W, H, 3]`` (its size transposed)."""
    out = list(frames)
    while len(out) < num_frames:
        h, w = out[-1].shape[:2]
        out.append(np.zeros((w, h, 3), np.uint8))
    return out


# ------------------------------------------------------------------------------------------ the prompt
Segment = tuple[str, str]  # (text, kind): kind "special" (a token of the template), "plain" (text), "media" (a tag)


def prompt_segments(question: str, lm_type: str, media: Sequence[str] = ("video",), system: str | None = None
                    ) -> list[Segment]:
    """The release's prompt for one user turn, in pieces: each medium's tag (``"video"`` / ``"image"``) and
    a newline, then ``question``, in the LM's chat template (``system=None``: the template's default)."""
    user = []
    for kind in media:
        user += [(VIDEO_TAG if kind == "video" else IMAGE_TAG, "media"), ("\n", "plain")]
    user.append((question, "plain"))
    if lm_type == "mistral":
        sys_text = MISTRAL_SYSTEM_PROMPT if system is None else system
        out = [(MISTRAL_BOS, "special"), (f"[INST] <<SYS>>\n{sys_text}\n<</SYS>>\n\n", "plain"), *user,
               (" [/INST]", "plain")]
    elif lm_type == "qwen2":
        sys_text = QWEN2_SYSTEM_PROMPT if system is None else system
        out = [(IM_START, "special"), (f"system\n{sys_text}", "plain"), (IM_END, "special"), ("\n", "plain"),
               (IM_START, "special"), ("user\n", "plain"), *user, (IM_END, "special"), ("\n", "plain"),
               (IM_START, "special"), ("assistant\n", "plain")]
    else:
        raise PromptError(f"no chat template for a {lm_type!r} language model (mistral, qwen2)")
    merged: list[Segment] = []  # adjacent plain pieces are one piece, as the release tokenises them
    for text, kind in out:
        if merged and kind == "plain" and merged[-1][1] == "plain":
            merged[-1] = (merged[-1][0] + text, "plain")
        elif text:
            merged.append((text, kind))
    return merged


def render_prompt(question: str, lm_type: str, media: Sequence[str] = ("video",), system: str | None = None) -> str:
    """:func:`prompt_segments` as one string (with the ``<video>`` / ``<image>`` tags)."""
    return "".join(text for text, _ in prompt_segments(question, lm_type, media, system))


def parse_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, str, list[tuple[str, Any]]]:
    """Chat messages (an optional system turn, then one user turn whose content is a string or a list of
    ``{"type": "video" | "image" | "text", ...}`` entries) -> ``(system, question, [(kind, source), ...])``."""
    system, rest = None, list(messages)
    if rest and isinstance(rest[0], Mapping) and rest[0].get("role") == "system":
        system, rest = str(rest[0].get("content", "")), rest[1:]
    if len(rest) != 1 or not isinstance(rest[0], Mapping) or rest[0].get("role") != "user":
        raise PromptError(f"VideoLLaMA2 prompts hold one user turn (after an optional system turn); got "
                          f"{len(rest)} message(s) after the system turn")
    content = rest[0].get("content")
    if isinstance(content, str):
        return system, content, []
    if not isinstance(content, Sequence):
        raise PromptError(f"the user turn's content must be a string or a list, got {type(content).__name__}")
    media, texts = [], []
    for j, c in enumerate(content):
        if not isinstance(c, Mapping):
            raise PromptError(f"user content {j}: expected a dict, got {type(c).__name__}")
        if c.get("type") == "video" or "video" in c:
            media.append(("video", c.get("video")))
        elif c.get("type") == "image" or "image" in c:
            media.append(("image", c.get("image")))
        elif "text" in c:
            texts.append(str(c["text"]))
    return system, "".join(texts), media


class VideoLLaMA2Processor:
    """Chat messages + videos / images -> ``input_ids [1, N]`` (expanded placeholders), ``attention_mask``,
    ``pixel_values_videos [sum T, 3, S, S]`` + ``video_grid_thw [n, 3]`` and ``pixel_values [n, 3, S, S]`` +
    ``image_grid_thw [n, 3]`` (patch grids), as VideoLLaMA2's release prepares them (see the module doc).

    ``num_frames``: frames per video (default the config's); ``aspect_ratio``: ``"pad"`` (``expand2square``,
    the config's ``image_aspect_ratio``) or anything else for none; ``allow_special``: tokenise special-token
    strings in user text as the special tokens (default: plain text)."""

    def __init__(self, tokenizer, config: VideoLLaMA2Config, *, spec: TowerImageSpec | None = None,
                 num_frames: int | None = None, aspect_ratio: str | None = None, allow_special: bool = False,
                 video_memory_limit: int = VIDEO_MEMORY_LIMIT):
        self.tokenizer, self.config = tokenizer, config
        self.spec = spec or TowerImageSpec.for_tower(config.vision)
        self.num_frames = config.num_frames if num_frames is None else int(num_frames)
        self.aspect_ratio = config.image_aspect_ratio if aspect_ratio is None else aspect_ratio
        self.allow_special, self.video_memory_limit = allow_special, video_memory_limit
        self.image_token_id, self.video_token_id = config.image_token_index, config.video_token_index

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "VideoLLaMA2Processor":
        """From a checkpoint folder: ``tokenizer.json``, ``config.json`` and, when present,
        ``preprocessor_config.json`` (mean / std / rescale factor)."""
        path = Path(path)
        pre = path / "preprocessor_config.json"
        try:
            preprocessor = json.loads(pre.read_text()) if pre.exists() else None
        except (OSError, ValueError) as err:
            raise UnsupportedFormatError(f"{pre}: cannot be read as JSON ({err})") from None
        config = VideoLLaMA2Config.from_json(path)
        overrides.setdefault("spec", TowerImageSpec.for_tower(config.vision, preprocessor))
        return cls(load_tokenizer(path), config, **overrides)

    @property
    def side(self) -> int:
        return self.config.vision.patches_per_side

    def frame_pixels(self, rgb: np.ndarray) -> np.ndarray:
        """One frame (or image) -> ``[3, S, S]`` float32: ``expand2square`` when padding, then the tower's processor."""
        if self.aspect_ratio == "pad":
            rgb = expand2square(rgb, self.spec.background)
        return tower_pixels(rgb, self.spec)

    def video_frames(self, video: Any, name: str) -> np.ndarray:
        """A video file (sampled uniformly) or frames (an array ``[n, H, W, C]`` / a list of images, topped up
        to ``num_frames``) -> RGB uint8 frames."""
        if isinstance(video, (str, os.PathLike)):
            frames, _ = read_uniform_frames(video, self.num_frames, self.video_memory_limit)
            return list(frames)
        frames = [to_rgb_uint8(f, f"{name} frame {j}") for j, f in enumerate(video)]
        if not frames:
            raise NoFramesError(f"{name}: no frames")
        return pad_frame_count(frames, self.num_frames)

    def __call__(self, *, messages: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        system, question, media = parse_messages(messages)
        out: dict[str, np.ndarray] = {}
        videos = [self.video_frames(src, f"video {i}") for i, src in enumerate(s for k, s in media if k == "video")]
        images = [to_rgb_uint8(src, f"image {i}") for i, src in enumerate(s for k, s in media if k == "image")]
        video_grid = tuple((len(v), self.side, self.side) for v in videos) or None
        image_grid = tuple((1, self.side, self.side) for _ in images) or None
        if videos:
            out["pixel_values_videos"] = np.stack([self.frame_pixels(f) for v in videos for f in v])
            out["video_grid_thw"] = np.asarray(video_grid, np.int64)
        if images:
            out["pixel_values"] = np.stack([self.frame_pixels(im) for im in images])
            out["image_grid_thw"] = np.asarray(image_grid, np.int64)
        segments = prompt_segments(question, self.config.lm_type, [k for k, _ in media], system)
        ids = expand_placeholders(self.segment_ids(segments), self.config, image_grid, video_grid)
        out["input_ids"] = ids[None]
        out["attention_mask"] = np.ones_like(out["input_ids"])
        return out

    def segment_ids(self, segments: Sequence[Segment]) -> list[int]:
        """The release's ids of :func:`prompt_segments`: one placeholder id per tag, the template's special
        tokens by id, the text tokenised without special tokens (unless ``allow_special``)."""
        tags = {VIDEO_TAG: self.video_token_id, IMAGE_TAG: self.image_token_id}
        ids: list[int] = []
        for text, kind in segments:
            if kind == "media":
                ids.append(tags[text])
            elif kind == "special":
                tok = self.tokenizer.token_to_id(text)
                if tok is None:
                    raise PromptError(f"the tokenizer has no {text} token; the {self.config.lm_type} chat template "
                                      "needs it (tokenizer.json does not belong to this checkpoint)")
                ids.append(tok)
            elif self.allow_special:
                ids += self.tokenizer.encode(text, add_special_tokens=False).ids
            else:
                ids += encode_plain(self.tokenizer, text)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1) if i >= 0],
                                     skip_special_tokens=skip_special_tokens)
