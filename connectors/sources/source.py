"""VideoSource: one stream, from connect to end, with sampling, scaling and reconnects."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import av
import numpy as np
from av.container import InputContainer
from av.video.stream import VideoStream

from .backoff import Backoff
from .decoder import Decoder, OpenSettings, count_frames, nominal_rate, open_video, start_seconds
from .failures import Failure, classify
from .sampling import RateSampler, UniformSampler
from .scaling import Scaler
from .seeking import PLAN_MISMATCH, PlannedFrames, SamplePlan, seek_before
from .timeline import Timeline
from .types import Frame, SourceError, SourceState, SourceStats
from .uri import Kind, SourceSpec

log = logging.getLogger(__name__)

LIVE_MAX_FORWARD_GAP = 10.0  # seconds; a live clock jumping further ahead is re-anchored
# Skip decoding non-reference frames when sampling at most this fraction of the frame rate:
# reference frames then still come several times per sampling interval.
SKIP_NONREF_RATIO = 4


class VideoSource:
    """Iterate it (once) for Frames. Thread-safe for: state, stats, close() from any thread."""

    def __init__(
        self,
        spec: SourceSpec,
        *,
        fps: float = 4.0,
        frames: int | None = None,
        scaler: Scaler,
        settings: OpenSettings,
        backoff: Backoff,
        live: bool | None = None,
        realtime: bool = True,
        retry_connect: bool = False,
        skip_nonref: bool = False,
        plan: SamplePlan | None = None,
        first_frame: int = 0,
    ) -> None:
        self.spec = spec
        self.uri = spec.display  # safe to log/publish
        self._fps, self._frames = fps, frames
        self._scaler, self._settings, self._backoff = scaler, settings, backoff
        self._live_override, self._realtime, self._retry_connect = live, realtime, retry_connect
        self._skip_nonref = skip_nonref
        self._state = SourceState.CONNECTING
        self._stats = SourceStats()
        self._stop = threading.Event()
        # Held around every blocking PyAV call, never across a yield: close() may then
        # close the container itself, or leave it to the reader that holds the lock.
        self._io = threading.Lock()
        self._container: InputContainer | None = None
        self._decoder: Decoder | None = None
        self._is_http_live: bool | None = None
        self._timeline: Timeline | None = None
        self._sampler: RateSampler | UniformSampler | None = None
        self._iterating = False
        self._planned = PlannedFrames(plan, first_frame) if plan is not None else None
        self._seq = first_frame if plan is not None else 0
        self._index = 0
        self._last_frame_mono: float | None = None
        self._clock_origin: float | None = None  # realtime pacing of loop://
        self._last_emitted: Frame | None = None
        self._last_duration: float | None = None  # of the last decoded frame: where a loop wraps

    # --- public surface -------------------------------------------------------------

    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def stats(self) -> SourceStats:
        """A snapshot (the reader thread keeps updating the live counters)."""
        return dataclasses.replace(self._stats)

    @property
    def is_live(self) -> bool:
        """True for cameras and loop://: the consumer should drop stale work, not block."""
        if self._live_override is not None:
            return self._live_override
        if self.spec.kind is Kind.HTTP and self._is_http_live is not None:
            return self._is_http_live
        return self.spec.presumed_live

    def start(self) -> VideoSource:
        """First connect. Raises SourceError if the source cannot start, unless it is live
        and retry_connect was asked: then iteration keeps retrying in state connecting."""
        try:
            self._connect(first=True)
        except Exception as exc:  # noqa: BLE001 - classified below: any failure has a reason
            failure = _failure(exc)
            if not (self._retry_connect and self.is_live):
                self._fail(failure)
            self._note_failure(failure, SourceState.CONNECTING)
        return self

    def close(self) -> None:
        """Stop from any thread. Returns at once; a reader blocked on a silent camera
        returns within read_timeout (PyAV offers no other interrupt) and then ends."""
        self._stop.set()
        if self._io.acquire(blocking=False):
            try:
                self._close_container()
            finally:
                self._io.release()
        if self._state not in (SourceState.FAILED,):
            self._state = SourceState.ENDED

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        if self._iterating:
            raise RuntimeError(f"{self.uri}: a source can be iterated only once")
        self._iterating = True
        try:
            yield from self._run()
        finally:
            with self._io:
                self._close_container()
            if self._stop.is_set() and self._state is not SourceState.FAILED:
                self._state = SourceState.ENDED

    # --- main loop ------------------------------------------------------------------

    def _run(self) -> Iterator[Frame]:
        while not self._stop.is_set():
            if self._decoder is None and not self._reconnect():
                return
            try:
                yield from self._read_segment()
            except Exception as exc:  # noqa: BLE001 - a live source recovers from any failure
                if self._stop.is_set():
                    return
                if not self.is_live:
                    self._fail(_failure(exc))
                self._lost(_failure(exc))
                continue
            if self._stop.is_set():
                return
            if self.spec.kind is Kind.LOOP:
                try:
                    self._restart_loop()
                except Exception as exc:  # noqa: BLE001 - e.g. the file went away: retry like a camera
                    self._lost(_failure(exc))
            elif self.is_live:
                self._lost(Failure("stream ended (EOF from server)", False))
            else:
                if self._planned is not None:
                    self._check_plan(self._planned.check_end)
                yield from self._pad_uniform()
                self._state = SourceState.ENDED
                return

    def _read_segment(self) -> Iterator[Frame]:
        assert self._timeline is not None and self._sampler is not None
        while True:
            with self._io:
                if self._stop.is_set() or self._decoder is None:
                    return
                decoded = self._decoder.read()
            if decoded is None:
                return
            for vf in decoded:
                wall, mono = time.time(), time.monotonic()
                self._last_frame_mono = mono
                raw = None if vf.pts is None or vf.time_base is None else float(vf.pts * vf.time_base)
                t = self._timeline.map(raw)
                if vf.duration and vf.time_base is not None:
                    self._last_duration = float(vf.duration * vf.time_base)
                index, self._index = self._index, self._index + 1
                copies = self._sampler.take(t, index)
                if copies and self._planned is not None and self._planned_number(t) is None:
                    continue  # decoded to reach the first frame asked for
                if not copies:
                    continue  # never converted to RGB
                image = self._scaler(vf)
                if self.spec.kind is Kind.LOOP and self._realtime and not self._pace(t, mono):
                    return
                for _ in range(copies):
                    yield self._emit(t, wall, index, image)

    def _emit(self, t: float, wall: float, index: int, image: np.ndarray) -> Frame:
        frame = Frame(seq=self._seq, pts=t, wall_time=wall, source_index=index, image=image)
        self._seq += 1
        self._stats.sampled += 1
        self._last_emitted = frame
        return frame

    def _planned_number(self, t: float) -> int | None:
        """A sampled frame's number in a single pass (None: before the first frame asked for)."""
        assert self._planned is not None and isinstance(self._sampler, RateSampler)
        return self._check_plan(lambda: self._planned.number(self._sampler.tick(t)))

    def _check_plan(self, check):
        try:
            return check()
        except ValueError as exc:
            self._fail(Failure(f"{PLAN_MISMATCH}: {exc}", True))

    def _pad_uniform(self) -> Iterator[Frame]:
        """frames=N promises N frames; if corrupt packets made the file shorter than its
        packet count, repeat the last frame (logged) rather than return fewer."""
        if self._frames is None or self._stats.sampled >= self._frames:
            return
        last = self._last_emitted
        missing = self._frames - self._stats.sampled
        if last is None:
            self._fail(Failure("no decodable frame in the file", True))
            return
        log.warning(
            "%s: %d of %d uniform frames undecodable, repeating the last one", self.uri, missing, self._frames
        )
        for _ in range(missing):
            yield self._emit(last.pts, time.time(), last.source_index, last.image)

    def _pace(self, t: float, mono: float) -> bool:
        """Deliver loop:// frames at their stream time, like a camera. False if stopped."""
        if self._clock_origin is None:
            self._clock_origin = mono - t
        delay = self._clock_origin + t - time.monotonic()
        return not (delay > 0 and self._stop.wait(delay))

    # --- connection management ------------------------------------------------------

    def _connect(self, first: bool = False) -> None:
        container, stream = open_video(self.spec, self._settings)
        try:
            if self.spec.kind is Kind.HTTP:
                # A live HLS playlist has no end; plain HTTP is taken as a file (live= overrides).
                self._is_http_live = "hls" in container.format.name and container.duration is None
            if first:
                self._init_sampling(stream)
            self._start_segment(stream, first)
            if self._skips_non_reference(stream):
                stream.codec_context.skip_frame = "NONREF"
            if first and self._planned is not None and self._planned.first_frame:
                seek_before(container, stream, self._planned.plan.seconds_before(self._planned.first_frame)
                            + (start_seconds(stream) or 0.0))
        except BaseException:
            container.close()
            raise
        with self._io:
            self._container, self._decoder = container, Decoder(container, stream, self._stats)
        self._stats.attempt = 0
        self._state = SourceState.LIVE

    def _skips_non_reference(self, stream: VideoStream) -> bool:
        """With skip_nonref, sampling by rate well below the frame rate needs no frame that nothing refers to
        (B-frames, usually): FFmpeg skips decoding them. A sample is then the first reference
        frame at or after its tick, a frame or two later at most, with its own true timestamp.
        Uniform sampling (frames=N) counts every frame, so it decodes them all."""
        rate = stream.average_rate or stream.guessed_rate
        return (self._skip_nonref and isinstance(self._sampler, RateSampler) and bool(rate)
                and float(rate) >= SKIP_NONREF_RATIO * self._fps)

    def _init_sampling(self, stream: VideoStream) -> None:
        if self._frames is not None and self.is_live:
            raise SourceError(self.spec.uri, "frames=N (uniform sampling) needs a file, not a live source")
        self._timeline = Timeline(1.0 / nominal_rate(stream), LIVE_MAX_FORWARD_GAP if self.is_live else None)
        if self._frames is None:
            self._sampler = RateSampler(self._fps)
        else:
            total = count_frames(self.spec, self._settings)
            if total == 0:
                raise SourceError(self.spec.uri, "no video frames in the file")
            self._sampler = UniformSampler(self._frames, total)

    def _start_segment(self, stream: VideoStream, first: bool) -> None:
        assert self._timeline is not None
        origin = start_seconds(stream) if self.spec.kind is not Kind.RTSP else None
        if first:
            self._timeline.restart(at=0.0, origin=origin)
        elif self.spec.kind is Kind.LOOP:
            # Continue where the last frame ends (its own duration is exact; the stream's
            # average rate is skewed by mp4's last-frame handling).
            step = self._last_duration or self._timeline.nominal_dt
            self._timeline.restart(at=(self._timeline.last or 0.0) + step, origin=origin)
        else:
            # A reconnected camera restarts its clock: continue from where we were plus
            # the outage, so stream time stays close to wall time.
            last = self._timeline.last or 0.0
            outage = time.monotonic() - (self._last_frame_mono or time.monotonic())
            self._timeline.restart(at=last + max(outage, self._timeline.nominal_dt))

    def _restart_loop(self) -> None:
        with self._io:
            self._close_container()
        self._connect()

    def _reconnect(self) -> bool:
        """Retry until connected (True), stopped (False) or out of attempts (SourceError)."""
        while not self._stop.is_set():
            self._stats.attempt += 1
            attempt = self._stats.attempt
            if self._backoff.exhausted(attempt):
                self._fail(Failure(f"gave up after {attempt - 1} attempts: {self._stats.last_error}", True))
            delay = self._backoff.delay(attempt)
            log.warning("%s: %s; retry %d in %.1fs", self.uri, self._stats.last_error, attempt, delay)
            if self._stop.wait(delay):
                return False
            self._stats.reconnects += 1
            try:
                self._connect(first=self._sampler is None)
                log.info("%s: live again after %d attempts", self.uri, attempt)
                return True
            except Exception as exc:  # noqa: BLE001 - same: retry whatever went wrong
                self._record(_failure(exc))
        return False

    def _lost(self, failure: Failure) -> None:
        with self._io:
            self._close_container()
        self._note_failure(failure, SourceState.RECONNECTING)

    def _record(self, failure: Failure) -> None:
        self._stats.last_error, self._stats.last_error_at = failure.reason, time.time()

    def _note_failure(self, failure: Failure, state: SourceState) -> None:
        self._record(failure)
        self._state = state

    def _fail(self, failure: Failure) -> None:
        self._record(failure)
        self._state = SourceState.FAILED
        with self._io:
            self._close_container()
        # from None: the PyAV error in the context names the URL with its password.
        raise SourceError(self.spec.uri, failure.reason) from None

    def _close_container(self) -> None:
        """Caller holds self._io (or is the only user)."""
        if self._container is not None:
            try:
                self._container.close()
            except (av.error.FFmpegError, OSError):  # closing a broken connection
                pass
        self._container, self._decoder = None, None


def _failure(exc: BaseException) -> Failure:
    if isinstance(exc, SourceError):
        return Failure(exc.reason, True)
    return classify(exc)
