"""Faults caused for real, on real Ray, Redis, an RTSP server and the tiny model: a model that
raises on some windows (a question longer than its context), a damaged recording, a camera that
drops and comes back, a camera refused at start, and more streams than the cluster has cores
for at once."""

from __future__ import annotations

import json
import time

import pytest

from connectors.client import SlowFastClient
from connectors.redis_schema import STATUS_INTERVAL_S, IngestState
from model.random_checkpoint import write_random_checkpoint
from tests.support.background_run import BackgroundRun, wait_until
from tests.support.media import cfr_times, damage, free_port, make_clip
from tests.test_pipeline_e2e import clip, pipeline_config  # noqa: F401 - clip: a fixture

TOO_LONG_PROMPT = "Is anyone walking through the loading bay right now? " * 20  # ~1,000 characters


def test_a_damaged_recordings_corrupt_frames_are_counted_apart_from_dropped_ones(
    ray_session, redis_url, tiny_model_dir, tmp_path
):
    """20 KB of noise in the middle of a recording: the decoder skips what it cannot use and the
    status counts it in `frames_corrupt`; `frames_dropped` stays for frames no processed window
    covered, none in a file (its windows are never skipped)."""
    clean = make_clip(tmp_path / "clean.ts", cfr_times(30, 10)).path
    corrupt = damage(clean, tmp_path / "corrupt.ts", garbage=(0.5, 20_000))
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [{"id": "damaged", "source": str(corrupt)}])
    summary = BackgroundRun(config).finish(stop=False, timeout=240)["damaged"]
    assert summary.state == "ended" and summary.stats.windows_done == summary.windows > 0
    status = SlowFastClient(redis_url).status("damaged")
    assert status.frames_corrupt >= 1 and status.frames_dropped == 0


@pytest.fixture(scope="module")
def camera_clip(tmp_path_factory):
    """30 s at 25 fps, a keyframe every 10 frames so a (re)joining client starts fast."""
    return make_clip(tmp_path_factory.mktemp("camera") / "camera.mp4", cfr_times(25, 30),
                     options={"preset": "veryfast", "bf": "2", "g": "10"}).path


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The random checkpoint with a context of 900 tokens: an 8-frame window (648 video tokens)
    and the caption prompt fit, a standing question of a thousand characters does not."""
    return write_random_checkpoint(tmp_path_factory.mktemp("short-context"), seed=0, max_position_embeddings=900,
                                   tokenizer_model_max_length=900)


def test_a_window_the_model_fails_on_is_retried_then_recorded_as_failed(
    ray_session, redis_url, short_context_model, clip, tmp_path
):
    """The model itself raises on every batch holding a standing question longer than its
    context, which windows 0, 4 and 8 carry (every_n_windows=4): each is retried once, alone,
    then recorded as failed; the other windows, batched with them at first, succeed on their
    retry. Nothing is silent."""
    streams = [{"id": "file", "source": str(clip), "standing_questions": [
        {"id": "long", "prompt": TOO_LONG_PROMPT, "every_n_windows": 4}]}]
    config = pipeline_config(redis_url, short_context_model, tmp_path, streams)
    summary = BackgroundRun(config).finish(stop=False, timeout=240)["file"]
    assert summary.state == "ended" and summary.windows == 9
    assert (summary.stats.windows_done, summary.stats.windows_failed, summary.stats.windows_skipped) == (6, 3, 0)

    client = SlowFastClient(redis_url)
    status = client.status("file")
    assert status.state is IngestState.ENDED
    assert (status.windows_emitted, status.windows_done, status.windows_failed) == (9, 6, 3)
    assert status.windows_done + status.windows_failed + status.windows_skipped == status.windows_emitted
    assert status.last_error.startswith("window 8 failed after 2 attempts: ModelInputError: prompt is ")
    assert "more than the context allows" in status.last_error and status.last_error_at is not None

    history = client.history("file", count=100)
    assert [c.window for c in history] == list(range(9))  # every window has an entry, in order
    failed = {c.window: c for c in history if c.error is not None}
    assert sorted(failed) == [0, 4, 8]
    assert all(c.text == "" and "more than the context allows" in c.error for c in failed.values())
    assert all(c.text for c in history if c.error is None)

    lines = [json.loads(line) for line in (tmp_path / "file" / "captions.jsonl").read_text().splitlines()]
    assert [line["window"] for line in lines] == list(range(9))
    assert [line["window"] for line in lines if "error" in line] == [0, 4, 8]
    assert (tmp_path / "file" / "captions.vtt").read_text().count("-->") == 6


def status_refreshes(client: SlowFastClient, stream: str, count: int, timeout: float = 120) -> list[float]:
    """The first `count` distinct `updated_at` values of a stream's status (the publisher's own
    clock), polled until they are there."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {len(seen)} status refreshes in {timeout:.0f} s"
        status = client.status(stream)
        if status is not None and (not seen or status.updated_at != seen[-1]):
            seen.append(status.updated_at)
        time.sleep(0.05)
    return seen


def test_camera_health_follows_outages_and_a_camera_refused_at_start(
    ray_session, redis_url, tiny_model_dir, tmp_path, camera_clip, rtsp_server_factory
):
    """`cam` runs, its server is killed (the status says reconnecting, and keeps being refreshed
    with no frames flowing), then restarted (live again, error cleared). `late` points at a port
    nobody listens on: connecting with the reason, then live once a server starts there."""
    cam_server = rtsp_server_factory(camera_clip).start()
    late_port = free_port()
    streams = [{"id": "cam", "source": cam_server.url(), "live": True},
               {"id": "late", "source": f"rtsp://127.0.0.1:{late_port}/cam", "live": True}]
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, streams)
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        wait_until(lambda: any(e.startswith("redis ") for e in run.events), timeout=120)  # workers up
        started = time.monotonic()  # the streams are being added now
        # (on a busy machine an ingest actor slow to start is reported first: "not placed")
        wait_until(lambda: (s := client.status("late")) is not None and "connection refused" in (s.last_error or ""),
                   timeout=120)
        late = client.status("late")
        print(f"\nrefused camera: {late.state} '{late.last_error}' {time.monotonic() - started:.1f} s "
              "after the streams were added")
        assert late.state in (IngestState.CONNECTING, IngestState.RECONNECTING)
        assert "connection refused" in late.last_error and late.last_error_at is not None

        wait_until(lambda: (s := client.status("cam")) is not None and s.state is IngestState.LIVE
                   and s.windows_done >= 1 and s.fps_in > 0)
        live = client.status("cam")
        assert live.last_error is None and live.fps_out > 0 and live.lag_s >= 0

        cam_server.stop()  # the camera loses power
        dropped = time.monotonic()
        wait_until(lambda: client.status("cam").state is IngestState.RECONNECTING)
        down = client.status("cam")
        print(f"camera drop -> reconnecting after {time.monotonic() - dropped:.1f} s: '{down.last_error}'")
        assert down.last_error is not None
        # No frames flow, and the status is still refreshed every STATUS_INTERVAL_S: a bound
        # that a busy machine keeps, and that refreshes only at reconnect attempts (backoff
        # doubling from 0.5 s) or reads (read_timeout, 10 s) would not.
        updates = status_refreshes(client, "cam", 6)
        gaps = [b - a for a, b in zip(updates, updates[1:])]
        print(f"status refreshed without frames: gaps {', '.join(f'{g:.2f}' for g in gaps)} s")
        assert max(gaps) < 5 * STATUS_INTERVAL_S, gaps
        assert client.status("cam").state is IngestState.RECONNECTING

        windows_before = client.status("cam").windows_done
        rtsp_server_factory(camera_clip, port=cam_server.port).start()  # power is back
        restarted = time.monotonic()
        wait_until(lambda: (s := client.status("cam")).state is IngestState.LIVE and s.windows_done > windows_before,
                   timeout=90)
        back = client.status("cam")
        print(f"camera restart -> live after {time.monotonic() - restarted:.1f} s")
        assert back.last_error is None and back.reconnects >= 1

        rtsp_server_factory(camera_clip, port=late_port).start()
        wait_until(lambda: (s := client.status("late")).state is IngestState.LIVE and s.frames_in > 0, timeout=90)
        assert client.status("late").last_error is None
    finally:
        summaries = run.finish()
    assert summaries["cam"].state == "stopped" and summaries["late"].state == "stopped"


@pytest.mark.slow(seconds=70)
def test_more_file_streams_than_the_cluster_has_room_for_all_run(ray_session, redis_url, tiny_model_dir, tmp_path):
    """2 CPUs: the model worker takes 1, each ingest actor 0.25, so 4 streams fit at once. Eight
    files added one after another at run time (as `slowfast streams add` does) all run, because
    a stream that ended frees its actor at once; each one's status stays in Redis."""
    import ray

    count = 8
    short = make_clip(tmp_path / "short.mp4", cfr_times(8, 2.0)).path  # 8 frames at 4 fps: one window
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [])
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        for index in range(count):
            client.add_stream(f"f{index}", str(short), live=False, timeout=60)
        ids = [f"f{index}" for index in range(count)]
        wait_until(lambda: all((s := client.status(sid)) is not None and s.state is IngestState.ENDED for sid in ids),
                   timeout=240)
        for sid in ids:
            status = client.status(sid)
            assert (status.windows_emitted, status.windows_done, status.windows_failed) == (1, 1, 0), status
            assert [c.window for c in client.history(sid)] == [0]
        # the ended streams' actors are gone: their reservations are free
        wait_until(lambda: not any(_actor_alive(ray, f"ingest:{sid}") for sid in ids))
        assert {s.id for s in client.streams()} >= set(ids)
    finally:
        summaries = run.finish()
    assert all(summaries[sid].state == "ended" and summaries[sid].stats.windows_done == 1 for sid in ids)


def _actor_alive(ray, name: str) -> bool:
    try:
        ray.get_actor(name)
    except ValueError:
        return False
    return True
