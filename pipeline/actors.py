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

from connectors.publisher import Publisher
from connectors.redis_schema import IngestState, Question, StreamStatus
from connectors.sources import SourceError, open_source

from .config import PipelineConfig, StreamConfig
from .outputs import CaptionFiles
from .window import FrameRef, SlidingWindow, Window

log = logging.getLogger("slowfast.pipeline")
STATUS_INTERVAL_S = 1.0
RESUBMIT_WAIT_S = 1.0
ATTACH_TIMEOUT_S = 5.0


@ray.remote(max_restarts=-1, max_task_retries=0)
class IngestActor:
    """Runs one stream's source: each sampled frame goes to the object store once; windows
    of references go to the stream's model worker. Files wait when too many windows are in
    flight (nothing skipped); live streams never wait (the worker keeps the newest)."""

    def __init__(self, stream: StreamConfig, config: PipelineConfig, worker_name: str, frame_size: int):
        # The worker goes by name, not handle: a handle argument would sit in the object store
        # and break restarts (ray#53727), and the driver may move the stream (retarget()).
        self.stream, self.config, self.worker_name, self.frame_size = stream, config, worker_name, frame_size
        self.worker: Any = None
        self.stop_event = threading.Event()
        self.state = IngestState.STARTING
        self.error: str | None = None
        self.frames_in = 0
        self.reconnects = 0
        self.live = bool(stream.live)
        self.windows_emitted = 0
        self.done = False
        self.frames_counter = Counter("slowfast_frames_in", "sampled frames ingested", tag_keys=("stream",))
        self.source = None
        self.thread = threading.Thread(target=self._ingest_and_finish, name=f"ingest-{stream.id}", daemon=True)
        self.thread.start()

    async def run(self) -> dict:
        """Wait until the source ends, fails or stop() is called; returns a summary."""
        while self.thread.is_alive():
            await asyncio.sleep(0.2)
        return self.summary()

    def _ingest_and_finish(self) -> None:
        try:
            self._ingest()
        except Exception as exc:  # keep the reason; the summary and status carry it
            self.state, self.error = IngestState.FAILED, f"{type(exc).__name__}: {exc}"
            log.exception("ingest of %s crashed", self.stream.id)
        finally:
            self.done = True

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
        last_status = 0.0
        first_window_seq = self._attach()
        if self.stop_event.is_set():  # stopped while waiting for a worker: never open the source
            self.state = IngestState.STOPPED
            return
        try:
            with open_source(self.stream.source, fps=self.config.fps, size=self.frame_size,
                             live=self.stream.live, retry_connect=True) as source:
                self.source = source
                self.live = source.is_live
                windows = SlidingWindow(self.stream.id, self.config.window, self.config.stride, self.live,
                                        first_seq=first_window_seq if self.live else 0)
                for frame in source:
                    if self.stop_event.is_set():
                        break
                    self.state = IngestState(str(source.state))
                    ref = ray.put(frame.image)
                    self.frames_in += 1
                    self.frames_counter.inc(tags={"stream": self.stream.id})
                    window = windows.push(FrameRef(frame.seq, frame.pts, frame.wall_time, ref))
                    if window is not None:
                        self._submit(window, in_flight)
                    now = time.time()
                    if now - last_status >= STATUS_INTERVAL_S:
                        last_status = now
                        self.reconnects = source.stats.reconnects
                        self.worker.ingest_status.remote(self.stream.id, self._status(source))
                if not self.stop_event.is_set() and not self.live:
                    tail = windows.finish()
                    if tail is not None:
                        self._submit(tail, in_flight)
                self.state = IngestState.STOPPED if self.stop_event.is_set() else IngestState.ENDED
                self.error = source.stats.last_error
        except SourceError as exc:
            self.state, self.error = IngestState.FAILED, str(exc)
            log.error("stream %s failed: %s", self.stream.id, exc)
        # Wait for the file's windows, so "ended" means "every window captioned".
        while in_flight and not self.live:
            self._wait_oldest(in_flight)
        if self.worker is None:  # stopped before a worker took the stream
            return
        try:  # the final status is published before run() returns, so a drain sees it
            ray.get(self.worker.ingest_status.remote(self.stream.id, self._status(None, final=True)), timeout=30)
        except Exception as exc:  # the worker may be gone too; the summary still says it
            log.warning("final status of %s not published: %s", self.stream.id, exc)

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
        ready ("retry"), re-send it and every later window in order, so none is lost and
        Redis still gets them in order."""
        window, ref = in_flight[0]
        while not self.stop_event.is_set():
            try:
                if ray.get(ref) in ("done", "skipped"):
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

    def _status(self, source, final: bool = False) -> dict:
        stats = source.stats if source is not None else None
        return {
            "state": str(self.state), "frames_in": self.frames_in, "reconnects": self.reconnects,
            "last_error": self.error or (stats.last_error if stats else None), "final": final,
            "live": self.live, "time": time.time(),
        }


@ray.remote(max_restarts=-1, max_task_retries=0)
class ModelWorker:
    """Owns a SlowFastVLM; batches the due tasks of all its streams' windows."""

    def __init__(self, config: PipelineConfig, model_path: str):
        import torch

        from model import SlowFastVLM

        from .processor import WindowProcessor

        self.config = config
        dtype = getattr(torch, config.dtype) if config.dtype else None
        self.vlm = SlowFastVLM.from_pretrained(model_path, device=config.device, dtype=dtype)
        self.publisher = Publisher(config.redis_url, history_len=config.history_len)
        self.processor = WindowProcessor(
            self.vlm, self.publisher, config.generation, config.batch_size,
            fetch_frames=lambda refs: ray.get([f.ref for f in refs]), model_name=Path(str(model_path)).name,
        )
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor (state lost)
        self.queues: dict[str, deque[tuple[Window, asyncio.Future]]] = {}
        self.ingest: dict[str, dict] = {}
        self.wakeup = asyncio.Event()
        self.batch_running = False
        self.lock = asyncio.Lock()
        self.loop_task: asyncio.Task | None = None
        self.windows_done = Counter("slowfast_windows_done", "windows captioned", tag_keys=("stream",))
        self.windows_skipped = Counter("slowfast_windows_skipped", "stale live windows skipped", tag_keys=("stream",))
        self.latency = Histogram("slowfast_window_latency_s", "window closed -> result in Redis",
                                 boundaries=[0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32], tag_keys=("stream",))
        self.queue_depth = Gauge("slowfast_queue_depth", "windows waiting at the worker", tag_keys=("stream",))
        self.batch_windows = Histogram("slowfast_batch_windows", "windows per batched model call",
                                       boundaries=[1, 2, 4, 8, 16, 32])

    def frame_size(self) -> int:
        return self.config.size or self.vlm.config.image_size

    async def add_stream(self, stream: StreamConfig, run: int, live: bool, next_window: int = 0) -> None:
        """Take a stream; `next_window` > 0 when re-adding it after a restart (files append)."""
        files = None
        if not live:
            files = CaptionFiles(Path(self.config.out_dir) / stream.id, 1.0 / self.config.fps, append=next_window > 0)
        self.processor.add_stream(stream, run, files)
        self.processor.streams[stream.id].next_window_seq = next_window
        self.queues[stream.id] = deque()
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def remove_stream(self, stream: str) -> None:
        async with self.lock:
            for window, future in self.queues.pop(stream, deque()):
                future.set_result("removed")
            self.processor.remove_stream(stream)
            self.ingest.pop(stream, None)

    async def resume_point(self, stream: str) -> int | None:
        """For a (re)starting ingest actor: clear the stream's feature ring (frame numbering
        restarts with the source) and return the next window number to use."""
        state = self.processor.streams.get(stream)
        if state is None:
            return None  # not (yet, or no longer) this worker's stream
        state.ring.clear()
        return state.next_window_seq

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def health(self) -> tuple[str, int]:
        """(incarnation, streams): a new incarnation tells the driver to re-add its streams."""
        return self.incarnation, len(self.queues)

    async def load(self) -> int:
        return len(self.queues)

    async def submit(self, window: Window) -> str:
        """Queue a window; resolves to "done" or "skipped" (live windows overtaken by a newer one)."""
        queue = self.queues.get(window.stream)
        if queue is None:
            return "removed"
        state = self.processor.streams[window.stream]
        if not window.live:
            # Files are captioned in order, exactly once: an already accepted window is done,
            # one beyond the next expected (a gap after a restart) must be re-sent in order.
            if window.seq < state.next_window_seq:
                return "done"
            if window.seq > state.next_window_seq:
                return "retry"
        future = asyncio.get_running_loop().create_future()
        state.next_window_seq = max(state.next_window_seq, window.seq + 1)
        if window.live:
            while queue:  # newest wins: an older window that was not started is skipped
                stale, stale_future = queue.popleft()
                state.windows_skipped += 1
                self.windows_skipped.inc(tags={"stream": window.stream})
                stale_future.set_result("skipped")
        queue.append((window, future))
        self.queue_depth.set(len(queue), tags={"stream": window.stream})
        self.wakeup.set()
        return await future

    async def ingest_status(self, stream: str, status: dict) -> None:
        self.ingest[stream] = status
        await asyncio.to_thread(self._publish_status, stream)

    async def answer(self, question: Question):
        async with self.lock:
            return await asyncio.to_thread(self.processor.answer, question)

    async def stats(self, drain: bool = False) -> dict[str, dict]:
        """Per stream: frames encoded (each once), feature-ring size, windows done/skipped/queued.
        With `drain`, first let every queued and running window finish (a clean stop)."""
        while drain and (self.batch_running or any(self.queues.values())):
            await asyncio.sleep(0.05)
        return {
            sid: {"frames_encoded": st.frames_encoded, "ring_size": len(st.ring), "windows_done": st.windows_done,
                  "windows_skipped": st.windows_skipped, "queued": len(self.queues.get(sid, ()))}
            for sid, st in self.processor.streams.items()
        }

    async def _loop(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while any(self.queues.values()):
                batch = self._take_batch()
                self.batch_running = True
                async with self.lock:
                    try:
                        await asyncio.to_thread(self.processor.process, [w for w, _ in batch])
                        outcome = "done"
                    except Exception as exc:  # one bad batch must not stop the worker
                        log.exception("processing failed for %s", [w.stream for w, _ in batch])
                        outcome = f"error: {exc}"
                for window, future in batch:
                    self.windows_done.inc(tags={"stream": window.stream})
                    self.latency.observe(time.time() - window.closed_at, tags={"stream": window.stream})
                    if not future.done():
                        future.set_result(outcome)
                    await asyncio.to_thread(self._publish_status, window.stream)
                self.batch_windows.observe(len(batch))
                self.batch_running = False

    def _take_batch(self) -> list[tuple[Window, asyncio.Future]]:
        """Round-robin over streams so one busy file cannot starve the cameras."""
        batch: list[tuple[Window, asyncio.Future]] = []
        while len(batch) < self.config.batch_size and any(self.queues.values()):
            for queue in self.queues.values():
                if queue and len(batch) < self.config.batch_size:
                    batch.append(queue.popleft())
        for stream, queue in self.queues.items():
            self.queue_depth.set(len(queue), tags={"stream": stream})
        return batch

    def _publish_status(self, stream: str) -> None:
        state = self.processor.streams.get(stream)
        ingest = self.ingest.get(stream)
        if state is None or ingest is None:
            return
        frames = ingest["frames_in"]
        self.publisher.publish_status(StreamStatus(
            stream=stream, state=IngestState(ingest["state"]), frames_in=frames,
            windows_done=state.windows_done, windows_skipped=state.windows_skipped,
            reconnects=ingest["reconnects"], latency_s=state.latency_s, last_error=ingest["last_error"],
            lag_s=max(0.0, time.time() - state.latest.wall_end) if state.latest and ingest["live"] else 0.0,
        ))
