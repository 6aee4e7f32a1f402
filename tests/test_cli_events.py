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
from connectors.publisher import Publisher
from connectors.redis_schema import EventPhase
from pipeline.cli import app, format_event
from tests.support.events import QUESTION, seed_events
from tests.support.media import free_port
from tests.support.records import make_caption, make_event

runner = CliRunner()


def test_events_shows_openings_and_closings_with_their_ids(redis_url):
    """A real `slowfast events`: the past records, then a closing published while it follows;
    the open event's update on window 4 is left out (made to watch openings and closings)."""
    seeded = seed_events(redis_url)
    wall = seeded["wall"]
    slowfast = str(Path(sys.executable).parent / "slowfast")
    proc = subprocess.Popen([slowfast, "events", "gate", "--redis-url", redis_url, "--count", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in iter(proc.stdout.readline, "")],
                     daemon=True).start()
    try:
        opened, closed, reopened = (lines.get(timeout=120) for _ in range(3))
        with Publisher(redis_url) as pub:  # the open event closes on window 6
            pub.publish_window(make_caption(6, stream="gate", run=seeded["run"]), events=[make_event(
                6, stream="gate", run=seeded["run"], question_id="vehicle", question=QUESTION, text="No.",
                phase=EventPhase.CLOSED, first_window=3, opened_at=wall[3], wall_end=wall[3] + 12)])
        closing = lines.get(timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert " opened gate #1 [" in opened and f"{QUESTION} -> Yes, a white van." in opened
    assert opened.endswith(f"event {seeded['closed']}")
    assert " closed gate #2 [" in closed and closed.endswith(
        f"event {seeded['closed']}, open {hms(wall[1])}-{hms(wall[2])} (windows 1-2)")
    assert " opened gate #3 [" in reopened and reopened.endswith(f"event {seeded['open']}")
    assert " closed gate #6 [" in closing and closing.endswith(
        f"event {seeded['open']}, open {hms(wall[3])}-{hms(wall[3] + 12)} (windows 3-6)")


def test_an_update_record_reads_as_one(redis_url):
    update = make_event(4, stream="gate", question_id="vehicle", phase=EventPhase.UPDATED, first_window=3)
    line = format_event(update)
    assert " updated gate #4 [" in line and line.endswith("event vehicle:1700000000000:3")


def hms(unix_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_s))


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
