"""Starting Ray for a run, and the small helpers the driver uses on Ray calls."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import ray

from .config import PipelineConfig
from .startup import free_port_on_all_interfaces, port_is_free

log = logging.getLogger("slowfast.pipeline")


# Ray starts its worker processes at nice 15, below everything else on the host. Here the
# actors are the real-time work (camera ingest, the model), so any busy process beside the
# run would starve them: frames dropped, windows skipped. They run at the driver's priority.
# Ray records every task's state changes for its dashboard and state API, which a run does not
# serve. The GCS keeps the last 100,000 tasks' events by default (some 3 KB each, about 1 MB a
# minute at a few actor calls per stream and second); under a smaller cap it instead remembers
# every evicted task, a set that grows to a million entries a job (+18 %/h in an hour's soak).
# Recording is off: the GCS stays flat and no worker spends time sending the events.
# Every Ray process keeps some memory for good each time it exports its metrics (Ray 2.60,
# measured on idle actors: +5-7 MB/h at the default export every 10 s, flat with metrics off,
# about +2 MB/h every 30 s). The metrics are exported every 30 s: Prometheus sees a change
# within 30 s, still well inside the minute alert rules wait.
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0, "task_events_report_interval_ms": 0,
                           "metrics_report_interval_ms": 30_000}

# Ray runs its GCS and raylet on the jemalloc it ships and starts its workers and agents on
# glibc's malloc, whose heaps only grew. Workers and agents keep Ray's jemalloc, which hands
# freed pages back: over an hour's soak the ingest actors grew 3.1-4.4 %/h, where they grew
# 3.6-5.7 %/h under glibc.
JEMALLOC_ON_WORKERS = {"RAY_LD_PRELOAD_ON_WORKERS": "1"}


# Ray waits a fixed 30 s for a new local raylet to register with its GCS and gives up, the GCS
# and raylet still running, when the host is too busy or the raylet died at start (its metrics
# agent could not bind the port). Those are stopped and the local Ray started again before the
# run fails.
LOCAL_START_ATTEMPTS = 3
LOCAL_START_TIMED_OUT = "timed out during startup"


@contextlib.contextmanager
def processes_in_their_own_group() -> Iterator[list[subprocess.Popen]]:
    """Processes Ray starts meanwhile (a local Ray's GCS and raylet, and through the raylet the
    actors) each lead a process group of their own; the list yielded collects them.

    A signal to the run's whole process group (systemd's and `tini -g`'s way of stopping a
    service, `kill -TERM -PGID`) then reaches the driver alone, which drains as for a signal
    to it alone; in the driver's group it killed the GCS too, and the driver hung a minute
    and drained nothing. They still die with the driver (Ray's parent-death signal)."""
    from ray._private import services  # Ray starts every process through this class

    original = services.ConsolePopen
    started: list[subprocess.Popen] = []

    class OwnGroupPopen(original):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, process_group=0, **kwargs)
            started.append(self)

    services.ConsolePopen = OwnGroupPopen
    try:
        yield started
    finally:
        services.ConsolePopen = original


def stop_process_groups(processes: list[subprocess.Popen]) -> None:
    """SIGKILL each process's group (it leads one): a raylet's workers and agents go with it."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


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
    if config.ray_address is None:  # a cluster's nodes get these from `ray start` (its environment)
        options["_system_config"] = LOCAL_RAY_SYSTEM_CONFIG
        for name, value in JEMALLOC_ON_WORKERS.items():  # read by the raylet from its environment
            os.environ.setdefault(name, value)
        if config.metrics_port:
            options["_metrics_export_port"] = config.metrics_port
    main = threading.current_thread() is threading.main_thread()
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
            local = processes_in_their_own_group() if config.ray_address is None else contextlib.nullcontext([])
            with local as started:
                try:
                    ray.init(address=config.ray_address, namespace=config.ray_namespace, include_dashboard=False,
                             log_to_driver=False, configure_logging=False, **options)
                    break
                except Exception as exc:
                    if not (started and LOCAL_START_TIMED_OUT in str(exc) and attempt < LOCAL_START_ATTEMPTS):
                        raise
                    log.warning("the local Ray node did not start within Ray's 30 s (a busy host?): "
                                "starting it again (%d of %d)", attempt + 1, LOCAL_START_ATTEMPTS)
                    stop_process_groups(started)
                    ray.shutdown()
                    # Its metrics port was free before the start; another run starting at the same
                    # moment may have taken it, and the raylet dies with an agent that cannot bind.
                    port = options.get("_metrics_export_port")
                    if port and not port_is_free(port):
                        options["_metrics_export_port"] = free_port_on_all_interfaces()
                        log.warning("metrics port %d was taken while Ray started (another run?): serving "
                                    "metrics on %d instead", port, options["_metrics_export_port"])
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


def results_within(refs: list, timeout_s: float) -> dict:
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


def actor_exists(name: str) -> bool:
    try:
        ray.get_actor(name)
    except ValueError:
        return False
    return True
