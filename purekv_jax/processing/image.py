"""Images to Qwen2-VL / Qwen2.5-VL patches, numerically identical to transformers' PIL image processor.

The pipeline (``Qwen2VLImageProcessorPil`` in transformers 5.x, and the original slow processor before it):

1. decode / convert to RGB ``uint8`` (alpha composited onto white, as ``convert_to_rgb`` does);
2. ``smart_resize`` to multiples of ``patch_size * merge_size`` (28) inside ``[min_pixels, max_pixels]``;
3. resize with PIL ``BICUBIC`` (uint8 in, uint8 out, no reducing gap);
4. rescale: ``uint8 -> float64 * (1/255) -> float32``;
5. normalise in float32 with the CLIP mean / std: ``(x - mean) / std``;
6. repeat to ``temporal_patch_size`` frames and flatten patches in 2x2 merge-group order: the frame stack
   ``(grid_t, T, C, gh/m, m, p, gw/m, m, p)`` is transposed to ``(0, 3, 6, 4, 7, 2, 1, 5, 8)`` and each row is
   ``C * T * p * p`` values laid out ``(C, T, p, p)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from .errors import ImageTooSmallError, MediaFileError, ProcessingError, UnsupportedFormatError, require_readable_file

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
#: The largest min / max pixels setting taken: 8192 x 8192, about 85,600 visual tokens for one image
#: (0.8 GB of float32 patches); beyond it a setting is refused instead of running out of memory.
PIXELS_LIMIT = 1 << 26

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jp2", ".ico"}
)

ImageLike = Union[str, os.PathLike, np.ndarray, PIL.Image.Image]


@dataclass(frozen=True)
class VisionSpec:
    """Patch geometry and normalisation shared by the image and video paths."""

    patch_size: int = PATCH_SIZE
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE
    merge_size: int = MERGE_SIZE
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass(frozen=True)
class ImageInputs:
    """``pixel_values`` [P, C*T*p*p] float32 and ``image_grid_thw`` [n, 3] int64 (t, h, w in patches)."""

    pixel_values: np.ndarray
    image_grid_thw: np.ndarray


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    *,
    name: str = "image",
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area inside [min_pixels, max_pixels], aspect kept.

    Same arithmetic as the reference (Python ``round`` is banker's rounding, as there).
    """
    if height <= 0 or width <= 0:
        raise ImageTooSmallError(f"{name}: size {height}x{width} (HxW) is empty")
    if max(height, width) / min(height, width) > 200:
        raise ImageTooSmallError(
            f"{name}: aspect ratio {max(height, width) / min(height, width):.1f} of {height}x{width} (HxW) "
            "must be at most 200"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_pixel_range(min_pixels: int, max_pixels: int, factor: int, what: str = "image") -> None:
    """Reject settings under which no image can be resized validly."""
    if min_pixels <= 0 or max_pixels <= 0:
        raise ProcessingError(f"{what}: min_pixels={min_pixels} and max_pixels={max_pixels} must be positive")
    if min_pixels > max_pixels:
        raise ProcessingError(f"{what}: min_pixels={min_pixels} is larger than max_pixels={max_pixels}")
    if max_pixels > PIXELS_LIMIT:
        raise ProcessingError(f"{what}: max_pixels={max_pixels} is above the limit of {PIXELS_LIMIT} pixels")
    if max_pixels < factor * factor:
        raise ImageTooSmallError(
            f"{what}: max_pixels={max_pixels} is below one merged patch ({factor}x{factor}={factor * factor} pixels)"
        )


def target_size(
    height: int, width: int, spec: VisionSpec, min_pixels: int, max_pixels: int, name: str = "image"
) -> tuple[int, int]:
    """``smart_resize`` with this project's checks: an input smaller than one patch is an error."""
    p = spec.patch_size
    if height < p or width < p:
        raise ImageTooSmallError(
            f"{name}: size {height}x{width} (HxW) is smaller than one {p}x{p} patch"
        )
    check_pixel_range(min_pixels, max_pixels, spec.factor, name)
    h, w = smart_resize(height, width, spec.factor, min_pixels, max_pixels, name=name)
    if h < spec.factor or w < spec.factor:  # pragma: no cover - smart_resize guarantees >= factor
        raise ImageTooSmallError(f"{name}: {height}x{width} resizes to {h}x{w}, below one {spec.factor}px merge group")
    return h, w


# ----------------------------------------------------------------------------------------- decoding


def _pil_to_rgb(img) -> np.ndarray:
    """PIL image -> RGB uint8 [H, W, 3]; transparency composited onto white (as transformers does)."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        img = img.convert("RGBA")
        background = PIL.Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = PIL.Image.alpha_composite(background, img).convert("RGB")
    else:
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to RGB uint8 [H, W, 3] (EXIF orientation applied, as transformers' ``load_image``)."""
    path = Path(path)
    require_readable_file(path, "image")
    try:
        with PIL.Image.open(path) as img:
            img = PIL.ImageOps.exif_transpose(img)
            img.load()
            return _pil_to_rgb(img)
    except PIL.UnidentifiedImageError as err:
        raise UnsupportedFormatError(f"image file {path}: not a recognised image format ({err})") from None
    except PIL.Image.DecompressionBombError as err:
        raise MediaFileError(f"image file {path}: refused as too large to decode safely ({err})") from None
    except OSError as err:  # truncated / corrupt data, I/O errors
        raise MediaFileError(f"image file {path}: cannot be decoded ({err})") from None


def _array_to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """[H, W], [H, W, 1|3|4] (uint8, integer-valued 0..255, or float 0..1) -> RGB uint8 [H, W, 3]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise UnsupportedFormatError(
            f"{name}: array of shape {tuple(arr.shape)} is not an image; expected [H, W], [H, W, 1], [H, W, 3] "
            "or [H, W, 4] (channels last)"
        )
    if arr.dtype != np.uint8:
        if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise UnsupportedFormatError(f"{name}: array dtype {arr.dtype} is not an image dtype")
        if arr.size and np.allclose(arr, arr.astype(np.int64)) and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        elif arr.size and np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            # transformers' to_pil_image: float32 * 255 then truncating cast
            arr = (arr.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
        else:
            raise UnsupportedFormatError(
                f"{name}: values in [{arr.min()}, {arr.max()}] of dtype {arr.dtype} are neither 0..255 integers "
                "nor 0..1 floats"
            )
    c = arr.shape[-1]
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 4:
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_rgb_uint8(image: ImageLike, name: str = "image") -> np.ndarray:
    """A path, PIL image or array -> RGB uint8 [H, W, 3]."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, name)
    if isinstance(image, PIL.Image.Image):
        return _pil_to_rgb(image)
    raise UnsupportedFormatError(
        f"{name}: unsupported input of type {type(image).__name__}; pass a file path, a PIL image or a numpy array"
    )


# ------------------------------------------------------------------------------------ numeric path


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL BICUBIC resize of RGB uint8 [H, W, 3] (the reference's resample; a no-op size is still resampled)."""
    img = PIL.Image.fromarray(rgb)
    return np.asarray(img.resize((width, height), resample=PIL.Image.Resampling.BICUBIC), dtype=np.uint8)


def rescale_normalize(rgb: np.ndarray, spec: VisionSpec = VisionSpec()) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., H, W, 3]: float64 rescale, float32 cast, float32 (x - mean) / std."""
    x = (rgb.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    return (x - mean) / std


def patchify(frames: np.ndarray, spec: VisionSpec = VisionSpec()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised frames [F, H, W, C] float32 -> (patches [grid_t*gh*gw, C*T*p*p], (grid_t, gh, gw)).

    F is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (one image -> T copies).
    Rows come in 2x2 merge-group order; each row is laid out (C, T, p, p).
    """
    f, h, w, c = frames.shape
    t, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    if h % (p * m) or w % (p * m):
        raise ProcessingError(f"patchify: frame size {h}x{w} is not a multiple of {p * m}")
    if pad := -f % t:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        f += pad
    gt, gh, gw = f // t, h // p, w // p
    x = np.transpose(frames, (0, 3, 1, 2))  # [F, C, H, W]
    x = x.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    x = np.transpose(x, (0, 3, 6, 4, 7, 2, 1, 5, 8))
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * t * p * p)), (gt, gh, gw)


def unpatchify(patches: np.ndarray, grid: tuple[int, int, int], spec: VisionSpec = VisionSpec()) -> np.ndarray:
    """:func:`patchify`'s inverse, to show what the model saw: one image's or video's ``patches
    [t*h*w, C*T*p*p]`` (normalised) and its ``grid (t, h, w)`` -> RGB uint8 frames ``[t*T, h*p, w*p, 3]``
    (normalisation undone, rounded)."""
    gt, gh, gw = (int(g) for g in grid)
    t, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    if patches.shape != (gt * gh * gw, spec.patch_dim):
        raise ProcessingError(f"unpatchify: patches of shape {patches.shape} do not match grid {(gt, gh, gw)} "
                              f"({gt * gh * gw} patches of {spec.patch_dim} values)")
    x = np.asarray(patches, np.float32).reshape(gt, gh // m, gw // m, m, m, 3, t, p, p)
    x = np.transpose(x, (0, 6, 5, 1, 3, 7, 2, 4, 8)).reshape(gt * t, 3, gh * p, gw * p)
    x = np.transpose(x, (0, 2, 3, 1)) * np.asarray(spec.image_std, np.float32) + np.asarray(spec.image_mean, np.float32)
    return np.clip(np.rint(x / spec.rescale_factor), 0, 255).astype(np.uint8)


def preprocess_frame(
    rgb: np.ndarray, height: int, width: int, spec: VisionSpec = VisionSpec()
) -> np.ndarray:
    """RGB uint8 frame -> resized, rescaled, normalised float32 [height, width, 3]."""
    return rescale_normalize(resize_bicubic(rgb, height, width), spec)


def process_images(
    images: ImageLike | Sequence[ImageLike],
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    spec: VisionSpec = VisionSpec(),
) -> ImageInputs:
    """Images -> ``pixel_values`` [sum(t*h*w), 1176] float32 and ``image_grid_thw`` [n, 3] int64."""
    if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
        images = [images]
    if len(images) == 0:
        raise ProcessingError("process_images: no images given")
    rows, grids = [], []
    for i, image in enumerate(images):
        name = str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}"
        rgb = to_rgb_uint8(image, name)
        h, w = target_size(rgb.shape[0], rgb.shape[1], spec, min_pixels, max_pixels, name)
        frame = preprocess_frame(rgb, h, w, spec)
        patches, grid = patchify(frame[None], spec)
        rows.append(patches)
        grids.append(grid)
    return ImageInputs(np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64))
