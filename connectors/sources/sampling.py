"""Which decoded frames become output frames: `take(t, index)` says how many times."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

# A frame this close before a tick counts as on it: containers round timestamps (Matroska
# and WebM to 1 ms), so 30 fps frames can sit a hair before 30 fps ticks.
TOLERANCE = 1e-3  # seconds


class RateSampler:
    """Target rate by stream time: for each tick k/fps, the first frame at or after it
    (within TOLERANCE).

    Each frame is taken at most once, so a gap longer than a tick yields one frame after
    the gap (no duplicates), and a source slower than the target yields every frame.
    """

    def __init__(self, fps: float) -> None:
        if not fps > 0:
            raise ValueError("fps must be > 0")
        self.fps = fps
        self._next_tick = 0
        self._eps = TOLERANCE * fps  # in ticks

    def tick(self, t: float) -> int:
        """The tick a frame at stream time t counts for (at most TOLERANCE before it)."""
        return math.floor(t * self.fps + self._eps)

    def take(self, t: float, index: int) -> int:
        """How many times the frame at stream time t (index-th decoded) is emitted."""
        if t * self.fps < self._next_tick - self._eps:
            return 0
        self._next_tick = self.tick(t) + 1
        return 1


class UniformSampler:
    """Exactly `count` frames spread over `total` frames, as the model's benchmarks do:
    indices round(linspace(0, total-1, count)); a short file repeats frames."""

    def __init__(self, count: int, total: int) -> None:
        if count < 1 or total < 1:
            raise ValueError("uniform sampling needs count >= 1 and a non-empty video")
        self.count = count
        self._wanted = Counter(np.linspace(0, total - 1, count).round().astype(int).tolist())

    def take(self, t: float, index: int) -> int:
        return self._wanted.pop(index, 0)
