"""What a run checks and starts before its actors: the inputs (checkpoint, Redis, output
folder), the metrics port, the model to serve and, when none is configured, an embedded Redis."""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from connectors.embedded import EmbeddedRedis
from connectors.redis_conn import check_reachable, describe_redis_error
from model.checkpoint_folder import check_checkpoint

from .config import ConfigError, PipelineConfig
from .signals import forced_exit_cleanups


@contextlib.contextmanager
def redis_for(config: PipelineConfig) -> Iterator[str]:
    """The configured Redis URL, or an embedded server for the run."""
    if config.redis_url:
        yield config.redis_url
        return
    with EmbeddedRedis() as server:
        forced_exit_cleanups.append(server.kill)
        try:
            yield server.url
        finally:
            forced_exit_cleanups.remove(server.kill)


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
    if config.ray_address is not None or port == 0 or port_is_free(port):
        return port, None
    if "metrics_port" in config.model_fields_set:
        raise ConfigError(f"metrics_port {port} is in use (another run?): choose another with --metrics-port, "
                          f"SLOWFAST_METRICS_PORT or metrics_port (0: any free port)")
    free = free_port_on_all_interfaces()
    return free, f"metrics port {port} is in use; serving metrics on {free} instead"


def port_is_free(port: int) -> bool:
    """Whether a server could bind `port` on every interface now (as Ray's metrics export does)."""
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_on_all_interfaces() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


def resolve_model(config: PipelineConfig, on_event: Callable[[str], None]) -> str:
    """The checkpoint to serve: `config.model`, else the small synthetic-world model shipped
    with the package (it knows only coloured shapes that move; see world.scenes)."""
    if config.model:
        return config.model
    from world.scenes import MARKER, SHIPPED_MODEL

    on_event(f"model: none given, serving the {MARKER} shipped with the package ({SHIPPED_MODEL})")
    return str(SHIPPED_MODEL)
