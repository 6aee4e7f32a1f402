"""Data types that leave the sources package: frames, state, counters, errors."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ..redact import redact_uri


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One sampled frame, already resized/cropped to the model input.

    seq: 0, 1, 2... over the life of the source (never reset by reconnects or loops).
    pts: stream time in seconds from stream start; strictly increasing across sampled frames.
    wall_time: time.time() when the decoder produced the frame.
    source_index: index of the frame among all decoded frames (presentation order).
    image: uint8 RGB array [H, W, 3], C-contiguous.
    """

    seq: int
    pts: float
    wall_time: float
    source_index: int
    image: np.ndarray


class SourceState(StrEnum):
    CONNECTING = "connecting"  # before the first successful open
    LIVE = "live"  # open and delivering frames (files too, while being read)
    RECONNECTING = "reconnecting"  # live source lost; stats.attempt counts tries
    ENDED = "ended"  # file reached EOF, or close() was called
    FAILED = "failed"  # cannot work: stats.last_error says why


@dataclass(slots=True)
class SourceStats:
    decoded: int = 0  # frames out of the decoder, sampled or not
    sampled: int = 0  # frames delivered
    corrupt_skipped: int = 0  # corrupt packets/frames dropped, undecodable packets
    reconnects: int = 0  # reconnect attempts over the source's life
    attempt: int = 0  # consecutive failed attempts in the current outage (0 when live)
    last_error: str | None = None  # reason of the latest failure, credentials redacted (kept after recovery)
    last_error_at: float | None = None  # time.time() of that failure


class SourceError(RuntimeError):
    """A source that cannot work: names the source (credentials redacted) and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = redact_uri(source)
        self.reason = reason
        super().__init__(f"video source {self.source}: {reason}")
