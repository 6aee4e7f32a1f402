"""`slowfast`: run the pipeline, and talk to a running one through Redis."""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

import av
import pydantic
import redis

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table

from common.validation import describe_validation_error
from connectors.client import QuestionError, SlowFastClient
from connectors.redis_conn import describe_redis_error
from connectors.redis_schema import Caption, Event, IngestState, NotificationKind, check_stream_id, safe_stream_id
from connectors.sources import SourceError
from model.errors import CheckpointError, UnsupportedConfigError

from .config import ConfigError, PipelineConfig, StandingQuestion, StreamConfig, load_config
from .summaries import clock
from .resume import ResumeRefused, restart_stream, resume_point
from .runner import format_caption, preflight, run_pipeline, stop_on_signals
from .window import expected_windows

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
streams_app = typer.Typer(help="Add or remove streams of a running pipeline.", no_args_is_help=True)
app.add_typer(streams_app, name="streams")
console = Console()
errors = Console(stderr=True)
debug = False  # --debug / SLOWFAST_DEBUG=1: expected errors show their traceback too

RedisUrl = Annotated[str, typer.Option("--redis-url", envvar="SLOWFAST_REDIS_URL", help="Redis of the running pipeline")]
WebAddress = Annotated[Optional[str], typer.Option("--web", help="serve the web page on HOST:PORT [default: 127.0.0.1:8080 or the next free port]")]
NoWeb = Annotated[bool, typer.Option("--no-web", help="do not serve the web page")]
WebToken = Annotated[Optional[str], typer.Option("--web-token", envvar="SLOWFAST_WEB_TOKEN", help="token the web page asks for (needed off loopback)")]


def web_beside(address: Optional[str], no_web: bool, token: Optional[str]):
    """The `beside` context of run_pipeline serving the web page, or None with --no-web.
    Bad addresses and missing tokens fail here, before anything starts."""
    from .web.server import WebError, check_token, parse_address, serving

    if no_web:
        return None
    try:
        if address is not None:
            check_token(parse_address(address)[0], token)
    except WebError as exc:
        fail(str(exc))

    @contextlib.contextmanager
    def beside(redis_url: str) -> Iterator[None]:
        with serving(redis_url, address, token) as server:
            console.print(f"web page: {server.url}", markup=False, highlight=False)
            beside.url = server.url
            yield

    beside.url = None
    return beside


def run_with_web(config: PipelineConfig, beside, **kwargs) -> dict[str, dict]:
    from .web.server import WebError

    try:
        return run_pipeline(config, beside=beside, **kwargs)
    except WebError as exc:
        fail(str(exc))


def parse_source_arg(value: str) -> tuple[str, str]:
    """`[ID=]URI`: an ID must be valid; without one, the file stem or the camera path's last part,
    made valid, names the stream."""
    if "=" in value.split("://", 1)[0]:
        sid, uri = value.split("=", 1)
        return check_stream_id(sid), uri
    tail = value.split("://", 1)[-1].split("?", 1)[0].rstrip("/")
    return safe_stream_id(Path(tail.rsplit("@", 1)[-1]).stem), value


def estimated_windows(source: str, config: PipelineConfig) -> int | None:
    """Windows a file will give, from its duration (None if it cannot be read here)."""
    try:
        with av.open(source) as container:
            stream = container.streams.video[0]
            seconds = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
    except Exception:  # the run itself reports unreadable sources
        return None
    return expected_windows(round(seconds * config.fps), config.window, config.stride)


@contextlib.contextmanager
def file_progress(config: PipelineConfig) -> Iterator[Callable[[Caption], None]]:
    """Print captions as they arrive, with a progress bar (windows done / total) per file."""
    streams = [s for s in config.streams if s.is_file()]
    files = {s.id: estimated_windows(s.source, config) for s in streams}
    done = resumed_windows(config, streams)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=console, transient=False, disable=not files) as progress:
        tasks = {sid: progress.add_task(sid, total=total, completed=done.get(sid, 0)) for sid, total in files.items()}

        def on_caption(caption: Caption) -> None:
            progress.console.print(format_caption(caption), markup=False, highlight=False)
            if caption.stream in tasks:
                progress.advance(tasks[caption.stream])

        yield on_caption


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Everything from INFO up, Ray's start-up lines included, goes to `path`; the console gets
    the pipeline's own warnings only, so nothing else lands in the middle of a progress bar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler()
    to_console.setLevel(logging.WARNING)
    to_console.addFilter(logging.Filter("slowfast"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(to_file)
    root.addHandler(to_console)
    console.print(f"log {path}")
    try:
        yield
    finally:
        root.removeHandler(to_file)
        root.removeHandler(to_console)
        root.setLevel(level)
        to_file.close()


def print_table(table: Table) -> None:
    """A terminal wraps long cells (error text folds, never an ellipsis); a pipe or file gets the
    table at its natural width, where rich would otherwise cut it to 80 columns."""
    for column in table.columns:
        column.overflow = "fold"
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(1_000_000), table).maximum
    Console(file=console.file, width=max(natural, console.width)).print(table)


def resumed_windows(config: PipelineConfig, streams: list[StreamConfig]) -> dict[str, int]:
    """Windows already captioned of the files that resume (they start the progress bars)."""
    if not config.redis_url:
        return {}
    done = {}
    with SlowFastClient(config.redis_url) as client:
        for stream in streams:
            with contextlib.suppress(ResumeRefused):  # refused before this; the run reports it
                point = resume_point(client, stream, False, config)
                if point is not None:
                    done[stream.id] = point.next_window
    return done


@app.callback()
def main(
    debug_flag: Annotated[bool, typer.Option("--debug", envvar="SLOWFAST_DEBUG",
                                             help="show tracebacks of errors")] = False,
) -> None:
    """Streaming video analysis with the Slow-Fast video LLM."""
    global debug
    debug = debug_flag


def fail(message: str, code: int = 2) -> None:
    """One line `error: ...` on stderr and exit `code` (2: usage or configuration, 1: at run time)."""
    # soft_wrap: keep the message on one line; markup off: values may contain [brackets].
    errors.print(f"error: {message}", style="red", soft_wrap=True, markup=False, highlight=False)
    raise typer.Exit(code)


def describe(exc: BaseException, redis_url: str | None) -> tuple[str, int]:
    """The one-line message and exit code of an expected error."""
    if isinstance(exc, pydantic.ValidationError):  # e.g. a question of 2,001 characters
        return describe_validation_error(exc), 2
    if isinstance(exc, (ConfigError, CheckpointError, UnsupportedConfigError, ValueError)):
        return str(exc), 2
    if isinstance(exc, redis.AuthenticationError) or (
            isinstance(exc, redis.ResponseError) and any(w in str(exc) for w in ("NOAUTH", "WRONGPASS", "NOPERM"))):
        return describe_redis_error(redis_url or "", exc), 2
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ConnectionError)):
        return describe_redis_error(redis_url or "", exc), 1
    if isinstance(exc, (QuestionError, TimeoutError)):
        return str(exc), 1
    return f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1


def reports_errors(command: Callable) -> Callable:
    """Expected errors end the command with one `error:` line and an exit code, no traceback
    (unless --debug)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if debug:
                raise
            message, code = describe(exc, kwargs.get("redis_url"))
            fail(message, code)
    return wrapper


@app.command()
@reports_errors
def run(
    config_file: Annotated[Optional[Path], typer.Option("-c", "--config", envvar="SLOWFAST_CONFIG", help="YAML config")] = None,
    source: Annotated[Optional[list[str]], typer.Option("--source", help="[ID=]URI, repeatable")] = None,
    redis_url: Annotated[Optional[str], typer.Option(help="Redis URL; none: start an embedded one")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address, e.g. auto")] = None,
    model: Annotated[Optional[str], typer.Option(help="checkpoint folder or hub id; none: the small synthetic-world model")] = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for captions.jsonl / captions.vtt of files")] = None,
    window: Annotated[Optional[int], typer.Option()] = None,
    stride: Annotated[Optional[int], typer.Option()] = None,
    fps: Annotated[Optional[float], typer.Option()] = None,
    caption_prompt: Annotated[Optional[str], typer.Option()] = None,
    temperature: Annotated[Optional[float], typer.Option()] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus port of the local Ray (default 9464; 0: any)")] = None,
    web: WebAddress = None,
    no_web: NoWeb = False,
    web_token: WebToken = None,
    restart: Annotated[bool, typer.Option("--restart", help="files start over: clear their Redis keys and "
                                          "output files first (default: resume after the last captioned window)")] = False,
) -> None:
    """Run the pipeline: files until done, live sources until interrupted (Ctrl-C drains)."""
    try:
        base = load_config(config_file)
        streams = [s.model_dump() for s in base.streams]
        for value in source or []:
            sid, uri = parse_source_arg(value)
            streams.append({"id": sid, "source": uri})
        if caption_prompt:
            for stream in streams:
                stream["caption_prompt"] = caption_prompt
        generation = base.generation.model_dump() | {
            k: v for k, v in {"temperature": temperature, "max_new_tokens": max_new_tokens}.items() if v is not None
        }
        config = load_config(config_file, redis_url=redis_url, ray_address=ray_address, model=model, out_dir=out,
                             window=window, stride=stride, fps=fps, device=device, streams=streams,
                             generation=generation, metrics_port=metrics_port)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    if not config.streams:
        fail("no streams: give --source URI or streams in the config file")
    beside = web_beside(web, no_web, web_token)
    preflight(config)  # before the log file and progress bars, so a bad setting prints its one line alone
    prepare_resume(config, restart)
    try:
        with run_log(config.out_dir / "slowfast.log"), stop_on_signals() as stop, file_progress(config) as on_caption:
            summaries = run_with_web(config, beside, stop=stop, on_event=console.print, on_caption=on_caption,
                                     check=False)
    except ConfigError as exc:
        fail(str(exc))
    print_summaries(summaries)
    if summaries and all(s.get("state") == "failed" for s in summaries.values()):
        fail("every source failed (see the summary)", 1)


def prepare_resume(config: PipelineConfig, restart: bool) -> None:
    """--restart clears the streams' keys and files; otherwise a file whose id has captions of
    another source or other window settings is refused here, before anything starts."""
    if restart:
        for stream in config.streams:
            if config.redis_url:
                console.print(restart_stream(config.redis_url, stream.id, config.out_dir), markup=False, soft_wrap=True)
        return
    if not config.redis_url:
        return  # an embedded Redis starts empty: nothing to resume
    with SlowFastClient(config.redis_url) as client:
        for stream in config.streams:
            try:
                resume_point(client, stream, stream.is_live(), config)
            except ResumeRefused as exc:
                fail(str(exc))
            except SourceError:
                pass  # the run reports a source that cannot work, for that stream alone


def print_summaries(summaries: dict[str, dict]) -> None:
    """One row per stream of what a run did."""
    table = Table("stream", "state", "frames in", "windows", "captioned", "skipped", "failed", "frames encoded",
                  "error", title="run summary")
    for sid, summary in summaries.items():
        table.add_row(sid, str(summary.get("state", "")), *(str(summary.get(key, "")) for key in (
            "frames_in", "windows", "windows_done", "windows_skipped", "windows_failed", "frames_encoded")),
            summary.get("error") or "")
    print_table(table)


@app.command()
@reports_errors
def ask(
    stream: str,
    question: str,
    redis_url: RedisUrl,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 60.0,
    yes_no: Annotated[bool, typer.Option("--yes-no", help="also return P(yes)")] = False,
) -> None:
    """Ask a question about the stream's latest window and print the answer."""
    client = SlowFastClient(redis_url)
    try:
        answer = client.ask(stream, question, timeout=timeout, kind="yesno" if yes_no else "open")
    except QuestionError as exc:
        fail(str(exc), 1)
    except TimeoutError:
        fail(f"no answer within {timeout:g} s (is the pipeline running?)", 1)
    suffix = f"  (P(yes)={answer.probability:.2f})" if answer.probability is not None else ""
    console.print(f"[{answer.start:.1f}s-{answer.end:.1f}s] {answer.text}{suffix}")


@app.command()
@reports_errors
def tail(
    redis_url: RedisUrl,
    stream: Annotated[Optional[str], typer.Argument()] = None,
    count: Annotated[int, typer.Option(help="print this many past captions first")] = 5,
) -> None:
    """Print captions as they arrive (all streams, or one)."""

    client = SlowFastClient(redis_url)
    registered = client.streams()  # Redis down: one line here (the follower would wait for it)
    if not stream and not registered:
        fail("no streams registered", 1)
    for caption in client.follow(stream, past=max(count, 0), stop=threading.Event()):
        console.print(format_caption(caption), markup=False, highlight=False)


def format_event(event: Event) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event.created_at))
    p_yes = f" (P(yes)={event.probability:.2f})" if event.probability is not None else ""
    return (f"{when} {event.stream} #{event.window} [{event.start:.2f}s-{event.end:.2f}s] "
            f"{event.question} -> {event.text}{p_yes}  [{event.trigger}]")


@app.command()
@reports_errors
def events(
    redis_url: RedisUrl,
    stream: Annotated[Optional[str], typer.Argument()] = None,
    count: Annotated[int, typer.Option(help="print this many past events per stream first")] = 5,
) -> None:
    """Print standing-question events as they fire (all streams, or one)."""
    client = SlowFastClient(redis_url)
    client.streams()  # Redis down: one line here (the follower would wait for it)
    for event in client.follow_events(stream, past=max(count, 0), stop=threading.Event()):
        # one line each, however long: made to grep
        console.print(format_event(event), markup=False, highlight=False, soft_wrap=True)


@app.command()
def web(
    redis_url: RedisUrl,
    host: Annotated[str, typer.Option(help="address to listen on; not loopback needs --token")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    token: Annotated[Optional[str], typer.Option(envvar="SLOWFAST_WEB_TOKEN", help="token the page asks for")] = None,
) -> None:
    """Serve the monitoring page of a running pipeline (reads and writes only its Redis)."""
    from .web.server import WebError, WebServer

    try:
        server = WebServer(redis_url, host, port, token)
    except (WebError, ValueError) as exc:
        fail(str(exc))
    console.print(f"web page: {server.url}  (Ctrl-C stops)", markup=False, highlight=False)
    server.run()


@app.command()
@reports_errors
def summary(stream: str, redis_url: RedisUrl) -> None:
    """Print the stream's latest summary (rolling, or a file's final one)."""
    try:
        check_stream_id(stream)
    except ValueError as exc:
        fail(str(exc))
    latest = SlowFastClient(redis_url).latest_summary(stream)
    if latest is None:
        fail(f"stream {stream!r} has no summary yet")
    console.print(f"{stream} {latest.kind} summary, windows {latest.first_window}-{latest.last_window} "
                  f"[{clock(latest.start)}-{clock(latest.end)}]", markup=False, highlight=False)
    console.print(latest.text, markup=False, highlight=False)


@app.command()
@reports_errors
def status(
    redis_url: RedisUrl,
    all_runs: Annotated[bool, typer.Option("--all", help="also streams of earlier pipeline runs")] = False,
) -> None:
    """A table of the current pipeline run's streams (--all: earlier runs' too): state, fps in/out,
    frames in/dropped, windows done/skipped/failed, lag, latency, seconds since the status was
    refreshed (every second while running), error."""
    client = SlowFastClient(redis_url)
    streams = client.streams()
    current = max((info.pipeline for info in streams), default=0)
    shown = streams if all_runs else [info for info in streams if info.pipeline == current]
    table = Table("stream", "state", "fps", "frames", "windows", "lag s", "latency s", "age s", "error")
    for info in shown:
        st = client.status(info.id)
        if st is None:
            table.add_row(info.id, "registered", *["-"] * 6, "")
            continue
        table.add_row(info.id, str(st.state), f"{st.fps_in:.1f}/{st.fps_out:.1f}", f"{st.frames_in}/{st.frames_dropped}",
                      f"{st.windows_done}/{st.windows_skipped}/{st.windows_failed}", f"{st.lag_s:.1f}",
                      f"{st.latency_s:.2f}" if st.latency_s is not None else "-", f"{time.time() - st.updated_at:.0f}",
                      st.last_error or "")
    print_table(table)
    if len(shown) < len(streams):
        console.print(f"{len(streams) - len(shown)} streams of earlier runs not shown (--all shows them)")


@streams_app.command("add")
@reports_errors
def streams_add(
    source: Annotated[str, typer.Argument(help="[ID=]URI")],
    redis_url: RedisUrl,
    live: Annotated[Optional[bool], typer.Option("--live/--file")] = None,
    timeout: float = 30.0,
) -> None:
    """Add a stream to the running pipeline."""
    sid, uri = parse_source_arg(source)
    try:
        SlowFastClient(redis_url).add_stream(sid, uri, live=live, timeout=timeout)
    except QuestionError as exc:
        fail(str(exc), 1)
    except TimeoutError:
        fail(f"no reply within {timeout:g} s (is the pipeline running?)", 1)
    console.print(f"added {sid}")


@streams_app.command("remove")
@reports_errors
def streams_remove(stream: str, redis_url: RedisUrl, timeout: float = 30.0) -> None:
    """Remove a stream from the running pipeline."""
    try:
        SlowFastClient(redis_url).remove_stream(stream, timeout=timeout)
    except QuestionError as exc:
        fail(str(exc), 1)
    except TimeoutError:
        fail(f"no reply within {timeout:g} s (is the pipeline running?)", 1)
    console.print(f"removed {stream}")


def stop_demo(client: SlowFastClient, camera: str, seconds: float, file: str, stop: threading.Event) -> None:
    """Set `stop` once the camera has run `seconds` from its first frame (start-up not counted)
    and the file is done."""
    notes = client.notifications(camera, stop=stop)  # subscribed now, before the camera starts

    def file_done() -> bool:
        status = client.status(file)
        return status is not None and status.state in (IngestState.ENDED, IngestState.FAILED)

    def wait() -> None:
        with contextlib.suppress(redis.exceptions.ConnectionError):  # Redis gone: the demo is over
            wait_for_camera_and_file()

    def wait_for_camera_and_file() -> None:
        for note in notes:
            status = client.status(camera) if note.kind == NotificationKind.STATUS else None
            if status is not None and status.frames_in > 0:
                break
        if stop.wait(seconds):
            return
        while not file_done():
            if stop.wait(0.5):
                return
        stop.set()

    threading.Thread(target=wait, daemon=True).start()


@app.command()
@reports_errors
def demo(
    model: Annotated[Optional[str], typer.Option(help="a real checkpoint (GPU); default: the small synthetic-world model")] = None,
    seconds: Annotated[float, typer.Option(
        help="how long the live camera copy runs from its first frame (longer if the file copy is not done)")] = 30.0,
    window: Annotated[int, typer.Option(help="frames per window (16: one 4 s scene at 4 fps)")] = 16,
    stride: Annotated[int, typer.Option()] = 16,
    web: WebAddress = None,
    no_web: NoWeb = False,
    web_token: WebToken = None,
) -> None:
    """Synthetic-world clip -> its small model -> embedded Redis: a file copy captioned to its end and a live
    looping copy for `--seconds` from its first frame."""
    from connectors.embedded import EmbeddedRedis

    from .demo_clip import RED_CIRCLE_SCENES, demo_scenes, write_clip

    beside = web_beside(web, no_web, web_token)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as embedded:
        scenes = demo_scenes()
        clip = write_clip(Path(tmp) / "clip.mp4", scenes)
        question = StandingQuestion(id="red-circle", prompt="Is there a red circle?", trigger={"p_yes_above": 0.5})
        out = Path("out") / "demo"
        config = load_config(
            None, model=model, out_dir=out, window=window, stride=stride, redis_url=embedded.url,
            streams=[StreamConfig(id="file", source=str(clip), live=False, standing_questions=[question]),
                     StreamConfig(id="camera", source=f"loop://{clip}", live=True)],
            generation={"max_new_tokens": 16},
        )
        for index, scene in enumerate(scenes):
            console.print(f"scene {index} on screen: {scene.caption}", markup=False, highlight=False)
        try:
            with run_log(out / "slowfast.log"), stop_on_signals() as stop:
                stop_demo(SlowFastClient(embedded.url), "camera", seconds, "file", stop)
                with file_progress(config) as on_caption:
                    summaries = run_with_web(config, beside, stop=stop, on_event=console.print,
                                             on_caption=on_caption)
        except ConfigError as exc:
            fail(str(exc))
        print_summaries(summaries)
        fired = sorted(event.window for event in SlowFastClient(embedded.url).events("file"))
        console.print(f"'{question.prompt}' fired on file windows {fired}; a red circle is on screen in "
                      f"scenes {list(RED_CIRCLE_SCENES)} (with --window 16 --stride 16 window i is scene i)")
        console.print(f"file captions: {out / 'file' / 'captions.jsonl'} and captions.vtt")
        if beside is not None and beside.url:
            console.print(f"web page (served while the demo ran): {beside.url}", markup=False, highlight=False)
