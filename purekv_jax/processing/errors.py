"""Errors a user can cause while turning files and prompts into model inputs.

Every class is a ``ValueError`` subclass, and every message names the file, input or field and the
shape or count involved, so a command line can print ``str(err)`` as one line and exit non-zero.
"""

from __future__ import annotations


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
