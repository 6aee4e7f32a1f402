"""The `slowfast` CLI, in-process with Typer's runner, on real Ray/Redis and the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app, parse_source_arg
from tests.support.media import cfr_times, free_port, make_clip, read_vtt_cues

runner = CliRunner()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("/data/lobby cam.mp4", ("lobby-cam", "/data/lobby cam.mp4")),
        ("rtsp://user:secret@10.0.0.5:554/stream1", ("stream1", "rtsp://user:secret@10.0.0.5:554/stream1")),
        ("door=rtsp://cam/live?token=x", ("door", "rtsp://cam/live?token=x")),
        ("loop:///tmp/clip.mp4", ("clip", "loop:///tmp/clip.mp4")),
        ("/data/café.mp4", ("caf", "/data/café.mp4")),
        (f"/data/{'x' * 70}.mp4", ("x" * 64, f"/data/{'x' * 70}.mp4")),
    ],
)
def test_source_arguments_name_streams(value, expected):
    assert parse_source_arg(value) == expected


def test_a_named_stream_keeps_its_id_or_is_refused():
    with pytest.raises(ValueError, match="invalid stream id 'lobby cam'"):
        parse_source_arg("lobby cam=/data/lobby.mp4")


def test_run_a_file_writes_outputs_and_status(ray_session, redis_url, tiny_model_dir, tmp_path):
    clip = make_clip(tmp_path / "yard.mp4", cfr_times(8, 6.0)).path
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "run", "--source", str(clip), "--redis-url", redis_url, "--model", str(tiny_model_dir),
        "--out", str(out), "--window", "8", "--stride", "4", "--max-new-tokens", "4",
    ])
    assert result.exit_code == 0, result.output
    # summary table: stream, state, frames in, windows, captioned, skipped
    assert re.search(r"yard\s*│\s*ended\s*│\s*24\s*│\s*5\s*│\s*5\s*│\s*0\s*│", result.output), result.output
    records = [json.loads(line) for line in (out / "yard" / "captions.jsonl").read_text().splitlines()]
    assert [r["window"] for r in records] == [0, 1, 2, 3, 4]
    # The subtitle track as FFmpeg reads it: one cue per window, back to back, the first over
    # the whole first window, each ending when its window's last frame has shown (4 fps).
    cues = read_vtt_cues(out / "yard" / "captions.vtt")
    assert len(cues) == len(records)
    assert cues[0][0] == pytest.approx(records[0]["start"], abs=1e-3)
    for cue, next_cue, record in zip(cues, cues[1:] + [None], records):
        assert cue[1] == pytest.approx(record["end"] + 1 / 4, abs=1e-3)
        if next_cue is not None:
            assert next_cue[0] == cue[1]

    status = runner.invoke(app, ["status", "--redis-url", redis_url])
    assert status.exit_code == 0 and "yard" in status.output and "ended" in status.output
    from connectors.client import SlowFastClient
    assert SlowFastClient(redis_url).stream("yard").pipeline > 0  # the run's id, which status filters on
    asked = runner.invoke(app, ["ask", "yard", "What happens?", "--redis-url", redis_url, "--timeout", "1"])
    assert asked.exit_code == 1 and "no answer within 1 s" in asked.output  # run time: exit 1


def test_a_second_run_in_the_same_ray_namespace_is_refused_in_one_line(ray_session, redis_url, tiny_model_dir, tmp_path):
    """Actor names are per namespace; the first run's actors must survive the second's attempt."""
    import ray

    @ray.remote(num_cpus=0)
    class FirstRunsWorker:
        def alive(self) -> bool:
            return True

    first = FirstRunsWorker.options(name="worker:0").remote()  # the tests' Ray runs in namespace slowfast-tests
    try:
        clip = make_clip(tmp_path / "yard.mp4", cfr_times(8, 2.0)).path
        result = runner.invoke(app, ["run", "--source", str(clip), "--redis-url", redis_url, "--model", str(tiny_model_dir)],
                               env={"SLOWFAST_RAY_NAMESPACE": "slowfast-tests"})
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1] == (
            "error: another slowfast run is using Ray namespace 'slowfast-tests' (its model worker exists): stop that "
            "run, or give this one its own ray_namespace (SLOWFAST_RAY_NAMESPACE)")
        assert "Traceback" not in result.output
        assert ray.get(first.alive.remote(), timeout=30)
    finally:
        ray.kill(first)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run"], "no streams"),
        (["run", "--source", "x.mp4", "--stride", "100"], "stride 100 is larger than the window 64"),
        (["run", "--source", "x.mp4", "--fps", "0"], "fps=0.0"),
        (["run", "-c", "/nonexistent/slowfast.yaml"], "cannot read config file"),
        (["run", "--window", "abc"], "Invalid value"),
    ],
)
def test_bad_run_arguments_exit_2_with_the_reason(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_every_command_has_help():
    for command in (["run"], ["ask"], ["tail"], ["status"], ["demo"], ["streams", "add"], ["streams", "remove"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_status_shows_the_current_run_whole_and_earlier_runs_with_all(redis_url):
    from connectors.publisher import Publisher
    from connectors.redis_schema import IngestState, StreamInfo, StreamStatus

    publisher = Publisher(redis_url)
    error = "cannot open rtsp://cam/door: connection refused (5 attempts, backoff 30 s) " + "x" * 120
    for sid, pipeline_run in (("old-cam", 1_000), ("door", 2_000), ("yard", 2_000)):
        publisher.register_stream(StreamInfo(id=sid, source="rtsp://cam/" + sid, pipeline=pipeline_run))
    publisher.publish_status(StreamStatus(stream="door", state=IngestState.RECONNECTING, last_error=error))
    publisher.publish_status(StreamStatus(stream="yard", state=IngestState.LIVE, fps_in=3.9, fps_out=0.25))
    publisher.publish_status(StreamStatus(stream="old-cam", state=IngestState.ENDED))

    result = runner.invoke(app, ["status", "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert "door" in result.output and "yard" in result.output and "old-cam" not in result.output
    assert "1 streams of earlier runs not shown (--all shows them)" in result.output
    assert error in result.output  # piped: the table is as wide as its text, nothing cut
    assert re.search(r"yard\s*│\s*live\s*│\s*3\.9/0\.2\s*│", result.output)  # fps in/out

    everything = runner.invoke(app, ["status", "--all", "--redis-url", redis_url])
    assert everything.exit_code == 0 and "old-cam" in everything.output and "not shown" not in everything.output


@pytest.mark.slow(seconds=85)
def test_demo_camera_runs_its_seconds_from_its_first_frame(ray_session, tiny_model_dir, tmp_path, monkeypatch):
    """The demo's live copy runs `--seconds` from its first frame, however long start-up took
    (at 4 fps, 4 s of camera are at least 16 frames; 0.5 s of slack for the first status), and
    the file copy is captioned to its end (24 s: 6 windows of 16 frames)."""
    monkeypatch.chdir(tmp_path)  # the demo writes out/demo/ here
    result = runner.invoke(app, ["demo", "--seconds", "4", "--window", "16", "--stride", "16",
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    frames = int(re.search(r"camera\s*│\s*\w+\s*│\s*(\d+)\s*│", result.output)[1])
    assert frames >= (4 - 0.5) * 4, result.output
    assert re.search(r"file\s*│\s*ended\s*│\s*96\s*│\s*6\s*│\s*6\s*│\s*0\s*│", result.output), result.output
    assert "Started a local Ray" not in result.output


@pytest.mark.slow(seconds=95)
def test_run_prints_its_metrics_url_and_keeps_rays_chatter_in_the_log(redis_url, tiny_model_dir, tmp_path):
    """A real `slowfast run` starting its own Ray: the console names the Redis and metrics URLs,
    the metrics URL serves the pipeline's counters in Prometheus text, and Ray's start-up lines
    are in the log file, not in the output."""
    clip = make_clip(tmp_path / "cam.mp4", cfr_times(8, 6.0)).path
    port = free_port()
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}
    driver = subprocess.Popen(
        [str(Path(sys.executable).parent / "slowfast"), "run", "--source", f"cam=loop://{clip}",
         "--redis-url", redis_url, "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
         "--window", "8", "--stride", "4", "--max-new-tokens", "4", "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in driver.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("cam #") for line in seen) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        url = next((line.split()[1] for line in seen if line.startswith("metrics ")), None)
        assert url and url.endswith(f":{port}/metrics"), seen
        body = ""
        # Each actor's metrics are exported every few seconds, the worker's after its first window.
        while not ("ray_slowfast_frames_in" in body and "ray_slowfast_windows_done" in body) \
                and time.monotonic() < deadline:
            time.sleep(1)
            body = urllib.request.urlopen(url, timeout=10).read().decode()
        assert re.search(r'^ray_slowfast_frames_in_total\{[^}]*stream="cam"[^}]*\} \d', body, re.M), body[-2000:]
        assert "# TYPE ray_slowfast_windows_done_total counter" in body
    finally:
        driver.send_signal(signal.SIGINT)
        driver.wait(timeout=120)
    time.sleep(0.5)  # the reader thread takes the last lines
    while not lines.empty():
        seen.append(lines.get())
    assert driver.returncode == 0, seen
    assert any(line.startswith(f"redis {redis_url}") for line in seen), seen
    ray_lines = [line for line in seen if re.search(r"\w+\.py:\d+ -- |Token authentication|local Ray instance", line)]
    assert not ray_lines, seen  # Ray's log format: "<time> WARNING file.py:85 -- message"
    log = (tmp_path / "out" / "slowfast.log").read_text()
    assert "Started a local Ray instance" in log


def test_a_busy_metrics_port_stops_the_run_if_chosen_and_gives_way_if_default():
    import socket

    from pipeline.config import ConfigError, load_config
    from pipeline.startup import local_metrics_port

    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics_port {port} is in use"):
            local_metrics_port(load_config(None, metrics_port=port))
    assert local_metrics_port(load_config(None, metrics_port=port)) == (port, None)  # free again

    default = load_config(None)
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # already taken by another run on this host: as good
            held.bind(("0.0.0.0", default.metrics_port))
            held.listen()
        chosen, note = local_metrics_port(default)
    assert chosen not in (0, default.metrics_port)
    assert note == f"metrics port {default.metrics_port} is in use; serving metrics on {chosen} instead"
