"""`slowfast`: run the pipeline, and talk to a running one through Redis."""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Optional

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
from connectors.redis_schema import Caption, Event, EventPhase, Hit, StreamStatus, check_stream_id, safe_stream_id
from model.errors import CheckpointError, UnsupportedConfigError

from .config import ConfigError, PipelineConfig, load_config
from .history import describe_hit, redis_picture, report_markdown
from .summaries import clock
from .logs import run_log
from .progress import estimated_windows, resumed_windows
from .resume import ResumeRefused, prepare_resume
from .messages import StreamSummary
from .signals import stop_on_signals

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
    """The `beside` context of run_pipeline serving the web page, or None with --no-web."""
    from .web import server

    if no_web:
        return None
    try:
        return server.web_beside(address, token, on_url=lambda url: console.print(
            f"web page: {url}", markup=False, highlight=False))
    except server.WebError as exc:
        fail(str(exc))


def run_with_web(config: PipelineConfig, beside, **kwargs) -> dict[str, StreamSummary]:
    # The pipeline's modules import torch: loaded only by the commands that run it, so the
    # followers (tail, events, web, status, search...) start in a fraction of the time and memory.
    from .runner import run_pipeline
    from .web.server import WebError

    try:
        return run_pipeline(config, beside=beside, **kwargs)
    except WebError as exc:
        fail(str(exc))


@contextlib.contextmanager
def logging_to(path: Path) -> Iterator[None]:
    with run_log(path):
        console.print(f"log {path}")
        yield


def parse_source_arg(value: str) -> tuple[str, str]:
    """`[ID=]URI`: an ID must be valid; without one, the file stem or the camera path's last part,
    made valid, names the stream."""
    if "=" in value.split("://", 1)[0]:
        sid, uri = value.split("=", 1)
        return check_stream_id(sid), uri
    tail = value.split("://", 1)[-1].split("?", 1)[0].rstrip("/")
    return safe_stream_id(Path(tail.rsplit("@", 1)[-1]).stem), value


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
    from .startup import preflight  # imports torch (see run_with_web)

    beside = web_beside(web, no_web, web_token)
    preflight(config)  # before the log file and progress bars, so a bad setting prints its one line alone
    try:
        for line in prepare_resume(config, restart):
            console.print(line, markup=False, soft_wrap=True)
    except ResumeRefused as exc:
        fail(str(exc))
    try:
        with logging_to(config.out_dir / "slowfast.log"), stop_on_signals() as stop, file_progress(config) as on_caption:
            summaries = run_with_web(config, beside, stop=stop, on_event=console.print, on_caption=on_caption,
                                     check=False)
    except ConfigError as exc:
        fail(str(exc))
    print_summaries(summaries)
    if summaries and all(s.state == "failed" for s in summaries.values()):
        fail("every source failed (see the summary)", 1)


def print_summaries(summaries: dict[str, StreamSummary]) -> None:
    """One row per stream of what a run did (the worker's counts blank where it could not say)."""
    table = Table("stream", "state", "frames in", "windows", "captioned", "skipped", "failed", "frames encoded",
                  "error", title="run summary")
    for sid, summary in summaries.items():
        stats = summary.stats
        counts = ("", "", "", "") if stats is None else (
            stats.windows_done, stats.windows_skipped, stats.windows_failed, stats.frames_encoded)
        table.add_row(sid, summary.state, str(summary.frames_in), str(summary.windows), *map(str, counts),
                      summary.error or "")
    print_table(table)


def format_caption(caption: Caption) -> str:
    return f"{caption.stream} #{caption.window} [{caption.start:.2f}s-{caption.end:.2f}s] {caption.text}"


Since = Annotated[Optional[str], typer.Option("--since", help="the last DURATION: 90s, 30m, 2h, 1d")]
From = Annotated[Optional[str], typer.Option(
    "--from", help="range start: ISO date-time (2026-11-24T14:00), time of day (14:00, today) or unix seconds")]
To = Annotated[Optional[str], typer.Option("--to", help="range end, same forms")]
StreamOption = Annotated[Optional[str], typer.Option("--stream", help="stream id")]


def print_hit(hit: Hit) -> None:
    """One line per history entry: stream, times, what it is, its text, where its picture is."""
    where = redis_picture(hit)
    line = f"{hit.stream} {describe_hit(hit)} {' '.join(hit.text.split())}" + (f"  picture: {where}" if where else "")
    console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def ask(
    words: Annotated[Optional[list[str]], typer.Argument(metavar="[STREAM] QUESTION")] = None,
    redis_url: RedisUrl = ...,
    stream_option: StreamOption = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 60.0,
    yes_no: Annotated[bool, typer.Option("--yes-no", help="also return P(yes)")] = False,
) -> None:
    """Ask about the stream's latest window; with --since or --from/--to, about its history in that
    range (answered from the range's captions, events and summaries, which are listed)."""
    words = words or []
    if stream_option is not None and len(words) == 1:
        stream, question = stream_option, words[0]
    elif stream_option is None and len(words) == 2:
        stream, question = words
    else:
        fail("give STREAM QUESTION, or --stream ID QUESTION")
    past = since is not None or from_ is not None or to is not None
    if past and yes_no:
        fail("--yes-no is for questions about the latest window, not about a range")
    client = SlowFastClient(redis_url)
    try:
        if past:
            answer = client.ask_history(stream, question, since=since, start=from_, end=to, timeout=timeout)
        else:
            answer = client.ask(stream, question, timeout=timeout, kind="yesno" if yes_no else "open")
    except QuestionError as exc:
        fail(str(exc), 1)
    except TimeoutError:
        fail(f"no answer within {timeout:g} s (is the pipeline running?)", 1)
    if past:
        console.print(answer.text or "", markup=False, highlight=False)
        console.print(f"drawn from {len(answer.sources or [])} entries:", markup=False, highlight=False)
        for hit in answer.sources or []:
            print_hit(hit)
        return
    suffix = f"  (P(yes)={answer.probability:.2f})" if answer.probability is not None else ""
    console.print(f"[{answer.start:.1f}s-{answer.end:.1f}s] {answer.text}{suffix}")


@app.command()
@reports_errors
def search(
    query: str,
    redis_url: RedisUrl,
    stream: Annotated[Optional[list[str]], typer.Option("--stream", help="only this stream (repeatable)")] = None,
    since: Since = None,
    from_: From = None,
    to: To = None,
    kind: Annotated[Optional[list[str]], typer.Option(
        "--kind", help="only caption, answer, event or summary (repeatable)")] = None,
    limit: Annotated[int, typer.Option(help="hits to show")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object: total and hits")] = False,
) -> None:
    """Search every caption, answer, event and summary Redis holds: words (all must appear), "a phrase",
    prefix*; best first, newest first among equals."""
    result = SlowFastClient(redis_url).search(query, streams=stream, kinds=kind, since=since, start=from_, end=to,
                                              limit=limit)
    if as_json:
        print(json.dumps({"total": result.total, "complete": result.complete,
                          "hits": [h.model_dump(mode="json") for h in result.hits]}))
        return
    for hit in result.hits:
        print_hit(hit)
    total = result.total if result.complete else f"at least {result.total}"  # reading stopped early
    console.print(f"{len(result.hits)} of {total} hits ({result.elapsed_ms:.0f} ms)", markup=False,
                  highlight=False)


@app.command()
@reports_errors
def report(
    redis_url: RedisUrl,
    stream: Annotated[str, typer.Option("--stream", help="stream id")],
    since: Since = None,
    from_: From = None,
    to: To = None,
    out: Annotated[Optional[Path], typer.Option(help="write the Markdown here, the pictures beside it")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the report")] = 600.0,
) -> None:
    """A report on the stream's range (the running pipeline's model summarises its captions): the
    summary, the events opened and closed in it, the pictures Redis still holds."""
    check_stream_id(stream)
    client = SlowFastClient(redis_url)
    try:
        answer = client.report(stream, since=since, start=from_, end=to, timeout=timeout)
    except QuestionError as exc:
        fail(str(exc), 1)
    except TimeoutError:
        fail(f"no report within {timeout:g} s (is the pipeline running?)", 1)
    if out is None:
        console.print(answer.text or "", markup=False, highlight=False, soft_wrap=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.with_name(f"{out.stem}-pictures")
    saved: dict[str, str] = {}
    for hit in answer.report.pictures:
        jpeg = client.snapshot(stream, hit.picture_id) if hit.picture_key.endswith(":snapshots") else \
            (found[1] if (found := client.frame(stream)) and found[0].entry_id == hit.picture_id else None)
        if jpeg is not None:
            folder.mkdir(exist_ok=True)
            (folder / f"window-{hit.window}.jpg").write_bytes(jpeg)
            saved[hit.picture_id] = f"![window {hit.window}]({folder.name}/window-{hit.window}.jpg)"
    out.write_text(report_markdown(answer.report, lambda h: saved.get(h.picture_id)), encoding="utf-8")
    console.print(f"report: {out}" + (f" (pictures in {folder})" if saved else ""), markup=False, highlight=False)


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


def time_of_day(unix_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_s))


def format_event(event: Event) -> str:
    """One line per record: when, what happened to the event (opened, updated, closed), where,
    the answer, and the event's id (what `slowfast ack` takes)."""
    p_yes = f" (P(yes)={event.probability:.2f})" if event.probability is not None else ""
    line = (f"{time_of_day(event.created_at)} {event.phase} {event.stream} #{event.window} [{event.start:.2f}s-{event.end:.2f}s] "
            f"{event.question} -> {event.text}{p_yes}  [{event.trigger}]")
    if event.event_id:
        line += f"  event {event.event_id}"
    if event.phase == EventPhase.CLOSED and event.opened_at is not None:
        line += (f", open {time_of_day(event.opened_at)}-{time_of_day(event.wall_end)} "
                 f"(windows {event.first_window}-{event.window})")
    return line


def print_open_events(client: SlowFastClient, stream: str | None) -> None:
    """A table of the events open now (all streams, or one), with who acknowledged each."""
    sids = [stream] if stream else [info.id for info in client.streams()]
    table = Table("stream", "event", "question", "opened", "windows", "latest answer", "acknowledged",
                  title="open events")
    for sid in sids:
        acks = client.acks(sid)
        for event in client.open_events(sid):
            ack = acks.get(event.event_id)
            seen = f"{ack.by or 'someone'} {time_of_day(ack.at)}" + (f": {ack.note}" if ack.note else "") if ack else ""
            table.add_row(sid, event.event_id, event.question, time_of_day(event.opened_at or event.wall_end),
                          f"{event.first_window}-{event.window}", event.text, seen)
    if table.row_count:
        print_table(table)
    else:
        console.print("no open events", markup=False, highlight=False)


@app.command()
@reports_errors
def events(
    redis_url: RedisUrl,
    stream: Annotated[Optional[str], typer.Argument()] = None,
    count: Annotated[int, typer.Option(help="print this many past event records per stream first")] = 5,
    open_only: Annotated[bool, typer.Option("--open", help="list the events open now and exit")] = False,
    updates: Annotated[bool, typer.Option("--updates", help="also each window an open event is seen again")] = False,
) -> None:
    """Print standing-question events as they open and close (all streams, or one)."""
    if stream is not None:
        try:
            check_stream_id(stream)
        except ValueError as exc:
            fail(str(exc))
    client = SlowFastClient(redis_url)
    if open_only:
        print_open_events(client, stream)
        return
    client.streams()  # Redis down: one line here (the follower would wait for it)
    for event in client.follow_events(stream, past=max(count, 0), stop=threading.Event()):
        if event.phase == EventPhase.UPDATED and not updates:
            continue
        # one line each, however long: made to grep
        console.print(format_event(event), markup=False, highlight=False, soft_wrap=True)


@app.command()
@reports_errors
def ack(
    stream: str,
    event_id: Annotated[str, typer.Argument(help="the event's id, as `slowfast events` prints it")],
    redis_url: RedisUrl,
    by: Annotated[Optional[str], typer.Option("--by", help="who acknowledges [default: your login name]")] = None,
    note: Annotated[str, typer.Option("--note", help="a note kept with the acknowledgement")] = "",
) -> None:
    """Acknowledge an event (open or closed): the page and `events --open` show who and when."""
    try:
        check_stream_id(stream)
    except ValueError as exc:
        fail(str(exc))
    try:
        done = SlowFastClient(redis_url).acknowledge(stream, event_id, by=by if by is not None else login_name(),
                                                     note=note)
    except KeyError as exc:
        fail(exc.args[0])
    console.print(f"acknowledged {stream} {done.event_id}" + (f" by {done.by}" if done.by else ""),
                  markup=False, highlight=False)


def login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return ""


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
    frames in/dropped, windows done/skipped/failed (a split file: of its total, and the ETA), of them
    gated (unchanged, no model), events open/opened, lag, latency, seconds since the status was
    refreshed (every second while running), error (and event notifications failed or waiting)."""
    client = SlowFastClient(redis_url)
    streams = client.streams()
    current = max((info.pipeline for info in streams), default=0)
    shown = streams if all_runs else [info for info in streams if info.pipeline == current]
    table = Table("stream", "state", "fps", "frames", "windows", "gated", "events", "lag s", "latency s", "age s",
                  "error")
    for info in shown:
        st = client.status(info.id)
        if st is None:
            table.add_row(info.id, "registered", *["-"] * 8, "")
            continue
        windows = f"{st.windows_done}/{st.windows_skipped}/{st.windows_failed}"
        if st.windows_total is not None:  # a file split over the workers: its progress
            windows += f" of {st.windows_total}" + (f", ETA {st.eta_s:.0f} s" if st.eta_s is not None else "")
        table.add_row(info.id, str(st.state), f"{st.fps_in:.1f}/{st.fps_out:.1f}", f"{st.frames_in}/{st.frames_dropped}",
                      windows, str(st.windows_gated),
                      f"{st.events_open}/{st.events_opened}", f"{st.lag_s:.1f}",
                      f"{st.latency_s:.2f}" if st.latency_s is not None else "-", f"{time.time() - st.updated_at:.0f}",
                      "; ".join(filter(None, [st.last_error, delivery_problem(st)])))
    print_table(table)
    if len(shown) < len(streams):
        console.print(f"{len(streams) - len(shown)} streams of earlier runs not shown (--all shows them)")


def delivery_problem(st: StreamStatus) -> str:
    if not st.deliveries_failed and not st.deliveries_pending:
        return ""
    last = f" (last error: {st.last_delivery_error})" if st.last_delivery_error else ""
    return f"event notifications: {st.deliveries_failed} undelivered, {st.deliveries_pending} waiting{last}"


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

    from .demo import CAMERA_STREAM, DEMO_QUESTION, FILE_STREAM, demo_config, stop_demo
    from .demo_clip import RED_CIRCLE_SCENES, demo_scenes, write_clip

    beside = web_beside(web, no_web, web_token)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as embedded:
        scenes = demo_scenes()
        out = Path("out") / "demo"
        config = demo_config(write_clip(Path(tmp) / "clip.mp4", scenes), model, out, window, stride, embedded.url)
        for index, scene in enumerate(scenes):
            console.print(f"scene {index} on screen: {scene.caption}", markup=False, highlight=False)
        try:
            with logging_to(out / "slowfast.log"), stop_on_signals() as stop:
                stop_demo(SlowFastClient(embedded.url), CAMERA_STREAM, seconds, FILE_STREAM, stop)
                with file_progress(config) as on_caption:
                    summaries = run_with_web(config, beside, stop=stop, on_event=console.print,
                                             on_caption=on_caption)
        except ConfigError as exc:
            fail(str(exc))
        print_summaries(summaries)
        fired = sorted(event.window for event in SlowFastClient(embedded.url).events(FILE_STREAM)
                       if event.phase != EventPhase.CLOSED)
        console.print(f"'{DEMO_QUESTION.prompt}' fired on file windows {fired}; a red circle is on screen in "
                      f"scenes {list(RED_CIRCLE_SCENES)} (with --window 16 --stride 16 window i is scene i)")
        console.print(f"file captions: {out / FILE_STREAM / 'captions.jsonl'} and captions.vtt")
        if beside is not None and beside.url:
            console.print(f"web page (served while the demo ran): {beside.url}", markup=False, highlight=False)
