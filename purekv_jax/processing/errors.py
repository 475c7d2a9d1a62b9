"""Errors a user can cause while turning files and prompts into model inputs.

Every class is a ``ValueError`` subclass, and every message names the file, input or field and the
shape or count involved, so a command line can print ``str(err)`` as one line and exit non-zero.
:func:`require_readable_file` is the one media-file check the image and video readers share.
"""

from __future__ import annotations

import os
from pathlib import Path


class ProcessingError(ValueError):
    """Base class for input-processing errors (images, videos, prompts)."""


class MediaFileError(ProcessingError):
    """A media file is missing, is not a regular file, or cannot be read."""


class UnsupportedFormatError(ProcessingError):
    """A file or object is not an image / video format this processor decodes."""


class NoFramesError(ProcessingError):
    """A video decodes to no frames (or fewer than the sampling rule needs)."""


class ImageTooSmallError(ProcessingError):
    """An image (or video frame) is smaller than one patch, or resizes below the minimum."""


class PromptError(ProcessingError):
    """Chat messages / placeholders do not match the images and videos given."""


def require_readable_file(path: Path, what: str) -> None:
    """Raises :class:`MediaFileError` unless ``path`` is an existing, regular, readable file; ``what``
    (``"image"``, ``"video"``) names the input in the message."""
    try:
        exists = path.exists()
    except OSError as err:  # a name too long, a path through a file, ...
        raise MediaFileError(f"{what} path cannot be looked up ({err.strerror}): {str(path)[:200]}") from None
    if not exists:
        raise MediaFileError(f"{what} file not found: {path}")
    if not path.is_file():
        raise MediaFileError(f"{what} path is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise MediaFileError(f"{what} file is not readable (permission denied): {path}")
