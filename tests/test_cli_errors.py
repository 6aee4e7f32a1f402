"""Expected errors at the CLI: one `error:` line, exit 2 (usage/config) or 1 (run time), no
traceback (unless --debug), and `run` fails before it starts Ray. Real redis-server processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import ray
from typer.testing import CliRunner

from connectors.embedded import EmbeddedRedis, free_port
from connectors.publisher import Publisher
from connectors.redis_conn import connect
from connectors.redis_schema import Keys, StreamInfo
from pipeline.cli import app

runner = CliRunner()
HUB_ID = "shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame64-s1t4"


def one_error_line(result, code: int, *words: str) -> str:
    """The command exited `code` with exactly one `error:` line holding `words`, no traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


@pytest.fixture(scope="module")
def protected_redis():
    with EmbeddedRedis(password="right") as server:
        yield server


def test_run_checks_the_model_before_starting_ray(tmp_path, tiny_model_dir, monkeypatch, redis_url):
    """A wrong --model stops the run before Ray starts and before anything reaches Redis."""
    import huggingface_hub.constants

    ray_was_up = ray.is_initialized()
    source = ["--source", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "out"), "--redis-url", redis_url]
    result = runner.invoke(app, ["run", *source, "--model", str(tmp_path / "no-such-model")])
    one_error_line(result, 2, "model:", "no-such-model", "does not exist")
    # The hub offline and an empty cache, whatever this machine's network (read at call time)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    result = runner.invoke(app, ["run", *source, "--model", HUB_ID])
    one_error_line(result, 2, HUB_ID, "not a local folder", "neither in the Hugging Face cache nor reachable",
                   "outgoing traffic has been disabled")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model_dir / "config.json").read_text())  # no weight files
    one_error_line(runner.invoke(app, ["run", *source, "--model", str(broken)]), 2, "model:", "broken-model")
    assert ray.is_initialized() == ray_was_up
    assert connect(redis_url).keys("*") == []  # nothing registered, no status, no intake streams


def test_run_checks_redis_and_the_output_folder(tmp_path, tiny_model_dir, dead_redis_url, protected_redis):
    ray_was_up = ray.is_initialized()
    base = ["run", "--source", str(tmp_path / "clip.mp4"), "--model", str(tiny_model_dir)]
    one_error_line(runner.invoke(app, [*base, "--redis-url", dead_redis_url, "--out", str(tmp_path)]), 2,
                   "unreachable", dead_redis_url.split("//")[1].rsplit("/", 1)[0])
    wrong = protected_redis.url.replace(":right@", ":wrong@")
    line = one_error_line(runner.invoke(app, [*base, "--redis-url", wrong, "--out", str(tmp_path)]), 2,
                          "refused the credentials")
    assert "wrong" not in line  # the password is never shown
    (tmp_path / "file").write_text("")
    one_error_line(runner.invoke(app, [*base, "--out", str(tmp_path / "file" / "out")]), 2,
                   "output folder", "not writable")
    assert ray.is_initialized() == ray_was_up


@pytest.fixture(scope="module")
def stopped_redis_url() -> Iterator[str]:
    """A real Redis that had a stream registered, then stopped."""
    with EmbeddedRedis() as server:
        with Publisher(server.url) as pub:
            pub.register_stream(StreamInfo(id="cam", source="rtsp://x/1"))
        server.stop()
        yield server.url


@pytest.mark.parametrize("command", [
    ["status"], ["status", "--all"], ["tail"], ["tail", "cam"], ["events"], ["events", "cam"], ["ask", "cam", "anyone?"],
    ["summary", "cam"], ["streams", "add", "cam2=rtsp://x/1"], ["streams", "remove", "cam"],
])
def test_client_commands_with_unreachable_redis_exit_1(command, dead_redis_url, stopped_redis_url):
    for url in (dead_redis_url, stopped_redis_url):
        one_error_line(runner.invoke(app, [*command, "--redis-url", url]), 1, "unreachable")


def test_events_in_a_real_process_with_a_stopped_redis_prints_one_line(stopped_redis_url):
    proc = subprocess.run([sys.executable, "-c", "from pipeline.cli import app; app()", "events", "--redis-url",
                           stopped_redis_url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: Redis at 127.0.0.1:") and "is unreachable" in line


def test_client_commands_with_refused_credentials_exit_2(protected_redis):
    wrong = protected_redis.url.replace(":right@", ":wrong@")
    one_error_line(runner.invoke(app, ["status", "--redis-url", wrong]), 2, "refused the credentials")


@pytest.mark.parametrize("stream, question, words", [
    ("cam", "x" * 2001, ["text", "at most 2000 characters"]),
    ("cam", "", ["text", "at least 1 character"]),
    ("bad id!", "anyone?", ["invalid stream id 'bad id!'"]),
])
def test_bad_questions_exit_2_and_send_nothing(redis_url, stream, question, words):
    one_error_line(runner.invoke(app, ["ask", stream, question, "--redis-url", redis_url]), 2, *words)
    assert connect(redis_url).exists(Keys().questions) == 0


def test_runtime_replies_exit_1(redis_url):
    one_error_line(runner.invoke(app, ["ask", "cam", "anyone?", "--redis-url", redis_url, "--timeout", "0.5"]), 1,
                   "no answer within 0.5 s")
    one_error_line(runner.invoke(app, ["tail", "--redis-url", redis_url]), 1, "no streams registered")
    one_error_line(runner.invoke(app, ["streams", "add", f"{'x' * 65}=rtsp://x/1", "--redis-url", redis_url]), 2,
                   "invalid stream id")


def cli_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from pipeline.cli import app; app()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"COLUMNS": "200"} | (env or {}))


def test_debug_shows_the_traceback(dead_redis_url):
    """--debug and SLOWFAST_DEBUG=1, each in a real process: the traceback on stderr, exit 1."""
    status = ["status", "--redis-url", dead_redis_url]
    procs = [cli_process("--debug", *status), cli_process(*status, env={"SLOWFAST_DEBUG": "1"})]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 1, err
        assert "Traceback (most recent call last)" in err and not err.startswith("error: "), err
        port = dead_redis_url.rsplit(":", 1)[1].split("/")[0]
        assert err.strip().splitlines()[-1] == f"ConnectionError: Error 111 connecting to 127.0.0.1:{port}. Connection refused."


def test_a_real_process_prints_only_the_error_line(tmp_path):
    """Outside the test runner too: stderr holds the one line, nothing else (no logs, no traceback)."""
    proc = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import app; app()", "run", "--source", str(tmp_path / "x.mp4"), "--model",
         str(tmp_path / "missing"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().splitlines() == [
        f"error: model: checkpoint folder {tmp_path / 'missing'} does not exist (and '{tmp_path / 'missing'}' is "
        "not a hub id)"]


def test_a_run_whose_every_source_failed_exits_1(ray_session, redis_url, tiny_model_dir, tmp_path):
    result = runner.invoke(app, [
        "run", "--source", f"gone={tmp_path / 'missing.mp4'}", "--source", "odd=ftp://host/x.mp4",
        "--redis-url", redis_url, "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
        "--window", "8", "--stride", "4"])
    assert result.exit_code == 1, result.output
    assert "stream gone failed" in result.output and "stream odd failed" in result.output
    assert result.output.strip().splitlines()[-1] == "error: every source failed (see the summary)"
