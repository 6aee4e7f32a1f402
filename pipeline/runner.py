"""The driver's run: checks its inputs, starts Redis (embedded unless configured), Ray and
the actors, routes questions and control messages, waits for files, and drains on Ctrl-C /
SIGTERM. A Redis outage pauses the routing (retried with backoff), never the run."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import ray

from connectors.client import SlowFastClient
from connectors.redis_conn import UNREACHABLE, Outage
from connectors.redis_schema import Caption

from .actors import ModelWorker
from .config import PipelineConfig
from .messages import StreamSummary
from .ray_session import metrics_url, start_ray
from .routing import Router
from .running import Pipeline
from .startup import local_metrics_port, preflight, redis_for, resolve_model

log = logging.getLogger("slowfast.pipeline")
WORKER_CHECK_INTERVAL_S = 2.0
PRINTER_JOIN_S = 5.0


def run_pipeline(
    config: PipelineConfig,
    stop: threading.Event | None = None,
    on_event: Callable[[str], None] = print,
    on_caption: Callable[[Caption], None] | None = None,
    beside: Callable[[str], contextlib.AbstractContextManager] | None = None,
    check: bool = True,
    worker_class: type[ModelWorker] = ModelWorker,
) -> dict[str, StreamSummary]:
    """Run until every file is done and no live stream remains, or until `stop` is set.

    `beside(redis_url)`: a context (e.g. the web app) entered once Redis is up and left before
    an embedded Redis stops. `worker_class`: the model workers' class (a subclass may load the
    model its own way). Raises ConfigError (before starting anything) for a setting that
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
        # ray.init turns a SIGTERM into its own exit (start_ray is then False) but leaves SIGINT to
        # the caller's handler, which only sets `stop`: both stop the run before a stream starts.
        if not ray.is_initialized() and (not start_ray(config) or stop.is_set()):
            ray.shutdown()
            on_event("stopped while Ray was starting")
            printer_stop.set()
            return {}
        pipeline = Pipeline(config, resolve_model(config, on_event), worker_class)
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
        router = Router(redis_url, pipeline, on_event)
        try:
            _watch(pipeline, router, stop, files_only, on_event)
        finally:
            pipeline.drain()
            printer_stop.set()
            router.close()
            pipeline.shutdown()
            if printer is not None:  # before an embedded Redis stops under it
                printer.join(timeout=PRINTER_JOIN_S)
        return pipeline.summaries()


def _watch(pipeline: Pipeline, router: Router, stop: threading.Event, files_only: bool,
           on_event: Callable[[str], None]) -> None:
    """Until stopped (or a files-only run is done): streams that finish, workers that restart
    or die, ingest actors Ray cannot place, and the routing of questions and controls."""
    outage = Outage("driver", log, level=logging.INFO)
    last_check = time.monotonic()
    while not stop.is_set():
        for sid in pipeline.finished_streams():
            on_event(f"stream {sid} done: {pipeline.streams[sid].summary}")
        if files_only and not pipeline.files_pending():
            return
        try:
            if time.monotonic() - last_check >= WORKER_CHECK_INTERVAL_S:
                last_check = time.monotonic()
                for message in pipeline.check_workers() + pipeline.check_placement():
                    on_event(message)
            router.poll()
            if (seconds := outage.ended()) is not None:
                on_event(f"redis reachable again after {seconds:.1f} s; questions and control resumed")
        except UNREACHABLE as exc:
            if not outage.down:
                on_event(f"redis unreachable ({exc}); the run goes on, questions and control wait for it")
            stop.wait(outage.failed(exc))
    on_event("stopping: draining windows in flight (a second Ctrl-C / SIGTERM exits at once)")
