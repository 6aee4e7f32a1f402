"""Events with a start and an end: a standing question's trigger opens an event after
`open_after` windows in a row say yes, and closes it after `close_after` windows in a row say
no; `cooldown_windows` after a close, yes opens nothing. Plain logic, no Redis."""

from __future__ import annotations

from dataclasses import dataclass

from connectors.redis_schema import EventPhase


@dataclass
class OpenEvent:
    first_window: int  # the window it opened on: its picture is the event's
    opened_at: float  # wall-clock end of that window


@dataclass
class EventTracker:
    """One standing question's lifecycle on one stream; `observe` is called once per window the
    question was asked on, in window order."""

    open_after: int = 1
    close_after: int = 1
    cooldown_windows: int = 0
    yes_run: int = 0
    no_run: int = 0
    open: OpenEvent | None = None
    cooldown_until: int = -1  # windows up to this one open nothing

    def observe(self, window: int, wall_end: float, fired: bool) -> EventPhase | None:
        """What this window's answer does to the event: opens it, updates it, closes it, or nothing."""
        if fired:
            self.no_run = 0
            if self.open is not None:
                return EventPhase.UPDATED
            self.yes_run += 1
            if self.yes_run >= self.open_after and window > self.cooldown_until:
                self.open, self.yes_run = OpenEvent(window, wall_end), 0
                return EventPhase.OPENED
            return None
        self.yes_run = 0
        if self.open is None:
            return None
        self.no_run += 1
        if self.no_run >= self.close_after:
            self.open, self.no_run = None, 0
            self.cooldown_until = window + self.cooldown_windows
            return EventPhase.CLOSED
        return None
