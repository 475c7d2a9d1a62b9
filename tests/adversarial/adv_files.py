"""Files the adversarial cases write: random videos (PyAV), requests files byte for byte, output records."""

from __future__ import annotations

import json
import os

import numpy as np


def write_video(path, rng: np.random.Generator, frames: int = 6, height: int = 56, width: int = 84,
                fmt: str | None = None) -> str:
    """A small video of fresh random frames (mpeg4 in ``fmt``, default from the extension)."""
    import av

    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return str(path)


def write_requests(path, lines) -> str:
    """A requests file: each line a dict / list (JSON), str (as is) or bytes (as is), newline-terminated."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line)
            elif isinstance(line, str):
                f.write(line.encode())
            else:
                f.write(json.dumps(line).encode())
            f.write(b"\n")
    return os.fspath(path)


def read_records(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
