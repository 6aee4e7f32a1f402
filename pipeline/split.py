"""The Ray side of a file split over the model workers (pipeline/segments.py has the logic).

- `plan_split`: the driver's choice, before a file stream starts: split it (a local file with
  a packet scan and enough windows for several segments, on more than one worker) or run it as
  one stream, as ever.
- `SplitFile`: the stream's actor (the driver holds it where a stream holds its ingest actor:
  run/stop/node_id). It starts each segment's lane at a worker and its ingest actor, moves
  segments off workers that die, re-adds them to workers that restart, receives their windows
  and publishes them in window order through the stream's one output processor, runs the
  rolling and final summaries on a worker, and publishes the stream's status.
- `SegmentLanes`: a model worker's side: its segment lanes' windows reach their merge before
  they count as done there, so a worker that dies loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import ray

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import STATUS_INTERVAL_S, IngestState
from connectors.sources import PLAN_MISMATCH, SamplePlan, scan_samples

from .config import PipelineConfig, StreamConfig
from .engine.output_processor import OutputProcessor, stream_files
from .ingest import IngestActor
from .messages import IngestReport, StreamStats, StreamSummary
from .notify import Notifier
from .progress import file_seconds
from .rates import RateMeter
from .resume import EarlierOutputs, earlier_outputs, summary_every
from .segments import Progress, Segment, SegmentOutbox, SegmentResult, SplitRun, plan_segments
from .window import expected_windows

log = logging.getLogger("slowfast.pipeline")
TICK_S = 0.2
WORKER_CHECK_S = 2.0
CALL_TIMEOUT_S = 5.0
DELIVERY_RETRY_S = 0.5
GONE = (ray.exceptions.ActorDiedError, ValueError)  # an actor killed for good, or a name no longer there
NOT_NOW = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, asyncio.TimeoutError)


def plan_split(stream: StreamConfig, live: bool, config: PipelineConfig, workers: int,
               next_window: int) -> tuple[SamplePlan, list[Segment]] | None:
    """The file's packet scan and segments when it is worth splitting over `workers`; None:
    it runs as one stream. A scene gate (which compares each window with the one before it)
    keeps a file whole."""
    if live or workers < 2 or stream.gate.enabled:
        return None
    seconds = file_seconds(stream.source)
    args = (config.window, config.stride, config.fps, config.split_min_s, workers, next_window)
    if seconds is None or not plan_segments(round(seconds * config.fps), *args):
        return None  # too short: not worth reading every packet to find out exactly
    plan = scan_samples(stream.source, config.fps)
    segments = plan_segments(plan.frames, *args) if plan is not None else []
    return (plan, segments) if segments else None


class SegmentLanes:
    """A model worker's segment lanes: lane -> the outbox of its windows and its merge's name.
    The worker's loop ships the outboxes after each step, before it resolves the step's
    windows as done."""

    def __init__(self) -> None:
        self.lanes: dict[str, tuple[SegmentOutbox, str]] = {}
        self.merges: dict[str, Any] = {}  # name -> handle
        self.shipping = False

    def __contains__(self, lane: str) -> bool:
        return lane in self.lanes

    @property
    def busy(self) -> bool:
        """Windows not at their merge yet."""
        return self.shipping or any(outbox.results for outbox, _ in self.lanes.values())

    def add(self, lane: str, stream: str, merge: str) -> SegmentOutbox:
        outbox = SegmentOutbox(stream, lane)
        self.lanes[lane] = (outbox, merge)
        return outbox

    def remove(self, lane: str) -> None:
        self.lanes.pop(lane, None)

    def of(self, stream: str, keep_tag: str) -> list[str]:
        """The stream's lanes of other incarnations of its merge than `keep_tag`'s."""
        return [lane for lane, (outbox, _) in self.lanes.items()
                if outbox.stream == stream and not lane.startswith(f"{stream}~{keep_tag}.")]

    async def _merge(self, name: str) -> Any:
        if name not in self.merges:
            self.merges[name] = await asyncio.to_thread(ray.get_actor, name)
        return self.merges[name]

    async def ship(self) -> None:
        """Send each outbox to its merge; waits while a merge restarts, drops what a merge gone
        for good would have had (its stream was stopped)."""
        self.shipping = True
        try:
            for lane, (outbox, name) in list(self.lanes.items()):
                results = outbox.take()
                while results:
                    try:
                        await (await self._merge(name)).deliver.remote(results)
                        break
                    except GONE:
                        log.warning("%d windows of %s dropped: its merge is gone", len(results), lane)
                        break
                    except NOT_NOW:
                        self.merges.pop(name, None)
                        await asyncio.sleep(DELIVERY_RETRY_S)
        finally:
            self.shipping = False

    async def report(self, lane: str, report: IngestReport, stats: StreamStats | None) -> None:
        """A segment ingest's heartbeat goes to its merge, with the lane's counts here."""
        _, name = self.lanes[lane]
        try:
            await (await self._merge(name)).segment_report.remote(lane, report, stats)
        except (*GONE, *NOT_NOW):
            self.merges.pop(name, None)


def _lane_config(stream: StreamConfig, lane: str) -> StreamConfig:
    return stream.model_copy(update={"id": lane, "live": False})


@ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=0)
class SplitFile:
    """One split file: its segments, their merge in window order, its outputs and status. A
    restart (Ray restarts it) starts again after the last window in Redis; the segment ingest
    actors it made die with the incarnation that made them."""

    def __init__(self, stream: StreamConfig, run: int, config: PipelineConfig, model_path: str, workers: int,
                 frame_size: int, plan: SamplePlan, ingest_options: dict[str, Any]):
        self.stream = stream.model_copy(update={"live": False})
        self.run_id, self.config, self.plan = run, config, plan
        self.frame_size, self.ingest_options = frame_size, ingest_options
        self.worker_names = [f"worker:{i}" for i in range(workers)]
        self.publisher = Publisher(config.redis_url, history_len=config.history_len)
        with SlowFastClient(config.redis_url) as client:
            latest = client.latest(stream.id)
        next_window = latest.window + 1 if latest is not None and latest.run == run else 0
        total = expected_windows(plan.frames, config.window, config.stride)
        segments = plan_segments(plan.frames, config.window, config.stride, config.fps, config.split_min_s, workers,
                                 next_window)
        if not segments and next_window < total:  # restarted near the end: the rest in one pass
            segments = [Segment(0, next_window, None, seek=False)]
        self.split = SplitRun(stream.id, segments, next_window, total, workers, run_tag=uuid.uuid4().hex[:8],
                              overlap_frames=config.window - config.stride)
        every = summary_every(stream, config)
        earlier = earlier_outputs(config, stream.id, run, False, every) if next_window else EarlierOutputs()
        files, summaries = stream_files(config, self.stream, run, every, earlier)
        self.notifier = Notifier(write_down=self.publisher.publish_undelivered)
        self.outputs = OutputProcessor(self.publisher, Path(str(model_path)).name, self._picture,
                                       on_event=self.notifier.event)
        self.outputs.add_stream(self.stream, run, files, summaries, earlier.open_events)
        self.pictures: dict[int, bytes | None] = {}
        self.to_publish: deque[SegmentResult] = deque()
        self.output_lock: asyncio.Lock | None = None
        self.ingests: dict[str, tuple[Any, asyncio.Future]] = {}  # lane -> (actor, its run())
        self.incarnations: dict[int, str] = {}
        self.unreachable_since: dict[int, float] = {}
        self.state = IngestState.STARTING
        self.stopping = False
        self.progress, self.fps_out = Progress(), RateMeter()
        self.task: asyncio.Task | None = None
        self.result: StreamSummary | None = None

    # ---- what the driver calls ---------------------------------------------------------------
    async def run(self) -> StreamSummary:
        """Until every segment is over and its windows published (or the stream stopped)."""
        if self.task is None:
            self.output_lock = asyncio.Lock()
            self.task = asyncio.get_running_loop().create_task(self._coordinate())
        await asyncio.shield(self.task)
        assert self.result is not None
        return self.result

    async def stop(self) -> None:
        self.stopping = True
        for lane in self.split.cancel_all():
            actor, _ = self.ingests.get(lane, (None, None))
            if actor is not None:
                actor.stop.remote(lane)

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # ---- what the workers call -----------------------------------------------------------------
    async def deliver(self, results: list[SegmentResult]) -> None:
        """Windows of the segment lanes: released in window order to a publishing task."""
        self.to_publish.extend(self.split.receive(results))
        if self.to_publish and self.output_lock is not None:
            asyncio.get_running_loop().create_task(self._publish())

    async def segment_report(self, lane: str, report: IngestReport, stats: StreamStats | None) -> None:
        self.split.report(lane, report, stats)

    # ---- the run -------------------------------------------------------------------------------
    async def _coordinate(self) -> None:
        await self._forget_lanes_of_earlier_incarnations()
        last_check = last_status = 0.0
        while not self.split.over:
            for lane, assignment in self.split.assign():
                await self._start(lane, assignment)
            await self._watch_ingests()
            if time.monotonic() - last_check >= WORKER_CHECK_S:
                last_check = time.monotonic()
                await self._check_workers()
            await self._rolling_summaries()
            if time.monotonic() - last_status >= STATUS_INTERVAL_S:
                last_status = time.monotonic()
                await self._publish_status()
            await asyncio.sleep(TICK_S)
        await self._finish()

    async def _start(self, lane: str, assignment) -> None:
        await self._add_lane(lane, assignment.worker)
        actor = IngestActor.options(name=f"ingest:{lane}", **self.ingest_options).remote(self.config, self.frame_size)
        self.ingests[lane] = (actor, self._run_lane(actor, lane))
        if self.stopping:  # stopped while it started
            actor.stop.remote(lane)
        self.state = IngestState.LIVE
        log.info("%s: segment %d (windows %d-%s) on model worker %d", self.stream.id, assignment.segment.index,
                 assignment.segment.first_window, assignment.segment.end_window or "end", assignment.worker)

    def _run_lane(self, actor: Any, lane: str) -> asyncio.Future:
        """The lane's run() call, to the worker its segment is on now (it may have moved)."""
        assignment = self.split.active[lane]
        return asyncio.ensure_future(actor.run.remote(
            _lane_config(self.stream, lane), self.worker_names[assignment.worker], lane, assignment.segment, self.plan))

    async def _add_lane(self, lane: str, worker: int) -> None:
        """(Re)add the lane at the worker, from its first window not received. A worker that
        cannot take it now gets it at the next check (or its segments move)."""
        try:
            handle = ray.get_actor(self.worker_names[worker])
            self.incarnations[worker] = await asyncio.wait_for(handle.add_segment.remote(
                _lane_config(self.stream, lane), self.run_id, self.split.resume_window(lane), self.stream.id,
                f"ingest:{self.stream.id}"), CALL_TIMEOUT_S)
        except (*GONE, *NOT_NOW) as exc:
            self.incarnations.pop(worker, None)
            log.warning("%s: lane %s not added at model worker %d yet: %s", self.stream.id, lane, worker, exc)

    async def _watch_ingests(self) -> None:
        for lane, (actor, done) in list(self.ingests.items()):
            if not done.done():
                continue
            try:
                summary: StreamSummary = done.result()
            except ray.exceptions.RayActorError:  # died mid-segment: Ray restarts it, run it there
                if lane in self.split.active:
                    self.ingests[lane] = (actor, self._run_lane(actor, lane))
                else:  # cancelled meanwhile (a stop): nothing left to run
                    await self._end_segment(lane, None)
                continue
            workers = {lane: a.worker for lane, a in self.split.active.items()}
            if summary.state == IngestState.FAILED:
                mismatch = PLAN_MISMATCH in (summary.error or "")
                if mismatch:
                    log.warning("%s: %s; the rest is read in one pass from the start of the file",
                                self.stream.id, summary.error)
                for cancelled in self.split.failed_segment(lane, summary.error or "failed", mismatch):
                    await self._end_segment(cancelled, workers.get(cancelled), stop=True)
            else:
                self.split.ended(lane)
            await self._end_segment(lane, workers.get(lane))

    async def _end_segment(self, lane: str, worker: int | None, stop: bool = False) -> None:
        """Its ingest actor goes (stopped first if it still runs), and its lane at the worker."""
        actor, _ = self.ingests.pop(lane, (None, None))
        if actor is not None:
            if stop:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(actor.stop.remote(lane), CALL_TIMEOUT_S)
            ray.kill(actor, no_restart=True)
        for index in ([worker] if worker is not None else range(len(self.worker_names))):
            with contextlib.suppress(*GONE, *NOT_NOW):
                await asyncio.wait_for(ray.get_actor(self.worker_names[index]).remove_stream.remote(lane),
                                       CALL_TIMEOUT_S)

    async def _check_workers(self) -> None:
        """Workers of running segments: a restarted one gets its lanes again, the segments of one
        that died for good (or stayed unreachable for worker_failover_s) move."""
        for index in sorted({a.worker for a in self.split.active.values()}):
            try:
                handle = ray.get_actor(self.worker_names[index])
                incarnation, _ = await asyncio.wait_for(handle.health.remote(), CALL_TIMEOUT_S)
            except GONE:
                await self._move_from(index, "died")
                continue
            except NOT_NOW:
                since = self.unreachable_since.setdefault(index, time.monotonic())
                if time.monotonic() - since >= self.config.worker_failover_s:
                    await self._move_from(index, f"unreachable for {self.config.worker_failover_s:.0f} s")
                continue
            self.unreachable_since.pop(index, None)
            if incarnation != self.incarnations.get(index):
                lanes = [lane for lane, a in self.split.active.items() if a.worker == index]
                for lane in lanes:
                    await self._add_lane(lane, index)
                log.warning("%s: model worker %d restarted; %d segments re-added", self.stream.id, index, len(lanes))

    async def _move_from(self, index: int, reason: str) -> None:
        for lane, assignment in self.split.worker_lost(index):
            await self._add_lane(lane, assignment.worker)
            actor, _ = self.ingests[lane]
            # An ingest dying meanwhile gets the new worker with its next run() call.
            with contextlib.suppress(*GONE, *NOT_NOW):
                await asyncio.wait_for(actor.retarget.remote(self.worker_names[assignment.worker], lane),
                                       CALL_TIMEOUT_S)
            log.warning("%s: segment %d moved from model worker %d (%s) to worker %d", self.stream.id,
                        assignment.segment.index, index, reason, assignment.worker)

    async def _forget_lanes_of_earlier_incarnations(self) -> None:
        for name in self.worker_names:
            with contextlib.suppress(*GONE, *NOT_NOW):
                await asyncio.wait_for(ray.get_actor(name).remove_segments.remote(self.stream.id, self.split.run_tag),
                                       CALL_TIMEOUT_S)

    # ---- outputs -------------------------------------------------------------------------------
    def _picture(self, window) -> bytes | None:
        return self.pictures.pop(window.seq, None)

    async def _publish(self) -> None:
        """Publish the released windows in order (whoever holds the lock publishes them all)."""
        async with self.output_lock:
            await asyncio.to_thread(self._publish_released)

    def _publish_released(self) -> None:
        while self.to_publish:
            result = self.to_publish.popleft()
            if result.error is not None:
                self.outputs.window_failed(result.window, result.error)
                continue
            self.pictures[result.window.seq] = result.picture
            self.outputs.window_done(result.replies())

    async def _ask(self, prompts: list[str]) -> list[str] | None:
        """Text-only prompts on a worker (the least busy of this file's that answers); None if none did."""
        busy = [a.worker for a in self.split.active.values()]
        for index in sorted(set(range(len(self.worker_names))) - self.split.dead, key=busy.count):
            try:
                handle = ray.get_actor(self.worker_names[index])
                return await handle.answer_texts.remote(prompts)
            except (*GONE, *NOT_NOW) as exc:
                log.warning("%s: summary not written on model worker %d: %s", self.stream.id, index, exc)
        return None

    async def _rolling_summaries(self) -> None:
        async with self.output_lock:
            tasks = await asyncio.to_thread(self.outputs.due_summaries, 1)
        if not tasks:
            return
        texts = await self._ask([t.prompt for t in tasks])
        async with self.output_lock:
            if texts is None:
                await asyncio.to_thread(self.outputs.summaries_abandoned, tasks)
            else:
                await asyncio.to_thread(self.outputs.summaries_done, tasks, texts)

    async def _final_summary(self) -> None:
        async with self.output_lock:
            await asyncio.to_thread(self.outputs.close_open_events, self.stream.id)
            while tasks := await asyncio.to_thread(self.outputs.final_summary_tasks, self.stream.id):
                texts = await self._ask([t.prompt for t in tasks])
                if texts is None:
                    log.error("final summary of %s not written: no model worker answered", self.stream.id)
                    return
                await asyncio.to_thread(self.outputs.final_summary_results, self.stream.id, tasks, texts)

    async def _publish_status(self) -> None:
        stats = [a.stats for a in [*self.split.finished, *self.split.active.values()] if a.stats is not None]
        fps_out = self.fps_out.update(sum(s.frames_encoded for s in stats))
        outputs = self.outputs.streams[self.stream.id]
        status = self.split.status(self.state, self.progress, outputs.latency_s, fps_out)
        await asyncio.to_thread(self.publisher.publish_status, status)

    async def _finish(self) -> None:
        self.split.valid.clear()  # a stop: windows still at the workers are not waited for (a resume makes them)
        await self._publish()
        if self.split.complete and not self.stopping:
            await self._final_summary()
            self.state = IngestState.ENDED
        elif self.stopping:
            self.state = IngestState.STOPPED
        else:
            self.state = IngestState.FAILED
            self.split.error = self.split.error or (
                f"windows from {self.split.release.next} on never arrived ({len(self.split.release.waiting)} "
                "later ones not published)")
        await self._publish_status()
        await asyncio.to_thread(self.notifier.close, CALL_TIMEOUT_S)
        status = self.split.status(self.state, self.progress, None, 0.0)  # the totals
        stats = [a.stats for a in self.split.finished if a.stats is not None]
        rolling = self.outputs.streams[self.stream.id].summaries
        self.result = StreamSummary(
            stream=self.stream.id, state=str(self.state), live=False, frames_in=status.frames_in,
            windows=status.windows_emitted, error=self.split.error if self.state is IngestState.FAILED else None,
            stats=StreamStats(frames_encoded=sum(s.frames_encoded for s in stats), windows_done=self.split.done,
                              windows_failed=self.split.failed, frames_dropped=status.frames_dropped,
                              summaries=len(rolling.done) if rolling else 0),
        )
        self.outputs.remove_stream(self.stream.id)
