"""Per-second rates from running totals, over a short trailing span (no Ray)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RateMeter:
    """`update(total)` returns (total now - total `span_s` ago) / elapsed: it falls to 0 within
    `span_s` once the total stops moving (a stalled camera shows 0 fps, not its old rate)."""

    def __init__(self, span_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.span_s, self.clock = span_s, clock
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, total: int) -> float:
        now = self.clock()
        self.samples.append((now, total))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.span_s:
            self.samples.popleft()
        first_t, first_total = self.samples[0]
        return (total - first_total) / (now - first_t) if now > first_t else 0.0

    def reset(self) -> None:
        self.samples.clear()
