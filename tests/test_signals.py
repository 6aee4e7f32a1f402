"""SIGTERM / SIGINT to a real `slowfast run` process: the first drains, prints the summary and
exits 0; a second one exits at once. Real Ray, real Redis, the tiny model."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.soak import child_pids
from connectors.embedded import EmbeddedRedis, find_server_binary, free_port
from tests.support.media import cfr_times, make_clip


# As root with util-linux, `slowfast run` can be PID 1 of its own PID namespace, as in a
# container without an init: the kernel then drops every signal it has no handler for.
CAN_BE_PID1 = os.geteuid() == 0 and shutil.which("unshare") is not None
# A caption line of any window: the run is up. Not one window's: on a busy machine a live
# window may be skipped (newest wins) and its line never comes.
CAPTIONED = "cam #"


class SlowfastProcess:
    """`slowfast run` in a subprocess of its own session (signalled alone, like a container's
    PID 1); stdout and stderr lines are collected as they come. `pid1`: run it as PID 1 of a new
    PID namespace; `.pid` is then its pid as seen from here."""

    def __init__(self, args: list[str], pid1: bool = False) -> None:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        prefix = ["unshare", "--pid", "--fork", "--mount-proc"] if pid1 else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", "from pipeline.cli import app; app()", "run", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )
        self.pid = self.proc.pid
        if pid1:  # the forked child of unshare
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            deadline = time.monotonic() + 30
            while not children.read_text().split():
                assert time.monotonic() < deadline, "unshare did not start its child"
                time.sleep(0.05)
            self.pid = int(children.read_text().split()[0])
            assert "NSpid:\t%d\t1" % self.pid in Path(f"/proc/{self.pid}/status").read_text()
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda s=stream, l=lines: l.extend(iter(s.readline, "")), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def wait_for_line(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.out):
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {''.join(self.out + self.err)[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s: {''.join(self.out)[-2000:]}"
            time.sleep(0.2)

    def output_read(self, timeout: float = 60) -> None:
        """After the exit: wait until everything it wrote has been collected."""
        for reader in self.readers:
            reader.join(timeout)
            assert not reader.is_alive(), "the run's output did not end (something still holds it open)"

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def session_processes(sid: int, columns: str = "pid=,comm=") -> list[str]:
    """`ps` lines (sid first, then `columns`) of the processes in session `sid`."""
    out = subprocess.run(["ps", "-e", "-o", "sid=," + columns], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(sid)]


def assert_session_empties(sid: int, timeout: float = 30) -> None:
    """Nothing of the run outlives it: Ray's processes go with the driver (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert session_processes(sid) == []


def pids_once_started(run: "SlowfastProcess", name: str, timeout: float) -> list[int]:
    """The pids of the processes called `name` in the run's session, once there is one."""
    deadline = time.monotonic() + timeout
    while not (pids := [int(line.split()[1]) for line in session_processes(run.pid) if line.split()[2] == name]):
        assert time.monotonic() < deadline and run.proc.poll() is None, f"no {name} started"
        time.sleep(0.02)
    return pids


@pytest.fixture
def clip(tmp_path):
    return make_clip(tmp_path / "cam.mp4", cfr_times(8, 6.0)).path


def run_args(clip: Path, tmp_path: Path, model: Path, redis_url: str | None = None) -> list[str]:
    args = ["--source", f"cam=loop://{clip}", "--model", str(model), "--out", str(tmp_path / "out"),
            "--window", "8", "--stride", "4", "--max-new-tokens", "4"]
    return args + (["--redis-url", redis_url] if redis_url else [])


def test_sigint_and_sigterm_set_the_stop_event_in_process():
    from pipeline.signals import stop_on_signals

    # What was there before, not Python's default: a shell starting the tests in the
    # background hands them SIGINT ignored.
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in (signal.SIGINT, signal.SIGTERM):
        with stop_on_signals() as stop:
            os.kill(os.getpid(), signum)
            assert stop.wait(5)
    assert {signum: signal.getsignal(signum) for signum in before} == before  # put back


def assert_run_processes_as_deployed(sid: int) -> None:
    """Ray starts its workers at nice 15 and on glibc's malloc; a run's actors (camera ingest, the
    model) must not be starved by whatever else the host runs, and run on Ray's jemalloc, under
    which their memory stays flat. The driver (the session's leader) never loads torch: only the
    model workers run the model."""
    assert "libtorch" not in Path(f"/proc/{sid}/maps").read_text()
    processes = [line.split(None, 3) for line in session_processes(sid, "pid=,ni=,args=")]
    actors = [(pid, nice, name) for _, pid, nice, name in processes if name.startswith("ray::")]
    assert any("IngestActor" in name for *_, name in actors) and any("ModelWorker" in name for *_, name in actors)
    assert all(nice == "0" for _, nice, _ in actors), actors
    assert all("libjemalloc" in Path(f"/proc/{pid}/maps").read_text() for pid, _, _ in actors), actors


@pytest.mark.slow(seconds=80)
def test_sigterm_drains_prints_the_summary_and_exits_0(clip, tmp_path, tiny_model_dir):
    """Also as PID 1 where the machine allows it (root)."""
    run = SlowfastProcess(run_args(clip, tmp_path, tiny_model_dir), pid1=CAN_BE_PID1)  # embedded Redis
    try:
        run.wait_for_line(CAPTIONED)
        os.kill(run.pid, signal.SIGTERM)
        code = run.proc.wait(timeout=120)
        run.output_read()
        output = "".join(run.out)
        assert code == 0, output + "".join(run.err)
        assert "stopping: draining" in output and "run summary" in output
        assert "│ cam " in output and "stopped" in output
        assert "SIGTERM received" not in "".join(run.err)  # Ray's native handler no longer fires
    finally:
        run.close()


@pytest.mark.slow(seconds=80)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_runs_processes_are_set_up_as_deployed_and_drain_on_a_signal_to_the_whole_group(
    signum, clip, tmp_path, tiny_model_dir
):
    """`kill -TERM -PGID`, `tini -g` and a terminal's Ctrl-C signal every process of the run's
    group: Ray's processes must not get it (a dead GCS hung the driver 60 s, exit 1, no summary)."""
    run = SlowfastProcess(run_args(clip, tmp_path, tiny_model_dir))  # embedded Redis
    try:
        run.wait_for_line(CAPTIONED)
        assert_run_processes_as_deployed(run.pid)
        sent = time.monotonic()
        os.killpg(run.pid, signum)
        code = run.proc.wait(timeout=90)
        took = time.monotonic() - sent
        run.output_read()
        output = "".join(run.out)
        assert code == 0, output + "".join(run.err)
        assert took < 30, took
        assert "stopping: draining" in output and "run summary" in output
        assert "│ cam " in output and "stopped" in output
        assert_session_empties(run.pid)
    finally:
        run.close()


@pytest.mark.slow(seconds=75)
def test_a_second_signal_exits_within_5_s(clip, tmp_path, tiny_model_dir):
    """SIGINT starts the drain (as SIGTERM does), SIGTERM then forces the exit; the run's
    processes (Ray's, the embedded Redis) go with it."""
    with EmbeddedRedis() as server:
        run = SlowfastProcess(run_args(clip, tmp_path, tiny_model_dir, server.url))
        try:
            run.wait_for_line(CAPTIONED)
            # With Redis gone the drain waits (bounded) for the workers' buffered writes: certainly
            # longer than the second signal takes to come.
            server.kill()
            server.stop()
            run.proc.send_signal(signal.SIGINT)
            run.wait_for_line("stopping: draining", timeout=60)
            assert run.proc.poll() is None, "the drain ended before the second signal"
            sent = time.monotonic()
            run.proc.send_signal(signal.SIGTERM)
            code = run.proc.wait(timeout=120)  # a bound for a stuck process, not the exit's speed
            print(f"\nsecond signal -> exit in {time.monotonic() - sent:.1f} s")
            # The forced exit, not the drain's end (exit 0, after the summary): the drain still had
            # its wait for the stopped Redis ahead of it.
            assert code == 128 + signal.SIGTERM
            assert_session_empties(run.proc.pid)  # Ray's processes share the driver's fate
            run.output_read()
            assert "run summary" not in "".join(run.out)
        finally:
            run.close()


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child may wait a while to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow(seconds=60)
def test_a_killed_run_takes_its_embedded_redis_with_it(clip, tmp_path, tiny_model_dir):
    """SIGKILL (the OOM killer, `kill -9`) runs no cleanup; the embedded server, in a session
    of its own, must still not outlive the run."""
    run = SlowfastProcess(run_args(clip, tmp_path, tiny_model_dir))  # embedded Redis
    servers: list[int] = []
    try:
        run.wait_for_line(CAPTIONED)
        servers = child_pids(run.pid, Path(find_server_binary()).name[:15])  # comm is cut at 15
        assert len(servers) == 1
        os.kill(run.pid, signal.SIGKILL)
        run.proc.wait()
        deadline = time.monotonic() + 30
        while is_running(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not is_running(servers[0]), "the embedded redis-server outlived its killed run"
    finally:
        run.close()
        for pid in filter(is_running, servers):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # Ray's agents take a minute or two to notice
            os.killpg(run.pid, signal.SIGKILL)


@pytest.mark.slow(seconds=90)
def test_a_metrics_port_taken_while_ray_starts_restarts_ray_on_another(clip, tmp_path, tiny_model_dir):
    """Two runs started at the same moment both find the default metrics port free; the
    second's Ray agent then cannot bind it, its raylet dies and Ray gives up after 30 s. Here
    the port is taken once the raylet is up: the run stops that Ray (its GCS does not outlive
    the retry), starts it again on another port and runs."""
    port = free_port()
    run = SlowfastProcess([*run_args(clip, tmp_path, tiny_model_dir), "--metrics-port", str(port)])  # embedded Redis
    try:
        pids_once_started(run, "raylet", timeout=60)
        first_gcs = pids_once_started(run, "gcs_server", timeout=1)
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", port))
            taken.listen()
            run.wait_for_line(CAPTIONED, timeout=300)
        assert first_gcs and not any(map(is_running, first_gcs))
        log = (tmp_path / "out" / "slowfast.log").read_text()
        assert "the local Ray node did not start within Ray's 30 s (a busy host?): starting it again (2 of 3)" in log
        assert f"metrics port {port} was taken while Ray started (another run?): serving metrics on" in log
        metrics = next(line for line in run.out if line.startswith("metrics "))
        assert f":{port}/" not in metrics, metrics
        os.kill(run.pid, signal.SIGTERM)
        assert run.proc.wait(timeout=120) == 0
    finally:
        run.close()


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_ray_starts_stops_the_run_before_any_stream_starts(signum, clip, tmp_path, tiny_model_dir):
    """ray.init takes SIGTERM for itself (it raises SystemExit) and leaves SIGINT to the run's
    handler; either way the run stops before a stream starts: one line, exit 0, no traceback,
    nothing registered in Redis and nothing of the run left running."""
    from connectors.redis_conn import connect
    from connectors.redis_schema import Keys

    with EmbeddedRedis() as server:
        run = SlowfastProcess(run_args(clip, tmp_path, tiny_model_dir, server.url))
        try:
            # The GCS is the first process ray.init starts; its raylet, the node's registration
            # and the driver's connection are still to come.
            pids_once_started(run, "gcs_server", timeout=120)
            run.proc.send_signal(signum)
            code = run.proc.wait(timeout=120)
            run.output_read()
            output = "".join(run.out) + "".join(run.err)
            assert code == 0, output
            assert "stopped while Ray was starting" in output and "stopping: draining" not in output
            assert "Traceback" not in output
            assert connect(server.url).hgetall(Keys().registry) == {}  # no stream was started
            assert_session_empties(run.pid)
        finally:
            run.close()
