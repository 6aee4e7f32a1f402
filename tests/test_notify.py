"""Event notifications against a real local HTTP receiver (http.server in a thread) and a real
Redis: signed deliveries that survive a receiver that is down and comes back, one idempotency
key per delivery across its retries, failures written down and counted, a stop that delivers
or writes down what is due, and captions that never wait for a receiver."""

from __future__ import annotations

import logging
import statistics
import threading
import time

import pytest

from connectors.client import SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import EventPhase, IngestState
from pipeline.config import ConfigError, StandingQuestion, StreamConfig, load_config
from pipeline.messages import IngestReport
from pipeline.notify import IDEMPOTENCY_HEADER, Notifier
from tests.support.media import free_port
from tests.support.records import make_event
from tests.support.webhook import WebhookReceiver

SECRET = "a-shared-secret"


def question(**fields) -> StandingQuestion:
    return StandingQuestion(id="bay", prompt="Is anyone in the loading bay?", trigger={"p_yes_above": 0.5}, **fields)


def stream(*sinks: dict, sid: str = "cam1") -> StreamConfig:
    return StreamConfig(id=sid, source="rtsp://10.0.0.7/stream1", notify=list(sinks))


def record(phase: EventPhase, window: int, first_window: int = 3, sid: str = "cam1"):
    return make_event(window, stream=sid, question_id="bay", phase=phase, first_window=first_window)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert predicate()


@pytest.fixture
def publisher(redis_url):
    pub = Publisher(redis_url)
    yield pub
    pub.close()


def test_each_open_and_close_arrives_signed_after_the_receiver_comes_back(publisher, redis_url):
    """The receiver is not listening for the first second, then answers 503 twice, then 200:
    both records arrive, in order, signed, each delivery with one key over all its attempts."""
    port = free_port()
    notifier = Notifier(write_down=publisher.publish_undelivered, backoff_s=0.2)
    config = stream({"webhook": f"http://127.0.0.1:{port}/hook", "secret": SECRET})
    opened, closed = record(EventPhase.OPENED, 3), record(EventPhase.CLOSED, 7)
    notifier.event(config, question(), opened)
    notifier.event(config, question(), closed)
    time.sleep(1.0)
    assert notifier.stream_stats("cam1").pending == 2 and "Connection" in notifier.stream_stats("cam1").last_error
    receiver = WebhookReceiver(port, status=lambda n: 503 if n < 2 else 200)
    try:
        wait_for(lambda: len(receiver.accepted()) == 2)
        arrivals = receiver.all()
    finally:
        receiver.stop()
        notifier.close(1.0)

    accepted = [a for a in arrivals if a.status == 200]
    assert [a.event["phase"] for a in accepted] == ["opened", "closed"]
    assert all(a.signed_by(SECRET) and a.path == "/hook" for a in arrivals)
    assert accepted[0].event["event_id"] == accepted[1].event["event_id"] == "bay:1700000000000:3"
    # The open was answered 503 twice (after refused connections): three arrivals, one key,
    # one body, attempts counted up; the close has a key of its own.
    opens = [a for a in arrivals if a.event["phase"] == "opened"]
    assert [a.status for a in opens] == [503, 503, 200]
    assert len({a.headers[IDEMPOTENCY_HEADER.lower()] for a in opens}) == 1 and len({a.body for a in opens}) == 1
    assert [int(a.headers["x-slowfast-attempt"]) for a in opens] == sorted(int(a.headers["x-slowfast-attempt"])
                                                                           for a in opens)
    assert int(opens[0].headers["x-slowfast-attempt"]) > 1  # refused connections were attempts too
    assert accepted[1].headers[IDEMPOTENCY_HEADER.lower()] != opens[0].headers[IDEMPOTENCY_HEADER.lower()]
    stats = notifier.stream_stats("cam1")
    assert (stats.delivered, stats.failed, stats.pending) == (2, 0, 0)
    assert SlowFastClient(redis_url).undelivered("cam1") == []


def test_a_sink_named_by_the_stream_and_its_question_gets_each_record_once(publisher):
    receiver = WebhookReceiver()
    notifier = Notifier(write_down=publisher.publish_undelivered)
    try:
        sink = {"webhook": receiver.url(), "secret": SECRET}
        other = WebhookReceiver()
        notifier.event(stream(sink), question(notify=[sink, {"webhook": other.url("/q")}]), record(EventPhase.OPENED, 3))
        wait_for(lambda: receiver.accepted() and other.accepted())
        assert notifier.close(5.0) == 0
        assert len(receiver.all()) == 1 and len(other.all()) == 1
        assert "x-slowfast-signature" not in other.all()[0].headers  # no secret: unsigned
    finally:
        receiver.stop()
        other.stop()


def test_refused_and_exhausted_deliveries_are_written_down_and_counted(publisher, redis_url, caplog):
    refusing = WebhookReceiver(status=lambda n: 401)
    failing = WebhookReceiver(status=lambda n: 503)
    notifier = Notifier(write_down=publisher.publish_undelivered, backoff_s=0.05)
    try:
        notifier.event(stream({"webhook": refusing.url(), "secret": SECRET}), question(),
                       record(EventPhase.OPENED, 3))
        notifier.event(stream({"webhook": failing.url(), "max_attempts": 3}, sid="cam2"), question(),
                       record(EventPhase.OPENED, 3, sid="cam2"))
        with caplog.at_level(logging.WARNING, logger="slowfast.notify"):
            wait_for(lambda: notifier.stream_stats("cam1").failed == 1 and notifier.stream_stats("cam2").failed == 1)
    finally:
        notifier.close(1.0)
        refusing.stop()
        failing.stop()
    assert len(refusing.all()) == 1  # a 401 never improves: not retried
    assert len(failing.all()) == 3  # max_attempts
    client = SlowFastClient(redis_url)
    (refused,) = client.undelivered("cam1")
    assert (refused.attempts, refused.error, refused.phase) == (1, "HTTP 401 Unauthorized", EventPhase.OPENED)
    assert refused.event.event_id == refused.event_id == "bay:1700000000000:3" and refused.sink == refusing.url()
    (exhausted,) = client.undelivered("cam2")
    assert (exhausted.attempts, exhausted.error) == (3, "HTTP 503 Service Unavailable")
    stats = notifier.stream_stats("cam2")
    assert "HTTP 503" in stats.last_error and stats.last_error_at is not None
    assert sum("not delivered" in r.getMessage() for r in caplog.records) == 2


def test_at_the_stop_a_due_delivery_is_delivered_or_written_down(publisher, redis_url, caplog):
    # Nobody listens: both records are still due when the stop's time is up.
    port = free_port()
    notifier = Notifier(write_down=publisher.publish_undelivered, backoff_s=0.1)
    config = stream({"webhook": f"http://user:pw@127.0.0.1:{port}/hook", "secret": SECRET})
    notifier.event(config, question(), record(EventPhase.OPENED, 3))
    notifier.event(config, question(), record(EventPhase.CLOSED, 5))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="slowfast.notify"):
        assert notifier.close(1.0) == 2
    assert time.monotonic() - started < 5
    written = SlowFastClient(redis_url).undelivered("cam1")
    assert [u.phase for u in written] == [EventPhase.OPENED, EventPhase.CLOSED]
    assert written[0].attempts >= 1 and written[1].attempts == 0  # the close waited behind the open
    assert all(u.error.startswith("still due at the stop") and "pw" not in u.sink for u in written)
    assert sum("not delivered" in r.getMessage() for r in caplog.records) == 2
    assert notifier.stream_stats("cam1").failed == 2

    # A receiver that comes back during the stop gets both.
    port = free_port()
    notifier = Notifier(write_down=publisher.publish_undelivered, backoff_s=0.1)
    config = stream({"webhook": f"http://127.0.0.1:{port}/hook", "secret": SECRET}, sid="cam2")
    notifier.event(config, question(), record(EventPhase.OPENED, 3, sid="cam2"))
    notifier.event(config, question(), record(EventPhase.CLOSED, 5, sid="cam2"))
    timer = threading.Timer(0.5, lambda: receivers.append(WebhookReceiver(port)))
    receivers: list[WebhookReceiver] = []
    timer.start()
    try:
        assert notifier.close(10.0) == 0
        assert [a.event["phase"] for a in receivers[0].accepted()] == ["opened", "closed"]
    finally:
        timer.join()
        for r in receivers:
            r.stop()
    assert SlowFastClient(redis_url).undelivered("cam2") == []


def test_publish_to_arrival_latency(publisher):
    """Records handed over right after their window's publish reach a healthy receiver fast."""
    receiver = WebhookReceiver()
    notifier = Notifier(write_down=publisher.publish_undelivered)
    config = stream({"webhook": receiver.url(), "secret": SECRET})
    handed = []
    try:
        for i in range(40):
            phase = EventPhase.OPENED if i % 2 == 0 else EventPhase.CLOSED
            handed.append(time.time())
            notifier.event(config, question(), record(phase, 3 + i, first_window=3 + i - i % 2))
            time.sleep(0.02)
        wait_for(lambda: len(receiver.accepted()) == 40)
    finally:
        notifier.close(1.0)
        receiver.stop()
    delays = [a.at - t for a, t in zip(receiver.accepted(), handed)]
    median = statistics.median(delays)
    print(f"\nhand-over -> webhook arrival: median {median * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms")
    assert median < 1.0


def test_the_yaml_form_loads_and_a_bad_sink_is_one_line(tmp_path):
    path = tmp_path / "slowfast.yaml"
    path.write_text("""
streams:
  - id: bay
    source: rtsp://10.0.0.7/stream1
    notify:
      - webhook: http://127.0.0.1:9/path
        secret: a-shared-secret        # HMAC-SHA256 of the body, in a header
    standing_questions:
      - id: anyone
        prompt: Is anyone there?
        trigger: {p_yes_above: 0.8}
        notify:
          - webhook: https://hooks.example.com/on-call
""")
    config = load_config(path)
    (sink,) = config.streams[0].notify
    assert sink.webhook == "http://127.0.0.1:9/path" and sink.secret.get_secret_value() == SECRET
    assert "a-shared-secret" not in str(config.streams[0].model_dump(mode="json"))  # the registry's copy
    assert config.streams[0].standing_questions[0].notify[0].webhook == "https://hooks.example.com/on-call"
    path.write_text("streams: [{id: bay, source: x.mp4, notify: [{webhook: 'ftp://host/x'}]}]")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert "\n" not in str(raised.value) and "http:// or https://" in str(raised.value)


def test_a_receiver_that_never_answers_delays_no_caption(tiny_vlm, redis_url, tmp_path):
    """The engine with the tiny model: an event opens on window 0 and its delivery hangs in a
    receiver that does not answer; every window is still captioned and published, the status
    shows the delivery pending; once the file ends its close queues behind it, and both
    arrive when the receiver answers."""
    from pipeline.engine import Engine
    from pipeline.window import FrameRef, Window
    from tests.support.random_model import random_frames

    window, stride, count = 4, 2, 4
    images = random_frames(window + stride * (count - 1), size=64)
    refs = [FrameRef(i, i / 4.0, time.time() + i / 4.0, None) for i in range(len(images))]
    windows = [Window("file", k, tuple(refs[k * stride : k * stride + window]), live=False) for k in range(count)]
    receiver = WebhookReceiver()
    receiver.hold.clear()
    publisher = Publisher(redis_url)
    notifier = Notifier(write_down=publisher.publish_undelivered)
    config = load_config(None, redis_url=redis_url, out_dir=tmp_path, window=window, stride=stride, fps=4.0,
                         batch_size=2, generation={"max_new_tokens": 3})
    engine = Engine(config, tiny_vlm, publisher, lambda fs: [images[f.seq] for f in fs], model_name="tiny",
                    notifier=notifier)
    always = {"id": "any", "prompt": "Is anything there?", "trigger": {"p_yes_above": 0.0}}
    engine.add_stream(StreamConfig(id="file", source="clip.mp4", standing_questions=[always],
                                   notify=[{"webhook": receiver.url(), "secret": SECRET, "timeout_s": 60}]),
                      run=1, live=False, summary_every=0)
    client = SlowFastClient(redis_url)
    try:
        for w in windows:
            engine.submit(w, w.seq)
        stepping = threading.Thread(target=lambda: [None for _ in iter(engine.step, None)])
        stepping.start()
        stepping.join(timeout=60)
        assert not stepping.is_alive()
        assert [c.window for c in client.history("file")] == list(range(count))
        # the open's delivery arrived and is held, unanswered
        wait_for(lambda: len(receiver.all()) == 1)
        assert notifier.stream_stats("file").delivered == 0
        engine.ingest_report("file", IngestReport(state=IngestState.ENDED, live=False, windows_emitted=count,
                                                  final=True))
        while engine.step() is not None:  # the file's end closes its open event
            pass
        engine.publish_status("file")
        status = client.status("file")
        assert (status.events_opened, status.events_open, status.deliveries_pending) == (1, 0, 2)
        assert [e.phase for e in client.events("file")] == ["opened", "updated", "updated", "updated", "closed"]
        receiver.hold.set()
        wait_for(lambda: len(receiver.accepted()) == 2)
        assert [a.event["phase"] for a in receiver.accepted()] == ["opened", "closed"]
        assert all(a.signed_by(SECRET) for a in receiver.accepted())
        assert notifier.close(5.0) == 0
    finally:
        receiver.stop()
        publisher.close()
