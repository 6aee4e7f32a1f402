"""The running pipeline: streams, their ingest actors and the model workers of one run."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorAlreadyExistsError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import IngestState, StreamInfo, StreamStatus

from .actors import ModelWorker, model_worker_actor
from .config import MAX_NOTIFY_TIMEOUT_S, ConfigError, PipelineConfig, StreamConfig
from .ingest import IngestActor
from .messages import StreamSummary
from .ray_session import actor_exists, results_within
from .resume import resume_point, window_settings
from .segments import describe
from .split import SplitFile, plan_split

log = logging.getLogger("slowfast.pipeline")
WORKER_HEALTH_TIMEOUT_S = 5.0
ACTOR_EXIT_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 60.0
DRAIN_FLUSH_S = 10.0  # at a stop, how long workers wait for an unreachable Redis to take their buffer
DRAIN_NOTIFY_S = 5.0  # at a stop, how long workers keep trying event notifications still due
PLACEMENT_WARN_S = 15.0
# A file's ingest actor, once the file is over, waits for the next file instead of being killed
# (see IngestActor). One waits at most: its ingest_cpus stay reserved while it waits.
IDLE_FILE_INGESTS = 1


@dataclass
class StreamHandle:
    config: StreamConfig
    run: int
    live: bool
    worker_index: int
    ingest: Any
    ingest_name: str
    job: str  # this run of the stream on its ingest actor (files take turns on one)
    done_ref: Any
    placed_ref: Any  # resolves once Ray has placed the ingest actor
    added_at: float = field(default_factory=time.monotonic)
    unplaced_reported: bool = False
    summary: StreamSummary | None = None  # once its ingest is over
    split: bool = False  # a file split over the workers: its SplitFile actor minds its workers


class Pipeline:
    """Streams, their ingest actors and the model workers of one run: started, watched
    (restarts, moves, placement), drained and shut down."""

    def __init__(self, config: PipelineConfig, model_path: str, worker_class: type[ModelWorker] = ModelWorker):
        self.config, self.model_path = config, model_path
        self.worker_actor = model_worker_actor(worker_class)
        self.streams: dict[str, StreamHandle] = {}
        self.workers: list[Any] = []
        self.failed: dict[str, StreamSummary] = {}  # streams that could not start
        self.incarnations: dict[int, str] = {}
        self.unreachable_since: dict[int, float] = {}  # worker index -> monotonic time
        self.dead: set[int] = set()  # workers that died for good
        self.started_ms = int(time.time() * 1000)  # this run's id in the registry
        self.frame_size = 0
        self.idle_file_ingests: list[tuple[Any, str]] = []  # (actor, name): the next file runs there
        self.file_ingests_made = 0
        self.publisher = Publisher(config.redis_url, history_len=config.history_len)
        self.client = SlowFastClient(config.redis_url)

    def start_workers(self) -> None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = self.config.workers or max(1, gpus)
        options = {"num_gpus": 1} if gpus else {"num_cpus": self.config.worker_cpus}
        options["resources"] = dict(self.config.worker_resources)
        self.workers = []
        try:
            for i in range(count):
                self.workers.append(self.worker_actor.options(name=f"worker:{i}", **options).remote(self.config, self.model_path))
        except ActorAlreadyExistsError:
            # Actor names are per namespace: a second run there would steer the first one's actors.
            for worker in self.workers:
                ray.kill(worker, no_restart=True)
            raise ConfigError(
                f"another slowfast run is using Ray namespace {self.config.ray_namespace!r} (its model worker "
                "exists): stop that run, or give this one its own ray_namespace (SLOWFAST_RAY_NAMESPACE)") from None
        self.frame_size = ray.get(self.workers[0].frame_size.remote())
        self.check_workers()
        for sid in self.publisher.prune_registry():
            log.info("stream %s of an earlier run left the registry (its keys expired)", sid)

    def ingest_options(self) -> dict[str, Any]:
        """Ingest actors are light (decode threads); with `ingest_node_resource` they prefer
        the nodes that have it, softly, so they still run (or restart) elsewhere."""
        options: dict[str, Any] = {"num_cpus": self.config.ingest_cpus}
        wanted = self.config.ingest_node_resource
        if wanted:
            nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(wanted, 0) > 0)
            if nodes:
                node = nodes[len(self.streams) % len(nodes)]
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        return options

    def check_workers(self) -> list[str]:
        """Re-add streams to a worker that Ray restarted (a restart loses its state); move the
        streams of a worker that died for good, or stayed unreachable for `worker_failover_s`,
        to the others."""
        messages = []
        for index, worker in enumerate(self.workers):
            if index in self.dead:
                continue
            try:
                incarnation, _ = ray.get(worker.health.remote(), timeout=WORKER_HEALTH_TIMEOUT_S)
            except ray.exceptions.ActorDiedError:
                self.dead.add(index)
                messages += self.move_streams(index, "died")
                continue
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
                since = self.unreachable_since.setdefault(index, time.monotonic())
                if time.monotonic() - since >= self.config.worker_failover_s:
                    messages += self.move_streams(index, f"unreachable for {self.config.worker_failover_s:.0f} s")
                continue  # restarting: look again next round
            self.unreachable_since.pop(index, None)
            if self.incarnations.get(index) not in (None, incarnation):
                its_streams = [h for h in self.streams.values() if h.worker_index == index and not h.split]
                for handle in its_streams:
                    self.attach(handle, index)
                log.warning("model worker %d restarted; %d streams re-added", index, len(its_streams))
            self.incarnations[index] = incarnation
        return messages

    def attach(self, handle: StreamHandle, index: int) -> None:
        """Give a running stream to worker `index`, continuing its window numbering."""
        latest = self.client.latest(handle.config.id)
        next_window = latest.window + 1 if latest is not None and latest.run == handle.run else 0
        ray.get(self.workers[index].add_stream.remote(handle.config, handle.run, handle.live, next_window))

    def move_streams(self, index: int, reason: str) -> list[str]:
        messages = []
        for sid, handle in self.streams.items():
            if handle.worker_index != index or handle.split:
                continue
            target = self.least_loaded_worker()
            if target is None:
                return [f"model worker {index} {reason} and no other worker is reachable; its streams wait"]
            self.attach(handle, target)
            handle.worker_index = target  # a restarted ingest actor gets it with its next run() call
            ray.get(handle.ingest.retarget.remote(f"worker:{target}", handle.job))
            messages.append(f"stream {sid} moved from model worker {index} ({reason}) to worker {target}")
            log.warning(messages[-1])
        return messages

    def check_placement(self) -> list[str]:
        """Streams whose ingest actor Ray has not placed for a while (the cluster lacks the CPUs):
        say so once, in the log and the stream's status, instead of waiting silently."""
        messages = []
        for sid, handle in self.streams.items():
            if handle.unplaced_reported or time.monotonic() - handle.added_at < PLACEMENT_WARN_S:
                continue
            if ray.wait([handle.placed_ref], timeout=0)[0]:
                continue
            handle.unplaced_reported = True
            reason = (f"ingest actor not placed after {PLACEMENT_WARN_S:.0f} s: the Ray cluster has no free "
                      f"num_cpus={self.config.ingest_cpus} (lower ingest_cpus or add nodes)")
            self.publisher.publish_status(StreamStatus(stream=sid, state=IngestState.STARTING, last_error=reason))
            log.warning("stream %s: %s", sid, reason)
            messages.append(f"stream {sid}: {reason}")
        return messages

    def least_loaded_worker(self) -> int | None:
        """Index of the reachable worker with the fewest streams (None if none is reachable)."""
        candidates = [i for i in range(len(self.workers)) if i not in self.dead and i not in self.unreachable_since]
        loads = {}
        for index in candidates:
            with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                                     ray.exceptions.ActorUnavailableError):
                loads[index] = ray.get(self.workers[index].load.remote(), timeout=WORKER_HEALTH_TIMEOUT_S)
        return min(loads, key=loads.get) if loads else None

    def add_stream(self, stream: StreamConfig) -> str | None:
        """Start a stream; returns a line for the user when a file resumes an earlier run."""
        if stream.id in self.streams:
            raise ValueError(f"stream {stream.id!r} is already running")
        live = stream.is_live()
        resume = resume_point(self.client, stream, live, self.config)  # ResumeRefused: this stream fails
        info = self.publisher.register_stream(StreamInfo(
            id=stream.id, source=stream.source, live=live, config=stream.model_dump(mode="json"),
            pipeline=self.started_ms, run=resume.run if resume else 0, window_settings=window_settings(self.config),
        ))
        next_window = resume.next_window if resume else 0
        split = plan_split(stream, live, self.config, len(self.workers) - len(self.dead), next_window)
        if split is not None:  # its actor stands where an ingest actor stands, under the same name
            plan, segments = split
            index, lines = 0, [describe(stream.id, segments, len(self.workers) - len(self.dead))]
            ingest = SplitFile.options(name=f"ingest:{stream.id}").remote(
                stream, info.run, self.config, self.model_path, len(self.workers), self.frame_size, plan,
                self.ingest_options())
        else:
            index, lines = self.least_loaded_worker(), []
            if index is None:
                raise RuntimeError("no model worker is reachable")
            ray.get(self.workers[index].add_stream.remote(stream, info.run, live, next_window))
        stream = stream.model_copy(update={"live": live})
        if split is not None:
            ingest_name = f"ingest:{stream.id}"
        elif not live and self.idle_file_ingests:
            ingest, ingest_name = self.idle_file_ingests.pop()
        else:
            if live:
                ingest_name = f"ingest:{stream.id}"
            else:
                ingest_name = f"ingest:files-{self.file_ingests_made}"
                self.file_ingests_made += 1
            ingest = IngestActor.options(name=ingest_name, **self.ingest_options()).remote(self.config, self.frame_size)
        handle = StreamHandle(stream, info.run, live, index, ingest, ingest_name, job=uuid.uuid4().hex, done_ref=None,
                              placed_ref=ingest.node_id.remote(), split=split is not None)
        handle.done_ref = self.run_ingest(handle)
        self.streams[stream.id] = handle
        log.info("stream %s added (%s)", stream.id, "live" if live else "file")
        if resume:
            lines.insert(0, f"stream {stream.id} resumes after window {resume.next_window - 1}")
        return "; ".join(lines) or None

    def stop_ingest(self, handle: StreamHandle) -> Any:
        """The ingest's stop() call, for the stream's job only (its actor may run the next file)."""
        return handle.ingest.stop.remote(None if handle.split else handle.job)

    def run_ingest(self, handle: StreamHandle) -> Any:
        """The ingest's run() call: it starts the stream's job, waits on it where it runs, and
        starts it again in an actor that Ray restarted."""
        if handle.split:
            return handle.ingest.run.remote()
        return handle.ingest.run.remote(handle.config, f"worker:{handle.worker_index}", handle.job)

    def report_failure(self, stream_id: str, exc: Exception) -> None:
        self.failed[stream_id] = StreamSummary(stream=stream_id, state="failed", error=str(exc))
        self.publisher.publish_status(StreamStatus(stream=stream_id, state=IngestState.FAILED, last_error=str(exc)))

    def shutdown(self) -> None:
        """Kill this run's actors and wait until their names are free for the next run."""
        ingests = [(h.ingest, h.ingest_name) for h in self.streams.values()] + self.idle_file_ingests
        for actor in [a for a, _ in ingests] + self.workers:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        names = [n for _, n in ingests] + [f"worker:{i}" for i in range(len(self.workers))]
        deadline = time.monotonic() + ACTOR_EXIT_TIMEOUT_S
        while names and time.monotonic() < deadline:
            names = [n for n in names if actor_exists(n)]
            time.sleep(0.1)

    def remove_stream(self, stream_id: str) -> None:
        handle = self.streams.pop(stream_id, None)
        if handle is None:
            raise ValueError(f"stream {stream_id!r} is not running")
        if handle.summary is None:  # still running (a finished stream's actor is gone, or runs the next file)
            ray.get(self.stop_ingest(handle))
            with contextlib.suppress(Exception):
                ray.get(handle.done_ref, timeout=30)
            ray.kill(handle.ingest, no_restart=True)
        ray.get(self.workers[handle.worker_index].remove_stream.remote(stream_id))
        self.publisher.unregister_stream(stream_id)

    def finished_streams(self) -> list[str]:
        """Streams whose ingest ended or failed since the last call. Each one's ingest actor is
        killed at once, so its CPUs go to the next stream, or for a file waits for the next file;
        its final status, published before run() returned, stays in Redis, and the worker keeps
        its counts for the summary."""
        finished = []
        for sid, handle in self.streams.items():
            if handle.summary is not None:
                continue
            ready, _ = ray.wait([handle.done_ref], timeout=0)
            if ready:
                try:
                    handle.summary = ray.get(handle.done_ref)
                except ray.exceptions.RayActorError:  # died mid-run: Ray restarts it, run it there
                    handle.done_ref = self.run_ingest(handle)
                    continue
                if self.keeps_for_the_next_file(handle):
                    self.idle_file_ingests.append((handle.ingest, handle.ingest_name))
                else:
                    ray.kill(handle.ingest, no_restart=True)
                finished.append(sid)
        return finished

    def keeps_for_the_next_file(self, handle: StreamHandle) -> bool:
        """A file's ingest actor waits for the next file, unless one waits already or a stream
        waits for Ray to place its ingest actor (the CPUs this one holds may be what it lacks)."""
        if handle.live or handle.split or len(self.idle_file_ingests) >= IDLE_FILE_INGESTS:
            return False
        unplaced = [h.placed_ref for h in self.streams.values() if h.summary is None]
        return not unplaced or len(ray.wait(unplaced, num_returns=len(unplaced), timeout=0)[0]) == len(unplaced)

    def files_pending(self) -> bool:
        return any(not h.live and h.summary is None for h in self.streams.values())

    def drain(self) -> None:
        """Stop ingest, let in-flight windows finish, then add the workers' counts to the summaries."""
        for handle in self.streams.values():
            if handle.summary is None:
                self.stop_ingest(handle)
        placed_refs = [h.placed_ref for h in self.streams.values()]
        placed = set(ray.wait(placed_refs, num_returns=len(placed_refs), timeout=0)[0]) if placed_refs else set()
        # A fresh run() call: it waits on the same ingest thread; where Ray restarted the actor
        # (the first call then failed with the old one) the job was stopped before it started.
        running = {
            self.run_ingest(h): h for h in self.streams.values() if h.summary is None and h.placed_ref in placed
        }
        for ref, summary in results_within(list(running), DRAIN_TIMEOUT_S).items():
            running[ref].summary = summary
        for sid, handle in self.streams.items():  # never placed, or stuck: say so
            if handle.summary is None:
                handle.summary = StreamSummary(stream=sid, state="not finished", live=handle.live)
        stats_refs = [w.stats.remote(drain=True) for i, w in enumerate(self.workers) if i not in self.dead]
        # A dead or stuck worker: the summaries keep the ingest counts.
        for stats in results_within(stats_refs, DRAIN_TIMEOUT_S).values():
            for sid, counts in stats.items():
                if sid in self.streams and self.streams[sid].summary is not None:
                    self.streams[sid].summary = replace(self.streams[sid].summary, stats=counts)
        live_workers = [w for i, w in enumerate(self.workers) if i not in self.dead]
        # Notifications still due get their last chance, the rest is written down (before the
        # publisher's flush, which then carries those records to Redis).
        drains = [w.drain_notifications.remote(DRAIN_NOTIFY_S) for w in live_workers]
        drain_s = DRAIN_NOTIFY_S + MAX_NOTIFY_TIMEOUT_S + WORKER_HEALTH_TIMEOUT_S
        written_down = sum(results_within(drains, drain_s).values())
        if written_down:
            log.warning("%d event notifications were not delivered before the stop; each is in its stream's "
                        "undelivered events in Redis", written_down)
        flushes = [w.flush_publisher.remote(DRAIN_FLUSH_S) for w in live_workers]
        undelivered = sum(results_within(flushes, DRAIN_FLUSH_S + WORKER_HEALTH_TIMEOUT_S).values())
        if undelivered:
            log.warning("%d writes never reached Redis (unreachable at the stop); file streams have "
                        "them in captions.jsonl", undelivered)
        self.publisher.close()

    def summaries(self) -> dict[str, StreamSummary]:
        """What the run did with each stream, those that never started included."""
        return self.failed | {sid: h.summary or StreamSummary(stream=sid, state="not finished", live=h.live)
                              for sid, h in self.streams.items()}
