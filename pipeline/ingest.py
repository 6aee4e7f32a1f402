"""The ingest actor: it runs a stream's source and sends windows of frame references to the
stream's model worker. Every live stream has one of its own; files take turns on few.

It lives apart from the model worker (pipeline/actors.py) so that its process imports neither the
engine nor torch: a killed ingest actor, or a new stream's, runs again in seconds."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import ray
from ray.util.metrics import Counter

from connectors.publisher import patch_status
from connectors.redis_conn import UNREACHABLE, connect
from connectors.redis_schema import STATUS_INTERVAL_S, IngestState, StreamStatus
from connectors.sources import SamplePlan, SourceError, SourceState, open_source

from .config import PipelineConfig, StreamConfig
from .gate import StreamGate
from .messages import IngestReport, StreamSummary
from .metric_labels import stream_label
from .rates import RateMeter
from .scheduler import FINAL
from .segments import Segment
from .window import FrameGroups, SlidingWindow, Window, frames_per_object

log = logging.getLogger("slowfast.pipeline")
RESUBMIT_WAIT_S = 1.0
ATTACH_TIMEOUT_S = 5.0
FINAL_STATUS_TIMEOUT_S = 30.0
# The worker publishes the stream's status with the ingest's report. Once it has taken none for
# this long (killed and restarting: a torch import and a model load), the ingest writes its own
# side straight to Redis, so the status stays fresh and says why captions wait.
WORKER_SILENT_S = 5.0
PENDING_REPORTS = 16  # reports awaiting the worker's answer that are kept (an unanswered one is dropped)
# While the source runs, the stream's state is the source's.
SOURCE_STATES = {SourceState.CONNECTING: IngestState.CONNECTING, SourceState.LIVE: IngestState.LIVE,
                 SourceState.RECONNECTING: IngestState.RECONNECTING, SourceState.ENDED: IngestState.LIVE,
                 SourceState.FAILED: IngestState.FAILED}


@ray.remote(max_restarts=-1, max_task_retries=0)
class IngestActor:
    """A Ray shell around `StreamIngest`: the stream comes with run(), so one actor can run
    files one after another. Ray keeps memory for good in the driver, the GCS and the raylet for
    every actor a run creates (some 80 KB: bench/actor_churn_bench.py), which a run that took a
    new actor for every file would keep for each file.

    Restarted by Ray after a crash, the actor runs nothing until its caller, whose run() call
    failed with the old process, calls run() again with the same job: the stream resumes there."""

    def __init__(self, config: PipelineConfig, frame_size: int):
        self.config, self.frame_size = config, frame_size
        self.current: StreamIngest | None = None
        self.stopped_early: set[str] = set()  # jobs stopped before their run() came (a restart at a drain)
        self.frames_counter = Counter("slowfast_frames_in", "sampled frames ingested", tag_keys=("stream",))

    async def run(self, stream: StreamConfig | None = None, worker_name: str = "", job: str = "",
                  segment: Segment | None = None, plan: SamplePlan | None = None) -> StreamSummary:
        """Run `stream` as `job` (an id its caller gives each run of a stream) until its source
        ends, fails or stop() is called; returns its summary. A call for the job that runs (or
        with no stream: for whatever runs) waits on the same ingest. `segment` (with the file's
        `plan`): the windows of one segment of a split file, from its first (the source seeks
        there) to its last, under the segment's lane id."""
        if stream is not None and (self.current is None or self.current.job != job):
            if self.current is not None and self.current.thread.is_alive():
                raise RuntimeError(f"ingest of {self.current.stream.id} still runs; {stream.id} not started")
            self.current = StreamIngest(stream, self.config, worker_name, self.frame_size, job, self.frames_counter,
                                        segment, plan)
            if job in self.stopped_early:
                self.stopped_early.discard(job)
                self.current.stop()
        current = self.current
        if current is None:
            raise RuntimeError("this ingest actor runs no stream")
        while current.thread.is_alive():
            await asyncio.sleep(0.2)
        return current.summary()

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def retarget(self, worker_name: str, job: str | None = None) -> None:
        """Send `job`'s windows (without one: whatever runs) to another model worker from now
        on (the driver moved the stream)."""
        if self.current is not None and job in (None, self.current.job):
            await asyncio.to_thread(self.current.retarget, worker_name)

    async def stop(self, job: str | None = None) -> None:
        """Stop `job` (without one: whatever runs). A job not started yet never starts."""
        if self.current is not None and job in (None, self.current.job):
            self.current.stop()
        elif job is not None and self.current is None:  # restarted: its run() may come next
            self.stopped_early.add(job)


class StreamIngest:
    """Runs one stream's source: each sampled frame goes to the object store once, in groups
    (`frames_per_object`); windows of references go to the stream's model worker. Files wait
    when too many windows are in flight (nothing skipped); live streams never wait (the worker
    keeps the newest). A heartbeat thread sends the stream's status every STATUS_INTERVAL_S,
    frames or not."""

    def __init__(self, stream: StreamConfig, config: PipelineConfig, worker_name: str, frame_size: int, job: str,
                 frames_counter: Counter, segment: Segment | None = None, plan: SamplePlan | None = None):
        # The worker goes by name, not handle: a handle argument would sit in the object store
        # and break restarts (ray#53727), and the driver may move the stream (retarget()).
        self.stream, self.config, self.worker_name, self.frame_size = stream, config, worker_name, frame_size
        self.job, self.segment, self.plan = job, segment, plan
        self.worker: Any = None
        self.stop_event = threading.Event()
        self.state = IngestState.STARTING  # until the source runs, and once it is over
        self.error: str | None = None
        self.error_at: float | None = None
        self.frames_in = 0
        self.reconnects = 0
        self.frames_corrupt = 0
        self.fps_in = RateMeter()
        self.live = bool(stream.live)
        self.windows_emitted = 0
        self.source = None
        self.source_running = False
        self.status_lock = threading.Lock()
        self.final_sent = False
        self.reports_sent: deque = deque(maxlen=PENDING_REPORTS)  # (sent at, ref)
        self.report_taken_at = time.time()  # when the worker last took a report
        self.redis: Any = None  # for the ingest's own status, while the worker takes none
        self.frames_counter = frames_counter
        self.metrics_label = stream_label(stream.id, self.live)
        self.thread = threading.Thread(target=self._ingest_and_finish, name=f"ingest-{stream.id}", daemon=True)
        self.thread.start()
        self.heartbeat = threading.Thread(target=self._heartbeat, name=f"status-{stream.id}", daemon=True)
        self.heartbeat.start()

    def _ingest_and_finish(self) -> None:
        try:
            self._ingest()
        except Exception as exc:  # keep the reason; the summary and status carry it
            self._set_error(f"{type(exc).__name__}: {exc}")
            self.state = IngestState.FAILED
            log.exception("ingest of %s crashed", self.stream.id)
        finally:
            self.source_running = False
            self._send_status(final=True)

    def summary(self) -> StreamSummary:
        return StreamSummary(stream=self.stream.id, state=str(self.state), live=self.live, frames_in=self.frames_in,
                             windows=self.windows_emitted, error=self.error)

    def retarget(self, worker_name: str) -> None:
        if worker_name != self.worker_name:
            self.worker_name = worker_name
            self.worker = ray.get_actor(worker_name)

    def _attach(self) -> int:
        """Wait until the assigned worker holds this stream; return the next window number.
        Run again in a restarted actor (max_restarts), live streams continue their window
        numbering, files start over and their already-published windows are recognised as
        duplicates by the publisher."""
        while not self.stop_event.is_set():
            name = self.worker_name
            try:
                worker = ray.get_actor(name)
                next_window = ray.get(worker.resume_point.remote(self.stream.id), timeout=ATTACH_TIMEOUT_S)
                if next_window is not None and name == self.worker_name:
                    self.worker, self.report_taken_at = worker, time.time()
                    return next_window
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                    ray.exceptions.ActorUnavailableError):
                pass  # worker gone or restarting: the driver re-adds or moves the stream
            time.sleep(RESUBMIT_WAIT_S)
        return 0

    def stop(self) -> None:
        self.stop_event.set()
        if self.source is not None:
            self.source.close()

    def _ingest(self) -> None:
        in_flight: deque = deque()
        first_window_seq = self._attach()
        if self.stop_event.is_set():  # stopped while waiting for a worker: never open the source
            self.state = IngestState.STOPPED
            return
        self.state = IngestState.CONNECTING
        try:
            # Files skip decoding frames that sampling never needs (see open_source).
            seek = self.segment.source_options(self.plan, self.config.stride) if self.segment else {}
            with open_source(self.stream.source, fps=self.config.fps, size=self.frame_size, live=self.stream.live,
                             retry_connect=True, skip_nonref=not self.stream.live, **seek) as source:
                self.source, self.source_running = source, True
                self.live = source.is_live
                windows = SlidingWindow(self.stream.id, self.config.window, self.config.stride, self.live,
                                        first_seq=first_window_seq if self.live else
                                        self.segment.first_seq() if self.segment else 0)
                settings = self.stream.gate
                gate = None
                if settings.enabled if settings.enabled is not None else self.live:
                    gate = StreamGate(settings.threshold, settings.refresh_every_n_windows, self.config.window)
                groups = FrameGroups(frames_per_object(self.config.window, self.config.stride),
                                     lambda images: ray.put(np.stack(images)))
                for frame in source:
                    if self.stop_event.is_set():
                        break
                    self.frames_in += 1
                    self.frames_counter.inc(tags={"stream": self.metrics_label})
                    if gate is not None:
                        gate.add_frame(frame.seq, frame.image)
                    if self._push(groups.add(frame.seq, frame.pts, frame.wall_time, frame.image), windows, gate,
                                  in_flight):
                        break
                if not self.stop_event.is_set() and not self.live and (
                        self.segment is None or self.segment.end_window is None):
                    self._push(groups.flush(), windows, gate, in_flight)  # the file's last, short group
                    tail = windows.finish()
                    if tail is not None:
                        self._submit(tail, in_flight)
                # The source is over; the status shows "live" until the file's windows are done.
                self.state, self.source_running = IngestState.LIVE, False
        except SourceError as exc:
            self.source_running = False
            self._set_error(str(exc))
            self.state = IngestState.FAILED
            log.error("stream %s failed: %s", self.stream.id, exc)
            return
        # Wait for the file's windows, so "ended" means "every window has its outcome".
        while in_flight and not self.live:
            self._wait_oldest(in_flight)
        self.state = IngestState.STOPPED if self.stop_event.is_set() else IngestState.ENDED

    def _push(self, refs: list, windows: SlidingWindow, gate: StreamGate | None, in_flight: deque) -> bool:
        """Push a stored group's frames; submit the windows they end. True once the segment's
        last window is sent."""
        for ref in refs:
            window = windows.push(ref)
            if window is not None:
                self._submit(gate.mark(window) if gate is not None else window, in_flight)
                if self.segment is not None and self.segment.ends_with(window.seq):
                    return True
        return False

    def _set_error(self, error: str) -> None:
        self.error, self.error_at = error, time.time()

    def _submit(self, window: Window, in_flight: deque) -> None:
        in_flight.append((window, self.worker.submit.remote(window)))
        self.windows_emitted += 1
        if not self.live:
            while len(in_flight) > self.config.file_windows_in_flight:  # backpressure: decoding waits
                self._wait_oldest(in_flight)
        else:
            while in_flight and ray.wait([in_flight[0][1]], timeout=0)[0]:
                in_flight.popleft()

    def _wait_oldest(self, in_flight: deque) -> None:
        """Wait for the oldest window of a file. If the worker died, restarted or was not
        ready (RETRY, REMOVED), or the driver moved the stream away from a worker that stopped
        answering, re-send it and every later window in order, so none is lost and Redis still
        gets them in order."""
        window, ref = in_flight[0]
        sent_to = self.worker
        while not self.stop_event.is_set():
            # Waited on in slices: an unreachable worker never answers, so only a move ends the wait.
            if ray.wait([ref], timeout=RESUBMIT_WAIT_S)[0]:
                try:
                    if ray.get(ref) in FINAL:
                        in_flight.popleft()
                        return
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    pass
                time.sleep(RESUBMIT_WAIT_S)
            elif self.worker is sent_to:
                continue  # its worker is still on it
            sent_to = self.worker
            resent = [(w, sent_to.submit.remote(w)) for w, _ in in_flight]
            in_flight.clear()
            in_flight.extend(resent)
            window, ref = in_flight[0]
        in_flight.popleft()

    def _heartbeat(self) -> None:
        while not self.final_sent:
            try:
                self._send_status()
            except Exception:  # keep beating: the next status may get through
                log.exception("status of %s not sent", self.stream.id)
            time.sleep(STATUS_INTERVAL_S)

    def _send_status(self, final: bool = False) -> None:
        """The ingest's side of the status, to the worker that publishes it with its counts. The
        final one is awaited, so a drain that saw run() return also sees it in Redis. While the
        worker takes none, the ingest writes its side to Redis itself."""
        with self.status_lock:
            if self.final_sent or self.worker is None:
                self.final_sent = final or self.final_sent
                return
            report = self._report(final)
            ref = self.worker.ingest_report.remote(self.stream.id, report)
            self.final_sent = final
            if not final:
                self._note_taken_reports()
                self.reports_sent.append((time.time(), ref))
                silent_s = time.time() - self.report_taken_at
                if silent_s > WORKER_SILENT_S:
                    self._write_own_status(report, silent_s)
        if final:
            try:
                ray.get(ref, timeout=FINAL_STATUS_TIMEOUT_S)
            except Exception as exc:  # the worker may be gone too; the summary still says it
                log.warning("final status of %s not published: %s", self.stream.id, exc)

    def _note_taken_reports(self) -> None:
        while self.reports_sent and ray.wait([self.reports_sent[0][1]], timeout=0)[0]:
            sent_at, ref = self.reports_sent.popleft()
            try:
                ray.get(ref, timeout=0)
            except Exception:  # the worker died with it: not taken
                continue
            self.report_taken_at = max(self.report_taken_at, sent_at)

    def _write_own_status(self, report: IngestReport, silent_s: float) -> None:
        """The report's fields over the status Redis holds: the counts stay the worker's last, the
        lag grows from its last processed window, and last_error says why captions wait."""
        error, error_at = report.last_error, report.last_error_at
        if report.state is IngestState.LIVE or error is None:
            error = (f"model worker {self.worker_name} has not answered for {silent_s:.0f} s (restarting?): "
                     f"captions wait until it is back")
            error_at = self.report_taken_at

        def own_side(held: StreamStatus) -> dict:
            # The latest processed window ended `lag_s` before the worker's last status.
            lag_s = max(0.0, time.time() - (held.updated_at - held.lag_s)) if report.live and held.lag_s else 0.0
            return dict(state=report.state, frames_in=report.frames_in, fps_in=report.fps_in, fps_out=0.0,
                        lag_s=lag_s, frames_corrupt=report.frames_corrupt, windows_emitted=report.windows_emitted,
                        reconnects=report.reconnects, last_error=error, last_error_at=error_at,
                        updated_at=time.time())

        try:
            if self.redis is None:
                self.redis = connect(self.config.redis_url, retries=0, socket_timeout=2.0, connect_timeout=2.0)
            patch_status(self.redis, self.stream.id, own_side)
        except UNREACHABLE as exc:  # Redis is down too: the status is stale until one of them is back
            log.debug("status of %s not written: %s", self.stream.id, exc)

    def _report(self, final: bool) -> IngestReport:
        source = self.source if self.source_running else None
        stats = source.stats if source is not None else None
        state = SOURCE_STATES[source.state] if source is not None else self.state
        self.reconnects = stats.reconnects if stats is not None else self.reconnects
        self.frames_corrupt = stats.corrupt_skipped if stats is not None else self.frames_corrupt
        error, error_at = self.error, self.error_at
        if stats is not None and state is not IngestState.LIVE and stats.last_error:
            error, error_at = stats.last_error, stats.last_error_at  # the source is down: say why
        return IngestReport(
            state=state, live=self.live, frames_in=self.frames_in, fps_in=self.fps_in.update(self.frames_in),
            frames_corrupt=self.frames_corrupt, windows_emitted=self.windows_emitted, reconnects=self.reconnects,
            last_error=error, last_error_at=error_at, final=final,
        )
