"""The followers of new entries across a real Redis restart: the client's follower (the run's
caption printer), `slowfast tail`, `slowfast events` and the web page's update stream. Entries
come before the restart, during its gap (buffered by the publisher, written once Redis is back)
and after; each follower shows every one of them, once, in order per stream. Real redis-server
processes (SIGKILLed), real CLI processes, the real web server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from connectors.client import FOLLOW_CATCH_UP_S, OUTAGE, READ_BATCH, RESYNC, SlowFastClient
from connectors.embedded import EmbeddedRedis
from connectors.publisher import Publisher, PublishResult
from connectors.redis_conn import connect
from connectors.redis_schema import Keys, NotificationKind, StreamInfo, encode_entry
from pipeline.web.server import WebServer
from tests.support.records import make_caption, make_event

SLOWFAST = str(Path(sys.executable).parent / "slowfast")
LINE = re.compile(r"\b(cam\d) #(\d+) \[")
# what each follower must show: cam1 and cam2 from their last window before it started (PAST = 1),
# cam3 (registered during the outage) whole
EXPECTED = {"cam1": list(range(1, 7)), "cam2": list(range(1, 7)), "cam3": [0, 1, 2]}


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not seen within {timeout:.0f} s"
        time.sleep(0.05)


class Restart:
    """A real Redis and a publisher that buffers while Redis is down (as the pipeline's does)."""

    def __init__(self, persistent: bool) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []
        self.server = EmbeddedRedis(extra_args=persistence).start()
        self.pub = Publisher(self.server.url, reconnect_interval_s=0.1, maintain_interval_s=0.2, retries=0)
        self.runs: dict[str, int] = {}

    @property
    def url(self) -> str:
        return self.server.url

    def register(self, sid: str) -> None:
        self.runs[sid] = self.pub.register_stream(StreamInfo(id=sid, source=f"rtsp://cam/{sid}")).run

    def publish(self, sids: tuple[str, ...], *windows: int) -> list[PublishResult]:
        """A caption and one event per window."""
        return [self.pub.publish_window(make_caption(w, stream=sid, run=self.runs[sid]),
                                        events=[make_event(w, stream=sid, run=self.runs[sid])])
                for w in windows for sid in sids]

    def before(self) -> None:
        """What is there before a follower starts: windows 0 and 1 of cam1 and cam2."""
        self.register("cam1")
        self.register("cam2")
        self.publish(("cam1", "cam2"), 0, 1)

    def run(self, shown: Callable[[], dict[str, list[int]]], expected: dict[str, list[int]] = EXPECTED) -> None:
        """Window 2 while the follower runs; Redis SIGKILLed; windows 3-4, and a new stream cam3
        with windows 0-1, buffered by the publisher; Redis back on the same port; windows 5-6
        (cam3: 2). Waits until `shown()` holds the last of each `expected` stream, then a full
        re-read longer, so that a late duplicate would show."""
        wait_for(lambda: all(shown().get(sid) == [1] for sid in ("cam1", "cam2") if sid in expected),
                 what="the past windows")
        self.publish(("cam1", "cam2"), 2)
        # shown before the kill: a restart without persistence loses what no one read yet
        wait_for(lambda: all(2 in shown().get(sid, []) for sid in ("cam1", "cam2") if sid in expected),
                 what="a window published live")
        self.server.kill()
        self.server.stop()
        assert set(self.publish(("cam1", "cam2"), 3, 4)) == {PublishResult.BUFFERED}
        self.register("cam3")
        assert set(self.publish(("cam3",), 0, 1)) == {PublishResult.BUFFERED}
        time.sleep(1.0)  # the follower meets the outage
        self.server.start()
        wait_for(lambda: self.pub.buffered == 0, what="the publisher's buffer written")
        self.publish(("cam1", "cam2"), 5, 6)
        self.publish(("cam3",), 2)
        wait_for(lambda: all(shown().get(sid, [])[-1:] == windows[-1:] for sid, windows in expected.items()),
                 what="every window")
        time.sleep(FOLLOW_CATCH_UP_S + 1.0)

    def __enter__(self) -> Restart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pub.close()
        self.server.close()


def by_stream(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for sid, window in list(pairs):
        out.setdefault(sid, []).append(window)
    return out


@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "no-persistence"])
def test_client_follower_misses_nothing_and_repeats_nothing(persistent):
    """SlowFastClient.follow() over all streams: the run's caption printer."""
    with Restart(persistent) as scenario:
        scenario.before()
        stop, seen, markers = threading.Event(), [], []
        client = SlowFastClient(scenario.url)
        updates = client.updates(kinds=(NotificationKind.CAPTION,), past=1, stop=stop, poll_s=0.2)

        def consume() -> None:
            for update in updates:
                if update.entry is not None:
                    seen.append((update.stream, update.entry.window))
                else:
                    markers.append(update.kind)

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        try:
            scenario.run(lambda: by_stream(seen))
        finally:
            stop.set()
            thread.join(10)
            client.close()
        assert by_stream(seen) == EXPECTED
        assert markers.count(OUTAGE) == 1 and markers[0] == RESYNC and markers[-1] == RESYNC
        assert RESYNC in markers[markers.index(OUTAGE):]  # re-read once Redis was back


def test_entries_without_nudges_are_found_by_the_re_read(redis_url):
    """No nudge at all (a publisher without them, then a burst written straight to the stream,
    longer than one read): the periodic re-read finds every entry, in order, once."""
    with Publisher(redis_url, notify=False) as pub, SlowFastClient(redis_url) as client:
        run = pub.register_stream(StreamInfo(id="cam1", source="rtsp://cam/1")).run
        stop, seen = threading.Event(), []
        captions = client.follow("cam1", stop=stop, poll_s=0.2)
        thread = threading.Thread(target=lambda: seen.extend(c.window for c in captions), daemon=True)
        thread.start()
        pub.publish_window(make_caption(0, run=run))
        burst = range(1, 2 * READ_BATCH + 2)
        r = connect(redis_url)
        with r.pipeline(transaction=False) as pipe:
            for w in burst:
                caption = make_caption(w, run=run)
                pipe.xadd(Keys().captions("cam1"), encode_entry(caption), id=caption.entry_id)
            pipe.execute()
        wait_for(lambda: len(seen) > burst[-1], timeout=FOLLOW_CATCH_UP_S + 30, what="the re-read")
        time.sleep(FOLLOW_CATCH_UP_S + 1.0)
        stop.set()
        thread.join(10)
        r.close()
        assert seen == [0, *burst]


class Lines:
    """A real `slowfast` process, its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([SLOWFAST, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "300"})
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def shown(self) -> dict[str, list[int]]:
        return by_stream([(m[1], int(m[2])) for line in list(self.lines) if (m := LINE.search(line))])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(5)


@pytest.mark.parametrize("command, persistent", [("tail", True), ("events", False)])
def test_cli_follows_across_a_restart(command, persistent):
    with Restart(persistent) as scenario:
        scenario.before()
        lines = Lines(command, "--redis-url", scenario.url, "--count", "1")
        try:
            scenario.run(lines.shown)
        finally:
            lines.close()
        assert lines.shown() == EXPECTED, lines.lines
        assert all(LINE.search(line) for line in lines.lines), lines.lines  # nothing but the entries
        if command == "tail":  # each line whole: the caption in Redis, with its stream times
            with SlowFastClient(scenario.url) as client:
                captions = {(c.stream, c.window): c for sid in EXPECTED for c in client.history(sid, count=100)}
            shown = [(m[1], int(m[2])) for line in lines.lines if (m := LINE.search(line))]
            assert [line.rstrip("\n") for line in lines.lines] == [
                f"{c.stream} #{c.window} [{c.start:.2f}s-{c.end:.2f}s] {c.text}" for c in map(captions.get, shown)]


def test_web_update_stream_follows_across_a_restart():
    """The stream page's way: a `stream` update naming a newer caption fetches the captions after
    the newest one shown."""
    with Restart(True) as scenario:
        scenario.before()
        server = WebServer(scenario.url, "127.0.0.1", 0).start()
        api = httpx.Client(base_url=server.url, timeout=30)
        newest = api.get("/api/streams/cam1/captions", params={"count": 1}).json()[0]
        shown, redis_states, stop = [newest["window"]], [], threading.Event()
        state = {"newest": newest["entry_id"]}

        def on_summary(summary: dict) -> None:
            caption = summary["caption"]
            if caption is None or not _newer(caption["entry_id"], state["newest"]):
                return
            page = api.get("/api/streams/cam1/captions", params={"after": state["newest"], "count": 500})
            if page.status_code != 200:
                return  # as the page: the next update tries again
            for c in reversed(page.json()):
                shown.append(c["window"])
                state["newest"] = c["entry_id"]

        def listen() -> None:
            sse = httpx.Client(base_url=server.url, timeout=httpx.Timeout(30, read=None))
            with sse, sse.stream("GET", "/api/updates", params={"stream": "cam1"}) as response:
                kind = None
                for line in response.iter_lines():
                    if stop.is_set():
                        return
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "stream":
                        on_summary(json.loads(line[6:]))
                    elif line.startswith("data: ") and kind == "redis":
                        redis_states.append(json.loads(line[6:])["ok"])

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        try:
            scenario.run(lambda: {"cam1": list(shown)}, {"cam1": EXPECTED["cam1"]})
        finally:
            stop.set()
            server.stop()
            thread.join(10)
        assert shown == EXPECTED["cam1"]
        assert redis_states == [False, True]


def _newer(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) > tuple(map(int, b.split("-")))
