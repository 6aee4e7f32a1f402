"""Redis restarts under the connectors (no Ray): the publisher writes back what a restart without
persistence lost and flushes its buffer by itself; the intake re-creates its consumer group; the
driver's outage tracker logs once per outage. Real redis-server processes, SIGKILLed."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from connectors.embedded import EmbeddedRedis
from connectors.intake import QuestionIntake
from connectors.publisher import Publisher, PublishResult
from connectors.redis_conn import UNREACHABLE, Outage, connect
from connectors.redis_schema import Caption, IngestState, Keys, Question, StreamInfo, StreamStatus, decode_entry, encode_entry
from tests.support.records import make_caption

K = Keys()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def crash_and_restart(server: EmbeddedRedis) -> None:
    """SIGKILL (no shutdown save) and start again on the same port."""
    server.kill()
    server.stop()
    server.start()


def test_publisher_restores_registry_and_status_after_a_restart_without_persistence() -> None:
    with EmbeddedRedis() as server:
        r = connect(server.url)
        pub = Publisher(server.url, maintain_interval_s=0.2)
        info = pub.register_stream(StreamInfo(id="cam1", source="rtsp://cam/1", live=True))
        pub.publish_status(StreamStatus(stream="cam1", state=IngestState.LIVE, frames_in=7))
        pub.register_stream(StreamInfo(id="gone", source="x.mp4", live=False))
        pub.unregister_stream("gone")  # removed: must stay removed
        r.set("written-before-the-crash", 1)  # the publisher never writes it back
        crash_and_restart(server)
        # The restart lost the data set. (The registry itself may already be back: the
        # publisher checks every 0.2 s, and nothing here can be sure to look first.)
        assert not r.exists("written-before-the-crash")
        # Nothing new is published: the publisher notices on its own.
        wait_for(lambda: r.hexists(K.registry, "cam1") and r.exists(K.status("cam1")), timeout=10)
        assert StreamInfo.model_validate_json(r.hget(K.registry, "cam1")).run == info.run
        assert r.hget(K.status("cam1"), "frames_in") == "7"
        assert not r.hexists(K.registry, "gone") and not r.exists(K.status("gone"))
        pub.close()


def test_publisher_flushes_its_buffer_in_order_without_a_new_write() -> None:
    with EmbeddedRedis(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        r = connect(server.url)
        pub = Publisher(server.url, reconnect_interval_s=0.1, maintain_interval_s=0.2, retries=0)
        assert pub.publish_window(make_caption(0)) is PublishResult.PUBLISHED
        server.kill()
        server.stop()
        assert [pub.publish_window(make_caption(w)) for w in (1, 2, 3)] == [PublishResult.BUFFERED] * 3
        server.start()
        wait_for(lambda: pub.buffered == 0, timeout=10)
        assert [decode_entry(Caption, f).window for _, f in r.xrange(K.captions("cam1"))] == [0, 1, 2, 3]
        pub.close()


def test_intake_recreates_its_group_after_a_restart_without_persistence() -> None:
    with EmbeddedRedis() as server:
        r = connect(server.url)
        intake = QuestionIntake(server.url, "driver-test")
        r.hset(K.registry, "cam1", StreamInfo(id="cam1", source="x", live=True).to_json())
        server.kill()
        with pytest.raises(UNREACHABLE):
            intake.poll(block_ms=10)
        server.stop()
        server.start()
        assert intake.poll(block_ms=10) == []  # NOGROUP: group and stream created again
        assert r.xinfo_groups(K.questions)[0]["name"] == "answerers"
        r.hset(K.registry, "cam1", StreamInfo(id="cam1", source="x", live=True).to_json())
        r.xadd(K.questions, encode_entry(Question(stream="cam1", text="anyone?")))
        [(entry_id, question)] = intake.poll(block_ms=1000)
        assert question.text == "anyone?"
        intake.close()


def test_outage_logs_one_line_when_it_starts_and_one_when_it_ends(caplog) -> None:
    outage = Outage("driver", logging.getLogger("test.outage"))
    with caplog.at_level(logging.INFO, logger="test.outage"):
        waits = [outage.failed(redis.ConnectionError("refused")) for _ in range(20)]
        assert outage.down and all(0 <= w <= 5.0 for w in waits)
        seconds = outage.ended()
        assert seconds is not None and not outage.down and outage.ended() is None
    assert [r.getMessage().split(":")[1].strip()[:17] for r in caplog.records] == [
        "Redis unreachable", "Redis reachable a"]
