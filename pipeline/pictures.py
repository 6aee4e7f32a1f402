"""The picture published with each window: its last frame as a JPEG (latest frame, event snapshot)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from connectors.redis_schema import FRAME_JPEG_QUALITY, FRAME_MAX_SIDE, Caption, FrameInfo


def window_picture(image: np.ndarray, caption: Caption) -> tuple[FrameInfo, bytes]:
    """JPEG of a window's last frame (uint8 [H, W, 3] RGB), at most FRAME_MAX_SIDE px a side."""
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]), "RGB")
    if max(picture.size) > FRAME_MAX_SIDE:
        picture.thumbnail((FRAME_MAX_SIDE, FRAME_MAX_SIDE), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=FRAME_JPEG_QUALITY)
    info = FrameInfo(stream=caption.stream, window=caption.window, run=caption.run, time=caption.end,
                     wall_time=caption.wall_end, width=picture.width, height=picture.height)
    return info, buffer.getvalue()
