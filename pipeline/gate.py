"""The scene gate: skip the model on windows whose new frames barely differ from the last
window it saw (plain numpy, no Ray, no model).

Each sampled frame is shrunk to a THUMB x THUMB copy by averaging blocks of pixels, which
averages camera noise and compression flicker away (a pixel's noise shrinks with the square
root of the block's pixel count). A thumbnail pixel counts as changed when one of its colour
channels moved by more than PIXEL_DELTA; the score of a frame is the fraction of changed
pixels against the reference, the last frame of the last window sent to the model. Colour,
not grey: a green object on a grey of the same brightness would vanish in grey.

A window goes to the model when any of its new frames scores above the threshold; the window
after such a change goes too (its frames all show the new scene, where the changed window was
half old, half new), and so does every `refresh_every`-th window of a static scene.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .window import Window

THUMB = 32
PIXEL_DELTA = 12  # of 255: above the noise left after averaging, below an object's contrast
# Fraction of thumbnail pixels that must change (0.002: 3 of 1024). Measured on the synthetic
# world through H.264 (tests/test_gate.py prints it): static noisy, gradient and solid scenes
# score 0; its smallest object (a circle 0.08 of the shorter side) entering scores 0.0039 at
# the least, over every colour and 36 random backgrounds.
DEFAULT_THRESHOLD = 0.002


def thumbnail(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [THUMB, THUMB, 3], each pixel the mean of its block."""
    height, width = image.shape[:2]
    block_h, block_w = max(1, height // THUMB), max(1, width // THUMB)
    rows, cols = min(THUMB, height), min(THUMB, width)
    top, left = (height - rows * block_h) // 2, (width - cols * block_w) // 2
    cropped = image[top : top + rows * block_h, left : left + cols * block_w].astype(np.float32)
    return cropped.reshape(rows, block_h, cols, block_w, 3).mean(axis=(1, 3))


def change_score(reference: np.ndarray, thumb: np.ndarray) -> float:
    """Fraction of thumbnail pixels where some channel moved by more than PIXEL_DELTA."""
    return float((np.abs(thumb - reference).max(axis=-1) > PIXEL_DELTA).mean())


@dataclass(frozen=True)
class GateDecision:
    send: bool
    score: float  # the largest change of the window's new frames against the reference


class SceneGate:
    """One stream's gate; `decide` is called once per window, in order."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, refresh_every: int = 10):
        self.threshold, self.refresh_every = threshold, refresh_every
        self.reference: np.ndarray | None = None  # thumbnail of the last frame the model saw
        self.gated_in_a_row = 0
        self.settling = False  # the last window sent was a change: the next one goes too

    def decide(self, new_frames: Sequence[np.ndarray]) -> GateDecision:
        """`new_frames`: thumbnails of the frames this window adds, oldest first."""
        if self.reference is None:
            score = 1.0  # nothing seen yet: the first window always goes
        else:
            score = max((change_score(self.reference, t) for t in new_frames), default=0.0)
        changed = score > self.threshold
        send = changed or self.settling or self.gated_in_a_row + 1 >= self.refresh_every
        self.settling = changed
        if send:
            self.reference, self.gated_in_a_row = new_frames[-1], 0
        else:
            self.gated_in_a_row += 1
        return GateDecision(send, score)


class StreamGate:
    """A stream's gate as its ingest runs it: thumbnails of its recent frames, and each window
    marked gated or not by the frames it adds."""

    def __init__(self, threshold: float, refresh_every: int, keep_frames: int):
        self.gate = SceneGate(threshold, refresh_every)
        self.keep_frames = keep_frames
        self.thumbs: dict[int, np.ndarray] = {}
        self.last_seq = -1  # the newest frame of the last window marked

    def add_frame(self, seq: int, image: np.ndarray) -> None:
        self.thumbs[seq] = thumbnail(image)
        for old in [s for s in self.thumbs if s <= seq - self.keep_frames]:
            del self.thumbs[old]

    def mark(self, window: Window) -> Window:
        new = [f for f in window.frames if f.seq > self.last_seq] or list(window.frames[-1:])
        self.last_seq = window.frames[-1].seq
        decision = self.gate.decide([self.thumbs[f.seq] for f in new])
        return window if decision.send else replace(window, gated=True)
