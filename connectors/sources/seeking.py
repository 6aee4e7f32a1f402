"""Starting a file part-way with exactly the frames a single pass samples there.

A single pass samples, for each tick k/fps of stream time, the first decoded frame at or after
it (each frame at most once) and numbers the sampled frames 0, 1, 2...: frame n's number
depends on every tick before it that had a frame. `scan_samples` reads that numbering from the
packets alone (demuxing, no decoding): the tick of each sampled frame. A source opened with the
scan and `first_frame` seeks to a keyframe before that frame, decodes forward with the same
timeline, sampler and skip_nonref choice, and emits the sampled frames from `first_frame` on,
numbered as a single pass numbers them.

The scan assumes every packet decodes to one frame (no corrupt data, and with skip_nonref every
tick that has a frame has a reference frame). Each sampled frame is checked against it, those
decoded before `first_frame` too: a frame the scan does not predict is a SourceError naming
PLAN_MISMATCH, never a silently renumbered frame.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

import av
from av.container import InputContainer
from av.video.stream import VideoStream

from .decoder import OpenSettings, nominal_rate, open_video, start_seconds
from .sampling import TOLERANCE, RateSampler
from .timeline import Timeline
from .types import SourceError
from .uri import Kind, parse_source

PLAN_MISMATCH = "a sampled frame differs from the packet scan"
SEEK_STEP_S = 1.0  # how much earlier a seek that landed too late tries again (doubling)


@dataclass(frozen=True)
class SamplePlan:
    """What a single pass at `fps` samples from a file: the tick of sampled frame n."""

    fps: float
    ticks: tuple[int, ...]

    @property
    def frames(self) -> int:
        return len(self.ticks)

    def seconds_before(self, frame: int) -> float:
        """Stream time that every frame decoded before sampled frame `frame`'s tick precedes."""
        return self.ticks[frame] / self.fps - TOLERANCE


def scan_samples(uri: str, fps: float, settings: OpenSettings = OpenSettings()) -> SamplePlan | None:
    """The sampled frames of a single pass, from the packets' timestamps. None when the file
    cannot be started part-way exactly: not a local file, no start time, a packet without a
    timestamp, or damaged data (those are read in a single pass)."""
    spec = parse_source(uri)
    if spec.kind is not Kind.FILE:
        return None
    try:
        container, stream = open_video(spec, settings)
        with container:
            origin = start_seconds(stream)
            if origin is None:
                return None
            pts = []
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                if packet.pts is None or packet.is_corrupt:
                    return None
                pts.append(packet.pts)
            time_base, rate = stream.time_base, nominal_rate(stream)
    except (av.error.FFmpegError, OSError, SourceError):
        return None
    timeline = Timeline(1.0 / rate)
    timeline.restart(at=0.0, origin=origin)
    sampler = RateSampler(fps)
    ticks = []
    for index, raw in enumerate(sorted(pts)):  # packets in decode order, frames in presentation order
        t = timeline.map(float(raw * time_base))
        if sampler.take(t, index):
            ticks.append(sampler.tick(t))
    return SamplePlan(fps, tuple(ticks))


def seek_before(container: InputContainer, stream: VideoStream, seconds: float) -> None:
    """Put the demuxer on a keyframe whose time is before `seconds` (raw stream time), or on the
    first one: its frames are decoded from there as a single pass decodes them. Demuxers seek
    by their own index, so the landing packet is checked, and a later one tried earlier."""
    first = start_seconds(stream) or 0.0
    target, step = seconds, SEEK_STEP_S
    while target > first:
        offset = math.floor(target / stream.time_base)
        container.seek(offset, stream=stream, backward=True)
        packet = next((p for p in container.demux(stream) if p.size), None)
        if packet is not None and packet.pts is not None and float(packet.pts * stream.time_base) < seconds:
            container.seek(offset, stream=stream, backward=True)  # that packet again, first
            return
        target, step = target - step, step * 2
    container.seek(stream.start_time or 0, stream=stream, backward=True)


class PlannedFrames:
    """Follows a decode started at a seek point against the scan: which sampled frames precede
    `first_frame` (decoded to reach it, not emitted), and that each is the frame the scan says."""

    def __init__(self, plan: SamplePlan, first_frame: int):
        if not 0 <= first_frame < plan.frames:
            raise ValueError(f"first_frame {first_frame} is not one of the {plan.frames} sampled frames")
        self.plan, self.first_frame = plan, first_frame
        self.next: int | None = None if first_frame else 0  # from the start: frame 0 comes first

    def number(self, tick: int) -> int | None:
        """The sampled frame's number in a single pass, None if it comes before `first_frame`.
        Raises ValueError (the reason) when the frame is not the one the scan predicts."""
        ticks = self.plan.ticks
        if self.next is None:  # the first sampled frame after the seek: any tick of the scan before the start
            index = bisect_left(ticks, tick)
            if index >= self.first_frame:
                raise ValueError(f"the seek landed at tick {tick}, not before frame {self.first_frame}")
        else:
            index = self.next
        if index >= len(ticks) or ticks[index] != tick:
            expected = f"tick {ticks[index]}" if index < len(ticks) else "the end of the file"
            raise ValueError(f"sampled frame {index} is at tick {tick}, the scan has {expected}")
        self.next = index + 1
        return index if index >= self.first_frame else None

    def check_end(self) -> None:
        """At the end of the file: every frame of the scan came."""
        if (self.next or 0) != self.plan.frames:
            raise ValueError(f"the file ended after {self.next or 0} sampled frames, the scan has {self.plan.frames}")
