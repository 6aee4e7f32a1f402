"""Long videos end to end (real Ray, Redis, tiny model): rolling and final summaries, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.client import SlowFastClient
from connectors.redis_schema import SummaryKind
from pipeline.config import load_config
from pipeline.runner import run_pipeline
from pipeline.window import expected_windows
from tests.support.background_run import wait_until
from tests.support.media import cfr_times, make_clip, read_vtt_cues

WINDOW, STRIDE, FPS = 8, 4, 4.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """12 s at 4 fps: 48 frames -> 11 windows of 8 frames at stride 4."""
    return make_clip(tmp_path_factory.mktemp("clips") / "long-video.mp4", cfr_times(8, 12.0)).path


def config_for(redis_url, model_dir, out_dir, clip, **stream):
    return load_config(
        None, redis_url=redis_url, model=str(model_dir), out_dir=out_dir, window=WINDOW, stride=STRIDE, fps=FPS,
        streams=[{"id": "film", "source": str(clip), **stream}], generation={"max_new_tokens": 4},
    )


def test_file_gets_rolling_summaries_every_n_windows_and_a_complete_final_summary(
    ray_session, redis_url, tiny_model_dir, clip, tmp_path
):
    every = 3
    result = run_pipeline(config_for(redis_url, tiny_model_dir, tmp_path, clip, summary_every_n_windows=every),
                          on_event=lambda _: None)
    total = expected_windows(48, WINDOW, STRIDE)
    assert result["film"].stats.windows_done == total == 11

    client = SlowFastClient(redis_url)
    captions = {c.window: c for c in client.history("film", count=100)}
    summaries = client.summaries("film", count=100)
    rolling = [s for s in summaries if s.kind == SummaryKind.ROLLING]
    # every 3 windows, the rest at the end of the file: exactly the windows in between, none twice
    assert [(s.first_window, s.last_window) for s in rolling] == [(0, 2), (3, 5), (6, 8), (9, 10)]
    for s in rolling:
        assert (s.start, s.end) == (captions[s.first_window].start, captions[s.last_window].end)
    final = summaries[-1]
    assert final.kind == SummaryKind.FINAL and len(summaries) == len(rolling) + 1
    assert (final.first_window, final.last_window) == (0, total - 1)
    assert client.latest_summary("film") == final

    markdown = (tmp_path / "film" / "summary.md").read_text()
    assert markdown.startswith("# Summary of film\n") and final.text.strip() in markdown
    timeline = [line for line in markdown.splitlines() if line.startswith("- **")]
    assert [line.split("(windows ")[1].split(")")[0] for line in timeline] == ["0-2", "3-5", "6-8", "9-10"]


def test_summary_command_prints_the_latest_or_says_there_is_none(redis_url):
    from typer.testing import CliRunner

    from connectors.publisher import Publisher
    from pipeline.cli import app
    from pipeline.summaries import RollingSummaries
    from tests.support.records import RUN, make_caption

    runner = CliRunner()
    bad = runner.invoke(app, ["summary", "no{pe}", "--redis-url", redis_url])
    assert bad.exit_code == 2 and bad.output.startswith("error: invalid stream id")
    missing = runner.invoke(app, ["summary", "film", "--redis-url", redis_url])
    assert missing.exit_code == 2 and "error: stream 'film' has no summary yet" in missing.output
    rolling = RollingSummaries("film", RUN, every_n_windows=2)
    for window in (0, 1):
        rolling.add_caption(make_caption(window, stream="film"))
    rolling.next_task()
    with Publisher(redis_url) as publisher:
        publisher.publish_summary(rolling.complete("a person walks in"))
    shown = runner.invoke(app, ["summary", "film", "--redis-url", redis_url])
    assert shown.exit_code == 0, shown.output
    assert "film rolling summary, windows 0-1 [0:00:00-0:00:19]" in shown.output and "a person walks in" in shown.output


def cli_run(clip, redis_url, out, *extra, config: Path | None = None):
    """`slowfast run` of the clip as stream film (`config`: a config file that names it instead)."""
    streams = ["-c", str(config)] if config else ["--source", f"film={clip}"]
    return [str(Path(sys.executable).with_name("slowfast")), "run", *streams, "--redis-url", redis_url,
            "--out", str(out), "--window", str(WINDOW), "--stride", str(STRIDE), "--fps", str(FPS),
            "--max-new-tokens", "4", *extra]


def check_outputs(redis_url, out: Path, total: int) -> None:
    """Redis and the files hold each window exactly once, of one run; the VTT parses."""
    client = SlowFastClient(redis_url)
    captions = client.history("film", count=1000)
    assert [c.window for c in captions] == list(range(total))
    assert len({c.run for c in captions}) == 1
    lines = (out / "film" / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line)["window"] for line in lines] == list(range(total))
    vtt = out / "film" / "captions.vtt"
    assert vtt.read_text().count("WEBVTT") == 1
    cues = read_vtt_cues(vtt)  # FFmpeg's WebVTT demuxer reads it back: one cue per window, back to back
    assert len(cues) == total
    assert all(start == pytest.approx(prev_end) for (_, prev_end, _), (start, _, _) in zip(cues, cues[1:]))
    rolling = [s for s in client.summaries("film", count=1000) if s.kind == SummaryKind.ROLLING]
    covered = [w for s in rolling for w in range(s.first_window, s.last_window + 1)]
    assert covered == list(range(total))  # contiguous, none twice, across the interruption
    assert client.latest_summary("film").kind == SummaryKind.FINAL


def killed_after_a_summary(command: list[str], client: SlowFastClient, timeout: float) -> None:
    """Start `command` (a `slowfast run` of stream film) in a session of its own and SIGKILL it
    and the Ray processes it started once film has a rolling summary in Redis."""
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: run.poll() is not None or client.redis.xlen("sfs:{film}:summaries") > 0, timeout)
        assert run.poll() is None, f"the run ended (code {run.returncode}) before its first summary"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()


def cut_mid_line(path: Path) -> None:
    """What a kill in the middle of a write leaves: the last line cut in half, no newline."""
    text = path.read_text()
    last = text.splitlines()[-1]
    path.write_text(text[: len(text) - 1 - len(last) // 2])


@pytest.mark.slow(seconds=130)
def test_a_run_killed_mid_file_resumes_after_the_last_captioned_window(redis_url, tmp_path, tiny_model_dir):
    """Killed once it has a rolling summary and a caption file cut mid-line, the rerun captions
    only the missing windows and continues the rolling summaries from the last one in Redis."""
    every = 3
    clip = make_clip(tmp_path / "film.mp4", cfr_times(8, 40.0)).path
    total = expected_windows(160, WINDOW, STRIDE)
    out = tmp_path / "out"
    config = tmp_path / "slowfast.yaml"  # JSON is YAML: the stream with its summary interval
    config.write_text(json.dumps({"streams": [{"id": "film", "source": str(clip), "summary_every_n_windows": every}]}))
    command = cli_run(clip, redis_url, out, "--model", str(tiny_model_dir), config=config)
    client = SlowFastClient(redis_url)
    killed_after_a_summary(command, client, timeout=180)
    done_before = client.redis.xlen("sfs:{film}:captions")
    before = [s for s in client.summaries("film", count=1000) if s.kind == SummaryKind.ROLLING]
    assert before and done_before < total  # a rolling summary exists, and windows are left
    cut_mid_line(out / "film" / "captions.jsonl")

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "stream film resumes after window" in second.stdout
    check_outputs(redis_url, out, total)
    assert (out / "film" / "captions.jsonl").read_text().endswith("}\n")  # whole lines only
    summaries = client.summaries("film", count=1000)
    rolling = [s for s in summaries if s.kind == SummaryKind.ROLLING]
    assert rolling[: len(before)] == before  # kept as they were
    resumed = rolling[len(before)]
    # the rerun's first summary continues the last one: the next windows, the next number
    assert (resumed.first_window, resumed.seq) == (before[-1].last_window + 1, before[-1].seq + 1)
    assert [s.seq for s in rolling] == list(range(len(rolling)))
    final = summaries[-1]
    assert final.kind == SummaryKind.FINAL and (final.first_window, final.last_window) == (0, total - 1)
    markdown = (out / "film" / "summary.md").read_text()  # its timeline lists the summaries from before the kill too
    timeline = [line.split("(windows ")[1].split(")")[0] for line in markdown.splitlines() if line.startswith("- **")]
    assert timeline == [f"{s.first_window}-{s.last_window}" for s in rolling]


def seed_earlier_run(redis_url, out: Path, source: str, window_settings: dict) -> None:
    """What an earlier (interrupted) run leaves: a registry entry, two captions, files."""
    from connectors.publisher import Publisher
    from connectors.redis_schema import StreamInfo
    from tests.support.records import make_caption

    with Publisher(redis_url) as publisher:
        info = publisher.register_stream(StreamInfo(id="film", source=source, live=False,
                                                    window_settings=window_settings))
        for window in (0, 1):
            publisher.publish_window(make_caption(window, stream="film", run=info.run, text="old"))
    (out / "film").mkdir(parents=True)
    for name in ("captions.jsonl", "captions.vtt", "summary.md"):
        (out / "film" / name).write_text("old\n")


@pytest.mark.parametrize("change", ["--stride", "source"])
def test_a_changed_setting_under_the_same_id_is_refused(redis_url, tmp_path, clip, change):
    from typer.testing import CliRunner

    from pipeline.cli import app

    settings = {"window": WINDOW, "stride": STRIDE, "fps": FPS}
    seed_earlier_run(redis_url, tmp_path, str(clip) if change != "source" else "/data/other.mp4", settings)
    args = cli_run(clip, redis_url, tmp_path)[1:]
    if change == "--stride":
        args[args.index("--stride") + 1] = "2"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stream 'film'"), result.output
    assert ("stride 4, window 8, this run has fps 4, stride 2" in lines[0]) if change == "--stride" else (
        "from /data/other.mp4, not" in lines[0])
    assert SlowFastClient(redis_url).redis.xlen("sfs:{film}:captions") == 2  # nothing touched


def test_restart_clears_keys_and_files_and_says_so(ray_session, redis_url, tmp_path, tiny_model_dir, clip):
    from typer.testing import CliRunner

    from pipeline.cli import app

    seed_earlier_run(redis_url, tmp_path, "/data/other.mp4", {})
    result = CliRunner().invoke(app, cli_run(clip, redis_url, tmp_path, "--model", str(tiny_model_dir),
                                             "--restart")[1:])
    assert result.exit_code == 0, result.output
    assert "restart: cleared stream film (" in result.output
    assert "captions.jsonl, captions.vtt, summary.md)" in result.output
    check_outputs(redis_url, tmp_path, expected_windows(48, WINDOW, STRIDE))
