"""Decoded frame -> model input: shortest edge to `size`, center crop, RGB, display rotation."""

from __future__ import annotations

import av
import numpy as np


class Scaler:
    def __init__(self, size: int | None = 576, crop: bool = True, interpolation: str = "BICUBIC") -> None:
        if size is not None and size < 1:
            raise ValueError("size must be >= 1 or None")
        self.size, self.crop, self.interpolation = size, crop, interpolation

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        if self.size is None:
            return width, height
        scale = self.size / min(width, height)
        return max(self.size, round(width * scale)), max(self.size, round(height * scale))

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        # One swscale call does the resize and the YUV->RGB conversion (no PIL, no extra copy);
        # the crop is a slice of the scaled picture.
        width, height = self.target_size(frame.width, frame.height)
        rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation=self.interpolation)
        image = rgb.to_ndarray()
        if self.crop and self.size is not None:
            y0, x0 = (height - self.size) // 2, (width - self.size) // 2
            image = image[y0 : y0 + self.size, x0 : x0 + self.size]
        # Phones store portrait video as landscape plus a display matrix; show it upright.
        # (A centered square crop commutes with the rotation, so rotating last is exact.)
        turns = round((frame.rotation or 0) / 90) % 4
        if turns:
            image = np.rot90(image, turns)
        return np.ascontiguousarray(image)
