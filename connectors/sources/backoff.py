"""Reconnect delays: exponential with jitter, capped, optionally bounded in attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.5  # seconds before the first retry
    maximum: float = 30.0  # cap of the exponential growth
    jitter: float = 0.2  # +-fraction, so cameras behind one switch do not retry in lockstep
    max_attempts: int | None = None  # None: retry forever

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or not 0 <= self.jitter < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and 0 <= jitter < 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 or None")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (1-based)."""
        base = min(self.maximum, self.initial * 2.0 ** min(attempt - 1, 62))
        return base * (1.0 + random.uniform(-self.jitter, self.jitter))

    def exhausted(self, attempt: int) -> bool:
        return self.max_attempts is not None and attempt > self.max_attempts
