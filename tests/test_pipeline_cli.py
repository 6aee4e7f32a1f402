"""The `slowfast` CLI, in-process with Typer's runner, on real Ray/Redis and the tiny model."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from pipeline.cli import app, parse_source_arg
from tests.support.media import cfr_times, make_clip, read_vtt_cues

runner = CliRunner()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("/data/lobby cam.mp4", ("lobby-cam", "/data/lobby cam.mp4")),
        ("rtsp://user:secret@10.0.0.5:554/stream1", ("stream1", "rtsp://user:secret@10.0.0.5:554/stream1")),
        ("door=rtsp://cam/live?token=x", ("door", "rtsp://cam/live?token=x")),
        ("loop:///tmp/clip.mp4", ("clip", "loop:///tmp/clip.mp4")),
    ],
)
def test_source_arguments_name_streams(value, expected):
    assert parse_source_arg(value) == expected


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
    asked = runner.invoke(app, ["ask", "yard", "What happens?", "--redis-url", redis_url, "--timeout", "1"])
    assert asked.exit_code == 2 and "no answer within 1 s" in asked.output


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
