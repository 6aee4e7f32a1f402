"""Days, not minutes: the real pipeline for a set time, with faults injected on a schedule.

`slowfast run` in a subprocess (the shipped synthetic-world model, a local Ray of its own) on a
real Redis with AOF; live RTSP cameras (one looping gst-rtsp-server each), looping files, a long
file started again under a new id each time it ends (the old one removed), standing questions
on every stream; the web page (`slowfast web`) read all the time by an SSE client, and
`slowfast tail` and `slowfast events` followers. Every --fault-every seconds the next fault in
rotation: kill an ingest actor, kill the model worker, SIGKILL Redis and start it again, kill
a camera's RTSP server and start it again. The run ends with SIGTERM to its process group.

Every --sample-every seconds a row of soak.csv: memory (RSS), descriptors and threads of the
driver, the actors, Ray's own processes, the web server, the followers and Redis, Redis's
used_memory, Ray's object store, windows per second, caption latency p50/p99 and state per
stream, file windows expected and published. At the end: report.txt (every figure and a verdict
line), soak.png (memory, latency and states over time, faults marked), processes.csv.

    python -m bench.soak --minutes 60 [--cameras 4 --loops 2 --fault-every 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import http.server
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from bench.common import parse_args, percentile, slope_per_hour
from bench.rtsp import RtspServer, rtsp_server_available, write_loop_clip
from bench.soak_plot import plot
from connectors.client import QuestionError, SlowFastClient
from connectors.embedded import EmbeddedRedis, free_port
from connectors.redis_conn import UNREACHABLE
from connectors.redis_schema import EventPhase, IngestState
from pipeline.config import load_config
from pipeline.demo_clip import demo_scenes, write_clip
from pipeline.progress import estimated_windows

FAULTS = ("ingest", "worker", "redis", "rtsp", "webhook")
QUESTIONS = [
    {"id": "red-circle", "prompt": "Is there a red circle?", "trigger": {"p_yes_above": 0.5}, "answer": "probability"},
    {"id": "blue-square", "prompt": "Is there a blue square?", "answer": "text"},
]
# Processes sampled, alone or summed (IngestActor: all of them; ray_other: Ray's other processes).
GROUPS = ("driver", "ModelWorker", "IngestActor", "raylet", "gcs_server", "ray_other", "web", "tail", "events", "redis")
PIPELINE_ROLES = ("driver", "ModelWorker", "IngestActor", "web", "tail", "events")
STALE_S = 5.0  # a status this old means no heartbeat: the stream is not being watched
CLI = [sys.executable, "-c", "from pipeline.cli import app; app()"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="soak time, from the first caption")
    parser.add_argument("--cameras", type=int, default=4, help="live RTSP cameras")
    parser.add_argument("--loops", type=int, default=2, help="live looping files (loop://)")
    # An hour of video: a long file, as users caption them (a run takes minutes). A short one
    # would add and remove a stream every few seconds, far more churn than any deployment.
    parser.add_argument("--long-scenes", type=int, default=900, help="4-s scenes in the long file")
    parser.add_argument("--questions", type=int, default=2, choices=range(len(QUESTIONS) + 1),
                        help="standing questions per stream")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--history-len", type=int, default=150,
                        help="entries Redis keeps per stream: the retention its memory levels off at")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"rotation, a comma list of {', '.join(FAULTS)}")
    parser.add_argument("--fault-every", type=float, default=300.0, help="seconds between faults")
    parser.add_argument("--down", type=float, default=5.0, help="seconds Redis and an RTSP server stay down")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="seconds the webhook receiver holds every delivery unanswered")
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=600.0, help="seconds not judged for growth")
    parser.add_argument("--live-within", type=float, default=10.0,
                        help="target: seconds from a fault's end to every live stream live again")
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSVs, report and plot")
    args = parse_args(parser, argv, smoke=dict(
        minutes=0.6, cameras=1, loops=1, long_scenes=3, questions=1, window=8, stride=4, max_new_tokens=8,
        faults="rtsp,redis", fault_every=10.0, down=3.0, sample_every=3.0, warmup=6.0, live_within=30.0))
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"--faults: unknown {', '.join(unknown)} (known: {', '.join(FAULTS)})")
    if args.cameras and not rtsp_server_available():
        print("error: gst-rtsp-server is not installed (make system-deps), or use --cameras 0", file=sys.stderr)
        return 2
    if not args.cameras:  # no RTSP server to kill
        faults = [f for f in faults if f != "rtsp"]
    # Stopped early (SIGTERM, as `timeout` sends): unwind, so the pipeline and the RTSP servers
    # it started stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    with Soak(args, faults, out) as soak:
        soak.run()
    report = soak.report()
    (out / "report.txt").write_text(report + "\n")
    print(report)
    plot(out / "soak.png", soak.rows, [(f.started - soak.t0, f.kind) for f in soak.faults],
         [s.id for s in soak.live] + ["long"])
    print(f"files: {out / 'soak.csv'}, {out / 'processes.csv'}, {out / 'report.txt'}, {out / 'soak.png'}")
    return 0 if soak.verdict_ok else 1


# ------------------------------------------------------------------------------- processes


def proc_stats(pid: int) -> tuple[float, int, int] | None:
    """(RSS MB, open descriptors, threads) of a process, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exiting
        return None
    return int(fields["VmRSS"].split()[0]) / 1024, fds, int(fields["Threads"])


def parent_pid(pid: int) -> int:
    """A process's parent: the field after the state in /proc/PID/stat (OSError once it is gone)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def child_pids(parent: int, name: str | None = None) -> list[int]:
    """`parent`'s child processes; with `name`, those whose `comm` it is (cut at 15 characters)."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and parent_pid(int(entry)) == parent and (
                    name is None or Path(f"/proc/{entry}/comm").read_text().strip() == name):
                children.append(int(entry))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return children


def child_process(name: str, parent: int) -> int | None:
    """The pid of `parent`'s child process named `name` (as `gcs_server` or `raylet`)."""
    return next(iter(child_pids(parent, name)), None)


def session_roles(sid: int) -> dict[int, str]:
    """{pid: role} of the processes of session `sid`: `driver` (the session leader), an actor
    or Ray worker by its title (ray::IngestActor or ray::ingest:cam1:IngestActor -> the same,
    less `ray::`), else the program's name."""
    roles = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" or int(fields[3]) != sid:
            continue
        pid = int(entry.name)
        title = argv[0].decode(errors="replace")
        if pid == sid:
            roles[pid] = "driver"
        elif title.startswith("ray::"):
            roles[pid] = re.split(r"[.\s]", title[5:], maxsplit=1)[0] or "ray"  # .method while busy
        else:
            script = next((a.decode() for a in argv[1:3] if a.endswith(b".py")), title)
            roles[pid] = Path(script).name.removesuffix(".py")
    return roles


class LineCounter:
    """A subprocess whose stdout lines are counted and timed (the last `keep` kept)."""

    def __init__(self, name: str, cmd: list[str], cwd: Path, keep: int = 0, log: Path | None = None) -> None:
        self.name, self.keep = name, keep
        self.times: list[float] = []
        self.lines: list[str] = []
        self.log = log.open("w") if log else None
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
                                     start_new_session=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            self.times.append(time.time())
            if self.log:
                self.log.write(line)
                self.log.flush()
            if self.keep:
                self.lines.append(line)
                del self.lines[:-self.keep]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.thread.join(timeout=5)
        if self.log:
            self.log.close()
        return self.proc.returncode


class SseClient:
    """Reads the web page's update stream (/api/updates) all the time, as an open browser tab
    does; reconnects after 2 s when it drops (the page's `retry`)."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        self.port, self.stop = port, stop
        self.events: Counter[str] = Counter()
        self.times: list[float] = []
        self.connects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("GET", "/api/updates", headers={"Accept": "text/event-stream"})
                response = conn.getresponse()
                if response.status != 200:
                    raise OSError(f"status {response.status}")
                self.connects += 1
                while not self.stop.is_set():
                    line = response.readline()
                    if not line:
                        break
                    if line.startswith(b"event: "):
                        self.events[line[7:].strip().decode()] += 1
                        self.times.append(time.time())
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            self.stop.wait(2.0)


class Seen(NamedTuple):
    stream: str
    window: int
    created: float  # the caption's created_at (unix s)
    wall_start: float  # capture time of its window's first frame
    latency: float | None  # window closed -> result ready
    arrived: float  # when this follower read it


class WebhookReceiver:
    """The receiver of every stream's event webhooks: answers each delivery at once, or while
    stalled holds it unanswered until the stall ends and then drops the connection (the sender
    has timed out by then, and tries again or writes the delivery down)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stalled = threading.Event()
        self.delivered: Counter[str] = Counter()  # idempotency key -> deliveries answered
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.stalled.is_set():
                    while receiver.stalled.is_set() and not stop.is_set():
                        time.sleep(0.2)
                    self.close_connection = True
                    return
                receiver.delivered[self.headers.get("Idempotency-Key", "")] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stalled.clear()
        self.server.shutdown()
        self.server.server_close()


class CaptionLog:
    """Every caption as it is published, read by the client's follower."""

    def __init__(self, redis_url: str, stop: threading.Event) -> None:
        self.rows: list[Seen] = []
        self.client = SlowFastClient(redis_url)
        self.thread = threading.Thread(target=self._run, args=(stop,), daemon=True)
        self.thread.start()

    def _run(self, stop: threading.Event) -> None:
        for c in self.client.follow(stop=stop, poll_s=0.5):
            self.rows.append(Seen(c.stream, c.window, c.created_at, c.wall_start, c.latency_s, time.time()))


# ------------------------------------------------------------------------------- the soak


@dataclass
class Fault:
    kind: str
    target: str
    started: float  # unix s
    ended: float | None = None  # back up (Redis, RTSP server), or = started for a kill
    live_after: dict[str, float] = field(default_factory=dict)  # stream -> s from `ended` to live again


@dataclass
class FileRun:
    sid: str
    expected: int | None
    started: float
    ended: float | None = None
    published: int = 0
    twice: int = 0
    missing: int = 0


@dataclass
class Live:
    id: str
    source: str
    server: RtspServer | None = None


class Soak:
    def __init__(self, args: argparse.Namespace, faults: list[str], out: Path) -> None:
        self.args, self.fault_kinds, self.out = args, faults, out
        self.stop = threading.Event()
        self.rows: list[dict[str, float | str]] = []
        self.process_rows: list[tuple[float, int, str, float, int, int]] = []
        self.faults: list[Fault] = []
        self.file_runs: list[FileRun] = []
        self.state_seconds: dict[str, Counter[str]] = defaultdict(Counter)
        self.removed: list[str] = []
        self.run_exit: tuple[int | None, float, bool] | None = None
        self.retention: tuple[int, int, int] | None = None
        self.notifications: tuple[int, int, int, int] | None = None
        self.verdict_ok = False
        self._stack = contextlib.ExitStack()

    # ---------------------------------------------------------------- setup and teardown

    def __enter__(self) -> Soak:
        a, out = self.args, self.out
        for earlier in ("redis", "run"):  # a soak starts from nothing: no stream resumes
            shutil.rmtree(out / earlier, ignore_errors=True)
        media = out / "media"
        media.mkdir(exist_ok=True)
        clip = write_clip(media / "scenes.mp4", demo_scenes())
        self.long_clip = write_clip(media / "long.mp4", demo_scenes(a.long_scenes, seed=7, red_circle_in=(1,)))
        self.redis = self._stack.enter_context(EmbeddedRedis(data_dir=out / "redis", extra_args=[
            "--appendonly", "yes", "--appendfsync", "everysec"]))
        self.redis_url = self.redis.url
        self.client = SlowFastClient(self.redis_url)
        self.live: list[Live] = []
        if a.cameras:
            loop_clip, loop_fps = write_loop_clip(clip, media / "scenes.h264")
            for i in range(a.cameras):
                server = RtspServer(loop_clip, loop_fps=loop_fps).start()
                self._stack.callback(server.stop)
                self.live.append(Live(f"cam{i + 1}", server.url(), server))
        self.live += [Live(f"loop{i + 1}", f"loop://{clip}") for i in range(a.loops)]
        self.questions = QUESTIONS[:a.questions]
        self.webhook = WebhookReceiver(self.stop)
        self._stack.callback(self.webhook.close)
        self.notify = [{"webhook": self.webhook.url}]
        self.window_config = load_config(None, window=a.window, stride=a.stride, fps=a.fps)
        self.long_n = itertools.count(1)
        long_id = f"long{next(self.long_n)}"
        streams = [{"id": s.id, "source": s.source, "live": True, "standing_questions": self.questions,
                    "notify": self.notify} for s in self.live]
        streams.append({"id": long_id, "source": str(self.long_clip), "live": False,
                        "standing_questions": self.questions, "notify": self.notify})
        # Every stream's ingest actor must fit beside the model worker (the long file's next run
        # starts as its last ends, so one more), or some would wait for a free CPU all soak long.
        ingest_cpus = round((os.cpu_count() - load_config(None).worker_cpus) / (len(streams) + 1), 3)
        config = {"window": a.window, "stride": a.stride, "fps": a.fps, "history_len": a.history_len,
                  "ingest_cpus": ingest_cpus, "generation": {"max_new_tokens": a.max_new_tokens}, "streams": streams,
                  "out_dir": str(out / "run")}
        (out / "soak.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"soak: {len(self.live)} live streams ({a.cameras} RTSP, {a.loops} looping files), a long file of "
              f"{a.long_scenes * 4} s, {len(self.questions)} standing questions each; window {a.window}, "
              f"stride {a.stride}, {a.fps:g} fps; faults {','.join(self.fault_kinds) or 'none'} every "
              f"{a.fault_every:g} s; {a.minutes:g} min; output in {out}", flush=True)
        self.run_started = time.time()
        self.pipeline = LineCounter("run", [*CLI, "run", "-c", str(out / "soak.yaml"), "--redis-url", self.redis_url,
                                       "--no-web", "--metrics-port", "0"], out, keep=400, log=out / "run.out")
        self._stack.callback(self.pipeline.stop, signal.SIGKILL)
        # The followers start with it (on a busy machine their start-up takes a while too).
        self.captions = CaptionLog(self.redis_url, self.stop)
        port = free_port()
        self.web = LineCounter("web", [*CLI, "web", "--redis-url", self.redis_url, "--port", str(port)], out)
        self._stack.callback(self.web.stop)
        self.events = LineCounter("events", [*CLI, "events", "--redis-url", self.redis_url], out)
        self._stack.callback(self.events.stop)
        self.sse = SseClient(port, self.stop)
        self.file_runs.append(FileRun(long_id, estimated_windows(str(self.long_clip), self.window_config),
                                      time.time()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._stack.close()

    def wait_for_first_caption(self, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(" #" in line for line in self.pipeline.lines):
            if self.pipeline.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run gave no caption: {''.join(self.pipeline.lines)[-3000:]}")
            time.sleep(0.5)
        self.first_caption = time.time()
        self.startup_s = self.first_caption - self.run_started
        self.metrics_url = next((line.split()[1] for line in self.pipeline.lines if line.startswith("metrics http")), None)

    # ---------------------------------------------------------------- the run

    def run(self) -> None:
        a = self.args
        while not self.client.streams():  # `slowfast tail` wants streams registered
            if self.pipeline.proc.poll() is not None:
                raise RuntimeError(f"the run exited: {''.join(self.pipeline.lines)[-3000:]}")
            time.sleep(0.5)
        self.tail = LineCounter("tail", [*CLI, "tail", "--redis-url", self.redis_url], self.out)
        self._stack.callback(self.tail.stop)
        self.wait_for_first_caption()
        print(f"first caption {self.startup_s:.0f} s after the start", flush=True)
        # The CLI followers start slowly on a busy machine: the soak's clock starts once they read.
        deadline = time.monotonic() + 600
        while not (self.tail.times and self.sse.times) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.t0 = time.time()
        print(f"followers reading {self.t0 - self.first_caption:.0f} s later; soaking", flush=True)
        end = self.t0 + a.minutes * 60
        rotation = itertools.cycle(self.fault_kinds) if self.fault_kinds else iter(())
        next_fault, next_sample = self.t0 + a.fault_every, self.t0
        fault_thread: threading.Thread | None = None
        last_tick = time.time()
        with open(self.out / "soak.csv", "w", newline="") as table, open(self.out / "processes.csv", "w", newline="") as procs:
            rows, proc_rows = None, csv.writer(procs)
            proc_rows.writerow(["t_s", "pid", "role", "rss_mb", "fds", "threads"])
            while (now := time.time()) < end:
                statuses = self.poll_states(now - last_tick)
                last_tick = now
                self.check_recoveries(statuses, now)
                self.check_long_file(statuses)
                # A fault leaves at least a minute (or its interval) to recover before the end.
                if now >= next_fault and now + min(60.0, a.fault_every) < end and (
                        fault_thread is None or not fault_thread.is_alive()):
                    kind = next(rotation, None)
                    if kind:
                        fault_thread = threading.Thread(target=self.inject, args=(kind,), daemon=True)
                        fault_thread.start()
                    next_fault += a.fault_every
                if now >= next_sample:
                    row = self.sample(now, statuses, proc_rows)
                    if rows is None:
                        rows = csv.DictWriter(table, fieldnames=list(row))
                        rows.writeheader()
                    rows.writerow({k: row.get(k, "") for k in rows.fieldnames})
                    table.flush()
                    procs.flush()
                    next_sample += a.sample_every
                time.sleep(max(0.0, 1.0 - (time.time() - now)))
            if fault_thread is not None:
                fault_thread.join()
        self.end = time.time()
        self.stop_run()

    def stop_run(self) -> None:
        """SIGTERM to the run's whole process group, as systemd or `tini -g` stop a service."""
        sent = time.time()
        os.killpg(self.pipeline.proc.pid, signal.SIGTERM)
        try:
            code = self.pipeline.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            code = None
        self.pipeline.thread.join(timeout=5)
        self.run_exit = (code, time.time() - sent, any("run summary" in line for line in self.pipeline.lines))
        self.stop.set()
        self.captions.thread.join(timeout=10)
        self.file_windows()  # the long file of the moment too, as far as it got
        self.retention = self.redis_retention()  # while Redis is still up
        self.notifications = self.webhook_deliveries()

    # ---------------------------------------------------------------- watching

    def poll_states(self, elapsed: float) -> dict[str, object]:
        """Each stream's status now; seconds per state accumulate (`stale`: no heartbeat, `none`: not
        readable, e.g. Redis down)."""
        statuses = {}
        for sid in [s.id for s in self.live] + [self.file_runs[-1].sid]:
            try:
                status = self.client.status(sid)
            except UNREACHABLE:
                status = None
            statuses[sid] = status
            key = "long" if sid.startswith("long") else sid
            self.state_seconds[key][self.state_of(status)] += elapsed
        return statuses

    @staticmethod
    def state_of(status) -> str:
        if status is None:
            return "none"
        if status.state in (IngestState.LIVE, IngestState.CONNECTING, IngestState.RECONNECTING) and \
                time.time() - status.updated_at > STALE_S:
            return "stale"
        return str(status.state)

    def check_recoveries(self, statuses: dict[str, object], now: float) -> None:
        for fault in self.faults:
            if fault.ended is None:
                continue
            for stream in self.live:
                status = statuses.get(stream.id)
                if stream.id in fault.live_after or status is None:
                    continue
                if status.updated_at >= fault.ended and status.state == IngestState.LIVE and status.fps_in > 0:
                    fault.live_after[stream.id] = now - fault.ended

    def check_long_file(self, statuses: dict[str, object]) -> None:
        """Once the long file has ended, check its windows, remove it and start it again under a new id."""
        current = self.file_runs[-1]
        status = statuses.get(current.sid)
        if status is None or status.state not in (IngestState.ENDED, IngestState.FAILED):
            return
        try:
            if current.sid not in self.removed:
                self.client.remove_stream(current.sid, timeout=30)
                self.removed.append(current.sid)
            sid = f"long{next(self.long_n)}"
            self.client.add_stream(sid, str(self.long_clip), live=False,
                                   config={"standing_questions": self.questions, "notify": self.notify}, timeout=30)
        except (*UNREACHABLE, TimeoutError, QuestionError) as exc:
            print(f"long file: not restarted yet ({exc}); trying again", flush=True)
            return
        current.ended = time.time()
        self.file_runs.append(FileRun(sid, current.expected, time.time()))

    def file_windows(self) -> None:
        """Windows of each long-file run: from its captions.jsonl, each window once, none missing."""
        for run in self.file_runs:
            path = self.out / "run" / run.sid / "captions.jsonl"
            windows = Counter(json.loads(line)["window"] for line in path.read_text().splitlines()) \
                if path.exists() else Counter()
            run.published = len(windows)
            run.twice = sum(1 for n in windows.values() if n > 1)
            top = run.expected if run.ended else (max(windows) + 1 if windows else 0)
            run.missing = len(set(range(top or 0)) - set(windows))

    def inject(self, kind: str) -> None:
        """One fault: a kill is over at once; Redis or an RTSP server stays down --down seconds."""
        if kind in ("ingest", "worker"):
            title = "IngestActor" if kind == "ingest" else "ModelWorker"
            pids = sorted(pid for pid, role in session_roles(self.pipeline.proc.pid).items()
                          if kind_of(role) == title)
            if not pids:
                print(f"fault: {kind}: no {title} to kill", flush=True)
                return
            pid = pids[len(self.faults) % len(pids)]
            fault = Fault(kind, f"{title} pid {pid}", time.time())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            fault.ended = fault.started
            self.faults.append(fault)
        else:
            seconds = self.args.down
            if kind == "redis":
                target, up = f"redis-server :{self.redis.port}", self.redis.start
                down = [self.redis.kill, self.redis.stop]  # SIGKILL, then reap it
            elif kind == "webhook":
                target, down, up = "webhook receiver", [self.webhook.stalled.set], self.webhook.stalled.clear
                seconds = self.args.stall
            else:
                cameras = [s for s in self.live if s.server is not None]
                camera = cameras[len(self.faults) % len(cameras)]
                target, down, up = f"RTSP server of {camera.id}", [camera.server.stop], camera.server.start
            fault = Fault(kind, target, time.time())
            self.faults.append(fault)
            for step in down:
                step()
            self.stop.wait(seconds)
            up()
            fault.ended = time.time()
        print(f"fault: {kind} ({fault.target}), down {fault.ended - fault.started:.1f} s", flush=True)

    def sample(self, now: float, statuses: dict[str, object], proc_rows) -> dict[str, float | str]:
        t = round(now - self.t0, 1)
        row: dict[str, float | str] = {"t_s": t}
        roles = session_roles(self.pipeline.proc.pid)
        pids = dict(roles)
        for name in ("web", "tail", "events"):
            pids[getattr(self, name).proc.pid] = name
        info = self._redis_info()
        if info:
            pids[int(info["process_id"])] = "redis"
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])
        for pid, role in pids.items():
            stats = proc_stats(pid)
            if stats is None:
                continue
            proc_rows.writerow([t, pid, role, f"{stats[0]:.1f}", stats[1], stats[2]])
            self.process_rows.append((t, pid, role, *stats))
            group = kind_of(role) if kind_of(role) in GROUPS else "ray_other"
            total = totals[group]
            total[0] += stats[0]
            total[1] += stats[1]
            total[2] += stats[2]
            total[3] += 1
        for group in GROUPS:
            rss, fds, threads, count = totals.get(group, [0.0, 0, 0, 0])
            row |= {f"{group}_rss_mb": round(rss, 1), f"{group}_fds": fds, f"{group}_threads": threads}
            if group in ("IngestActor", "ray_other"):
                row[f"{group}_count"] = count
        row["redis_used_mb"] = round(int(info["used_memory"]) / 2**20, 2) if info else ""
        row["redis_keys"] = self._dbsize()
        row |= self._metrics()
        window = self.args.sample_every
        recent = [r for r in self.captions.rows if r.arrived > now - window]
        for stream in [s.id for s in self.live] + ["long"]:
            mine = [r for r in recent if (r.stream.startswith("long") if stream == "long" else r.stream == stream)]
            latencies = [r.latency for r in mine if r.latency is not None]
            row[f"{stream}_wps"] = round(len(mine) / window, 3)
            row[f"{stream}_p50_s"] = round(percentile(latencies, 0.5), 2) if latencies else ""
            row[f"{stream}_p99_s"] = round(percentile(latencies, 0.99), 2) if latencies else ""
            sid = self.file_runs[-1].sid if stream == "long" else stream
            row[f"{stream}_state"] = self.state_of(statuses.get(sid))
        row["long_file_runs"] = len(self.file_runs)
        row["sse_events"] = sum(self.sse.events.values())
        row["tail_lines"] = len(self.tail.times)
        row["events_lines"] = len(self.events.times)
        active = [f.kind for f in self.faults if f.started > now - window]
        row["faults"] = "+".join(active)
        self.rows.append(row)
        return row

    def _redis_info(self) -> dict | None:
        with contextlib.suppress(*UNREACHABLE):
            return self.client.redis.info()
        return None

    def _dbsize(self) -> int | str:
        with contextlib.suppress(*UNREACHABLE):
            return self.client.redis.dbsize()
        return ""

    def _metrics(self) -> dict[str, float | str]:
        """Ray's object store (bytes, objects) and the pipeline's metric label sets (streams)."""
        if not self.metrics_url:
            return {}
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            host, port = self.metrics_url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            store = objects = 0.0
            streams = set()
            for line in text.splitlines():
                if line.startswith("ray_object_store_memory{"):
                    store += float(line.rsplit(" ", 1)[1])
                elif line.startswith("ray_object_store_num_local_objects{"):
                    objects += float(line.rsplit(" ", 1)[1])
                elif line.startswith("ray_slowfast_") and (m := re.search(r'stream="([^"]*)"', line)):
                    streams.add(m.group(1))
            return {"object_store_mb": round(store / 2**20, 2), "object_store_objects": int(objects),
                    "metric_streams": len(streams)}
        return {}

    # ---------------------------------------------------------------- the report

    def report(self) -> str:
        a = self.args
        lines = [f"soak: {(self.end - self.t0) / 60:.1f} min after a start-up of {self.startup_s:.0f} s; "
                 f"{len(self.live)} live streams, the long file run {len(self.file_runs)} times; "
                 f"{len(self.faults)} faults; {len(self.rows)} samples every {a.sample_every:g} s"]
        checks: list[tuple[str, bool | None]] = []

        # Growth after the warm-up, per process that lived through it.
        judged = [r for r in self.rows if r["t_s"] >= a.warmup]
        span = (judged[-1]["t_s"] - judged[0]["t_s"]) if len(judged) >= 3 else 0.0
        per_pid: dict[tuple[int, str], list[tuple[float, float, int, int]]] = defaultdict(list)
        for t, pid, role, rss, fds, threads in self.process_rows:
            if t >= a.warmup:
                per_pid[(pid, role)].append((t, rss, fds, threads))
        growth = []  # (RSS %/h, second half %/h, role, pid, first MB, last MB, fds, threads, minutes, judged)
        for (pid, role), series in per_pid.items():
            lived = series[-1][0] - series[0][0] if series else 0.0
            if len(series) < 3 or lived < min(300.0, 0.8 * span):
                continue
            rss_series = [(s[0], s[1]) for s in series]
            growth.append((growth_per_hour(rss_series), growth_per_hour(second_half(rss_series)), role, pid, series[0][1],
                           series[-1][1], drift([s[2] for s in series]), drift([s[3] for s in series]), lived / 60,
                           lived >= 0.8 * span))
        growth.sort(reverse=True)
        judge = span >= 300
        lines.append(f"growth after the first {a.warmup / 60:.1f} min ({span / 60:.1f} min judged"
                     f"{'' if judge else '; under 5 min: not judged'}), per process that lived 5 min of it, RSS %/h, "
                     "the same over the judged time's second half (a leak keeps its rate, memory that settles "
                     "slows down), first -> last MB, descriptors and threads (last quarter - first quarter):")
        for pct, late, role, pid, first, last, fds, threads, minutes, whole in growth:
            lines.append(f"  {role:<24} pid {pid:<8} {pct:+7.2f} %/h (second half {late:+6.2f}) ({first:.0f} -> "
                         f"{last:.0f} MB)  "
                         f"fds {fds:+d}  threads {threads:+d}" + ("" if whole else
                                                                  f"  (restarted: {minutes:.1f} min, not judged)"))
        growth = [g for g in growth if g[-1]]  # the verdict: processes that lived through it
        worst = max((g[0] for g in growth), default=0.0)
        worst_late = max((g[1] for g in growth), default=0.0)
        # Descriptors and threads are judged on the pipeline's own processes: Ray's log monitor
        # keeps each new worker process's log file open (up to 200), so it grows by design.
        ours = [g for g in growth if g[2] in PIPELINE_ROLES]
        fd_drift = max((g[6] for g in ours), default=0)
        thread_drift = max((g[7] for g in ours), default=0)
        used = [(r["t_s"], r["redis_used_mb"]) for r in judged if r.get("redis_used_mb") != ""]
        # Not judged: Redis fills up to its retention (a removed stream's keys live removed_ttl_s,
        # the search index keeps hours), which a soak of an hour or two does not reach.
        checks += [(f"memory growth max {worst:+.2f} %/h (target <= 2; second half {worst_late:+.2f})",
                    worst <= 2.0 if judge else None),
                   (f"redis used_memory {growth_per_hour(used):+.2f} %/h (second half "
                    f"{growth_per_hour(second_half(used)):+.2f}; fills up to its retention)", None),
                   (f"descriptors {fd_drift:+d}, threads {thread_drift:+d} in the pipeline's processes (flat)",
                    (fd_drift <= 2 and thread_drift <= 2) if judge else None)]
        metric_streams = [r["metric_streams"] for r in self.rows if r.get("metric_streams") not in (None, "")]
        if metric_streams:
            lines.append(f"metric label sets: {metric_streams[0]} streams at the start, {metric_streams[-1]} at the "
                         f"end ({len(self.live) + 1} running)")
        stores = [r["object_store_mb"] for r in judged if r.get("object_store_mb") not in (None, "")]
        if stores:
            lines.append(f"object store after the warm-up: {min(stores):.1f}..{max(stores):.1f} MB")
        if used:
            lines.append(f"redis used_memory after the warm-up: {min(u[1] for u in used):.2f}.."
                         f"{max(u[1] for u in used):.2f} MB")
        if self.retention is not None:
            untimed, removed, longest = self.retention
            # MAXLEN ~ trims whole nodes of a Redis stream (stream-node-max-entries: 100)
            checks.append((f"redis retention: longest live caption history {longest} (history_len "
                           f"{a.history_len}, ~ trimming: +100); {removed} keys of {len(self.removed)} removed "
                           f"streams, {untimed} without a TTL", untimed == 0 and longest <= a.history_len + 100))

        # Faults: each live stream live again, and captioned again.
        lines.append(f"faults (live again: s from the fault's end to a fresh `live` heartbeat with frames; "
                     f"captions again: s to the first caption of frames captured after the fault began):")
        recovered = True
        worst_live = 0.0
        for fault in self.faults:
            if fault.ended is None:
                continue
            again = self.captions_again(fault)
            missing = [s.id for s in self.live if s.id not in fault.live_after]
            recovered &= not missing
            longest = max(fault.live_after.values(), default=0.0)
            worst_live = max(worst_live, longest)
            lines.append(f"  {fault.started - self.t0:7.0f} s {fault.kind:<7} {fault.target}: down "
                         f"{fault.ended - fault.started:.1f} s; live again within {longest:.1f} s"
                         f"{' NOT: ' + ', '.join(missing) if missing else ''}; captions again within "
                         f"{max(again.values(), default=float('nan')):.1f} s")
        checks.append((f"every live stream live again after every fault: {'yes' if recovered else 'NO'}, "
                       f"within {worst_live:.1f} s (target <= {a.live_within:g})",
                       recovered and worst_live <= a.live_within))
        stuck = [s.id for s in self.live if not any(r.stream == s.id and r.arrived > self.end - 30
                                                    for r in self.captions.rows)]
        checks.append((f"streams stuck at the end (no caption in 30 s): {len(stuck)} {stuck or ''}".rstrip(), not stuck))

        if self.notifications is not None:
            due, delivered, written, lost = self.notifications
            checks.append((f"event notifications: {due} openings and closings, {delivered} delivered, {written} "
                           f"written down as undelivered, {lost} neither", lost == 0))

        # Files: every window once.
        lost = sum(r.missing for r in self.file_runs)
        twice = sum(r.twice for r in self.file_runs)
        done = [r for r in self.file_runs if r.ended]
        lines.append(f"long file: {len(done)} runs done, windows expected {sum(r.expected or 0 for r in done)}, "
                     f"published {sum(r.published for r in done)}; the run in progress at the end: "
                     f"{self.file_runs[-1].published} windows so far")
        checks.append((f"file windows lost {lost}, twice {twice}", lost == 0 and twice == 0 and bool(done)))

        # Latency p99, first against last stretch.
        stretch = min(600.0, (self.end - self.t0) / 3)
        live_ids = {s.id for s in self.live}
        timed = [r for r in self.captions.rows if r.stream in live_ids and r.latency is not None]
        first = [r.latency for r in timed if r.created < self.t0 + stretch]
        last = [r.latency for r in timed if r.created > self.end - stretch]
        if first and last:
            p99_first, p99_last = percentile(first, 0.99), percentile(last, 0.99)
            ratio = p99_last / p99_first if p99_first else float("inf")
            checks.append((f"latency p99 last {stretch / 60:.1f} min {p99_last:.2f} s / first {p99_first:.2f} s = "
                           f"{ratio:.2f}x (target <= 1.5)", ratio <= 1.5 if judge else None))

        # States, followers, the stop.
        lines.append("seconds per state (stale: no heartbeat for 5 s; none: no status readable):")
        for stream, states in self.state_seconds.items():
            lines.append(f"  {stream:<8} " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(states.items())))
        follow_gap = {name: self.follower_back(getattr(self, name).times) for name in ("tail", "events")}
        follow_gap["sse"] = self.follower_back(self.sse.times)
        lines.append(f"followers: tail {len(self.tail.times)} lines, events {len(self.events.times)} lines, "
                     f"SSE {sum(self.sse.events.values())} events ({self.sse.connects} connections); "
                     "first output after each fault's end (whenever there is something new) within: " +
                     ", ".join(f"{k} {v:.1f} s" if v is not None else f"{k} NOT" for k, v in follow_gap.items()))
        checks.append(("followers alive after every fault", all(v is not None for k, v in follow_gap.items()
                                                                 if k != "events")))
        code, took, summary = self.run_exit or (None, 0.0, False)
        checks.append((f"SIGTERM to the run's process group: exit {code} after {took:.1f} s, "
                       f"summary {'printed' if summary else 'MISSING'}", code == 0 and summary))
        self.verdict_ok = all(ok is not False for _, ok in checks)
        for text, ok in checks:
            lines.append(f"check: {text}: {'ok' if ok else 'not judged' if ok is None else 'FAIL'}")
        lines.append(f"verdict: {'PASS' if self.verdict_ok else 'FAIL'}; " + "; ".join(text for text, _ in checks))
        return "\n".join(lines)

    def captions_again(self, fault: Fault) -> dict[str, float]:
        """Per live stream: seconds from the fault's end to the first caption of frames captured
        after it began (0: such captions came while the fault lasted)."""
        again = {}
        for stream in self.live:
            times = [r.arrived for r in self.captions.rows if r.stream == stream.id and r.wall_start >= fault.started]
            if times:
                again[stream.id] = max(0.0, min(times) - fault.ended)
        return again

    def follower_back(self, times: list[float]) -> float | None:
        """Worst time from a fault's end to the follower's next output (None: none after some fault)."""
        worst = 0.0
        for fault in self.faults:
            if fault.ended is None:
                continue
            after = [t for t in times if t >= fault.ended]
            if not after:
                return None
            worst = max(worst, after[0] - fault.ended)
        return worst

    def webhook_deliveries(self) -> tuple[int, int, int, int] | None:
        """(event openings and closings in Redis, delivered, written down, neither), None if
        Redis is unreachable. Read after the run stopped: what was still due is written down."""
        sids = [s.id for s in self.live] + [r.sid for r in self.file_runs]
        try:
            due = {f"{e.stream}:{e.event_id}:{e.phase}" for sid in sids for e in self.client.events(sid, count=100_000)
                   if e.phase != EventPhase.UPDATED}
            written = {u.idempotency_key for sid in sids for u in self.client.undelivered(sid, count=100_000)}
        except UNREACHABLE:
            return None
        delivered = due & set(self.webhook.delivered)
        return len(due), len(delivered), len(due & written), len(due - delivered - written)

    def redis_retention(self) -> tuple[int, int, int] | None:
        """(keys of removed streams without a TTL: they would stay for good, keys of removed
        streams, the longest caption history of a live stream), None if Redis is unreachable."""
        try:
            untimed = removed = 0
            for sid in self.removed:
                for key in self.client.redis.scan_iter(match=f"*{{{sid}}}*"):
                    removed += 1
                    untimed += self.client.redis.ttl(key) == -1
            longest = max((self.client.redis.xlen(self.client.keys.captions(s.id)) for s in self.live), default=0)
        except UNREACHABLE:
            return None
        return untimed, removed, longest


def kind_of(role: str) -> str:
    """An actor's class (ingest:cam1:IngestActor -> IngestActor); other roles as they are."""
    return role.rsplit(":", 1)[-1]


def growth_per_hour(series: Sequence[tuple[float, float]]) -> float:
    """Least-squares growth of (seconds, value) samples, in % of their mean per hour (0 under 3)."""
    if len(series) < 3:
        return 0.0
    mean = statistics.mean(v for _, v in series)
    return slope_per_hour([t for t, _ in series], [v for _, v in series]) / mean * 100 if mean else 0.0


def second_half(series: Sequence[tuple[float, float]]) -> Sequence[tuple[float, float]]:
    """The samples of the later half of the series' time."""
    middle = (series[0][0] + series[-1][0]) / 2 if series else 0.0
    return [s for s in series if s[0] >= middle]


def drift(values: Sequence[int]) -> int:
    """Median of the last quarter minus median of the first (a count that creeps, not one that wobbles)."""
    quarter = max(1, len(values) // 4)
    return round(statistics.median(values[-quarter:]) - statistics.median(values[:quarter]))


if __name__ == "__main__":
    sys.exit(main())
