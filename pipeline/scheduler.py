"""Which work a model worker runs next, and what becomes of each item: plain Python, no Ray.

Work arrives in lanes (one per stream and kind of task; today each stream has one lane of
windows). A lane follows one policy:

- `Policy.ORDERED` (files): items are accepted in sequence order, exactly once. An item
  already accepted answers `Outcome.ALREADY` (its result went to the first submission); one
  beyond the next expected (a gap, e.g. after the worker restarted) answers `Outcome.RETRY`,
  so the sender re-sends from the oldest unfinished item, in order. An item re-sent while
  its first submission still waits takes that one's place (fresh payload, the new token
  answers); one re-sent while it runs shares that run's outcome.
- `Policy.NEWEST` (live): a newer item replaces any that is still waiting, which is
  `Outcome.SKIPPED`; the worker always works on the most recent one.

Batches take items round-robin over the lanes (the lane after the previous batch's first
goes first), so a busy file cannot starve the cameras. A batch whose model call raised is
retried item by item, each alone, so one bad item cannot fail the others; an item that
raises again is `Outcome.FAILED` and never counts as done.

An item whose payload is gone (`frames_lost`: its frames died with the process that owned
them) is no model failure and is never published. In an ordered lane it goes back to "not
yet accepted": the lane's next expected seq rolls back to it and the lane's later items are
dropped, all answering `Outcome.RETRY`, so the (restarted) sender's re-sent items are
accepted again, in order. In a newest lane it is `Outcome.SKIPPED`: newer items follow.

The scheduler holds opaque tokens (the Ray shell's futures) and returns `Resolution`s;
another kind of task is another lane (or another payload type in a lane), without changes
here.
"""

from __future__ import annotations

from collections import deque
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

MAX_ATTEMPTS = 2  # the first try and one retry


class Policy(StrEnum):
    ORDERED = "ordered"
    NEWEST = "newest"


class Outcome(StrEnum):
    DONE = "done"  # processed and published
    SKIPPED = "skipped"  # a live item overtaken by a newer one before it started
    FAILED = "failed"  # the model call raised on it twice
    ALREADY = "already"  # an ordered item accepted before; its outcome went to that submission
    RETRY = "retry"  # an ordered item ahead of the next expected: re-send in order from the oldest
    REMOVED = "removed"  # the lane is not (or no longer) on this worker


FINAL = frozenset({Outcome.DONE, Outcome.SKIPPED, Outcome.FAILED, Outcome.ALREADY})


@dataclass
class Item:
    lane: Hashable
    seq: int
    payload: Any
    token: Any
    attempts: int = 0
    followers: list[Any] = field(default_factory=list)  # tokens of re-submissions while it ran


@dataclass(frozen=True)
class Resolution:
    token: Any
    outcome: Outcome
    item: Item | None = None
    error: str | None = None


@dataclass
class LaneCounts:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    last_error: str | None = None  # the latest model failure, naming the item; kept as a record
    last_error_at: float | None = None


@dataclass
class Lane:
    policy: Policy
    next_seq: int = 0
    waiting: deque[Item] = field(default_factory=deque)
    counts: LaneCounts = field(default_factory=LaneCounts)


@dataclass(frozen=True)
class Batch:
    items: list[Item]

    @property
    def payloads(self) -> list[Any]:
        return [item.payload for item in self.items]


class Scheduler:
    def __init__(self, batch_size: int, clock: Callable[[], float] = time.time) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size, self.clock = batch_size, clock
        self.lanes: dict[Hashable, Lane] = {}
        self.running: Batch | None = None
        self._first = 0  # round-robin start position among the lanes

    # ---- lanes -------------------------------------------------------------------
    def add_lane(self, lane: Hashable, policy: Policy, next_seq: int = 0) -> None:
        """(Re-)add a lane; `next_seq` > 0 resumes an ordered lane after a restart."""
        self.lanes[lane] = Lane(policy, next_seq)

    def remove_lane(self, lane: Hashable) -> list[Resolution]:
        state = self.lanes.pop(lane, None)
        return [Resolution(i.token, Outcome.REMOVED, i) for i in (state.waiting if state else ())]

    def next_seq(self, lane: Hashable) -> int | None:
        state = self.lanes.get(lane)
        return None if state is None else state.next_seq

    def counts(self, lane: Hashable) -> LaneCounts | None:
        state = self.lanes.get(lane)
        return None if state is None else state.counts

    def waiting(self, lane: Hashable) -> int:
        state = self.lanes.get(lane)
        return len(state.waiting) if state else 0

    @property
    def idle(self) -> bool:
        return self.running is None and not any(lane.waiting for lane in self.lanes.values())

    # ---- intake ------------------------------------------------------------------
    def submit(self, lane: Hashable, seq: int, payload: Any, token: Any) -> list[Resolution]:
        """Offer an item. Returns what is decided at once: the item's own outcome if it is not
        accepted, and items it overtook. An accepted item's token resolves later."""
        state = self.lanes.get(lane)
        item = Item(lane, seq, payload, token)
        if state is None:
            return [Resolution(token, Outcome.REMOVED, item)]
        resolved = []
        if state.policy is Policy.ORDERED:
            if seq < state.next_seq:
                return self._resubmitted(state, item)
            if seq > state.next_seq:
                return [Resolution(token, Outcome.RETRY, item)]
        else:
            while state.waiting:  # newest wins: what has not started is stale now
                stale = state.waiting.popleft()
                state.counts.skipped += 1
                resolved.append(Resolution(stale.token, Outcome.SKIPPED, stale))
        state.next_seq = max(state.next_seq, seq + 1)
        state.waiting.append(item)
        return resolved

    def _resubmitted(self, state: Lane, item: Item) -> list[Resolution]:
        """An ordered item accepted before: a waiting first submission gives way to this one
        (its payload may be gone with its sender), a running one shares its outcome."""
        waiting = next((i for i in state.waiting if i.seq == item.seq), None)
        if waiting is not None:
            earlier = Resolution(waiting.token, Outcome.ALREADY, replace(waiting))
            waiting.payload, waiting.token = item.payload, item.token
            return [earlier]
        running = self.running.items if self.running else []
        match = next((i for i in running if i.lane == item.lane and i.seq == item.seq), None)
        if match is not None:
            match.followers.append(item.token)
            return []
        return [Resolution(item.token, Outcome.ALREADY, item)]

    # ---- batches -----------------------------------------------------------------
    def next_batch(self) -> Batch | None:
        """The next batch to run, or None if nothing waits (or a batch is still running)."""
        if self.running is not None:
            return None
        lanes = [lane for lane in self.lanes.values() if lane.waiting]
        if not lanes:
            return None
        order = list(self.lanes.values())
        start = self._first % len(order)
        order = order[start:] + order[:start]
        retry = next((lane for lane in order if lane.waiting and lane.waiting[0].attempts > 0), None)
        if retry is not None:  # a retried item runs alone
            self.running = Batch([retry.waiting.popleft()])
            return self.running
        items: list[Item] = []
        while len(items) < self.batch_size and any(lane.waiting for lane in order):
            for lane in order:
                if lane.waiting and len(items) < self.batch_size:
                    items.append(lane.waiting.popleft())
        self._first = start + 1
        self.running = Batch(items)
        return self.running

    def finished(self, batch: Batch, error: str | None = None) -> list[Resolution]:
        """Record the running batch's result: `error` is the reason its model call raised."""
        if batch is not self.running:
            raise ValueError("finished() must be given the running batch")
        self.running = None
        resolved = []
        # Newest first, so items put back at the front of their lane keep their order.
        for item in reversed(batch.items):
            state = self.lanes.get(item.lane)
            if state is None:  # removed while running
                resolved[:0] = _answers(item, Outcome.REMOVED)
                continue
            if error is None:
                state.counts.done += 1
                resolved[:0] = _answers(item, Outcome.DONE)
                continue
            item.attempts += 1
            state.counts.last_error_at = self.clock()
            if item.attempts < MAX_ATTEMPTS and not (state.policy is Policy.NEWEST and state.waiting):
                state.waiting.appendleft(item)  # retried next, alone
                state.counts.last_error = f"window {item.seq}: {error} (retrying)"
            elif item.attempts < MAX_ATTEMPTS:  # live, and a newer item waits: that one wins
                state.counts.skipped += 1
                state.counts.last_error = f"window {item.seq}: {error} (skipped for a newer window)"
                resolved[:0] = _answers(item, Outcome.SKIPPED, error)
            else:
                state.counts.failed += 1
                state.counts.last_error = f"window {item.seq} failed after {item.attempts} attempts: {error}"
                resolved[:0] = _answers(item, Outcome.FAILED, state.counts.last_error)
        return resolved

    def frames_lost(self, batch: Batch, lost: Item, reason: str) -> list[Resolution]:
        """Record that the running batch could not run because `lost`'s payload is gone (not a
        model failure; nothing of the batch ran). The other items go back to the front of
        their lanes as they were, to run again."""
        if batch is not self.running:
            raise ValueError("frames_lost() must be given the running batch")
        if not any(item is lost for item in batch.items):
            raise ValueError("the lost item must be one of the batch's")
        self.running = None
        resolved: list[Resolution] = []
        state = self.lanes.get(lost.lane)
        rolled_back = state is not None and state.policy is Policy.ORDERED
        for item in reversed(batch.items):
            if item is lost or (rolled_back and item.lane == lost.lane and item.seq > lost.seq):
                continue
            other = self.lanes.get(item.lane)
            if other is None:
                resolved += _answers(item, Outcome.REMOVED)
            elif other.policy is Policy.NEWEST and other.waiting:  # a newer one came meanwhile
                other.counts.skipped += 1
                resolved += _answers(item, Outcome.SKIPPED)
            else:
                other.waiting.appendleft(item)
        if state is None:
            return resolved + _answers(lost, Outcome.REMOVED)
        state.counts.last_error, state.counts.last_error_at = f"window {lost.seq}: {reason}", self.clock()
        if not rolled_back:  # live: newer items follow
            state.counts.skipped += 1
            return resolved + _answers(lost, Outcome.SKIPPED, reason)
        state.counts.last_error += " (re-sent by its source)"
        later = [i for i in [*batch.items, *state.waiting] if i.lane == lost.lane and i.seq > lost.seq]
        state.waiting = deque(i for i in state.waiting if i.seq < lost.seq)
        state.next_seq = lost.seq
        for item in [lost, *later]:
            resolved += _answers(item, Outcome.RETRY, reason)
        return resolved


def _answers(item: Item, outcome: Outcome, error: str | None = None) -> list[Resolution]:
    """The item's outcome, for its token and the tokens of its re-submissions."""
    return [Resolution(token, outcome, item, error) for token in (item.token, *item.followers)]
