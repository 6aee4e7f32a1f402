"""Stopping a run by signal: the first SIGINT / SIGTERM drains it, a second exits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

import ray

FORCED_EXIT_CLEANUP_S = 3.0  # a second signal exits within this (plus process teardown)


# Run by a second signal before exiting at once (e.g. kill the embedded Redis, which runs in its
# own session so a terminal's Ctrl-C does not stop it under a draining run).
forced_exit_cleanups: list[Callable[[], None]] = []


def _force_exit(signum: int) -> None:
    code = 128 + signum
    threading.Timer(FORCED_EXIT_CLEANUP_S, os._exit, (code,)).start()  # if a cleanup hangs
    for cleanup in list(forced_exit_cleanups):
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
