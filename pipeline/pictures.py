"""The picture published with each window: its last frame as a JPEG (latest frame, event snapshot)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from connectors.redis_schema import FRAME_JPEG_QUALITY, FRAME_MAX_SIDE, Caption, FrameInfo


def jpeg(image: np.ndarray) -> bytes:
    """A frame (uint8 [H, W, 3] RGB) as a JPEG, at most FRAME_MAX_SIDE px a side."""
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]), "RGB")
    if max(picture.size) > FRAME_MAX_SIDE:
        picture.thumbnail((FRAME_MAX_SIDE, FRAME_MAX_SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=FRAME_JPEG_QUALITY)
    return buffer.getvalue()


def window_picture(image: np.ndarray | bytes, caption: Caption) -> tuple[FrameInfo, bytes]:
    """The picture of a window: its last frame, or that frame's `jpeg` made where the frame was
    (a segment of a split file sends it to its merge so)."""
    data = image if isinstance(image, bytes) else jpeg(image)
    width, height = Image.open(io.BytesIO(data)).size
    info = FrameInfo(stream=caption.stream, window=caption.window, run=caption.run, time=caption.end,
                     wall_time=caption.wall_end, width=width, height=height)
    return info, data
