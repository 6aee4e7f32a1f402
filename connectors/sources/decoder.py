"""Opening a video with PyAV and turning its packets into frames, skipping corrupt data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import av
from av.container import InputContainer
from av.video.stream import VideoStream

from .types import SourceError, SourceStats
from .uri import Kind, SourceSpec

MAX_CONSECUTIVE_ERRORS = 100  # demux errors in a row before a file is declared unreadable


@dataclass(frozen=True, slots=True)
class OpenSettings:
    transport: str = "tcp"  # RTSP: tcp (default: works through NAT/firewalls, no loss) or udp
    open_timeout: float = 10.0
    read_timeout: float = 10.0  # no packet for this long: the source is dead (live: reconnect)
    av_options: dict[str, str] = field(default_factory=dict)  # extra FFmpeg options, win over ours


def _microseconds(seconds: float) -> str:
    return str(int(seconds * 1_000_000))


def open_video(spec: SourceSpec, settings: OpenSettings) -> tuple[InputContainer, VideoStream]:
    """Open and return the first video stream; PyAV errors propagate for the caller to classify."""
    options: dict[str, str] = {}
    if spec.kind is Kind.RTSP:
        options |= {"rtsp_transport": settings.transport, "timeout": _microseconds(settings.read_timeout)}
    elif spec.kind is Kind.HTTP:
        options |= {"rw_timeout": _microseconds(settings.read_timeout)}
    options |= settings.av_options
    container = av.open(spec.target, options=options, timeout=(settings.open_timeout, settings.read_timeout))
    try:
        if not container.streams.video:
            raise SourceError(spec.uri, "no video stream (audio-only or not a video)")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise SourceError(spec.uri, "unsupported video codec (no decoder in this FFmpeg build)")
        stream.thread_type = "AUTO"  # frame+slice threads; the decoder is the hot path
        return container, stream
    except BaseException:
        container.close()
        raise


def nominal_rate(stream: VideoStream) -> float:
    """Frames per second the stream declares (25 when it declares none)."""
    return float(stream.average_rate or stream.guessed_rate or 25)


def start_seconds(stream: VideoStream) -> float | None:
    """The raw time of the stream's start (what maps to stream time 0), if it says."""
    if stream.start_time is None or stream.time_base is None:
        return None
    return float(stream.start_time * stream.time_base)


def count_frames(spec: SourceSpec, settings: OpenSettings) -> int:
    """Video packets in the file, by demuxing only (no decoding): the total for uniform sampling."""
    container, stream = open_video(spec, settings)
    with container:
        return sum(1 for packet in container.demux(stream) if packet.size)


class Decoder:
    """Frames of one opened container in presentation order. Corrupt packets, packets the
    decoder rejects and frames it flags corrupt are dropped and counted in stats."""

    def __init__(self, container: InputContainer, stream: VideoStream, stats: SourceStats) -> None:
        self._container, self._stream, self._stats = container, stream, stats
        self._packets: Iterator[av.Packet[VideoStream]] = container.demux(stream)
        self._errors_in_row = 0

    def read(self) -> list[av.VideoFrame] | None:
        """Frames from the next packet (maybe none), or None at end of stream. Blocks on I/O."""
        while True:
            try:
                packet = next(self._packets)
            except StopIteration:
                return None
            except av.error.InvalidDataError:
                # A damaged container chunk: count it, resume demuxing after it.
                self._stats.corrupt_skipped += 1
                self._errors_in_row += 1
                if self._errors_in_row > MAX_CONSECUTIVE_ERRORS:
                    raise
                self._packets = self._container.demux(self._stream)
                continue
            self._errors_in_row = 0
            if packet.is_corrupt:
                self._stats.corrupt_skipped += 1
                continue
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                self._stats.corrupt_skipped += 1
                continue
            good = [f for f in frames if not f.is_corrupt]
            self._stats.corrupt_skipped += len(frames) - len(good)
            self._stats.decoded += len(good)
            return good
