"""SlowFastClient against data written by the Publisher, and against a real run for questions
and control."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from connectors.client import QuestionError, SlowFastClient
from connectors.publisher import Publisher
from connectors.redis_schema import Answer, IngestState, StreamInfo, StreamStatus
from pipeline.cli import app as cli_app

from tests.support.background_run import wait_until
from tests.support.media import free_port
from tests.support.records import make_caption, make_event
from tests.support.web import STANDING_QUESTION, standing_answer


@pytest.fixture
def setup(redis_url: str) -> Iterator[tuple[Publisher, SlowFastClient, int]]:
    pub = Publisher(redis_url)
    info = pub.register_stream(StreamInfo(id="cam1", source="rtsp://admin:pw@cam/1", config={"fps": 4}))
    pub.register_stream(StreamInfo(id="clip", source="/data/clip.mp4", live=False))
    client = SlowFastClient(redis_url)
    yield pub, client, info.run
    client.close()
    pub.close()


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


def test_ask_and_control_round_trips_with_the_real_driver(setup, redis_url: str, answering_pipeline: str) -> None:
    """Questions and control messages through a real run (random checkpoint, a live camera):
    the replies are the driver's and the intake's own; then the CLI's lines for them."""
    _, client, _ = setup
    sid = answering_pipeline
    reply = client.ask(sid, STANDING_QUESTION["prompt"], timeout=120, kind="yesno")
    standing = standing_answer(redis_url, reply.window)  # the pipeline's answer, same question and window
    assert reply.ok and reply.stream == sid and reply.question == STANDING_QUESTION["prompt"]
    assert (reply.start, reply.end, reply.text) == (standing.start, standing.end, standing.text)
    assert reply.probability == pytest.approx(standing.probability, abs=1e-4)

    with pytest.raises(QuestionError, match="^stream 'clip' is not running$") as err:
        client.ask("clip", "what happens?", timeout=120)  # registered, not part of this run
    assert err.value.reply.question_id
    with pytest.raises(QuestionError, match="unknown stream 'ghost'"):
        client.ask("ghost", "anyone?", timeout=120)  # rejected by the intake itself
    with pytest.raises(ValueError):
        client.ask(sid, "", timeout=1)

    nobody = f"rtsp://u:secret@127.0.0.1:{free_port()}/9"  # a camera that refuses: it keeps connecting
    assert client.add_stream("cam9", nobody, live=True, config={"caption_every_n_windows": 2}, timeout=120).ok
    assert client.stream("cam9").source == nobody.replace(":secret@", ":***@")
    with pytest.raises(QuestionError, match="^stream 'cam9' is already running$"):
        client.add_stream("cam9", nobody, live=True, timeout=120)
    assert client.remove_stream("cam9", timeout=120).ok
    assert client.stream("cam9") is None
    with pytest.raises(QuestionError, match="^stream 'cam9' is not running$"):
        client.remove_stream("cam9", timeout=120)
    assert client.add_stream("cam8", nobody) is None  # fire and forget
    wait_until(lambda: client.stream("cam8") is not None, timeout=120)

    # The CLI's lines for the same round trips
    cli = ["--redis-url", redis_url]
    added = CliRunner().invoke(cli_app, ["streams", "add", f"cam7={nobody}", "--live", "--timeout", "120", *cli])
    assert (added.exit_code, added.output) == (0, "added cam7\n"), added.output
    removed = CliRunner().invoke(cli_app, ["streams", "remove", "cam7", "--timeout", "120", *cli])
    assert (removed.exit_code, removed.output) == (0, "removed cam7\n"), removed.output
    asked = CliRunner().invoke(cli_app, ["ask", sid, STANDING_QUESTION["prompt"], "--yes-no", "--timeout", "120", *cli])
    assert asked.exit_code == 0, asked.output
    window = {f"[{a.start:.1f}s-{a.end:.1f}s]": a for a in client.answers(sid, count=10_000)
              if a.question_id == STANDING_QUESTION["id"]}
    shown = window[asked.output.split()[0]]  # the standing answer on the window it names
    assert asked.output == f"[{shown.start:.1f}s-{shown.end:.1f}s] {shown.text}  (P(yes)={shown.probability:.2f})\n"


def test_ask_times_out_without_answerer(setup) -> None:
    _, client, _ = setup
    with pytest.raises(TimeoutError, match="no reply"):
        client.ask("cam1", "anyone?", timeout=0.3)
