"""A long file on every model worker at once: cut into time segments, computed in parallel,
merged back in window order. Plain logic, no Ray (pipeline/split.py is the Ray side).

Windows are numbered as a single pass numbers them: window w holds sampled frames
[w*stride, w*stride + window). A segment owns windows [first_window, end_window) and starts
decoding at its first window's first frame, window - stride frames (its pre-roll) before the
first frame no earlier window holds; the source seeks there (connectors/sources/seeking.py)
and samples exactly the frames of a single pass. The last segment runs to the end of the file
and gives the tail window as a single pass does.

Each segment is a lane of its own on some model worker, fed by an ingest actor of its own. Its
windows' replies go to the stream's merge, which releases them in window order, once each,
into the one output processor of the stream (Redis, files, summaries, events), so consumers
see what a single pass gives. Segments are queued and a worker that finishes one takes the
next, so every worker stays busy to the end.

A segment whose frames differ from the packet scan (SourceError naming PLAN_MISMATCH) means
the scan cannot number this file: everything not yet released is read again in one pass from
the start of the file, numbered by counting as a single pass does.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from connectors.redis_schema import IngestState, StreamStatus
from connectors.sources import SamplePlan

from .config import StandingQuestion
from .messages import IngestReport, Reply, StreamStats, WindowReplies
from .pictures import jpeg
from .window import FrameRef, Window, expected_windows

PREROLL_SHARE = 8  # a segment's frames are at least this many times its pre-roll (re-encoded frames)
SEGMENTS_PER_WORKER = 4  # more segments than workers, so none waits at the end for a long one

T = TypeVar("T")


@dataclass(frozen=True)
class Segment:
    """Windows [first_window, end_window) of a file (end None: to the end of the file, tail
    window included). `seek`: decoding starts at the first window's first frame; otherwise at
    the start of the file, and the windows before `first_window` are answered as done already."""

    index: int
    first_window: int
    end_window: int | None
    seek: bool = True

    def first_frame(self, stride: int) -> int:
        return self.first_window * stride if self.seek else 0

    def first_seq(self) -> int:
        """The number of the first window its ingest makes."""
        return self.first_window if self.seek else 0

    def source_options(self, plan: SamplePlan | None, stride: int) -> dict:
        """open_source's arguments that start its source at its first frame."""
        first = self.first_frame(stride)
        return {"plan": plan, "first_frame": first} if first and plan is not None else {}

    def ends_with(self, seq: int) -> bool:
        """Window `seq` is its last: its ingest stops after it."""
        return self.end_window is not None and seq >= self.end_window - 1

    def lane(self, stream: str, run_tag: str) -> str:
        """Its lane at a model worker: never a stream id ('~' is not allowed in one)."""
        return f"{stream}~{run_tag}.{self.index}"


def min_segment_windows(window: int, stride: int, fps: float, min_s: float) -> int:
    """The fewest windows a segment has: `min_s` seconds of video, and PREROLL_SHARE pre-rolls."""
    frames = max(min_s * fps, PREROLL_SHARE * (window - stride))
    return max(2, math.ceil(frames / stride))


def plan_segments(frames: int, window: int, stride: int, fps: float, min_s: float, workers: int,
                  next_window: int = 0) -> list[Segment]:
    """Segments for the windows of a file of `frames` sampled frames from `next_window` on:
    SEGMENTS_PER_WORKER per worker, each at least `min_segment_windows`. Empty when the file
    is not worth splitting (one worker, or too short): it runs as one stream, as ever."""
    total = expected_windows(frames, window, stride)
    todo = total - next_window
    count = min(workers * SEGMENTS_PER_WORKER, todo // min_segment_windows(window, stride, fps, min_s))
    if workers < 2 or count < 2:
        return []
    bounds = [next_window + round(i * todo / count) for i in range(count)] + [None]
    return [Segment(i, bounds[i], bounds[i + 1]) for i in range(count)]


class InOrder(Generic[T]):
    """Items numbered by window, released in window order: each once, none past a gap."""

    def __init__(self, next_seq: int) -> None:
        self.next = next_seq
        self.waiting: dict[int, T] = {}

    def has(self, seq: int) -> bool:
        """Received already (released or waiting)."""
        return seq < self.next or seq in self.waiting

    def add(self, seq: int, item: T) -> list[T]:
        """Take an item; returns those now released, in order. A repeat is ignored."""
        if self.has(seq):
            return []
        self.waiting[seq] = item
        released = []
        while self.next in self.waiting:
            released.append(self.waiting.pop(self.next))
            self.next += 1
        return released

    def received_through(self, first: int, end: int | None) -> int:
        """The first window of [first, end) not received yet (`end` when all are)."""
        seq = max(first, self.next)
        while seq in self.waiting and (end is None or seq < end):
            seq += 1
        return seq if end is None else min(seq, end)

    def drop(self) -> int:
        """Forget what waits (it will be computed again); returns how many."""
        count = len(self.waiting)
        self.waiting.clear()
        return count


@dataclass(frozen=True)
class SegmentResult:
    """A window computed on a segment lane, as the stream's merge receives it: the replies of
    its queries, its picture as a JPEG, or the error the model failed on it with."""

    lane: str
    window: Window  # the stream's id; frames: the first and the last, without references
    caption: Reply | None = None
    standing: tuple[tuple[StandingQuestion, Reply], ...] = ()
    picture: bytes | None = None
    error: str | None = None

    def replies(self) -> WindowReplies:
        return WindowReplies(self.window, None, self.caption, list(self.standing))


class SegmentOutbox:
    """A segment lane's results, collected as the engine makes them (the output processor's
    relay) until the worker's loop sends them to the merge."""

    def __init__(self, stream: str, lane: str) -> None:
        self.stream, self.lane = stream, lane
        self.results: list[SegmentResult] = []
        self._lock = threading.Lock()

    def __call__(self, window: Window, replies: WindowReplies | None, picture: np.ndarray | None,
                 error: str | None = None) -> None:
        ends = (window.frames[0], window.frames[-1])
        window = Window(self.stream, window.seq, tuple(FrameRef(f.seq, f.pts, f.wall_time, None) for f in ends),
                        window.live, window.closed_at)
        result = SegmentResult(self.lane, window, error=error)
        if replies is not None:
            result = SegmentResult(self.lane, window, replies.caption, tuple(replies.standing),
                                   jpeg(picture) if picture is not None else None)
        with self._lock:
            self.results.append(result)

    def take(self) -> list[SegmentResult]:
        with self._lock:
            results, self.results = self.results, []
        return results


@dataclass
class Assignment:
    segment: Segment
    worker: int
    report: IngestReport | None = None  # the latest heartbeat of its ingest
    stats: StreamStats | None = None  # its lane's counts at the worker, with that heartbeat


@dataclass
class SplitRun:
    """One split file's segments: which run where, what is received and released, what ends
    the run. The Ray actor asks it what to do and does it."""

    stream: str
    segments: list[Segment]
    next_window: int
    total_windows: int
    workers: int
    queued: deque[Segment] = field(init=False)
    active: dict[str, Assignment] = field(default_factory=dict)  # lane -> where it runs
    finished: list[Assignment] = field(default_factory=list)  # segments whose ingest ended
    valid: set[str] = field(default_factory=set)  # lanes whose windows count (not cancelled)
    dead: set[int] = field(default_factory=set)  # workers gone for good
    error: str | None = None  # a segment that failed: the file cannot be read past it
    fell_back: bool = False  # the scan could not number the file: one pass reads the rest
    run_tag: str = "0"  # tells this incarnation's lanes from an earlier one's
    overlap_frames: int = 0  # a segment's pre-roll, in sampled frames (window - stride)

    def __post_init__(self) -> None:
        self.queued = deque(self.segments)
        self.release: InOrder[SegmentResult] = InOrder(self.next_window)
        self.next_index = max((s.index for s in self.segments), default=-1) + 1
        self.done = self.failed = 0  # windows received, captioned / failed

    def lane(self, segment: Segment) -> str:
        return segment.lane(self.stream, self.run_tag)

    # ---- where segments run ------------------------------------------------------------
    def assign(self) -> list[tuple[str, Assignment]]:
        """Queued segments for the workers that have none of this file's: (lane, assignment)."""
        busy = {a.worker for a in self.active.values()}
        started = []
        for worker in range(self.workers):
            if not self.queued or worker in busy or worker in self.dead:
                continue
            segment = self.queued.popleft()
            assignment = self.active[self.lane(segment)] = Assignment(segment, worker)
            self.valid.add(self.lane(segment))
            started.append((self.lane(segment), assignment))
        return started

    def worker_lost(self, worker: int) -> list[tuple[str, Assignment]]:
        """A worker died for good: its segments move to the live worker with the fewest of
        them (continuing from the first window not received). Returns the moved assignments;
        none when no worker is left."""
        self.dead.add(worker)
        alive = [w for w in range(self.workers) if w not in self.dead]
        moved = []
        for lane, assignment in self.active.items():
            if assignment.worker == worker and alive:
                load = {w: sum(a.worker == w for a in self.active.values()) for w in alive}
                assignment.worker = min(alive, key=lambda w: load[w])
                moved.append((lane, assignment))
        return moved

    def resume_window(self, lane: str) -> int:
        """The first window of the lane's segment not received: where its lane (re)starts."""
        segment = self.active[lane].segment
        return self.release.received_through(segment.first_window, segment.end_window)

    # ---- results -----------------------------------------------------------------------------
    def receive(self, results: Sequence[SegmentResult]) -> list[SegmentResult]:
        """Results from the lanes; returns those released now, in window order. Results of a
        cancelled lane, or of an earlier incarnation's, are ignored."""
        released = []
        for result in results:
            if result.lane not in self.valid or self.release.has(result.window.seq):
                continue
            if result.error is None:
                self.done += 1
            else:
                self.failed += 1
            released += self.release.add(result.window.seq, result)
        return released

    def report(self, lane: str, report: IngestReport, stats: StreamStats | None) -> None:
        assignment = self.active.get(lane)
        if assignment is not None:
            assignment.report, assignment.stats = report, stats or assignment.stats

    # ---- segments that end -------------------------------------------------------------------
    def ended(self, lane: str) -> None:
        """The lane's ingest ended: every window of it is received."""
        assignment = self.active.pop(lane, None)
        if assignment is not None:
            self.finished.append(assignment)

    def failed_segment(self, lane: str, error: str, mismatch: bool) -> list[str]:
        """The lane's ingest failed; returns the lanes to cancel. A mismatch with the scan:
        everything not released is read again in one pass from the start of the file. Any
        other failure: no window past it can be released, so the later segments stop."""
        assignment = self.active.pop(lane, None)
        if assignment is None:
            return []
        if mismatch and not self.fell_back:
            cancelled = list(self.active)
            self.active.clear()
            self.valid.clear()
            self.queued.clear()
            self.release.drop()
            self.fell_back = True
            self.queued.append(Segment(self.next_index, self.release.next, None, seek=False))
            self.next_index += 1
            return cancelled
        self.finished.append(assignment)
        self.error = self.error or error
        first = assignment.segment.first_window
        self.queued = deque(s for s in self.queued if s.first_window < first)
        cancelled = [lane for lane, a in self.active.items() if a.segment.first_window > first]
        for lane in cancelled:
            del self.active[lane]
            self.valid.discard(lane)
        return cancelled

    def cancel_all(self) -> list[str]:
        """A stop: nothing more starts; returns the lanes running."""
        self.queued.clear()
        return list(self.active)

    @property
    def over(self) -> bool:
        return not self.queued and not self.active

    @property
    def complete(self) -> bool:
        """Every window of the file released (or, after a fall-back, the one pass ended)."""
        return self.over and self.error is None and not self.release.waiting and (
            self.fell_back or self.release.next >= self.total_windows)

    # ---- status --------------------------------------------------------------------------------
    def status(self, state: IngestState, progress: Progress, latency_s: float | None, fps_out: float) -> StreamStatus:
        """The stream's status over all its segments: frames sampled once each (a segment's
        pre-roll is its predecessor's too), windows received so far, and the progress."""
        assignments = [*self.finished, *self.active.values()]
        reports = [(a, a.report) for a in assignments if a.report is not None]
        frames_in = sum(r.frames_in - min(r.frames_in, self.overlap(a.segment)) for a, r in reports)
        errors = [(r.last_error, r.last_error_at) for _, r in reports if r.last_error]
        error, error_at = (self.error, time.time()) if self.error else (errors[-1] if errors else (None, None))
        remaining = max(0, self.total_windows - self.release.next - len(self.release.waiting))
        return StreamStatus(
            stream=self.stream, state=state, frames_in=frames_in, fps_out=fps_out,
            fps_in=sum(r.fps_in for a, r in reports if a in self.active.values()),
            frames_corrupt=sum(r.frames_corrupt for _, r in reports),
            frames_dropped=sum(a.stats.frames_dropped for a in assignments if a.stats is not None),
            windows_emitted=sum(r.windows_emitted for _, r in reports), windows_done=self.done,
            windows_failed=self.failed, latency_s=latency_s, last_error=error, last_error_at=error_at,
            windows_total=self.total_windows, eta_s=progress.eta(self.done + self.failed, remaining),
        )

    def overlap(self, segment: Segment) -> int:
        """Frames a segment samples that an earlier segment samples too."""
        return self.overlap_frames if segment.seek and segment.first_window > 0 else 0


class Progress:
    """A split file's ETA: the windows still to do at the average rate since its first window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None
        self.first = 0

    def eta(self, done: int, remaining: int) -> float | None:
        now = self.clock()
        if self.started is None:
            if done:
                self.started, self.first = now, done
            return None
        rate = (done - self.first) / (now - self.started) if now > self.started else 0.0
        return remaining / rate if rate > 0 else None


def describe(stream: str, segments: Sequence[Segment], workers: int) -> str:
    """A line for the user when a file is split."""
    first = segments[0]
    return (f"stream {stream} split into {len(segments)} segments of about {first.end_window - first.first_window} "
            f"windows over {workers} model workers")
