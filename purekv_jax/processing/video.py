"""Videos to Qwen2-VL / Qwen2.5-VL patches.

Decoding: PyAV, every frame as RGB uint8 (``to_ndarray(format="rgb24")``), frame count and rate read from the
stream header as transformers' ``read_video_pyav`` does (a container whose header has no frame count is
counted by decoding).

Sampling (transformers' ``Qwen2VLVideoProcessor.sample_frames``): with ``fps`` given,
``n = total / video_fps * fps`` clamped to ``[min_frames, min(max_frames, total) floored to T]`` and to
``total``, floored to a multiple of ``temporal_patch_size``; indices ``arange(0, total, total / n)`` in float32,
truncated. ``second_per_grid_t = temporal_patch_size / sampled_fps`` with ``sampled_fps = n / total * video_fps``
(the rate of the frames actually kept, as transformers and qwen-vl-utils both compute it; it equals ``fps``
whenever ``n`` was not clamped or floored).

Pixels: each frame goes through the image path (PIL bicubic, float32 CLIP normalisation), so a frame's patches
equal the image processor's on that frame bitwise. A file's frames are resized as they are decoded (one
full-resolution frame in memory at a time), and a video whose kept frames would pass
:data:`VIDEO_MEMORY_LIMIT` is refused before they are kept. ``max_pixels`` caps each frame;
``total_pixels`` (optional) additionally caps each frame to ``total_pixels * T / n`` but never below
``1.05 * min_pixels`` (transformers' ``cap_pixels_per_frame`` with ``total_pixels = int(max_video_tokens *
28 * 28 * 0.9)``). transformers' own video processor resizes with torchvision's uint8 antialiased bicubic,
which differs from PIL's by at most 2/255 on a small fraction of pixels; this module keeps PIL (no torch /
torchvision at run time).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import av
import numpy as np
import PIL.Image

from .errors import MediaFileError, NoFramesError, ProcessingError, UnsupportedFormatError, require_readable_file
from .image import VisionSpec, patchify, preprocess_frame, rescale_normalize, resize_bicubic, target_size, to_rgb_uint8

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".3gp", ".ts"})
#: FFmpeg demuxers a video file may open with: plain containers of the extensions above. Playlists (hls),
#: concat lists, image sequences and every network protocol are refused, so a file cannot make FFmpeg
#: read other files.
ALLOWED_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpeg,mpegts,mpegvideo,flv,h264,hevc,m4v"
#: Host memory one video's kept frames may take once resized (uint8) and normalised (float32, twice: the
#: frames and their patches): ``frames * height * width * 3 * (1 + 4 + 4)`` bytes at the target size.
#: Frames are resized as they are decoded, so the full-resolution frames never add up.
VIDEO_MEMORY_LIMIT = 8 << 30
#: A frame larger than this (header size) is refused before decoding (PIL's decompression-bomb limit).
FRAME_PIXELS_LIMIT = 2 * PIL.Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class VideoMetadata:
    """What the stream header says, plus which frames were kept."""

    total_num_frames: int
    fps: float
    width: int
    height: int
    frames_indices: tuple[int, ...] = ()

    @property
    def duration(self) -> float:
        return self.total_num_frames / self.fps if self.fps else 0.0

    @property
    def sampled_fps(self) -> float:
        """Rate of the kept frames (transformers' ``VideoMetadata.sampled_fps``)."""
        if not self.frames_indices or not self.total_num_frames or not self.fps:
            return self.fps or 24.0
        return len(self.frames_indices) / self.total_num_frames * self.fps


@dataclass(frozen=True)
class VideoInputs:
    """``pixel_values_videos`` [P, 1176] float32, ``video_grid_thw`` [n, 3] int64, ``second_per_grid_ts`` [n]."""

    pixel_values_videos: np.ndarray
    video_grid_thw: np.ndarray
    second_per_grid_ts: np.ndarray
    metadata: tuple[VideoMetadata | None, ...] = ()


def sample_frame_indices(
    total_num_frames: int,
    video_fps: float | None,
    *,
    fps: float | None = VIDEO_FPS,
    num_frames: int | None = None,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    temporal_patch_size: int = 2,
    name: str = "video",
) -> np.ndarray:
    """Indices of the frames to keep (transformers' ``Qwen2VLVideoProcessor.sample_frames``, in numpy)."""
    if fps is not None and num_frames is not None:
        raise ProcessingError(f"{name}: pass either fps={fps} or num_frames={num_frames}, not both")
    total = int(total_num_frames)
    if total <= 0:
        raise NoFramesError(f"{name}: no decodable frames")
    t = temporal_patch_size
    if num_frames is not None:
        n = round(num_frames / t) * t
    elif fps is not None:
        if fps <= 0:
            raise ProcessingError(f"{name}: fps={fps} must be positive")
        if not video_fps:
            raise ProcessingError(f"{name}: the stream has no frame rate, so fps={fps} sampling is impossible; "
                                  "pass num_frames instead")
        max_n = math.floor(min(max_frames, total) / t) * t
        n = total / video_fps * fps
        n = min(max(n, min_frames), max_n, total)
        n = math.floor(n / t) * t
    else:
        return np.arange(total, dtype=np.int64)
    if n <= 0:
        raise NoFramesError(
            f"{name}: {total} decodable frame(s) give 0 frames after rounding to a multiple of "
            f"temporal_patch_size={t}; the video needs at least {t} frames"
        )
    if n > total:
        raise NoFramesError(f"{name}: asked for {n} frames but the video has only {total}")
    step = total / n
    count = math.ceil(total / step)
    # torch.arange(0, total, step) is float32 (computed in double, then rounded), .int() truncates
    idx = (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int32)
    return idx.astype(np.int64)


def _open_container(path: Path):
    """The file as a plain local video container (:data:`ALLOWED_DEMUXERS`, the ``file`` protocol only)."""
    options = {"format_whitelist": ALLOWED_DEMUXERS, "protocol_whitelist": "file"}
    try:
        return av.open(os.path.abspath(path), options=options)
    except av.error.ArgumentError:
        raise UnsupportedFormatError(f"video file {path}: not a plain video container (playlists, concat lists and "
                                     "image sequences are refused)") from None
    except (av.error.InvalidDataError, av.error.PatchWelcomeError, av.error.DecoderNotFoundError) as err:
        raise UnsupportedFormatError(f"video file {path}: not a recognised video format ({err})") from None
    except av.error.FFmpegError as err:
        raise MediaFileError(f"video file {path}: cannot be opened ({err})") from None


def probe_video(path: str | os.PathLike) -> VideoMetadata:
    """Frame count, rate and size from the stream header (decodes to count when the header has no count)."""
    path = Path(path)
    require_readable_file(path, "video")
    container = _open_container(path)
    with container:
        if not container.streams.video:
            raise NoFramesError(f"video file {path}: has no video stream")
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        rate = float(stream.average_rate) if stream.average_rate else 0.0
        if int(stream.width or 0) * int(stream.height or 0) > FRAME_PIXELS_LIMIT:
            raise MediaFileError(f"video file {path}: frames of {stream.width}x{stream.height} are larger than "
                                 f"{FRAME_PIXELS_LIMIT} pixels; refused")
        if total == 0:
            total = sum(1 for _ in _decode(container, path))
        return VideoMetadata(total, rate, int(stream.width or 0), int(stream.height or 0))


def _decode(container, path: Path):
    """Yield decoded frames; a decoder error before the first frame means the video has no decodable frames,
    one after it ends the stream there (the frames before it are kept)."""
    n = 0
    try:
        for frame in container.decode(video=0):
            n += 1
            yield frame
    except av.error.FFmpegError as err:
        if n == 0:
            raise NoFramesError(f"video file {path}: no decodable frames (decoder: {err})") from None


def count_frames(path: Path) -> int:
    """How many frames really decode (for a header that over-counts)."""
    with _open_container(path) as container:
        return sum(1 for _ in _decode(container, path))


def grab_frames(path: Path, indices: np.ndarray, resize=None) -> dict[int, np.ndarray]:
    """Decode frames up to the last index; keep those in ``indices`` as RGB uint8 [H, W, 3], each resized as
    it is decoded to ``resize(height, width, len(indices))`` (computed on the first kept frame) when given."""
    wanted = {int(i) for i in indices}
    last = int(indices[-1])
    frames: dict[int, np.ndarray] = {}
    size = None
    with _open_container(path) as container:
        for i, frame in enumerate(_decode(container, path)):
            if i > last:
                break
            if i in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                if resize is not None:
                    size = size or resize(rgb.shape[0], rgb.shape[1], len(indices))
                    rgb = resize_bicubic(rgb, *size)
                frames[i] = rgb
    return frames


def read_video(
    path: str | os.PathLike,
    *,
    fps: float | None = VIDEO_FPS,
    num_frames: int | None = None,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    temporal_patch_size: int = 2,
    resize=None,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode and sample a video file -> (frames RGB uint8 [n, H, W, 3], metadata with ``frames_indices``).

    ``resize(height, width, n_frames) -> (h, w)``: each kept frame is resized (PIL bicubic) to that size as
    it is decoded, so only one full-resolution frame is held at a time."""
    path = Path(path)
    meta = probe_video(path)

    def sample(total: int) -> np.ndarray:
        return sample_frame_indices(
            total, meta.fps, fps=fps, num_frames=num_frames, min_frames=min_frames, max_frames=max_frames,
            temporal_patch_size=temporal_patch_size, name=f"video file {path}",
        )

    total = meta.total_num_frames
    idx = sample(total)
    frames = grab_frames(path, idx, resize)
    if len(frames) < len(idx):
        # the header over-counts: sample again over the frames that really decode
        total = count_frames(path)
        if total == 0:
            raise NoFramesError(f"video file {path}: no decodable frames (header says {meta.total_num_frames})")
        idx = sample(total)
        frames = grab_frames(path, idx, resize)
    kept = [int(i) for i in idx]
    video = np.stack([frames[i] for i in kept])
    width, height = (video.shape[2], video.shape[1]) if resize is None else (meta.width, meta.height)
    return video, VideoMetadata(total, meta.fps, width, height, tuple(kept))


VideoLike = Union[str, os.PathLike, np.ndarray, Sequence]


def check_video_memory(n_frames: int, height: int, width: int, limit: int, name: str = "video") -> None:
    """Refuses a video whose kept frames would take more than ``limit`` bytes of host memory at their target
    size (see :data:`VIDEO_MEMORY_LIMIT`)."""
    need = n_frames * height * width * 3 * 9
    if need > limit:
        raise ProcessingError(
            f"{name}: {n_frames} frames of {height}x{width} need {need / 2**30:.1f} GiB of host memory, more than "
            f"the {limit / 2**30:.1f} GiB limit; lower --fps / --max-frames / --max-pixels")


def frame_max_pixels(num_frames: int, min_pixels: int, max_pixels: int, total_pixels: int | None,
                     temporal_patch_size: int = 2) -> int:
    """Per-frame pixel cap: ``max_pixels``, further bounded by an even share of ``total_pixels`` if given."""
    if total_pixels is None:
        return max_pixels
    return max(min(max_pixels, total_pixels * temporal_patch_size // num_frames), int(min_pixels * 1.05))


def process_videos(
    videos: VideoLike | Sequence[VideoLike],
    *,
    fps: float | None = VIDEO_FPS,
    num_frames: int | None = None,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int | None = None,
    frames_fps: float | None = None,
    spec: VisionSpec = VisionSpec(),
    memory_limit: int = VIDEO_MEMORY_LIMIT,
) -> VideoInputs:
    """Videos (file paths, or already-sampled frames [n, H, W, 3] / lists of images) -> model inputs.

    File paths are decoded and sampled (``fps`` / ``num_frames``), each kept frame resized as it is decoded;
    a video whose frames would take more than ``memory_limit`` bytes (:func:`check_video_memory`) is refused
    before its frames are kept. Frames passed in directly are used as given; their ``second_per_grid_t`` is
    ``temporal_patch_size / frames_fps`` (``frames_fps`` defaults to ``fps``).
    """
    if isinstance(videos, (str, os.PathLike, np.ndarray)):
        videos = [videos]
    videos = list(videos)
    if not videos:
        raise ProcessingError("process_videos: no videos given")
    rows, grids, spgt, metas = [], [], [], []
    for vi, video in enumerate(videos):
        if isinstance(video, (str, os.PathLike)):
            name = f"video file {video}"

            def size(height: int, width: int, n: int, name=name) -> tuple[int, int]:
                cap = frame_max_pixels(n, min_pixels, max_pixels, total_pixels, spec.temporal_patch_size)
                h, w = target_size(height, width, spec, min_pixels, cap, name)
                check_video_memory(n, h, w, memory_limit, name)
                return h, w

            frames, meta = read_video(
                video, fps=fps, num_frames=num_frames, min_frames=min_frames, max_frames=max_frames,
                temporal_patch_size=spec.temporal_patch_size, resize=size,
            )
            rate = meta.sampled_fps
            patches, grid = patchify(np.stack([rescale_normalize(f, spec) for f in frames]), spec)
        else:
            name = f"video {vi}"
            if isinstance(video, np.ndarray):
                if video.ndim != 4:
                    raise UnsupportedFormatError(
                        f"{name}: frames array of shape {tuple(video.shape)} must be [n, H, W, C]"
                    )
                frames = np.stack([to_rgb_uint8(f, f"{name} frame {j}") for j, f in enumerate(video)]) if len(video) else video
            else:
                frames = [to_rgb_uint8(f, f"{name} frame {j}") for j, f in enumerate(video)]
                if frames and len({f.shape for f in frames}) != 1:
                    raise ProcessingError(f"{name}: frames differ in size: {sorted({f.shape for f in frames})}")
                frames = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
            meta = None
            rate = frames_fps if frames_fps is not None else (fps if fps is not None else VIDEO_FPS)
            if len(frames) == 0:
                raise NoFramesError(f"{name}: no frames")
            cap = frame_max_pixels(len(frames), min_pixels, max_pixels, total_pixels, spec.temporal_patch_size)
            h, w = target_size(frames.shape[1], frames.shape[2], spec, min_pixels, cap, name)
            patches, grid = patchify(np.stack([preprocess_frame(f, h, w, spec) for f in frames]), spec)
        rows.append(patches)
        grids.append(grid)
        spgt.append(spec.temporal_patch_size / rate)
        metas.append(meta)
    return VideoInputs(
        np.concatenate(rows, axis=0),
        np.asarray(grids, dtype=np.int64),
        np.asarray(spgt, dtype=np.float64),
        tuple(metas),
    )
