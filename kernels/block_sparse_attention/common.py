"""What the Pallas kernels share: the head dims they take and the score of a masked-out key."""

from __future__ import annotations

import numpy as np

__all__ = ["PALLAS_HEAD_DIMS", "MASK_VALUE", "HeadDimError", "check_head_dim"]

# Head dims the Pallas kernels take (Triton needs a power of two >= 16; the TPU kernel tiles by 128
# lanes and takes 64 as a full-extent block).
PALLAS_HEAD_DIMS = (32, 64, 128, 256)
# finite (a fully masked block must not turn the running max into -inf - -inf = NaN)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class HeadDimError(ValueError):
    """head_dim that a kernel cannot take."""


def check_head_dim(d: int, kernel: str):
    """Raises HeadDimError unless the Pallas ``kernel`` (its backend name) takes head_dim ``d``."""
    if d not in PALLAS_HEAD_DIMS:
        raise HeadDimError(f"head_dim {d} is not supported by the {kernel!r} block-sparse kernel; "
                           f"supported: {PALLAS_HEAD_DIMS} (backend='xla' takes any head_dim)")
