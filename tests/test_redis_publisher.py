"""Publisher against a real redis-server: transactions, idempotency, caps, offline buffer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from connectors.embedded import EmbeddedRedis
from connectors.publisher import Publisher, PublishResult
from connectors.redis_conn import connect
from connectors.redis_schema import (
    Answer,
    AnswerKind,
    Caption,
    IngestState,
    Keys,
    StreamInfo,
    StreamStatus,
    decode_entry,
)

from tests.support.records import RUN, make_caption, make_event

K = Keys()


def answer(window: int, qid: str = "bay") -> Answer:
    return Answer(
        question_id=qid,
        stream="cam1",
        question="anyone?",
        kind=AnswerKind.STANDING,
        window=window,
        text="Yes",
        probability=0.9,
    )


def windows_in(r, sid: str = "cam1") -> list[int]:
    return [decode_entry(Caption, f).window for _, f in r.xrange(K.captions(sid))]


def test_window_is_one_transaction(redis_url: str) -> None:
    r = connect(redis_url)
    with Publisher(redis_url) as pub:
        pub.redis.ping()  # connect before counting commands
        r.config_resetstat()
        c = make_caption(0)
        assert pub.publish_window(c, [answer(0), answer(0, "door")], [make_event(0)]) is PublishResult.PUBLISHED
        stats = r.info("commandstats")
    assert stats["cmdstat_multi"]["calls"] == 1 and stats["cmdstat_exec"]["calls"] == 1
    assert stats["cmdstat_xadd"]["calls"] == 4  # caption, two answers, one event
    assert "cmdstat_hset" in stats and "cmdstat_publish" in stats  # inside the same EXEC
    assert r.xrange(K.captions("cam1"))[0][0] == f"{RUN}-0"
    assert [e[0] for e in r.xrange(K.answers("cam1"))] == [f"{RUN}-0", f"{RUN}-1"]
    assert r.xlen(K.events("cam1")) == 1
    state = r.hgetall(K.state("cam1"))
    assert state["caption"] == "window 0" and state["window"] == "0" and state["entry_id"] == f"{RUN}-0"
    assert decode_entry(Caption, state) == c
    week = 7 * 24 * 3600
    written = [key for key in K.per_stream("cam1") if r.exists(key)]
    assert len(written) >= 4 and all(week - 60 <= r.ttl(key) <= week for key in written)  # each write refreshes it


def test_retried_publish_is_not_duplicated(redis_url: str) -> None:
    r = connect(redis_url)
    with Publisher(redis_url) as pub:
        assert pub.publish_window(make_caption(0), [answer(0)], [make_event(0)]) is PublishResult.PUBLISHED
        assert pub.publish_window(make_caption(1), [answer(1)]) is PublishResult.PUBLISHED
        # an actor retry of window 1, and a late retry of window 0
        assert pub.publish_window(make_caption(1), [answer(1)]) is PublishResult.DUPLICATE
        assert pub.publish_window(make_caption(0), [answer(0)], [make_event(0)]) is PublishResult.DUPLICATE
        assert pub.stats.duplicates == 2
    assert windows_in(r) == [0, 1]
    assert r.xlen(K.answers("cam1")) == 2 and r.xlen(K.events("cam1")) == 1
    assert r.hget(K.state("cam1"), "window") == "1"  # the late retry of window 0 did not win "latest"


def test_history_is_capped(redis_url: str) -> None:
    r = connect(redis_url)
    with Publisher(redis_url, history_len=50, answers_len=50) as pub:
        for w in range(600):
            pub.publish_window(make_caption(w), [answer(w)])
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): bounded, not exact
    assert 50 <= r.xlen(K.captions("cam1")) <= 150
    assert 50 <= r.xlen(K.answers("cam1")) <= 150
    assert windows_in(r)[-1] == 599


def test_status_and_registry(redis_url: str) -> None:
    r = connect(redis_url)
    with Publisher(redis_url, removed_ttl_s=120) as pub:
        info = pub.register_stream(StreamInfo(id="cam1", source="rtsp://u:secret@cam/1", config={"fps": 4}))
        assert info.run >= int(time.time() * 1000) - 5000
        pub.publish_window(make_caption(0, run=info.run))
        # a new run starts above everything the stream already has
        again = pub.register_stream(StreamInfo(id="cam1", source="rtsp://cam/1"))
        assert again.run > info.run
        # resuming keeps the run, so re-published windows stay idempotent
        assert pub.register_stream(info).run == info.run
        pub.publish_status(StreamStatus(stream="cam1", state=IngestState.LIVE, fps_in=4.0, windows_skipped=3))
        status = r.hgetall(K.status("cam1"))
        assert status["state"] == "live" and status["windows_skipped"] == "3"
        assert "secret" not in r.hget(K.registry, "cam1")

        assert pub.unregister_stream("cam1") is PublishResult.PUBLISHED
    assert not r.hexists(K.registry, "cam1")
    for key in (K.captions("cam1"), K.state("cam1"), K.status("cam1")):
        assert 0 < r.ttl(key) <= 120


def test_refused_write_raises_and_does_not_block(redis_url: str) -> None:
    from connectors.publisher import PublishError

    r = connect(redis_url)
    r.set(K.captions("bad"), "not a stream")
    with Publisher(redis_url) as pub:
        with pytest.raises(PublishError, match="bad"):
            pub.publish_window(make_caption(0, stream="bad"))
        assert pub.publish_window(make_caption(0)) is PublishResult.PUBLISHED
        assert pub.buffered == 0


def test_offline_buffer_flushes_in_order_and_counts_overflow() -> None:
    with EmbeddedRedis(save=True) as server:  # save: data survives the restart (RDB on shutdown)
        r = connect(server.url)
        pub = Publisher(server.url, buffer_size=5, reconnect_interval_s=0.0, retries=1)
        for w in range(3):
            assert pub.publish_window(make_caption(w)) is PublishResult.PUBLISHED

        server.stop()
        results = [pub.publish_window(make_caption(w)) for w in range(3, 10)]  # 7 writes, room for 5
        pub.publish_status(StreamStatus(stream="cam1", state=IngestState.RECONNECTING))
        pub.publish_status(StreamStatus(stream="cam1", state=IngestState.LIVE))  # supersedes the one above
        assert results == [PublishResult.BUFFERED] * 7
        assert not pub.stats.online
        assert pub.stats.overflowed == 3 and pub.stats.overflowed_by_stream["cam1"] == 3  # 8 ops, 5 slots

        server.start()  # same port
        assert pub.publish_window(make_caption(10)) is PublishResult.PUBLISHED
        assert pub.stats.online and pub.buffered == 0
        assert pub.stats.flushed == 5

        # windows 3-5 were the oldest when the buffer overflowed; the rest arrived in order
        assert windows_in(r) == [0, 1, 2, 6, 7, 8, 9, 10]
        status = r.hgetall(K.status("cam1"))
        assert status["state"] == "live" and status["offline_dropped"] == "3"
        pub.close()


def test_publisher_is_safe_across_threads(redis_url: str) -> None:
    """The pipeline may call one publisher from several asyncio.to_thread workers."""
    from concurrent.futures import ThreadPoolExecutor

    r = connect(redis_url)

    def run_stream(sid: str) -> list[PublishResult]:
        return [pub.publish_window(make_caption(w, stream=sid)) for w in range(50)]

    with Publisher(redis_url) as pub, ThreadPoolExecutor(4) as pool:
        results = [x for res in pool.map(run_stream, ["s0", "s1", "s2", "s3"]) for x in res]
    assert set(results) == {PublishResult.PUBLISHED}
    assert [windows_in(r, f"s{i}") for i in range(4)] == [list(range(50))] * 4


def test_out_of_order_window_is_refused_and_counted(redis_url: str) -> None:
    r = connect(redis_url)
    with Publisher(redis_url) as pub:
        pub.publish_window(make_caption(5))
        assert pub.publish_window(make_caption(4)) is PublishResult.OUT_OF_ORDER
        assert pub.publish_window(make_caption(5)) is PublishResult.DUPLICATE
        assert pub.stats.out_of_order == 1 and pub.stats.duplicates == 1
    assert windows_in(r) == [5]


def test_prune_registry_drops_only_streams_whose_keys_expired(redis_url):
    pub = Publisher(redis_url)  # keys live 7 days after the last write
    short_lived = Publisher(redis_url, key_ttl_s=1)
    r = connect(redis_url)
    eight_days_ago = time.time() - 8 * 24 * 3600
    for sid in ("gone", "kept"):
        short_lived.register_stream(StreamInfo(id=sid, source="/v.mp4", registered_at=eight_days_ago))
        short_lived.publish_status(StreamStatus(stream=sid, state=IngestState.ENDED))
    pub.publish_status(StreamStatus(stream="kept", state=IngestState.LIVE))  # written again: kept 7 days
    pub.register_stream(StreamInfo(id="fresh", source="/v.mp4"))  # registered now, nothing written yet
    deadline = time.monotonic() + 30
    while r.exists(*K.per_stream("gone")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pub.prune_registry() == ["gone"]
    assert set(r.hkeys(K.registry)) == {"kept", "fresh"}


class ClosingPort:
    """A port that accepts each connection and closes it at once, counting them: a Redis that
    is unreachable, where every attempt to reach it can be seen."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.attempts = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                conn, _ = self.sock.accept()
                self.attempts += 1  # before the close the client is waiting on
                conn.close()

    def close(self) -> None:
        self.sock.close()


def test_an_unreachable_redis_is_tried_once_per_reconnect_interval_not_per_write() -> None:
    """While offline a write buffers straight away (no connection attempt, so no time spent)
    until `reconnect_interval_s` has passed since the last try."""
    port = ClosingPort()
    pub = Publisher(port.url, reconnect_interval_s=3600, retries=1, maintain_interval_s=None)
    try:
        assert pub.publish_window(make_caption(0)) is PublishResult.BUFFERED
        tried = port.attempts
        assert tried >= 1 and not pub.stats.online
        results = [pub.publish_window(make_caption(w)) for w in range(1, 8)]
        pub.publish_status(StreamStatus(stream="cam1", state=IngestState.RECONNECTING))
        assert results == [PublishResult.BUFFERED] * 7 and pub.buffered == 9
        assert port.attempts == tried
    finally:
        port.close()
