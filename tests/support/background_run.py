"""`run_pipeline` in a background thread, as `slowfast run` runs it in its main thread, a
`slowfast run` killed outright mid-file, and a wait for a condition with a generous bound."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from pipeline.runner import run_pipeline

__all__: list[str] = []  # helpers only (tests/conftest.py star-imports fixture modules)


class BackgroundRun:
    """run_pipeline in a thread, as `slowfast run` does in its main thread; collects its events."""

    def __init__(self, config, **options):
        self.stop, self.events, self.result = threading.Event(), [], {}
        self.thread = threading.Thread(target=lambda: self.result.update(
            run_pipeline(config, stop=self.stop, on_event=self.events.append, **options)))
        self.thread.start()

    def finish(self, stop: bool = True, timeout: float = 120) -> dict:
        """Stop it (or, for files, let it end) and return the summaries."""
        if stop:
            self.stop.set()
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():  # stopped, so its actors do not hold the shared Ray for later tests
            self.stop.set()
            self.thread.join(timeout=120)
            pytest.fail(f"the run did not end within {timeout:.0f} s; events: {self.events[-10:]}")
        return self.result


def wait_until(predicate, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.3)
    assert predicate()


def killed_mid_file(command: list[str], client, stream: str, captions: int, timeout: float) -> int:
    """Start `command` (a `slowfast run`) in a session of its own, SIGKILL it and the Ray
    processes it started once `stream` has `captions` captions in Redis (`client`); returns
    how many it had then."""
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    key = f"sfs:{{{stream}}}:captions"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and client.redis.xlen(key) < captions:
            assert run.poll() is None
            time.sleep(0.1)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    return client.redis.xlen(key)
