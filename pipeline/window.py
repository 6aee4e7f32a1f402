"""Sliding windows over frame references (plain logic, no Ray)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FrameRef:
    """One sampled frame as the pipeline passes it around: metadata + object-store reference."""

    seq: int
    pts: float
    wall_time: float
    ref: Any  # ray.ObjectRef of the uint8 [S, S, 3] image (any handle in unit tests)


class FramesLost(Exception):
    """Frames the frame store no longer has (the process that owned them died): not a model
    failure. `window` is the window that needed them, once known."""

    def __init__(self, reason: str, window: Window | None = None):
        super().__init__(reason)
        self.window = window


@dataclass(frozen=True)
class Window:
    stream: str
    seq: int
    frames: tuple[FrameRef, ...]
    live: bool
    closed_at: float = field(default_factory=time.time)
    gated: bool = False  # the scene gate found its new frames unchanged: publish without the model

    @property
    def start(self) -> float:
        return self.frames[0].pts

    @property
    def end(self) -> float:
        return self.frames[-1].pts

    @property
    def wall_start(self) -> float:
        return self.frames[0].wall_time

    @property
    def wall_end(self) -> float:
        return self.frames[-1].wall_time


class SlidingWindow:
    """Keeps the last `size` frames; emits a window once full, then every `stride` frames.

    `finish()` emits a final window over the last `size` frames when frames arrived since the
    last window (a file's tail), or the frames so far if the stream never filled a window.
    """

    def __init__(self, stream: str, size: int, stride: int, live: bool, first_seq: int = 0):
        if not 1 <= stride <= size:
            raise ValueError(f"stride {stride} must be between 1 and the window size {size}")
        self.stream, self.size, self.stride, self.live = stream, size, stride, live
        self.frames: deque[FrameRef] = deque(maxlen=size)
        self.since_last = 0
        self.next_seq = first_seq
        self.emitted = False

    def push(self, frame: FrameRef) -> Window | None:
        self.frames.append(frame)
        self.since_last += 1
        full = len(self.frames) == self.size
        if full and (not self.emitted or self.since_last >= self.stride):
            return self._emit()
        return None

    def finish(self) -> Window | None:
        if self.frames and (self.since_last > 0) and (self.emitted or len(self.frames) >= 2):
            return self._emit()
        return None

    def _emit(self) -> Window:
        window = Window(self.stream, self.next_seq, tuple(self.frames), self.live)
        self.next_seq += 1
        self.since_last = 0
        self.emitted = True
        return window


def expected_windows(frame_count: int, size: int, stride: int) -> int:
    """How many windows a file of `frame_count` sampled frames gives (tail window included)."""
    if frame_count < 2:
        return 0
    if frame_count <= size:
        return 1
    steps, tail = divmod(frame_count - size, stride)
    return 1 + steps + (1 if tail else 0)
