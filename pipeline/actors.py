"""Ray actors: one ingest actor per stream, one model worker per GPU (or one on CPU)."""

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

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import STATUS_INTERVAL_S, IngestState, Question, StreamStatus, SummaryKind, window_entry_id
from connectors.sources import SourceError, SourceState, open_source

from .config import PipelineConfig, StreamConfig
from .outputs import CaptionFiles
from .rates import RateMeter
from .scheduler import FINAL, Outcome, Policy, Resolution, Scheduler
from .summaries import MAX_PENDING_FACTOR, default_summary_every
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

    def __init__(self, stream: StreamConfig, config: PipelineConfig, worker_name: str, frame_size: int):
        # The worker goes by name, not handle: a handle argument would sit in the object store
        # and break restarts (ray#53727), and the driver may move the stream (retarget()).
        self.stream, self.config, self.worker_name, self.frame_size = stream, config, worker_name, frame_size
        self.worker: Any = None
        self.stop_event = threading.Event()
        self.state = IngestState.STARTING  # until the source runs, and once it is over
        self.error: str | None = None
        self.error_at: float | None = None
        self.frames_in = 0
        self.reconnects = 0
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

    async def run(self) -> dict:
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

    def summary(self) -> dict:
        return {"stream": self.stream.id, "state": str(self.state), "frames_in": self.frames_in,
                "windows": self.windows_emitted, "error": self.error, "live": self.live}

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
            with open_source(self.stream.source, fps=self.config.fps, size=self.frame_size,
                             live=self.stream.live, retry_connect=True, skip_nonref=not self.stream.live) as source:
                self.source, self.source_running = source, True
                self.live = source.is_live
                windows = SlidingWindow(self.stream.id, self.config.window, self.config.stride, self.live,
                                        first_seq=first_window_seq if self.live else 0)
                for frame in source:
                    if self.stop_event.is_set():
                        break
                    ref = ray.put(frame.image)
                    self.frames_in += 1
                    self.frames_counter.inc(tags={"stream": self.stream.id})
                    window = windows.push(FrameRef(frame.seq, frame.pts, frame.wall_time, ref))
                    if window is not None:
                        self._submit(window, in_flight)
                if not self.stop_event.is_set() and not self.live:
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
            status = self._status() | {"final": final}
            ref = self.worker.ingest_status.remote(self.stream.id, status)
            self.final_sent = final
        if final:
            try:
                ray.get(ref, timeout=FINAL_STATUS_TIMEOUT_S)
            except Exception as exc:  # the worker may be gone too; the summary still says it
                log.warning("final status of %s not published: %s", self.stream.id, exc)

    def _status(self) -> dict:
        source = self.source if self.source_running else None
        stats = source.stats if source is not None else None
        state = SOURCE_STATES[source.state] if source is not None else self.state
        self.reconnects = stats.reconnects if stats is not None else self.reconnects
        error, error_at = self.error, self.error_at
        if stats is not None and state is not IngestState.LIVE and stats.last_error:
            error, error_at = stats.last_error, stats.last_error_at  # the source is down: say why
        return {
            "state": str(state), "frames_in": self.frames_in, "fps_in": self.fps_in.update(self.frames_in),
            "windows_emitted": self.windows_emitted, "reconnects": self.reconnects,
            "last_error": error, "last_error_at": error_at, "live": self.live,
        }


def _fetch_frames(refs: list[FrameRef]) -> list:
    """The frames from the object store. A frame's owner is the ingest actor that put it: if
    that actor died, the frame is gone with it (ObjectLostError and its kin)."""
    try:
        return ray.get([f.ref for f in refs])
    except ray.exceptions.ObjectLostError as exc:
        raise FramesLost(f"frames gone with their ingest actor ({type(exc).__name__})") from exc


@ray.remote(max_restarts=-1, max_task_retries=0)
class ModelWorker:
    """Owns a SlowFastVLM and runs the scheduler's batches (pipeline/scheduler.py decides what
    runs and what becomes of each window; pipeline/processor.py does the model work)."""

    def __init__(self, config: PipelineConfig, model_path: str):
        import torch

        from model import SlowFastVLM

        from .processor import WindowProcessor

        self.config = config
        dtype = getattr(torch, config.dtype) if config.dtype else None
        self.vlm = SlowFastVLM.from_pretrained(
            model_path, device=config.device, dtype=dtype, encode_batch_size=config.encode_batch_size
        )
        # On CUDA: compile and capture now, so the first window does not wait for it.
        self.warm_up_s = self.vlm.warm_up(
            config.window, config.generation.max_new_tokens, config.batch_size, config.generation.decode_cross_attention
        )
        if self.warm_up_s:
            log.info("model worker warm-up (compile + CUDA graphs) took %.1f s", self.warm_up_s)
        model = config._test_model_wrapper(self.vlm) if config._test_model_wrapper else self.vlm
        self.publisher = Publisher(config.redis_url, history_len=config.history_len)
        self.processor = WindowProcessor(
            model, self.publisher, config.generation, config.batch_size,
            fetch_frames=_fetch_frames, model_name=Path(str(model_path)).name,
        )
        self.scheduler = Scheduler(config.batch_size)
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor (state lost)
        self.ingest: dict[str, dict] = {}
        self.fps_out: dict[str, RateMeter] = {}
        self.files_ended: deque[str] = deque()  # files whose final summary is still to write
        self.wakeup = asyncio.Event()
        self.lock = asyncio.Lock()
        self.loop_task: asyncio.Task | None = None
        tags = ("stream",)
        self.metrics = {
            Outcome.DONE: Counter("slowfast_windows_done", "windows captioned", tag_keys=tags),
            Outcome.SKIPPED: Counter("slowfast_windows_skipped", "stale live windows skipped", tag_keys=tags),
            Outcome.FAILED: Counter("slowfast_windows_failed", "windows the model failed on twice", tag_keys=tags),
        }
        self.latency = Histogram("slowfast_window_latency_s", "window closed -> result in Redis",
                                 boundaries=[0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32], tag_keys=tags)
        self.queue_depth = Gauge("slowfast_queue_depth", "windows waiting at the worker", tag_keys=tags)
        self.batch_windows = Histogram("slowfast_batch_windows", "windows per batched model call",
                                       boundaries=[1, 2, 4, 8, 16, 32])

    def frame_size(self) -> int:
        return self.config.size or self.vlm.config.image_size

    async def add_stream(self, stream: StreamConfig, run: int, live: bool, next_window: int = 0) -> None:
        """Take a stream; `next_window` > 0 when re-adding it after a restart (files append)."""
        files = None
        if not live:
            earlier = await asyncio.to_thread(self._run_captions, stream.id, run) if next_window else []
            files = CaptionFiles(Path(self.config.out_dir) / stream.id, 1.0 / self.config.fps, earlier)
        every = stream.summary_every_n_windows
        if every is None:
            every = default_summary_every(self.config.window, self.config.stride, self.config.fps)
        summaries = await asyncio.to_thread(self._earlier_summaries, stream.id, run, every) if every and next_window else ([], [])
        self.processor.add_stream(stream.model_copy(update={"live": live}), run, files, every, summaries)
        self.scheduler.add_lane(stream.id, Policy.NEWEST if live else Policy.ORDERED, next_window)
        self.fps_out[stream.id] = RateMeter()
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())

    def _run_captions(self, stream: str, run: int) -> list:
        """Every caption of this run of the stream that Redis holds, in window order."""
        with SlowFastClient(self.config.redis_url) as client:
            return [c for c in client.history(stream, since=f"{run - 1}-0", count=self.config.history_len)
                    if c.run == run]

    def _earlier_summaries(self, stream: str, run: int, every: int) -> tuple[list, list]:
        """A stream continuing its run (worker restart, resumed file): its rolling summaries so
        far and the captions after the last one, from Redis."""
        with SlowFastClient(self.config.redis_url) as client:
            done = [s for s in client.summaries(stream, count=self.config.history_len)
                    if s.run == run and s.kind == SummaryKind.ROLLING]
            after = window_entry_id(run, done[-1].last_window) if done else f"{run - 1}-0"
            since = [c for c in client.history(stream, since=after, count=MAX_PENDING_FACTOR * every + 16)
                     if c.run == run]
        return done, since

    async def remove_stream(self, stream: str) -> None:
        async with self.lock:
            self._resolve(self.scheduler.remove_lane(stream))
            self.processor.remove_stream(stream)
            self.ingest.pop(stream, None)
            self.fps_out.pop(stream, None)

    async def resume_point(self, stream: str) -> int | None:
        """For a (re)starting ingest actor: clear the stream's feature ring (frame numbering
        restarts with the source) and return the next window number to use."""
        state = self.processor.streams.get(stream)
        if state is None:
            return None  # not (yet, or no longer) this worker's stream
        state.ring.clear()
        state.last_frame_seq = None
        return self.scheduler.next_seq(stream)

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def health(self) -> tuple[str, int]:
        """(incarnation, streams): a new incarnation tells the driver to re-add its streams."""
        return self.incarnation, len(self.scheduler.lanes)

    async def load(self) -> int:
        return len(self.scheduler.lanes)

    async def submit(self, window: Window) -> Outcome:
        """Offer a window; resolves to its Outcome once decided."""
        future = asyncio.get_running_loop().create_future()
        self._resolve(self.scheduler.submit(window.stream, window.seq, window, future))
        self.queue_depth.set(self.scheduler.waiting(window.stream), tags={"stream": window.stream})
        self.wakeup.set()
        return await future

    async def ingest_status(self, stream: str, status: dict) -> None:
        """The ingest's side of the stream's status (its heartbeat); published with the worker's."""
        self.ingest[stream] = status
        if status["final"] and not status["live"] and status["state"] == IngestState.ENDED:
            self.files_ended.append(stream)  # every window is done: summarise the file
            self.wakeup.set()
        await asyncio.to_thread(self._publish_status, stream)

    async def answer(self, question: Question):
        async with self.lock:
            return await asyncio.to_thread(self.processor.answer, question)

    async def stats(self, drain: bool = False) -> dict[str, dict]:
        """Per stream: frames encoded (each once), feature-ring size, window outcomes, queued.
        With `drain`, first let every queued and running window finish (a clean stop)."""
        while drain and (not self.scheduler.idle or self.files_ended):
            await asyncio.sleep(0.05)
        stats = {}
        for sid, st in self.processor.streams.items():
            counts = self.scheduler.counts(sid)
            stats[sid] = {"frames_encoded": st.frames_encoded, "ring_size": len(st.ring),
                          "windows_done": counts.done, "windows_skipped": counts.skipped,
                          "windows_failed": counts.failed, "queued": self.scheduler.waiting(sid),
                          "summaries": len(st.summaries.done) if st.summaries else 0,
                          "summaries_skipped": st.summaries.skipped if st.summaries else 0}
        return stats

    async def flush_publisher(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the publisher's offline buffer to reach Redis (a clean
        stop after an outage); returns how many writes are still buffered."""
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self.publisher.flush) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        return self.publisher.buffered

    async def _loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while True:
                batch = self.scheduler.next_batch()
                if batch is None:  # no window waits: one step of a file's final summary, if any
                    if not self.files_ended:
                        break
                    if await self._final_summary_step(self.files_ended[0]):
                        self.files_ended.popleft()
                    continue
                error, lost = None, None
                async with self.lock:
                    try:
                        await asyncio.to_thread(self.processor.process, batch.payloads)
                    except FramesLost as exc:  # not the model's fault: the scheduler re-queues or drops it
                        lost = next(i for i in batch.items if i.payload is exc.window)
                        log.warning("window %d of %s: %s", lost.seq, lost.lane, exc)
                        error = str(exc)
                    except Exception as exc:  # one bad batch must not stop the worker: retried, then failed
                        log.exception("processing failed for windows %s",
                                      [(w.stream, w.seq) for w in batch.payloads])
                        error = f"{type(exc).__name__}: {exc}"
                if lost is not None:
                    resolutions = self.scheduler.frames_lost(batch, lost, error)
                else:
                    resolutions = self.scheduler.finished(batch, error)
                for resolution in resolutions:
                    if resolution.outcome is Outcome.FAILED:
                        await asyncio.to_thread(self.processor.publish_failure, resolution.item.payload,
                                                resolution.error)
                self._resolve(resolutions)
                self.batch_windows.observe(len(batch.items))
                for stream in {w.stream for w in batch.payloads}:
                    self.queue_depth.set(self.scheduler.waiting(stream), tags={"stream": stream})
                    await asyncio.to_thread(self._publish_status, stream)

    def _resolve(self, resolutions: list[Resolution]) -> None:
        for resolution in resolutions:
            window = resolution.item.payload if resolution.item else None
            metric = self.metrics.get(resolution.outcome)
            if metric is not None and window is not None:
                metric.inc(tags={"stream": window.stream})
                if resolution.outcome is Outcome.DONE:
                    self.latency.observe(time.time() - window.closed_at, tags={"stream": window.stream})
            if not resolution.token.done():
                resolution.token.set_result(resolution.outcome)

    async def _final_summary_step(self, stream: str) -> bool:
        """One model call towards a file's final summary (windows that arrive meanwhile go
        first); True when it is written, or failed."""
        async with self.lock:
            try:
                return await asyncio.to_thread(self.processor.final_summary_step, stream)
            except Exception:  # the captions are done; a failed summary must not stop the worker
                log.exception("final summary of %s failed", stream)
                return True

    def _publish_status(self, stream: str) -> None:
        state = self.processor.streams.get(stream)
        counts = self.scheduler.counts(stream)
        ingest = self.ingest.get(stream)
        if state is None or counts is None or ingest is None:
            return
        error, error_at = ingest["last_error"], ingest["last_error_at"]
        if error is None and counts.last_error is not None:
            error, error_at = counts.last_error, counts.last_error_at
        live = ingest["live"]
        self.publisher.publish_status(StreamStatus(
            stream=stream, state=IngestState(ingest["state"]), frames_in=ingest["frames_in"],
            fps_in=ingest["fps_in"], fps_out=self.fps_out[stream].update(state.frames_encoded),
            frames_dropped=state.frames_dropped, windows_emitted=ingest["windows_emitted"],
            windows_done=counts.done, windows_skipped=counts.skipped, windows_failed=counts.failed,
            reconnects=ingest["reconnects"], latency_s=state.latency_s, last_error=error, last_error_at=error_at,
            lag_s=max(0.0, time.time() - state.latest.wall_end) if state.latest and live else 0.0,
            summaries_skipped=state.summaries.skipped if state.summaries else 0,
        ))
