"""End to end on real Ray, real Redis, PyAV-generated clips and the tiny model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from connectors.client import QuestionError, SlowFastClient
from connectors.sources import open_source
from model import VideoQuery
from typer.testing import CliRunner

from pipeline.cli import app as cli_app
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.window import expected_windows
from tests.support.background_run import BackgroundRun, wait_until
from tests.support.media import cfr_times, make_clip
from tests.support.model_faults import HoldEachBatch, HoldWhileFileExists, worker_with

WINDOW, STRIDE, FPS = 8, 4, 4.0
PROMPT = "Please describe this video in detail."


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clips") / "indexed.mp4", cfr_times(8, 10.0)).path


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """24 s: 96 frames at 4 fps -> three 64-frame windows at stride 16."""
    return make_clip(tmp_path_factory.mktemp("clips") / "long.mp4", cfr_times(8, 24.0)).path


def pipeline_config(redis_url, model_dir, out_dir, streams, **extra):
    return load_config(
        None, redis_url=redis_url, model=str(model_dir), out_dir=out_dir, window=WINDOW, stride=STRIDE,
        fps=FPS, streams=streams, generation={"max_new_tokens": 6}, **extra,
    )


@pytest.mark.slow(seconds=50)
def test_file_windows_captions_and_outputs_are_exact(
    ray_session, redis_url, tiny_model_dir, tiny_vlm, long_clip, tmp_path
):
    """Released shape: 64-frame windows every 16 frames at 4 fps."""
    window, stride = 64, 16
    config = load_config(
        None, redis_url=redis_url, model=str(tiny_model_dir), out_dir=tmp_path, window=window, stride=stride,
        fps=FPS, streams=[{"id": "clip", "source": str(long_clip)}], generation={"max_new_tokens": 6},
        file_windows_in_flight=1,
    )
    summaries = run_pipeline(config, on_event=lambda line: None)
    assert summaries["clip"].state == "ended"

    with open_source(str(long_clip), fps=FPS, size=576) as source:
        frames = list(source)
    count = expected_windows(len(frames), window, stride)
    assert len(frames) == 96 and count == 3 and summaries["clip"].windows == count
    # 3 windows of 64 frames over 96 frames: each frame encoded once, the ring bounded by the window
    assert summaries["clip"].stats.frames_encoded == 96
    assert summaries["clip"].stats.ring_size <= window

    history = SlowFastClient(redis_url).history("clip", count=100)
    assert [c.window for c in history] == list(range(count))
    for caption in history:
        first = caption.window * stride
        window_frames = frames[first : first + window]
        assert (caption.start, caption.end) == (window_frames[0].pts, window_frames[-1].pts)
        assert caption.start == pytest.approx(caption.window * stride / FPS)
        assert caption.end == pytest.approx(caption.start + (window - 1) / FPS)
        expected = tiny_vlm.generate(
            [VideoQuery(frames=np.stack([f.image for f in window_frames]), question=PROMPT)], max_new_tokens=6
        )[0].text
        assert caption.text == expected

    lines = [json.loads(line) for line in (tmp_path / "clip" / "captions.jsonl").read_text().splitlines()]
    assert [(r["window"], r["start"], r["end"], r["caption"]) for r in lines] == [
        (c.window, c.start, c.end, c.text) for c in history
    ]
    vtt = (tmp_path / "clip" / "captions.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n0\n00:00:00.000 --> 00:00:16.000\n")
    assert vtt.count("-->") == count

    status = SlowFastClient(redis_url).status("clip")
    assert status.windows_done == count and status.windows_skipped == 0 and status.state == "ended"


def test_a_broken_stream_does_not_stop_the_others(ray_session, redis_url, tiny_model_dir, clip, tmp_path):
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [
        {"id": "missing", "source": str(tmp_path / "nope.mp4")},
        {"id": "good", "source": str(clip)},
    ])
    summaries = run_pipeline(config, on_event=lambda line: None)
    assert summaries["missing"].state == "failed" and "file not found" in summaries["missing"].error
    assert summaries["good"].state == "ended" and summaries["good"].windows == 9
    assert "file not found" in SlowFastClient(redis_url).status("missing").last_error


def yes_threshold(vlm, clip_path: Path, question: str) -> tuple[float, list[float]]:
    """P(yes) of `question` on each window of the clip's first pass, from the model itself, and
    a threshold in the widest gap between them (away from the ends): some windows fire, some
    do not, and no value sits near the line."""
    with open_source(str(clip_path), fps=FPS, size=576) as source:
        frames = [f.image for f in source]
    windows = range(expected_windows(len(frames), WINDOW, STRIDE))
    p_yes = [vlm.yes_probability(VideoQuery(frames=np.stack(frames[w * STRIDE: w * STRIDE + WINDOW]), question=question))
             for w in windows]
    ordered = sorted(p_yes)
    gap, low = max((b - a, a) for a, b in zip(ordered[1:-2], ordered[2:-1]))
    assert gap > 0.005, ordered  # the premise: the model's answers differ across the clip
    return low + gap / 2, p_yes


@pytest.mark.slow(seconds=60)
def test_live_stream_questions_events_and_clean_stop(ray_session, redis_url, tiny_model_dir, tiny_vlm, clip, tmp_path):
    """The standing question's threshold lies between the model's own P(yes) on the clip's
    windows: the pipeline's answers carry those P(yes), and the events (opened on a window that
    fires, updated on each next one that fires, closed on the first that does not) are exactly
    the ones those answers call for."""
    question = "Is anyone there?"
    threshold, model_p_yes = yes_threshold(tiny_vlm, clip, question)
    trigger = {"p_yes_above": threshold, "open_after": 1, "close_after": 1}
    streams = [{
        "id": "cam", "source": f"loop://{clip}", "live": True, "gate": {"enabled": False},
        "standing_questions": [{"id": "anyone", "prompt": question, "every_n_windows": 1, "trigger": trigger}],
    }]
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, streams)
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)

    def standing() -> dict[int, float]:
        return {a.window: a.probability for a in client.answers("cam", count=10_000) if a.question_id == "anyone"}

    try:
        wait_until(lambda: any(e.phase == "closed" for e in client.events("cam", count=10_000)), timeout=180)
        answered = standing()  # first: every window's events were published with its answers
        events = [e for e in client.events("cam", count=10_000) if e.window <= max(answered)]
        first_pass = [w for w in answered if w < len(model_p_yes)]
        assert first_pass, sorted(answered)  # the first pass is the clip itself: the model's own windows
        assert all(answered[w] == pytest.approx(model_p_yes[w], abs=1e-3) for w in first_pass)
        fired = {w for w, p in answered.items() if p > threshold}
        order = sorted(answered)
        after_yes = {w for prev, w in zip(order, order[1:]) if prev in fired}
        assert {e.window for e in events if e.phase != "closed"} == fired
        assert {e.window for e in events if e.phase == "opened"} == {w for w in fired if w not in after_yes}
        assert {e.window for e in events if e.phase == "closed"} == after_yes - fired
        assert all(e.question_id == "anyone" and e.trigger == f"p_yes>{threshold}" for e in events)

        answer = client.ask("cam", "What is happening?", timeout=30)
        assert answer.ok and answer.window is not None and answer.text is not None
        latest_window = client.latest("cam").window
        asked = CliRunner().invoke(cli_app, ["ask", "cam", "What is happening?", "--redis-url", redis_url])
        assert asked.exit_code == 0 and asked.output.startswith("[")
        assert client.answers("cam")[-1].window >= latest_window  # answered from the latest window
        unknown = CliRunner().invoke(cli_app, ["ask", "ghost", "Anything?", "--redis-url", redis_url])
        assert unknown.exit_code == 1 and "'ghost'" in unknown.output  # an error reply: a run-time error
        yes_no = client.ask("cam", question, timeout=30, kind="yesno")  # the standing question, asked
        assert yes_no.probability == pytest.approx(standing()[yes_no.window], abs=1e-4)
        with pytest.raises(QuestionError, match="not running|unknown"):
            client.ask("ghost", "Anything?", timeout=30)
    finally:
        result = run.finish()
    assert result["cam"].state == "stopped"
    assert client.status("cam").windows_done >= 1


def test_live_stream_that_outruns_the_worker_skips_stale_windows(ray_session, redis_url, tiny_model_dir, clip, tmp_path):
    """The worker holds each batch for 1 s (a test-only model wrapper) while 16 fps at stride 1
    closes a window every 62 ms: newest wins, whatever the machine's load. The rule itself is
    unit-tested in test_pipeline_scheduler.py; this checks it end to end."""
    config = load_config(
        None, redis_url=redis_url, model=str(tiny_model_dir), out_dir=tmp_path, window=WINDOW, stride=1, fps=16.0,
        streams=[{"id": "fast", "source": f"loop://{clip}", "live": True}], generation={"max_new_tokens": 4},
    )
    run = BackgroundRun(config, worker_class=worker_with(HoldEachBatch(1.0)))
    client = SlowFastClient(redis_url)
    try:  # a window done, and more than one batch's worth of windows emitted since
        wait_until(lambda: (s := client.status("fast")) is not None and s.windows_done >= 2
                   and s.windows_skipped >= 1, timeout=120)
    finally:
        summary = run.finish()["fast"]
    assert summary.stats.windows_skipped > 0 and summary.stats.windows_done > 0
    assert summary.stats.windows_done + summary.stats.windows_skipped <= summary.windows
    assert summary.stats.windows_failed == 0
    assert summary.stats.ring_size <= WINDOW  # features of frames that slid out are released
    windows = [c.window for c in client.history("fast", count=1000)]
    assert windows == sorted(windows) and len(windows) == summary.stats.windows_done
    status = client.status("fast")
    assert status.windows_skipped == summary.stats.windows_skipped
    # frames of skipped windows that no processed window covered never reach the model
    assert status.frames_dropped > 0 and summary.stats.frames_encoded + status.frames_dropped <= summary.frames_in


@pytest.mark.slow(seconds=90)
def test_streams_added_removed_and_restarted_at_run_time(ray_session, redis_url, tiny_model_dir, clip, tmp_path):
    import ray

    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [{"id": "cam", "source": f"loop://{clip}"}])
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)

    def windows_of(sid: str) -> list[int]:
        return [c.window for c in client.history(sid, count=1000)]

    try:
        wait_until(lambda: len(windows_of("cam")) >= 2)
        # an ingest actor that dies is restarted by Ray and its stream resumes, numbering on
        before = max(windows_of("cam"))
        ray.kill(ray.get_actor("ingest:cam"), no_restart=False)
        wait_until(lambda: max(windows_of("cam")) >= before + 3)
        assert windows_of("cam") == sorted(set(windows_of("cam")))

        client.add_stream("yard", str(clip), live=False, timeout=30)
        wait_until(lambda: len(windows_of("yard")) == 9)
        with pytest.raises(QuestionError, match="already running"):
            client.add_stream("yard", str(clip), live=False, timeout=30)
        with pytest.raises(QuestionError, match="file not found"):
            client.add_stream("bad", str(tmp_path / "missing.mp4"), timeout=30)

        client.remove_stream("cam", timeout=60)
        assert "cam" not in {s.id for s in client.streams()}
        with pytest.raises(QuestionError, match="not running"):
            client.remove_stream("cam", timeout=30)
    finally:
        result = run.finish()
    assert result["yard"].windows == 9 and "cam" not in result


@pytest.mark.slow(seconds=50)
@pytest.mark.parametrize("actor", ["worker:0", "ingest:files-0"])  # files take turns on ingest:files-N
def test_a_restarted_actor_loses_no_file_window_and_writes_none_twice(
    ray_session, redis_url, tiny_model_dir, tmp_path, actor
):
    import ray

    long_clip = make_clip(tmp_path / "long.mp4", cfr_times(8, 20.0)).path  # 80 frames -> 19 windows
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [{"id": "long", "source": str(long_clip)}],
                             file_windows_in_flight=1)
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    wait_until(lambda: len(client.history("long", count=100)) >= 3, timeout=180)  # Ray and the model start first
    ray.kill(ray.get_actor(actor), no_restart=False)  # Ray restarts it (max_restarts)
    run.finish(stop=False, timeout=180)
    assert [(c.window, c.error) for c in client.history("long", count=100)] == [(w, None) for w in range(19)]
    lines = [json.loads(line) for line in (tmp_path / "long" / "captions.jsonl").read_text().splitlines()]
    assert [(c["window"], c.get("error")) for c in lines] == [(w, None) for w in range(19)]  # each exactly once


def test_a_window_whose_frames_died_with_their_ingest_actor_is_captioned_once_after_the_restart(
    ray_session, redis_url, tiny_model_dir, tmp_path
):
    """The worker holds window 0 while window 1 waits, accepted, its frames owned by the ingest
    actor alone; the actor is killed, so those frames are gone. That is no model failure: the
    restarted actor's windows replace the lost ones and every window is captioned exactly once."""
    import ray

    long_clip = make_clip(tmp_path / "long.mp4", cfr_times(8, 20.0)).path  # 80 frames -> 19 windows
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, [{"id": "long", "source": str(long_clip)}],
                             file_windows_in_flight=1)
    gate = tmp_path / "hold"
    gate.touch()
    run = BackgroundRun(config, worker_class=worker_with(HoldWhileFileExists(gate)))
    client = SlowFastClient(redis_url)

    def queued() -> int:
        try:
            return ray.get(ray.get_actor("worker:0").stats.remote())["long"].queued
        except (ValueError, KeyError):  # not started yet
            return 0

    killed = False
    try:
        wait_until(lambda: queued() >= 1, timeout=120)  # window 0 held, window 1 accepted and waiting
        ingest = ray.get_actor("ingest:files-0")  # the run's first file ingest actor
        running = ingest.run.remote()  # fails once the incarnation that owns the frames is gone
        ray.kill(ingest, no_restart=False)  # Ray restarts it (max_restarts)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(running, timeout=120)
        killed = True
    finally:
        gate.unlink()
        run.finish(stop=not killed, timeout=180)
    captions = client.history("long", count=100)
    assert [(c.window, c.error) for c in captions] == [(w, None) for w in range(19)]
    lines = [json.loads(line) for line in (tmp_path / "long" / "captions.jsonl").read_text().splitlines()]
    assert [(c["window"], c.get("error")) for c in lines] == [(w, None) for w in range(19)]  # each exactly once


def test_streams_of_a_worker_that_dies_for_good_move_to_another(ray_session, redis_url, tiny_model_dir, tmp_path, clip):
    """Two workers; the file's worker dies and is not restarted (its node is gone): the file and
    its in-flight windows move to the other worker, every window is captioned once, the camera
    on the other worker goes on."""
    import ray

    long_clip = make_clip(tmp_path / "long.mp4", cfr_times(8, 20.0)).path  # 80 frames -> 19 windows
    streams = [{"id": "long", "source": str(long_clip)}, {"id": "cam", "source": f"loop://{clip}"}]
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, streams, file_windows_in_flight=1,
                             workers=2, worker_cpus=0.5, ingest_cpus=0.25)
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        wait_until(lambda: len(client.history("long", count=100)) >= 3)
        ray.kill(ray.get_actor("worker:0"), no_restart=True)  # the least loaded at start took the file
        wait_until(lambda: len(client.history("long", count=100)) >= 19, timeout=120)
        cam_windows = len(client.history("cam", count=1000))
        wait_until(lambda: len(client.history("cam", count=1000)) > cam_windows)  # the camera never stopped
    finally:
        run.finish()
    assert [c.window for c in client.history("long", count=100)] == list(range(19))
    lines = (tmp_path / "long" / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line)["window"] for line in lines] == list(range(19))
    assert any("stream long moved from model worker 0 (died) to worker 1" in e for e in run.events), run.events


def test_a_stream_the_cluster_cannot_place_is_reported_not_waited_on(
    ray_session, redis_url, tiny_model_dir, clip, tmp_path, monkeypatch
):
    """2 CPUs: the CPU model worker takes 1 and the first camera 0.75; the second camera cannot
    be placed. It is reported in its status, the first camera is captioned, and stop is prompt."""
    import pipeline.running as running_module

    monkeypatch.setattr(running_module, "PLACEMENT_WARN_S", 1.0)
    streams = [{"id": "placed", "source": f"loop://{clip}"}, {"id": "unplaced", "source": f"loop://{clip}"}]
    config = pipeline_config(redis_url, tiny_model_dir, tmp_path, streams, ingest_cpus=0.75)
    run = BackgroundRun(config)
    client = SlowFastClient(redis_url)
    try:
        wait_until(lambda: client.latest("placed") and any("not placed" in e for e in run.events))
        status = client.status("unplaced")
        assert status.state == "starting" and "no free num_cpus=0.75" in status.last_error
        assert client.latest("placed") is not None and client.latest("unplaced") is None
    finally:
        stopped_at = time.time()
        result = run.finish()
    assert time.time() - stopped_at < 60  # bounds a wait for a placement that never comes, not speed
    assert result["placed"].state == "stopped" and result["unplaced"].state == "not finished"


def plasma_usage(gcs_address: str) -> tuple[int, int]:
    """(MiB, objects) in the object store, from Ray's own `ray memory --stats-only`."""
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), "memory", "--stats-only", "--address", gcs_address],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", out)
    assert match, out
    return int(match[1]), int(match[2])


def exported_metrics(stream: str) -> dict[str, float]:
    """The pipeline's samples for one stream as Ray's Prometheus endpoint serves them."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, float] = {}
    for line in body.splitlines():
        match = re.match(r"ray_(slowfast_\w+)\{[^}]*stream=\"" + stream + r"\"[^}]*\} (\S+)$", line)
        if match and "_bucket" not in match[1]:
            samples[match[1]] = samples.get(match[1], 0.0) + float(match[2])
    return samples


def test_long_looping_run_keeps_object_store_flat_and_exports_metrics(
    ray_session, redis_url, tiny_model_dir, clip, tmp_path
):
    """A looping camera at 8 fps puts ~1 MB per frame; frames that slid out of the window must be
    released, so usage after 120 more frames is what it was (a leak would add ~120 objects).
    Meanwhile its counters reach Prometheus through Ray's metrics export."""
    import ray

    config = load_config(
        None, redis_url=redis_url, model=str(tiny_model_dir), out_dir=tmp_path, window=WINDOW, stride=STRIDE,
        fps=8.0, streams=[{"id": "loop", "source": f"loop://{clip}", "live": True}], generation={"max_new_tokens": 4},
    )
    run = BackgroundRun(config)
    client, gcs = SlowFastClient(redis_url), ray.get_runtime_context().gcs_address
    try:
        wait_until(lambda: client.latest("loop") is not None)
        first = client.status("loop").frames_in
        wait_until(lambda: client.status("loop").frames_in >= first + 2 * WINDOW)  # past the first windows
        frames_before = client.status("loop").frames_in
        mib_before, objects_before = plasma_usage(gcs)
        wait_until(lambda: client.status("loop").frames_in >= frames_before + 120, timeout=120)
        frames_after = client.status("loop").frames_in
        mib_after, objects_after = plasma_usage(gcs)
        metrics: dict[str, float] = {}

        def exported_since_frames_before() -> bool:
            metrics.update(exported_metrics("loop"))
            return metrics.get("slowfast_frames_in_total", 0.0) >= frames_before

        wait_until(exported_since_frames_before, timeout=120)  # Ray exports the metrics every 30 s
    finally:
        result = run.finish()
    assert frames_after - frames_before >= 120  # the camera kept running meanwhile
    assert objects_after <= objects_before + 2 * WINDOW, (objects_before, objects_after)
    assert mib_after <= mib_before + 2 * WINDOW, (mib_before, mib_after)
    assert result["loop"].stats.ring_size <= WINDOW
    assert metrics["slowfast_frames_in_total"] >= frames_before
    assert metrics["slowfast_windows_done_total"] >= 1
    assert metrics["slowfast_window_latency_s_count"] >= 1 and "slowfast_queue_depth" in metrics
