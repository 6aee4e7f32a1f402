"""Ray actors: one ingest actor per stream, one model worker per GPU (or one on CPU).

Both are thin shells: the sources and the sliding windows (connectors/sources, window.py)
and the engine (pipeline/engine) do the work; here is what needs Ray: the object store,
actor names and restarts, futures and metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from connectors.publisher import Publisher
from connectors.redis_schema import STATUS_INTERVAL_S, IngestState, Question, StreamStatus
from connectors.sources import SamplePlan, SourceError, SourceState, open_source

from .config import PipelineConfig, StreamConfig
from .engine import EarlierOutputs, Engine
from .gate import StreamGate
from .engine.batch_rows import batch_row_counts
from .messages import IngestReport, StreamStats, StreamSummary
from .notify import Notifier
from .rates import RateMeter
from .resume import earlier_outputs, summary_every
from .scheduler import FINAL, Outcome, Resolution
from .segments import Segment
from .split import SegmentLanes
from .window import FrameRef, FramesLost, SlidingWindow, Window

log = logging.getLogger("slowfast.pipeline")
RESUBMIT_WAIT_S = 1.0
ATTACH_TIMEOUT_S = 5.0
FINAL_STATUS_TIMEOUT_S = 30.0
# While the source runs, the stream's state is the source's.
SOURCE_STATES = {SourceState.CONNECTING: IngestState.CONNECTING, SourceState.LIVE: IngestState.LIVE,
                 SourceState.RECONNECTING: IngestState.RECONNECTING, SourceState.ENDED: IngestState.LIVE,
                 SourceState.FAILED: IngestState.FAILED}


@ray.remote(max_restarts=-1, max_task_retries=0)
class IngestActor:
    """Runs one stream's source: each sampled frame goes to the object store once; windows
    of references go to the stream's model worker. Files wait when too many windows are in
    flight (nothing skipped); live streams never wait (the worker keeps the newest). A
    heartbeat thread sends the stream's status every STATUS_INTERVAL_S, frames or not."""

    def __init__(self, stream: StreamConfig, config: PipelineConfig, worker_name: str, frame_size: int,
                 segment: Segment | None = None, plan: SamplePlan | None = None):
        """`segment` (with the file's `plan`): the windows of one segment of a split file, from
        its first (the source seeks there) to its last, under the segment's lane id."""
        # The worker goes by name, not handle: a handle argument would sit in the object store
        # and break restarts (ray#53727), and the driver may move the stream (retarget()).
        self.stream, self.config, self.worker_name, self.frame_size = stream, config, worker_name, frame_size
        self.segment, self.plan = segment, plan
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
        self.frames_counter = Counter("slowfast_frames_in", "sampled frames ingested", tag_keys=("stream",))
        self.thread = threading.Thread(target=self._ingest_and_finish, name=f"ingest-{stream.id}", daemon=True)
        self.thread.start()
        self.heartbeat = threading.Thread(target=self._heartbeat, name=f"status-{stream.id}", daemon=True)
        self.heartbeat.start()

    async def run(self) -> StreamSummary:
        """Wait until the source ends, fails or stop() is called; returns a summary."""
        while self.thread.is_alive():
            await asyncio.sleep(0.2)
        return self.summary()

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

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def retarget(self, worker_name: str) -> None:
        """Send windows to another model worker from now on (the driver moved the stream)."""
        if worker_name != self.worker_name:
            self.worker_name = worker_name
            self.worker = await asyncio.to_thread(ray.get_actor, worker_name)

    def _attach(self) -> int:
        """Wait until the assigned worker holds this stream; return the next window number.
        A restarted actor (max_restarts) resumes by itself: live streams continue their
        window numbering, files start over and their already-published windows are
        recognised as duplicates by the publisher."""
        while not self.stop_event.is_set():
            name = self.worker_name
            try:
                worker = ray.get_actor(name)
                next_window = ray.get(worker.resume_point.remote(self.stream.id), timeout=ATTACH_TIMEOUT_S)
                if next_window is not None and name == self.worker_name:
                    self.worker = worker
                    return next_window
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                    ray.exceptions.ActorUnavailableError):
                pass  # worker gone or restarting: the driver re-adds or moves the stream
            time.sleep(RESUBMIT_WAIT_S)
        return 0

    async def stop(self) -> None:
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
                for frame in source:
                    if self.stop_event.is_set():
                        break
                    ref = ray.put(frame.image)
                    self.frames_in += 1
                    self.frames_counter.inc(tags={"stream": self.stream.id})
                    if gate is not None:
                        gate.add_frame(frame.seq, frame.image)
                    window = windows.push(FrameRef(frame.seq, frame.pts, frame.wall_time, ref))
                    if window is not None:
                        self._submit(gate.mark(window) if gate is not None else window, in_flight)
                        if self.segment is not None and self.segment.ends_with(window.seq):
                            break
                if not self.stop_event.is_set() and not self.live and (
                        self.segment is None or self.segment.end_window is None):
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
        ready (RETRY, REMOVED), re-send it and every later window in order, so none is lost
        and Redis still gets them in order."""
        window, ref = in_flight[0]
        while not self.stop_event.is_set():
            try:
                if ray.get(ref) in FINAL:
                    in_flight.popleft()
                    return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                pass
            time.sleep(RESUBMIT_WAIT_S)
            resent = [(w, self.worker.submit.remote(w)) for w, _ in in_flight]
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
        final one is awaited, so a drain that saw run() return also sees it in Redis."""
        with self.status_lock:
            if self.final_sent or self.worker is None:
                self.final_sent = final or self.final_sent
                return
            ref = self.worker.ingest_report.remote(self.stream.id, self._report(final))
            self.final_sent = final
        if final:
            try:
                ray.get(ref, timeout=FINAL_STATUS_TIMEOUT_S)
            except Exception as exc:  # the worker may be gone too; the summary still says it
                log.warning("final status of %s not published: %s", self.stream.id, exc)

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


class StatusMetrics:
    """What an operator alerts on, read from each status the worker publishes (one source for
    both): the state as a 0/1 gauge per state, the status's running counts as counters (by
    how much each grew), and its present values as gauges."""

    COUNTED = {
        "reconnects": "times the source reconnected",
        "windows_gated": "windows the scene gate published unchanged, without the model",
        "events_opened": "events the standing questions opened",
        "deliveries_failed": "event notifications given up on (written down in Redis)",
    }
    PRESENT = {
        "events_open": "events open now",
        "deliveries_pending": "event notifications waiting to be delivered or retried",
    }

    def __init__(self) -> None:
        tags = ("stream",)
        self.state = Gauge("slowfast_stream_state", "1 for the stream's current state, 0 for the others",
                           tag_keys=("stream", "state"))
        self.counters = {name: Counter(f"slowfast_{name}", text, tag_keys=tags) for name, text in self.COUNTED.items()}
        self.gauges = {name: Gauge(f"slowfast_{name}", text, tag_keys=tags) for name, text in self.PRESENT.items()}
        self.seen: dict[tuple[str, str], int] = {}  # (stream, count) -> its value in the last status

    def export(self, status: StreamStatus) -> None:
        sid = status.stream
        for state in IngestState:
            self.state.set(1.0 if status.state == state else 0.0, tags={"stream": sid, "state": str(state)})
        for name, counter in self.counters.items():
            value = getattr(status, name)
            grown = value - self.seen.get((sid, name), 0)
            if grown > 0:  # a smaller value is a count that started over (a restarted source)
                counter.inc(grown, tags={"stream": sid})
            self.seen[sid, name] = value
        for name, gauge in self.gauges.items():
            gauge.set(getattr(status, name), tags={"stream": sid})


def _fetch_frames(refs: list[FrameRef]) -> list:
    """The frames from the object store. A frame's owner is the ingest actor that put it: if
    that actor died, the frame is gone with it (ObjectLostError and its kin)."""
    try:
        return ray.get([f.ref for f in refs])
    except ray.exceptions.ObjectLostError as exc:
        raise FramesLost(f"frames gone with their ingest actor ({type(exc).__name__})") from exc


class ModelWorker:
    """Ray shell around an `Engine` (made an actor with MODEL_WORKER_OPTIONS; a subclass may
    override `load_model`): it loads the model, runs the engine's steps off the event loop,
    resolves the futures ingest actors await and exports the metrics."""

    def __init__(self, config: PipelineConfig, model_path: str):
        self.config = config
        vlm = self.load_model(config, model_path)
        self.frame_size_px = config.size or vlm.config.image_size
        self.publisher = Publisher(config.redis_url, history_len=config.history_len)
        self.notifier = Notifier(write_down=self.publisher.publish_undelivered)
        self.engine = Engine(config, vlm, self.publisher, _fetch_frames, model_name=Path(str(model_path)).name,
                             notifier=self.notifier)
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor (state lost)
        self.segment_lanes = SegmentLanes()
        self.wakeup = asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        tags = ("stream",)
        self.outcomes = {
            Outcome.DONE: Counter("slowfast_windows_done", "windows captioned", tag_keys=tags),
            Outcome.SKIPPED: Counter("slowfast_windows_skipped", "stale live windows skipped", tag_keys=tags),
            Outcome.FAILED: Counter("slowfast_windows_failed", "windows the model failed on twice", tag_keys=tags),
        }
        self.latency = Histogram("slowfast_window_latency_s", "window closed -> result in Redis",
                                 boundaries=[0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32], tag_keys=tags)
        self.queue_depth = Gauge("slowfast_queue_depth", "windows waiting at the worker", tag_keys=tags)
        self.batch_windows = Histogram("slowfast_batch_windows", "windows per batched model call",
                                       boundaries=[1, 2, 4, 8, 16, 32])
        self.status_metrics = StatusMetrics()

    @staticmethod
    def load_model(config: PipelineConfig, model_path: str):
        import torch

        from model import SlowFastVLM
        from model.compiled import use_compile_cache

        if config.compile_cache_dir is not None:
            try:
                use_compile_cache(config.compile_cache_dir)
            except (OSError, ValueError) as exc:  # a slower start, not a worker that cannot start
                log.warning("compile cache %s unusable, compiling without it: %s", config.compile_cache_dir, exc)
        dtype = getattr(torch, config.dtype) if config.dtype else None
        vlm = SlowFastVLM.from_pretrained(model_path, device=config.device, dtype=dtype,
                                          encode_batch_size=config.encode_batch_size,
                                          decode_attention=config.generation.decode_attention)
        # On CUDA: compile and capture now, so the first window does not wait for it.
        seconds = vlm.warm_up(config.window, config.generation.max_new_tokens, batch_row_counts(config),
                              config.generation.decode_cross_attention)
        if seconds:
            log.info("model worker warm-up (compile + CUDA graphs) took %.1f s", seconds)
        return vlm

    def frame_size(self) -> int:
        return self.frame_size_px

    async def add_stream(self, stream: StreamConfig, run: int, live: bool, next_window: int = 0) -> None:
        """Take a stream; `next_window` > 0 when re-adding it after a restart (files append)."""
        every = summary_every(stream, self.config)
        earlier = EarlierOutputs()
        if next_window:
            earlier = await asyncio.to_thread(earlier_outputs, self.config, stream.id, run, live, every)
        await asyncio.to_thread(self.engine.add_stream, stream, run, live, every, next_window, earlier)
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def add_segment(self, lane: StreamConfig, run: int, first_window: int, stream: str, merge: str) -> str:
        """Take a segment of split file `stream` as lane `lane.id` from `first_window` on; its
        windows go to actor `merge`. Returns the incarnation (a restart loses the lane)."""
        relay = self.segment_lanes.add(lane.id, stream, merge)
        await asyncio.to_thread(self.engine.add_stream, lane, run, False, 0, first_window, EarlierOutputs(), relay)
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())
        return self.incarnation

    async def remove_segments(self, stream: str, keep_tag: str) -> None:
        """Drop the stream's segment lanes that an earlier incarnation of its merge added."""
        for lane in self.segment_lanes.of(stream, keep_tag):
            await self.remove_stream(lane)

    async def remove_stream(self, stream: str) -> None:
        self._resolve(await asyncio.to_thread(self.engine.remove_stream, stream))
        self.segment_lanes.remove(stream)

    async def resume_point(self, stream: str) -> int | None:
        return self.engine.resume_point(stream)

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def health(self) -> tuple[str, int]:
        """(incarnation, streams): a new incarnation tells the driver to re-add its streams."""
        return self.incarnation, self.engine.stream_count

    async def load(self) -> int:
        return self.engine.stream_count

    async def submit(self, window: Window) -> Outcome:
        """Offer a window; resolves to its Outcome once decided."""
        future = asyncio.get_running_loop().create_future()
        self._resolve(self.engine.submit(window, future))
        self.queue_depth.set(self.engine.scheduler.waiting(window.stream), tags={"stream": window.stream})
        self.wakeup.set()
        return await future

    async def ingest_report(self, stream: str, report: IngestReport) -> None:
        """The ingest's side of the stream's status (its heartbeat); published with the engine's.
        A segment's goes to its merge instead."""
        if stream in self.segment_lanes:
            await self.segment_lanes.report(stream, report, self.engine.stats(stream))
            return
        self.engine.ingest_report(stream, report)
        self.wakeup.set()
        await asyncio.to_thread(self._publish_status, stream)

    def _publish_status(self, stream: str) -> None:
        status = self.engine.publish_status(stream)
        if status is not None:
            self.status_metrics.export(status)

    async def answer(self, question: Question):
        return await asyncio.to_thread(self.engine.answer, question)

    async def answer_texts(self, prompts: list[str]) -> list[str]:
        return await asyncio.to_thread(self.engine.answer_texts, prompts)

    async def stats(self, drain: bool = False) -> dict[str, StreamStats]:
        """Per stream counts. With `drain`, first let every queued and running window finish."""
        while drain and not (self.engine.idle and not self.segment_lanes.busy):
            await asyncio.sleep(0.05)
        return self.engine.all_stats()

    async def flush_publisher(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the publisher's offline buffer to reach Redis (a clean
        stop after an outage); returns how many writes are still buffered."""
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self.engine.flush) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        return self.publisher.buffered

    async def drain_notifications(self, timeout_s: float) -> int:
        """At the stop: deliver the event notifications still due within `timeout_s`, write down
        the rest (Redis, log); returns how many were written down."""
        return await asyncio.to_thread(self.notifier.close, timeout_s)

    async def _loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while (step := await asyncio.to_thread(self.engine.step)) is not None:
                await self.segment_lanes.ship()  # a segment's windows count as done once their merge has them
                self._resolve(step.resolutions)
                if step.windows:
                    self.batch_windows.observe(len(step.windows))
                for stream in step.streams:
                    self.queue_depth.set(self.engine.scheduler.waiting(stream), tags={"stream": stream})
                    await asyncio.to_thread(self._publish_status, stream)

    def _resolve(self, resolutions: list[Resolution]) -> None:
        for resolution in resolutions:
            window = resolution.item.payload if resolution.item else None
            metric = self.outcomes.get(resolution.outcome)
            if metric is not None and window is not None:
                metric.inc(tags={"stream": window.stream})
                if resolution.outcome is Outcome.DONE:
                    self.latency.observe(time.time() - window.closed_at, tags={"stream": window.stream})
            if not resolution.token.done():
                resolution.token.set_result(resolution.outcome)


MODEL_WORKER_OPTIONS = {"max_restarts": -1, "max_task_retries": 0}


def model_worker_actor(worker_class: type[ModelWorker] = ModelWorker):
    """The Ray actor class of a model worker (a subclass may load the model its own way)."""
    return ray.remote(**MODEL_WORKER_OPTIONS)(worker_class)
