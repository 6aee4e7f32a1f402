"""The driver: checks its inputs, starts Ray, Redis and the actors, routes questions and
control messages, waits for files, and drains on Ctrl-C / SIGTERM. A Redis outage pauses the
routing (retried with backoff), never the run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import redis
from ray.exceptions import ActorAlreadyExistsError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from connectors.embedded import EmbeddedRedis
from connectors.intake import ControlIntake, QuestionIntake
from connectors.publisher import Publisher
from connectors.client import SlowFastClient
from connectors.redis_conn import UNREACHABLE, Outage, check_reachable, describe_redis_error
from connectors.redis_schema import Answer, Caption, ControlAction, IngestState, InvalidMessage, NotificationKind, StreamInfo, StreamStatus
from model.checkpoint import check_checkpoint

from .config import ConfigError, PipelineConfig, StreamConfig
from .actors import IngestActor, ModelWorker
from .resume import resume_point, window_settings

log = logging.getLogger("slowfast.pipeline")
POLL_MS = 200
WORKER_CHECK_INTERVAL_S = 2.0
WORKER_HEALTH_TIMEOUT_S = 5.0
ACTOR_EXIT_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 60.0
DRAIN_FLUSH_S = 10.0  # at a stop, how long workers wait for an unreachable Redis to take their buffer
PLACEMENT_WARN_S = 15.0
FORCED_EXIT_CLEANUP_S = 3.0  # a second signal exits within this (plus process teardown)


@dataclass
class StreamHandle:
    config: StreamConfig
    run: int
    live: bool
    worker_index: int
    ingest: Any
    done_ref: Any
    placed_ref: Any  # resolves once Ray has placed the ingest actor
    added_at: float = field(default_factory=time.monotonic)
    unplaced_reported: bool = False
    moved: bool = False  # now on another worker than its ingest actor was created with
    summary: dict | None = None


@contextlib.contextmanager
def redis_for(config: PipelineConfig) -> Iterator[str]:
    """The configured Redis URL, or an embedded server for the run."""
    if config.redis_url:
        yield config.redis_url
        return
    with EmbeddedRedis() as server:
        _forced_exit_cleanups.append(server.kill)
        try:
            yield server.url
        finally:
            _forced_exit_cleanups.remove(server.kill)


def preflight(config: PipelineConfig) -> None:
    """What a run checks before it starts Ray, so a wrong setting fails in a second, not after
    Ray and the model workers are up: the checkpoint (config and weight files, or a hub id that
    is cached or reachable), Redis with the URL's credentials, a writable output folder.
    Raises ConfigError naming what is wrong."""
    if config.model:
        try:
            check_checkpoint(config.model)
        except (OSError, ValueError, RuntimeError) as exc:  # CheckpointError, UnsupportedConfigError
            raise ConfigError(f"model: {exc}") from exc
    if config.redis_url:
        try:
            check_reachable(config.redis_url)
        except (redis.RedisError, OSError) as exc:
            raise ConfigError(describe_redis_error(config.redis_url, exc)) from exc
    out = Path(config.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"output folder {str(out)!r} is not writable ({exc.strerror or exc})") from exc


def local_metrics_port(config: PipelineConfig) -> tuple[int, str | None]:
    """The metrics port for the local Ray this run starts, and a note when it is not the one
    asked for. Ray would wait on a busy port until its start-up times out, so: a port the user
    set that is busy is a ConfigError; the default, when busy (another run on the host), gives
    way to a free port."""
    port = config.metrics_port
    if config.ray_address is not None or port == 0:
        return port, None
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
            return port, None
        except OSError:
            pass
    if "metrics_port" in config.model_fields_set:
        raise ConfigError(f"metrics_port {port} is in use (another run?): choose another with --metrics-port, "
                          f"SLOWFAST_METRICS_PORT or metrics_port (0: any free port)")
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        free = probe.getsockname()[1]
    return free, f"metrics port {port} is in use; serving metrics on {free} instead"


# Ray starts its worker processes at nice 15, below everything else on the host. Here the
# actors are the real-time work (camera ingest, the model), so any busy process beside the
# run would starve them: frames dropped, windows skipped. They run at the driver's priority.
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


def start_ray(config: PipelineConfig) -> bool:
    """Join the configured cluster, or start a local Ray serving metrics on `metrics_port`.

    Ray's own log lines (start-up notes, the token-auth warning) propagate to the root logger,
    which the application points at its log file, instead of Ray's stderr handler.

    The caller's SIGINT / SIGTERM handlers are kept: ray.init replaces the SIGTERM handler with
    one that exits (SystemExit(15)), and its core worker installs a native one that dumps a
    stack trace and aborts (a SIGTERM then ended the run with 134 and no summary). False if a
    SIGTERM arrived during ray.init (handed to the caller's handler)."""
    logging.getLogger("ray").propagate = True
    options: dict[str, Any] = {}
    if config.ray_address is None:  # a cluster's nodes get it from `ray start` (RAY_worker_niceness)
        options["_system_config"] = LOCAL_RAY_SYSTEM_CONFIG
        if config.metrics_port:
            options["_metrics_export_port"] = config.metrics_port
    main = threading.current_thread() is threading.main_thread()
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        ray.init(address=config.ray_address, namespace=config.ray_namespace, include_dashboard=False,
                 log_to_driver=False, configure_logging=False, **options)
    except SystemExit as exc:
        if not (main and exc.code == signal.SIGTERM and callable(kept[signal.SIGTERM])):
            raise
        with contextlib.suppress(Exception):
            ray.shutdown()
        kept[signal.SIGTERM](signal.SIGTERM, None)
        return False
    finally:
        for sig, handler in kept.items():  # only the main thread may set handlers
            if handler is not None:
                signal.signal(sig, handler)
    return True


def metrics_url() -> str:
    """Where the driver's node serves the pipeline's metrics (Ray's metrics export); every
    node of a cluster serves its own actors' metrics the same way."""
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == here), None)
    if node is None:  # a driver outside the cluster (Ray Client)
        return "on each Ray node at http://NODE:PORT/metrics (PORT: ray start --metrics-export-port)"
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def resolve_model(config: PipelineConfig, on_event: Callable[[str], None]) -> str:
    """The checkpoint to serve: `config.model`, else the small synthetic-world model shipped
    with the package (it knows only coloured shapes that move; see world.scenes)."""
    if config.model:
        return config.model
    from world.scenes import MARKER, SHIPPED_MODEL

    on_event(f"model: none given, serving the {MARKER} shipped with the package ({SHIPPED_MODEL})")
    return str(SHIPPED_MODEL)


@dataclass
class Pipeline:
    """Streams, their ingest actors and the model workers of one run."""

    config: PipelineConfig
    model_path: str
    streams: dict[str, StreamHandle] = field(default_factory=dict)
    workers: list[Any] = field(default_factory=list)
    failed: dict[str, dict] = field(default_factory=dict)
    incarnations: dict[int, str] = field(default_factory=dict)
    unreachable_since: dict[int, float] = field(default_factory=dict)  # worker index -> monotonic time
    dead: set[int] = field(default_factory=set)  # workers that died for good
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))  # this run's id in the registry

    def start_workers(self) -> None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = self.config.workers or max(1, gpus)
        options = {"num_gpus": 1} if gpus else {"num_cpus": self.config.worker_cpus}
        options["resources"] = dict(self.config.worker_resources)
        self.workers = []
        try:
            for i in range(count):
                self.workers.append(ModelWorker.options(name=f"worker:{i}", **options).remote(self.config, self.model_path))
        except ActorAlreadyExistsError:
            # Actor names are per namespace: a second run there would steer the first one's actors.
            for worker in self.workers:
                ray.kill(worker, no_restart=True)
            raise ConfigError(
                f"another slowfast run is using Ray namespace {self.config.ray_namespace!r} (its model worker "
                "exists): stop that run, or give this one its own ray_namespace (SLOWFAST_RAY_NAMESPACE)") from None
        self.frame_size = ray.get(self.workers[0].frame_size.remote())
        self.check_workers()
        self.publisher = Publisher(self.config.redis_url, history_len=self.config.history_len)
        self.client = SlowFastClient(self.config.redis_url)
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
                incarnation, stream_count = ray.get(worker.health.remote(), timeout=WORKER_HEALTH_TIMEOUT_S)
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
                for sid, handle in self.streams.items():
                    if handle.worker_index == index:
                        self.attach(handle, index)
                log.warning("model worker %d restarted; %d streams re-added", index, stream_count)
            self.incarnations[index] = incarnation
        for handle in self.streams.values():  # an ingest actor restarted after a move asks its first worker
            if handle.moved:
                handle.ingest.retarget.remote(f"worker:{handle.worker_index}")
        return messages

    def attach(self, handle: StreamHandle, index: int) -> None:
        """Give a running stream to worker `index`, continuing its window numbering."""
        latest = self.client.latest(handle.config.id)
        next_window = latest.window + 1 if latest is not None and latest.run == handle.run else 0
        ray.get(self.workers[index].add_stream.remote(handle.config, handle.run, handle.live, next_window))

    def move_streams(self, index: int, reason: str) -> list[str]:
        messages = []
        for sid, handle in self.streams.items():
            if handle.worker_index != index:
                continue
            target = self.least_loaded_worker()
            if target is None:
                return [f"model worker {index} {reason} and no other worker is reachable; its streams wait"]
            self.attach(handle, target)
            handle.worker_index, handle.moved = target, True
            ray.get(handle.ingest.retarget.remote(f"worker:{target}"))
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
        index = self.least_loaded_worker()
        if index is None:
            raise RuntimeError("no model worker is reachable")
        ray.get(self.workers[index].add_stream.remote(stream, info.run, live, resume.next_window if resume else 0))
        stream = stream.model_copy(update={"live": live})
        ingest = IngestActor.options(name=f"ingest:{stream.id}", **self.ingest_options()).remote(
            stream, self.config, f"worker:{index}", self.frame_size
        )
        self.streams[stream.id] = StreamHandle(
            stream, info.run, live, index, ingest, done_ref=ingest.run.remote(), placed_ref=ingest.node_id.remote()
        )
        log.info("stream %s added (%s)", stream.id, "live" if live else "file")
        return f"stream {stream.id} resumes after window {resume.next_window - 1}" if resume else None

    def report_failure(self, stream_id: str, exc: Exception) -> None:
        self.failed[stream_id] = {"stream": stream_id, "state": "failed", "error": str(exc)}
        self.publisher.publish_status(StreamStatus(stream=stream_id, state=IngestState.FAILED, last_error=str(exc)))

    def shutdown(self) -> None:
        """Kill this run's actors and wait until their names are free for the next run."""
        actors = [h.ingest for h in self.streams.values()] + self.workers
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        names = [f"ingest:{sid}" for sid in self.streams] + [f"worker:{i}" for i in range(len(self.workers))]
        deadline = time.monotonic() + ACTOR_EXIT_TIMEOUT_S
        while names and time.monotonic() < deadline:
            names = [n for n in names if _actor_exists(n)]
            time.sleep(0.1)

    def remove_stream(self, stream_id: str) -> None:
        handle = self.streams.pop(stream_id, None)
        if handle is None:
            raise ValueError(f"stream {stream_id!r} is not running")
        if handle.summary is None:  # still running (a finished stream's actor is gone already)
            ray.get(handle.ingest.stop.remote())
            with contextlib.suppress(Exception):
                ray.get(handle.done_ref, timeout=30)
            ray.kill(handle.ingest, no_restart=True)
        ray.get(self.workers[handle.worker_index].remove_stream.remote(stream_id))
        self.publisher.unregister_stream(stream_id)

    def finished_streams(self) -> list[str]:
        """Streams whose ingest ended or failed since the last call. Each one's ingest actor is
        killed at once, so its CPUs go to the next stream; its final status, published before
        run() returned, stays in Redis, and the worker keeps its counts for the summary."""
        finished = []
        for sid, handle in self.streams.items():
            if handle.summary is not None:
                continue
            ready, _ = ray.wait([handle.done_ref], timeout=0)
            if ready:
                try:
                    handle.summary = ray.get(handle.done_ref)
                except ray.exceptions.RayActorError:  # died mid-run: Ray restarts it, wait again
                    handle.done_ref = handle.ingest.run.remote()
                    continue
                ray.kill(handle.ingest, no_restart=True)
                finished.append(sid)
        return finished

    def files_pending(self) -> bool:
        return any(not h.live and h.summary is None for h in self.streams.values())

    def drain(self) -> None:
        """Stop ingest, let in-flight windows finish, then add the workers' counts to the summaries."""
        for handle in self.streams.values():
            handle.ingest.stop.remote()
        placed_refs = [h.placed_ref for h in self.streams.values()]
        placed = set(ray.wait(placed_refs, num_returns=len(placed_refs), timeout=0)[0]) if placed_refs else set()
        # A fresh run() call: it waits on the same ingest thread, or on the restarted actor's
        # thread where Ray restarted it (the first call then failed with the old actor).
        running = {
            h.ingest.run.remote(): h for h in self.streams.values() if h.summary is None and h.placed_ref in placed
        }
        for ref, summary in _results_within(list(running), DRAIN_TIMEOUT_S).items():
            running[ref].summary = summary
        for sid, handle in self.streams.items():  # never placed, or stuck: say so
            if handle.summary is None:
                handle.summary = {"stream": sid, "state": "not finished", "live": handle.live}
        stats_refs = [w.stats.remote(drain=True) for i, w in enumerate(self.workers) if i not in self.dead]
        # A dead or stuck worker: the summaries keep the ingest counts.
        for stats in _results_within(stats_refs, DRAIN_TIMEOUT_S).values():
            for sid, counts in stats.items():
                if sid in self.streams and self.streams[sid].summary is not None:
                    self.streams[sid].summary |= counts
        live_workers = [w for i, w in enumerate(self.workers) if i not in self.dead]
        flushes = [w.flush_publisher.remote(DRAIN_FLUSH_S) for w in live_workers]
        undelivered = sum(_results_within(flushes, DRAIN_FLUSH_S + WORKER_HEALTH_TIMEOUT_S).values())
        if undelivered:
            log.warning("%d writes never reached Redis (unreachable at the stop); file streams have "
                        "them in captions.jsonl", undelivered)
        self.publisher.close()


def format_caption(caption: Caption) -> str:
    return f"{caption.stream} #{caption.window} [{caption.start:.2f}s-{caption.end:.2f}s] {caption.text}"


def _results_within(refs: list, timeout_s: float) -> dict:
    """{ref: value} of the refs that resolve, without error, within one shared timeout."""
    if not refs:
        return {}
    ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if not_ready:
        log.warning("%d of %d calls not done after %.0f s", len(not_ready), len(refs), timeout_s)
    results = {}
    for ref in ready:
        with contextlib.suppress(ray.exceptions.RayError):
            results[ref] = ray.get(ref)
    return results


def _actor_exists(name: str) -> bool:
    try:
        ray.get_actor(name)
    except ValueError:
        return False
    return True


def run_pipeline(
    config: PipelineConfig,
    stop: threading.Event | None = None,
    on_event: Callable[[str], None] = print,
    on_caption: Callable[[Caption], None] | None = None,
    beside: Callable[[str], contextlib.AbstractContextManager] | None = None,
    check: bool = True,
) -> dict[str, dict]:
    """Run until every file is done and no live stream remains, or until `stop` is set.

    `beside(redis_url)`: a context (e.g. the web app) entered once Redis is up and left before
    an embedded Redis stops. Raises ConfigError (before starting anything) for a setting that
    cannot work (`check`: run `preflight`; False where the caller just did)."""
    stop = stop or threading.Event()
    if check:
        preflight(config)
    if not ray.is_initialized():  # before anything starts: a busy port stops the run cleanly
        port, note = local_metrics_port(config)
        config = config.model_copy(update={"metrics_port": port})
        if note:
            on_event(note)
    with redis_for(config) as redis_url, beside(redis_url) if beside else contextlib.nullcontext():
        config = config.model_copy(update={"redis_url": redis_url})
        printer_stop = threading.Event()
        printer = None
        if on_caption is not None:
            printer = threading.Thread(
                target=lambda: [on_caption(c) for c in SlowFastClient(redis_url).follow(stop=printer_stop)], daemon=True
            )
            printer.start()
        if not ray.is_initialized() and not start_ray(config):
            on_event("stopped while Ray was starting")
            printer_stop.set()
            return {}
        pipeline = Pipeline(config, resolve_model(config, on_event))
        pipeline.start_workers()
        on_event(f"redis {redis_url}")
        on_event(f"metrics {metrics_url()}")
        for stream in config.streams:
            try:
                resumed = pipeline.add_stream(stream)
                if resumed:
                    on_event(resumed)
            except Exception as exc:  # a stream that cannot start affects only itself
                pipeline.report_failure(stream.id, exc)
                on_event(f"stream {stream.id} failed: {exc}")
        # A run of files only ends when they are done; with a live stream (or none configured,
        # waiting for control messages) it runs until stopped.
        files_only = bool(config.streams) and not any(h.live for h in pipeline.streams.values())
        questions = QuestionIntake(redis_url, consumer_name=f"driver-{socket.gethostname()}")
        controls = ControlIntake(redis_url, consumer_name=f"driver-{socket.gethostname()}")
        pending_answers: dict[Any, tuple[str, Any]] = {}
        replies: deque[Callable[[], object]] = deque()  # written in order once Redis takes them
        outage = Outage("driver", log, level=logging.INFO)
        last_check = time.monotonic()
        try:
            while not stop.is_set():
                for sid in pipeline.finished_streams():
                    on_event(f"stream {sid} done: {pipeline.streams[sid].summary}")
                if files_only and not pipeline.files_pending():
                    break
                try:
                    if time.monotonic() - last_check >= WORKER_CHECK_INTERVAL_S:
                        last_check = time.monotonic()
                        for message in pipeline.check_workers() + pipeline.check_placement():
                            on_event(message)
                    _send_replies(replies)
                    _route_questions(pipeline, questions, pending_answers, replies)
                    _handle_controls(pipeline, controls, on_event, replies)
                    _finish_answers(questions, pending_answers, replies)
                    _send_replies(replies)
                    if (seconds := outage.ended()) is not None:
                        on_event(f"redis reachable again after {seconds:.1f} s; questions and control resumed")
                except UNREACHABLE as exc:
                    if not outage.down:
                        on_event(f"redis unreachable ({exc}); the run goes on, questions and control wait for it")
                    stop.wait(outage.failed(exc))
            if stop.is_set():
                on_event("stopping: draining windows in flight (a second Ctrl-C / SIGTERM exits at once)")
        finally:
            pipeline.drain()
            printer_stop.set()
            _finish_answers(questions, pending_answers, replies, wait=True)
            try:
                _send_replies(replies)
            except UNREACHABLE:
                on_event(f"redis unreachable at exit: {len(replies)} question/control replies not delivered")
            questions.close()
            controls.close()
            pipeline.shutdown()
            if printer is not None:  # before an embedded Redis stops under it
                printer.join(timeout=5)
        return pipeline.failed | {sid: h.summary or {} for sid, h in pipeline.streams.items()}


def _route_questions(pipeline: Pipeline, intake: QuestionIntake, pending: dict, replies: deque) -> None:
    for entry_id, question in intake.poll(block_ms=POLL_MS, count=16) + intake.reclaim(count=16):
        if isinstance(question, InvalidMessage):
            continue  # the intake already replied with the error and acknowledged it
        handle = pipeline.streams.get(question.stream)
        if handle is None:
            error = Answer(question_id=question.id, stream=question.stream, question=question.text,
                           error=f"stream {question.stream!r} is not running")
            replies.append(lambda e=entry_id, q=question, a=error: intake.complete(e, q, a))
            continue
        pending[pipeline.workers[handle.worker_index].answer.remote(question)] = (entry_id, question)


def _finish_answers(intake: QuestionIntake, pending: dict, replies: deque, wait: bool = False) -> None:
    """Queue the replies of the questions the workers have answered (sent by _send_replies)."""
    if not pending:
        return
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=30 if wait else 0)
    for ref in ready:
        entry_id, question = pending.pop(ref)
        try:
            answer = ray.get(ref)
        except Exception as exc:  # a worker that died mid-question still owes a reply
            answer = Answer(question_id=question.id, stream=question.stream, question=question.text,
                            error=f"answering failed: {type(exc).__name__}: {exc}")
        replies.append(lambda e=entry_id, q=question, a=answer: intake.complete(e, q, a))


def _send_replies(replies: deque) -> None:
    """Write queued replies in order; one that fails (Redis unreachable) stays first in line."""
    while replies:
        replies[0]()
        replies.popleft()


def _handle_controls(pipeline: Pipeline, intake: ControlIntake, on_event: Callable[[str], None],
                     replies: deque) -> None:
    for entry_id, control in intake.poll(block_ms=0, count=8):
        if isinstance(control, InvalidMessage):
            continue
        error = None
        try:
            if control.action == ControlAction.ADD:
                if not control.source:
                    raise ValueError("add needs a source")
                stream = StreamConfig(id=control.stream, source=control.source, live=control.live, **control.config)
                pipeline.add_stream(stream)
            else:
                pipeline.remove_stream(control.stream)
            on_event(f"control: {control.action} {control.stream}")
        except UNREACHABLE:
            raise
        except Exception as exc:  # a bad request affects only itself
            error = str(exc)
        replies.append(lambda e=entry_id, c=control, err=error: intake.complete(e, c, err))


# Run by a second signal before exiting at once (e.g. kill the embedded Redis, which runs in its
# own session so a terminal's Ctrl-C does not stop it under a draining run).
_forced_exit_cleanups: list[Callable[[], None]] = []


def _force_exit(signum: int) -> None:
    code = 128 + signum
    threading.Timer(FORCED_EXIT_CLEANUP_S, os._exit, (code,)).start()  # if a cleanup hangs
    for cleanup in list(_forced_exit_cleanups):
        with contextlib.suppress(Exception):
            cleanup()
    with contextlib.suppress(Exception):
        ray.shutdown()
    os._exit(code)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """The first SIGINT / SIGTERM sets the event: the run drains, publishes final status and
    returns (exit 0). A second one exits at once with 128 + the signal number."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            _force_exit(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
