"""A real run (Ray, Redis, PyAV clips, the tiny model) seen as an operator sees it: event
notifications that reach a webhook which was down at first, and the Prometheus metrics an
alert is written on, read with prometheus_client's own parser from Ray's export."""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest

from connectors.client import SlowFastClient
from pipeline.config import load_config
from pipeline.metric_labels import FILES_LABEL
from pipeline.runner import run_pipeline
from tests.support.media import cfr_times, free_port, make_clip
from tests.support.webhook import WebhookReceiver

SECRET = "a-shared-secret"
QUESTIONS = 3  # standing questions of the file, each with its own webhook path


def static_clip(path: Path, seconds: float = 4.0, fps: int = 8) -> Path:
    """A camera that sees nothing happen: one picture, encoded again each frame."""
    y, x = np.mgrid[0:120, 0:160]
    image = np.stack([x * 1.5, y * 2.0, np.full_like(x, 90)], -1).astype(np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def exported(stream: str) -> dict[tuple[str, str], float]:
    """(sample name, state label) -> value of the `stream`'s slowfast samples, as Ray's
    Prometheus endpoint serves them, parsed by prometheus_client."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.startswith("ray_slowfast_") and sample.labels.get("stream") == stream:
                key = (sample.name.removeprefix("ray_"), sample.labels.get("state", ""))
                samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def wait_until(predicate, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.3)
    assert predicate()


# Ids of this test's own: Ray's metrics keep the series of a session's earlier runs, and a stream
# of the same id in an earlier test on this worker's Ray would add its counts to these. Files
# count together (FILES_LABEL): the file's are what this run added to them.
FILE, CAMERA, DOWN = "monitored-file", "monitored-camera", "camera-down"


@pytest.mark.timeout(600)
def test_events_reach_a_webhook_that_was_down_and_metrics_show_what_an_operator_alerts_on(
    ray_session, redis_url, tiny_model_dir, tmp_path
):
    """Three streams: a file whose standing questions open events that close at its end, a
    static camera the scene gate keeps from the model, and a camera that is down."""
    receiver = WebhookReceiver(status=lambda n: 503 if n < 2 else 200)  # down for its first two requests
    refusing = WebhookReceiver(status=lambda n: 401)
    clip = make_clip(tmp_path / "clip.mp4", cfr_times(8, 6.0)).path
    static = static_clip(tmp_path / "static.mp4")
    questions = "\n".join(f"""      - id: q{i}
        prompt: Is anything there ({i})?
        trigger: {{p_yes_above: 0.0}}
        notify:
          - webhook: {receiver.url(f"/q{i}")}
            secret: {SECRET}""" for i in range(QUESTIONS))
    (tmp_path / "slowfast.yaml").write_text(f"""
window: 8
stride: 4
fps: 4.0
generation: {{max_new_tokens: 4}}
streams:
  - id: {FILE}
    source: {clip}
    standing_questions:
{questions}
  - id: {CAMERA}
    source: loop://{static}
    live: true
    gate: {{refresh_every_n_windows: 4}}
    notify:
      - webhook: {receiver.url("/cam")}
        secret: {SECRET}        # HMAC-SHA256 of the body, in a header
    standing_questions:
      - id: anyone
        prompt: Is anyone there?
        trigger: {{p_yes_above: 0.0}}
        notify:
          - webhook: {refusing.url()}
  - id: {DOWN}
    source: rtsp://127.0.0.1:{free_port()}/stream1
""")
    config = load_config(tmp_path / "slowfast.yaml", redis_url=redis_url, model=str(tiny_model_dir),
                         out_dir=tmp_path / "out")
    files_before = exported(FILES_LABEL)

    def files_added(now: dict[tuple[str, str], float], name: str) -> float:
        return now.get((name, ""), 0.0) - files_before.get((name, ""), 0.0)

    stop, result = threading.Event(), {}
    thread = threading.Thread(target=lambda: result.update(run_pipeline(config, stop=stop)))
    thread.start()
    client = SlowFastClient(redis_url)
    try:
        def arrived(path: str) -> list[str]:
            return [a.event["phase"] for a in receiver.accepted() if a.path == path]

        wait_until(lambda: all(arrived(f"/q{i}") == ["opened", "closed"] for i in range(QUESTIONS))
                   and arrived("/cam") == ["opened"], timeout=300)  # Ray's start-up on a loaded machine
        wait_until(lambda: (st := client.status(CAMERA)) is not None and st.windows_gated >= 3
                   and st.deliveries_failed == 1)
        wait_until(lambda: (st := client.status(DOWN)) is not None and st.reconnects >= 1)
        # Every sample read below, since Ray exports each on its own period after the status changed.
        wanted = {FILES_LABEL: [("slowfast_events_opened_total", "")],
                  CAMERA: [("slowfast_deliveries_failed_total", ""), ("slowfast_windows_gated_total", ""),
                          ("slowfast_events_opened_total", "")],
                  DOWN: [("slowfast_reconnects_total", "")]}
        metrics: dict[str, dict] = {}

        def caught_up() -> bool:  # the export has every sample, at the counts the statuses show
            metrics.update({sid: exported(sid) for sid in wanted})
            return (all(set(keys) <= metrics[sid].keys() for sid, keys in wanted.items())
                    and metrics[CAMERA]["slowfast_windows_gated_total", ""] >= 3
                    and files_added(metrics[FILES_LABEL], "slowfast_events_opened_total") == QUESTIONS)

        wait_until(caught_up, timeout=120)
        cam_status, clip_status = client.status(CAMERA), client.status(FILE)
        by_file_id = exported(FILE)
        registered = client.stream(CAMERA).config
    finally:
        stop.set()
        thread.join(timeout=180)
        receiver.stop()
        refusing.stop()
    assert not thread.is_alive()

    # Every open and close arrived, signed; the first deliveries met the receiver down and were
    # repeated with the same idempotency key.
    arrivals = receiver.all()
    assert all(a.signed_by(SECRET) for a in arrivals)
    assert [a.status for a in arrivals[:2]] == [503, 503]
    for refused in arrivals[:2]:
        repeats = [a for a in arrivals if a.headers["idempotency-key"] == refused.headers["idempotency-key"]]
        assert repeats[-1].status == 200 and len({a.body for a in repeats}) == 1
    assert len({a.headers["idempotency-key"] for a in receiver.accepted()}) == len(receiver.accepted()) == 2 * QUESTIONS + 1
    assert {a.event["event_id"].split(":")[0] for a in receiver.accepted()} == {*(f"q{i}" for i in range(QUESTIONS)), "anyone"}
    (refused,) = refusing.all()  # the question's own sink, which refuses: not retried, written down
    (written,) = client.undelivered(CAMERA)
    assert written.error == "HTTP 401 Unauthorized" and written.phase == "opened"
    assert SECRET not in str(registered)  # the registry keeps the config, the secret masked
    # From the window's publish (the record is made just before it) to the webhook's arrival.
    delays = [a.at - a.event["created_at"] for a in receiver.accepted() if a.headers["x-slowfast-attempt"] == "1"]
    print(f"\nwindow published -> webhook arrival over a real run: median {statistics.median(delays) * 1000:.0f} ms, "
          f"max {max(delays) * 1000:.0f} ms, {len(delays)} deliveries at their first attempt")
    # Tens of ms on a quiet machine, over 1 s with two other runs on its two cores: the bound
    # catches a delivery that waits for something (a retry's backoff, the run's end), not speed.
    assert len(delays) >= QUESTIONS and statistics.median(delays) < 5.0

    # Status and metrics agree on what an operator alerts on.
    assert (cam_status.events_opened, cam_status.events_open) == (1, 1)
    assert (clip_status.events_opened, clip_status.events_open, clip_status.deliveries_failed) == (QUESTIONS, 0, 0)
    assert "HTTP 401" in cam_status.last_delivery_error
    cam, files, down = metrics[CAMERA], metrics[FILES_LABEL], metrics[DOWN]
    assert cam["slowfast_stream_state", "live"] == 1 and cam["slowfast_stream_state", "reconnecting"] == 0
    assert cam["slowfast_windows_gated_total", ""] >= 3
    assert cam["slowfast_events_opened_total", ""] == 1 and cam["slowfast_events_open", ""] == 1
    assert cam["slowfast_deliveries_failed_total", ""] == 1
    # A file's counts add to the files' (its windows among them); no series carries its id, so
    # files that come and go leave no label sets behind in Ray's metrics.
    assert files_added(files, "slowfast_events_opened_total") == QUESTIONS
    assert files_added(files, "slowfast_windows_done_total") == clip_status.windows_done > 0
    assert by_file_id == {}
    assert down["slowfast_stream_state", "live"] == 0 and down["slowfast_reconnects_total", ""] >= 1
    assert sum(down["slowfast_stream_state", s] for s in ("connecting", "reconnecting")) == 1
    assert result[CAMERA].stats.windows_gated >= 3


def test_metrics_keep_no_state_of_removed_streams_and_no_label_set_per_file():
    """Ray's metrics cannot drop a label set: files share one, and what the worker remembers to
    turn each status into counter increments goes when its stream does."""
    from connectors.redis_schema import IngestState, StreamStatus
    from pipeline.actors import StatusMetrics
    from pipeline.metric_labels import stream_label

    assert stream_label("cam", live=True) == "cam"
    assert stream_label("file-1", live=False) == stream_label("file-2", live=False) == FILES_LABEL
    metrics = StatusMetrics()
    for index in range(3):
        sid = f"file-{index}"
        metrics.export(StreamStatus(stream=sid, state=IngestState.LIVE, reconnects=1, events_opened=2), live=False)
        metrics.forget(sid)
    metrics.export(StreamStatus(stream="cam", state=IngestState.LIVE, reconnects=1), live=True)
    assert {sid for sid, _ in metrics.seen} == {"cam"}
