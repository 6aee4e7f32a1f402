"""SlowFastClient against data written by the Publisher, with real answerer threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from connectors.client import QuestionError, SlowFastClient
from connectors.intake import ControlIntake, QuestionIntake
from connectors.publisher import Publisher
from connectors.redis_schema import (
    Answer,
    Control,
    IngestState,
    InvalidMessage,
    Question,
    StreamInfo,
    StreamStatus,
)

from tests.support.records import make_caption, make_event


@pytest.fixture
def setup(redis_url: str) -> Iterator[tuple[Publisher, SlowFastClient, int]]:
    pub = Publisher(redis_url)
    info = pub.register_stream(StreamInfo(id="cam1", source="rtsp://admin:pw@cam/1", config={"fps": 4}))
    pub.register_stream(StreamInfo(id="clip", source="/data/clip.mp4", live=False))
    client = SlowFastClient(redis_url)
    yield pub, client, info.run
    client.close()
    pub.close()


def serve(stop: threading.Event, handle, intake) -> threading.Thread:
    """Run `handle(intake, entry_id, msg)` for every valid message until `stop`."""

    def loop() -> None:
        while not stop.is_set():
            for entry_id, msg in intake.poll(block_ms=100):
                if not isinstance(msg, InvalidMessage):
                    handle(intake, entry_id, msg)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_reading_results(setup) -> None:
    pub, client, run = setup
    assert [s.id for s in client.streams()] == ["cam1", "clip"]
    assert client.stream("cam1").source == "rtsp://admin:***@cam/1"
    assert client.latest("cam1") is None and client.status("cam1") is None
    ev = make_event(3, run=run, trigger="starts_with:yes", probability=None)
    for w in range(5):
        answers = [Answer(question_id="bay", stream="cam1", window=w, text="Yes" if w == 3 else "No")]
        pub.publish_window(make_caption(w, run=run), answers, [ev] if w == 3 else [])
    pub.publish_status(StreamStatus(stream="cam1", state=IngestState.LIVE, fps_in=4.0, windows_skipped=1))

    assert client.latest("cam1").text == "window 4"
    assert [a.text for a in client.latest_answers("cam1")] == ["No"]
    assert [c.window for c in client.history("cam1")] == [0, 1, 2, 3, 4]
    assert [c.window for c in client.history("cam1", count=2)] == [3, 4]
    since = client.history("cam1")[1].entry_id
    assert [c.window for c in client.history("cam1", since=since)] == [2, 3, 4]
    assert [a.window for a in client.answers("cam1")] == [0, 1, 2, 3, 4]
    assert client.events("cam1") == [ev]
    status = client.status("cam1")
    assert status.state is IngestState.LIVE and status.windows_skipped == 1 and status.offline_dropped == 0


def test_follow_sees_new_captions_in_order(setup, redis_url: str) -> None:
    pub, client, run = setup
    pub.publish_window(make_caption(0, run=run))
    stop = threading.Event()
    seen: list[int] = []

    def consume() -> None:
        with SlowFastClient(redis_url) as c:
            for cap in c.follow("cam1", since=make_caption(0, run=run).entry_id, stop=stop, poll_s=0.1):
                seen.append(cap.window)
                if len(seen) == 5:
                    stop.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    for w in range(1, 6):
        pub.publish_window(make_caption(w, run=run))
    thread.join(10)
    assert seen == [1, 2, 3, 4, 5]

    # without `since`, follow starts after the newest caption at the time of the call
    tail = client.follow("cam1", poll_s=0.1)
    pub.publish_window(make_caption(6, run=run))
    assert next(tail).window == 6


def test_notifications_push(setup, redis_url: str) -> None:
    pub, client, run = setup
    stop = threading.Event()
    got: list[tuple[str, str, int | None]] = []
    with SlowFastClient(redis_url) as c:
        nudges = c.notifications(stop=stop, poll_s=0.1)  # subscribed from here on

        def listen() -> None:
            for n in nudges:
                got.append((n.kind.value, n.stream, n.window))
                if n.kind == "removed":
                    stop.set()

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        pub.publish_window(make_caption(0, run=run))
        pub.publish_status(StreamStatus(stream="clip", state=IngestState.ENDED))
        pub.unregister_stream("clip")
        thread.join(5)
    assert got == [("caption", "cam1", 0), ("status", "clip", None), ("removed", "clip", None)]


def test_ask_round_trip_with_an_answering_thread(setup, redis_url: str) -> None:
    pub, client, run = setup
    seen: list[Question] = []

    def answer(intake: QuestionIntake, entry_id: str, q: Question) -> None:
        seen.append(q)
        if q.stream == "clip":
            intake.reply_error(q, "no window yet for stream 'clip'")
            intake.ack(entry_id)
        else:
            intake.complete(
                entry_id,
                q,
                Answer(
                    question_id=q.id,
                    stream=q.stream,
                    question=q.text,
                    window=7,
                    text="Yes, one person",
                    probability=0.87,
                ),
            )

    stop = threading.Event()
    with QuestionIntake(redis_url, "answerer") as intake:
        thread = serve(stop, answer, intake)
        try:
            reply = client.ask("cam1", "Is anyone in the loading bay?", timeout=10, kind="yesno")
            assert reply.text == "Yes, one person" and reply.probability == 0.87 and reply.window == 7
            assert seen[0].kind == "yesno" and seen[0].text == "Is anyone in the loading bay?"

            with pytest.raises(QuestionError, match="no window yet") as err:
                client.ask("clip", "what happens?", timeout=10)
            assert err.value.reply.question_id

            with pytest.raises(QuestionError, match="unknown stream 'ghost'"):
                client.ask("ghost", "anyone?", timeout=10)  # rejected by the intake itself
        finally:
            stop.set()
            thread.join(5)
    with pytest.raises(ValueError):
        client.ask("cam1", "", timeout=1)


def test_ask_times_out_without_answerer(setup) -> None:
    _, client, _ = setup
    with pytest.raises(TimeoutError, match="no reply"):
        client.ask("cam1", "anyone?", timeout=0.3)


def test_add_and_remove_stream_via_control(setup, redis_url: str) -> None:
    pub, client, _ = setup

    def control(intake: ControlIntake, entry_id: str, msg: Control) -> None:
        if msg.action == "add":
            pub.register_stream(StreamInfo(id=msg.stream, source=msg.source, live=bool(msg.live), config=msg.config))
            intake.complete(entry_id, msg)
        elif msg.stream not in {s.id for s in client.streams()}:
            intake.complete(entry_id, msg, error=f"no stream {msg.stream!r}")
        else:
            pub.unregister_stream(msg.stream)
            intake.complete(entry_id, msg)

    stop = threading.Event()
    with ControlIntake(redis_url, "supervisor") as intake:
        thread = serve(stop, control, intake)
        try:
            assert client.add_stream("cam9", "rtsp://u:secret@cam/9", live=True, config={"fps": 2}, timeout=10).ok
            assert client.stream("cam9").source == "rtsp://u:***@cam/9"
            assert client.remove_stream("cam9", timeout=10).ok
            assert client.stream("cam9") is None
            with pytest.raises(QuestionError, match="no stream 'cam9'"):
                client.remove_stream("cam9", timeout=10)
            assert client.add_stream("cam8", "rtsp://cam/8") is None  # fire and forget
        finally:
            stop.set()
            thread.join(5)
