"""Sliding windows over frame references (plain logic, no Ray)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FrameRef:
    """One sampled frame as the pipeline passes it around: metadata + object-store reference."""

    seq: int
    pts: float
    wall_time: float
    ref: Any  # ray.ObjectRef of the uint8 [S, S, 3] image, or of a group's [N, S, S, 3] (any handle in unit tests)
    index: int | None = None  # the frame's place in its group's object; None: `ref` is this frame alone


def frames_per_object(size: int, stride: int) -> int:
    """How many consecutive frames share one object in the frame store. Every window starts
    and ends on a multiple of gcd(size, stride) frames, so a window is made of whole groups and
    never waits for a frame. Fewer objects is less memory for good: a Ray process keeps a few
    hundred bytes for good for every object it owns that another process borrowed (Ray 2.60,
    ~360 B; bench/frame_store_bench.py), which one object per frame made ~5 MB an hour for a
    4-fps camera."""
    return math.gcd(size, stride)


class FrameGroups:
    """Gathers sampled frames into groups of `size` consecutive ones; `put` stores a group's
    images as one object and returns its handle. `add` and `flush` return the frame references
    of a group once it is stored, in order."""

    def __init__(self, size: int, put: Callable[[list], Any]):
        self.size, self.put, self.pending = size, put, []

    def add(self, seq: int, pts: float, wall_time: float, image: Any) -> list[FrameRef]:
        self.pending.append((seq, pts, wall_time, image))
        return self.flush() if len(self.pending) == self.size else []

    def flush(self) -> list[FrameRef]:
        """Store the frames gathered so far (a file's last, short group)."""
        if not self.pending:
            return []
        handle = self.put([image for *_, image in self.pending])
        refs = [FrameRef(seq, pts, wall, handle, i) for i, (seq, pts, wall, _) in enumerate(self.pending)]
        self.pending = []
        return refs


def frames_from_objects(refs: Sequence[FrameRef], get: Callable[[list], list]) -> list:
    """The images of `refs`, getting each object once (`get`: handles -> objects, in order)."""
    handles = list(dict.fromkeys(f.ref for f in refs))
    objects = dict(zip(handles, get(handles)))
    return [objects[f.ref] if f.index is None else objects[f.ref][f.index] for f in refs]


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
