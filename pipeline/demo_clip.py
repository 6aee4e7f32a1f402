"""A synthetic clip for `slowfast demo` (no file needed, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_clip(path: Path, seconds: float = 24.0, fps: int = 24, size: tuple[int, int] = (640, 360)) -> Path:
    """A synthetic H.264 clip: a moving bright square over a slowly shifting gradient."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(int(seconds * fps)):
            image = np.stack([(x + 3 * index) % 256, (y + index) % 256, np.full_like(x, 96)], -1).astype(np.uint8)
            left = (index * 7) % (width - 80)
            image[140:220, left : left + 80] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
