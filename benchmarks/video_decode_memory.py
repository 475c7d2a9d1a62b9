"""Host memory of turning a high-resolution video into patches (not a test).

Writes a clip of random 4K frames (mpeg4), then measures with ``tracemalloc`` (numpy's buffers included)
the peak of ``process_videos`` (frames resized as they are decoded) and of the full-resolution path
(``read_video`` without resizing, then the frames processed: what every sampled frame used to cost).

    JAX_PLATFORMS=cpu python benchmarks/video_decode_memory.py [--frames 8] [--height 2160] [--width 3840]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import tracemalloc

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from purekv_jax.processing import process_videos, read_video  # noqa: E402


def write_clip(path: str, frames: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--height", type=int, default=2160)
    ap.add_argument("--width", type=int, default=3840)
    args = ap.parse_args()
    kw = dict(fps=4.0, min_frames=2, max_frames=args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        write_clip(path, args.frames, args.height, args.width)
        new = peak_mib(lambda: process_videos([path], **kw))

        def full_resolution():
            frames, meta = read_video(path, **kw)
            process_videos([frames], frames_fps=meta.sampled_fps)

        old = peak_mib(full_resolution)
    frame = args.height * args.width * 3 / 2**20
    print(f"{args.frames} frames of {args.height}x{args.width} ({frame:.1f} MiB each as RGB): peak "
          f"{new:.0f} MiB resized as decoded, {old:.0f} MiB with every frame kept at full resolution")


if __name__ == "__main__":
    main()
