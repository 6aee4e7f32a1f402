"""`slowfast events` (openings and closings, --open) and `slowfast ack` on a real Redis: a real
process for the follower, CliRunner for the rest."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from typer.testing import CliRunner

from connectors.client import SlowFastClient
from pipeline.cli import app
from tests.support.events import QUESTION, seed_events
from tests.support.media import free_port

runner = CliRunner()


def lines_of(*args: str, count: int, timeout: float = 60.0) -> list[str]:
    """The first `count` lines `slowfast ARGS` prints (it follows forever: stopped after)."""
    slowfast = str(Path(sys.executable).parent / "slowfast")
    proc = subprocess.Popen([slowfast, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")], daemon=True).start()
    try:
        return [lines.get(timeout=timeout).rstrip("\n") for _ in range(count)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_events_shows_openings_and_closings_with_their_ids(redis_url):
    seeded = seed_events(redis_url)
    wall = seeded["wall"]
    hms = lambda t: time.strftime("%H:%M:%S", time.localtime(t))  # noqa: E731
    opened, closed, reopened = lines_of("events", "gate", "--redis-url", redis_url, "--count", "10", count=3)
    assert " opened gate #1 [" in opened and f"{QUESTION} -> Yes, a white van." in opened
    assert opened.endswith(f"event {seeded['closed']}")
    assert " closed gate #2 [" in closed and closed.endswith(
        f"event {seeded['closed']}, open {hms(wall[1])}-{hms(wall[2])} (windows 1-2)")
    assert " opened gate #3 [" in reopened and reopened.endswith(f"event {seeded['open']}")
    # the open event's update on window 4 only with --updates
    *_, update = lines_of("events", "gate", "--redis-url", redis_url, "--count", "10", "--updates", count=4)
    assert " updated gate #4 [" in update and update.endswith(f"event {seeded['open']}")


def test_open_events_and_acknowledging_one(redis_url):
    seeded = seed_events(redis_url)
    listed = runner.invoke(app, ["events", "--open", "--redis-url", redis_url])
    assert listed.exit_code == 0, listed.output
    assert seeded["open"] in listed.output and seeded["closed"] not in listed.output
    assert "Yes, a truck." in listed.output and "3-4" in listed.output  # windows so far

    acked = runner.invoke(app, ["ack", "gate", seeded["open"], "--by", "Dana", "--note", "driver expected",
                                "--redis-url", redis_url])
    assert acked.exit_code == 0 and acked.output.strip() == f"acknowledged gate {seeded['open']} by Dana"
    ack = SlowFastClient(redis_url).acks("gate")[seeded["open"]]
    assert (ack.by, ack.note) == ("Dana", "driver expected")
    listed = runner.invoke(app, ["events", "gate", "--open", "--redis-url", redis_url])
    assert "Dana" in listed.output and "driver expected" in listed.output
    # a closed event can be acknowledged too
    assert runner.invoke(app, ["ack", "gate", seeded["closed"], "--redis-url", redis_url]).exit_code == 0
    assert seeded["closed"] in SlowFastClient(redis_url).acks("gate")


def one_error_line(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert all(word in lines[0] for word in words), lines[0]


def test_ack_and_open_events_errors_are_one_line(redis_url):
    seeded = seed_events(redis_url)
    one_error_line(runner.invoke(app, ["ack", "gate", "vehicle:1:99", "--redis-url", redis_url]), 2,
                   "stream 'gate' has no event 'vehicle:1:99'")
    one_error_line(runner.invoke(app, ["ack", "bad id!", "x", "--redis-url", redis_url]), 2, "invalid stream id")
    one_error_line(runner.invoke(app, ["ack", "gate", seeded["open"], "--by", "x" * 201, "--redis-url", redis_url]),
                   2, "by", "at most 200 characters")
    assert SlowFastClient(redis_url).acks("gate") == {}
    dead = f"redis://127.0.0.1:{free_port()}/0"
    one_error_line(runner.invoke(app, ["ack", "gate", "vehicle:1:1", "--redis-url", dead]), 1, "unreachable")
    one_error_line(runner.invoke(app, ["events", "--open", "--redis-url", dead]), 1, "unreachable")
    empty = runner.invoke(app, ["events", "--open", "--redis-url", redis_url.rsplit("/", 1)[0] + "/0"])
    assert empty.exit_code == 0
