"""Stream time from raw decoder timestamps, robust to what real streams send.

Decoded frames come out in presentation order (B-frames are already reordered), but
timestamps can be missing, jump back (camera clock reset, wrap), jump far ahead (a live
camera's clock), and restart at every reconnect or loop. Stream time stays monotonic.
"""

from __future__ import annotations

BACKWARD_TOLERANCE = 1.0  # seconds; a smaller step back is jitter and is clamped, not re-anchored
CONFIRM = 3  # consecutive out-of-line timestamps that make a jump real (clock reset)


class Timeline:
    def __init__(self, nominal_dt: float, max_forward_gap: float | None = None) -> None:
        self.nominal_dt = nominal_dt
        self.max_forward_gap = max_forward_gap  # None for files: their gaps are real
        self.last: float | None = None
        self._offset: float | None = None  # stream time = raw + offset
        self._anchor: float | None = 0.0  # stream time of the next frame after restart()
        self._anomalies = 0

    def restart(self, at: float | None = None, origin: float | None = None) -> None:
        """A new segment (connection/loop) starts; its first frame gets stream time `at`
        (default: right after the last frame). With `origin` (the raw time that should map
        to `at`, e.g. the stream's start_time) the anchor does not depend on which frame
        happens to be decoded first."""
        self._anchor = at
        self._anomalies = 0
        self._offset = None if origin is None else self._next_time() - origin

    def map(self, raw: float | None) -> float:
        if raw is None:
            t = self._next_time() if self._offset is None else self._after_last()
        else:
            if self._offset is None:
                self._offset = self._next_time() - raw
            t = raw + self._offset
            if self.last is not None:
                t = self._check_step(raw, t, self.last)
        self.last = t
        return t

    def _check_step(self, raw: float, t: float, last: float) -> float:
        step = t - last
        backward = step < -BACKWARD_TOLERANCE
        forward = self.max_forward_gap is not None and step > self.max_forward_gap
        if not (backward or forward):
            self._anomalies = 0
            return max(t, last)  # small step back: jitter, clamp
        # One odd timestamp (a damaged packet, a stray B-frame) must not shift everything
        # after it: only a jump that persists for CONFIRM frames moves the clock.
        self._anomalies += 1
        if self._anomalies < CONFIRM:
            return last if backward else last + self.nominal_dt
        self._anomalies = 0
        self._offset = self._after_last() - raw
        return raw + self._offset

    def _after_last(self) -> float:
        return 0.0 if self.last is None else self.last + self.nominal_dt

    def _next_time(self) -> float:
        if self._anchor is not None:
            anchor, self._anchor = self._anchor, None
            return anchor
        return self._after_last()
