"""The model worker actor: one per GPU (or one on CPU); the ingest actors are in ingest.py.

A thin shell: the engine (pipeline/engine) does the work; here is what needs Ray: the object
store, actor names and restarts, futures and metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from connectors.publisher import Publisher
from connectors.redis_schema import IngestState, Question, StreamStatus

from .config import PipelineConfig, StreamConfig
from .engine.batch_rows import batch_row_counts
from .messages import IngestReport, StreamStats
from .metric_labels import stream_label
from .notify import Notifier
from .resume import EarlierOutputs, earlier_outputs, summary_every
from .scheduler import Outcome, Resolution
from .split import SegmentLanes
from .window import FrameRef, FramesLost, Window, frames_from_objects

log = logging.getLogger("slowfast.pipeline")


class StatusMetrics:
    """What an operator alerts on, read from each status the worker publishes (one source for
    both): the state as a 0/1 gauge per state, the status's running counts as counters (by
    how much each grew), and its present values as gauges. Files add to the counters only:
    their state and present values, one gauge for them all, would be whichever file wrote last."""

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

    def export(self, status: StreamStatus, live: bool) -> None:
        sid, label = status.stream, stream_label(status.stream, live)
        for name, counter in self.counters.items():
            value = getattr(status, name)
            grown = value - self.seen.get((sid, name), 0)
            if grown > 0:  # a smaller value is a count that started over (a restarted source)
                counter.inc(grown, tags={"stream": label})
            self.seen[sid, name] = value
        if not live:
            return
        for state in IngestState:
            self.state.set(1.0 if status.state == state else 0.0, tags={"stream": label, "state": str(state)})
        for name, gauge in self.gauges.items():
            gauge.set(getattr(status, name), tags={"stream": label})

    def forget(self, stream: str) -> None:
        for name in self.COUNTED:
            self.seen.pop((stream, name), None)


def _fetch_frames(refs: list[FrameRef]) -> list:
    """The frames from the object store. A frame's owner is the ingest actor that put it: if
    that actor died, the frame is gone with it (ObjectLostError and its kin)."""
    try:
        return frames_from_objects(refs, ray.get)
    except ray.exceptions.ObjectLostError as exc:
        raise FramesLost(f"frames gone with their ingest actor ({type(exc).__name__})") from exc


class ModelWorker:
    """Ray shell around an `Engine` (made an actor with MODEL_WORKER_OPTIONS; a subclass may
    override `load_model`): it loads the model, runs the engine's steps off the event loop,
    resolves the futures ingest actors await and exports the metrics."""

    def __init__(self, config: PipelineConfig, model_path: str):
        # The engine imports torch. Every process that holds a worker's handle (each ingest actor)
        # loads this module to make it, so only the worker itself imports the engine.
        from .engine import Engine

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
        self.status_lock = threading.Lock()
        self.step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self.question_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="question")

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
        self.status_metrics.forget(stream)

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
        self._export_queue_depth(window.stream)
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
        # Statuses are built and exported one at a time, in order: the export counts how much each
        # count grew since the status before, and two threads interleaved counted a growth twice
        # (or an older status, exported after a newer one, read as a count that started over).
        with self.status_lock:
            status = self.engine.publish_status(stream)
            if status is not None:
                self.status_metrics.export(status, self.engine.is_live(stream))

    async def answer(self, question: Question):
        # Its own threads: an answer may wait for the next batch, and must never hold a thread
        # the step loop or a status needs.
        return await asyncio.get_running_loop().run_in_executor(self.question_threads, self.engine.answer, question)

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
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while (step := await loop.run_in_executor(self.step_thread, self.engine.step)) is not None:
                await self.segment_lanes.ship()  # a segment's windows count as done once their merge has them
                self._resolve(step.resolutions)
                if step.windows:
                    self.batch_windows.observe(len(step.windows))
                for stream in step.streams:
                    self._export_queue_depth(stream)
                    await asyncio.to_thread(self._publish_status, stream)

    def _export_queue_depth(self, stream: str) -> None:
        # A gauge per live stream; files wait in order and their progress is in their status.
        if self.engine.is_live(stream):
            self.queue_depth.set(self.engine.scheduler.waiting(stream), tags={"stream": stream})

    def _resolve(self, resolutions: list[Resolution]) -> None:
        for resolution in resolutions:
            window = resolution.item.payload if resolution.item else None
            metric = self.outcomes.get(resolution.outcome)
            if metric is not None and window is not None:
                tags = {"stream": stream_label(window.stream, window.live)}
                metric.inc(tags=tags)
                if resolution.outcome is Outcome.DONE:
                    self.latency.observe(time.time() - window.closed_at, tags=tags)
            if not resolution.token.done():
                resolution.token.set_result(resolution.outcome)


MODEL_WORKER_OPTIONS = {"max_restarts": -1, "max_task_retries": 0}


def model_worker_actor(worker_class: type[ModelWorker] = ModelWorker):
    """The Ray actor class of a model worker (a subclass may load the model its own way)."""
    return ray.remote(**MODEL_WORKER_OPTIONS)(worker_class)
