"""FastAPI app: HTML pages, a JSON API over the Redis contract, and one live update stream (SSE).

Live updates: one background thread per app follows every stream (`SlowFastClient.updates`),
rebuilds the summary of the stream that changed and hands it to every open update stream.
Every few seconds it also re-reads all streams, so a missed nudge (Redis restart) or a stream
registered without one shows up anyway. Browsers never poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from connectors.client import OUTAGE, RESYNC, QuestionError, SlowFastClient, Update
from connectors.redis_conn import UNREACHABLE
from connectors.redis_schema import (
    DEFAULT_KEYS,
    MAX_QUESTION_CHARS,
    Answer,
    STATUS_INTERVAL_S,
    STREAM_ID_RE,
    Caption,
    EventAck,
    EventPhase,
    Hit,
    Keys,
    NotificationKind,
    QuestionKind,
    StreamInfo,
)
from connectors.search import picture_path

from ..config import PipelineConfig
from ..history import report_markdown
from ..outputs import CaptionFiles

log = logging.getLogger("slowfast.web")
STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "sfs_token"
TOKEN_HEADER = "x-slowfast-token"
EVENT_WINDOW_S = 3600.0  # "recent" events: the last hour
RECENT_RECORDS = 200  # event records a card looks through for the recent openings and closings
RESYNC_S = 5.0  # full re-read of every stream by the update thread (not by browsers)
# what changes a stream's card: its entries, its state, its removal
UPDATE_KINDS = tuple(NotificationKind)
KEEPALIVE_S = 15.0
STALE_AFTER_INTERVALS = 10
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Scripts, styles and pictures from this server only: even a caption that slipped into HTML
# could not run inline script or load anything from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
StreamIdPath = Annotated[str, PathParam(pattern=STREAM_ID_RE.pattern, description="stream id")]


class RangeFields(BaseModel):
    since: str | None = Field(default=None, description="the last DURATION: 90s, 30m, 2h, 1d")
    start: str | None = Field(default=None, description="range start: ISO date-time, time of day or unix seconds")
    end: str | None = Field(default=None, description="range end, same forms")


class QuestionRequest(RangeFields):
    text: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    kind: QuestionKind = Field(default=QuestionKind.OPEN, description="`history`: about the range (since or "
                               "start/end), answered from its captions, events and summaries")
    timeout_s: float = Field(default=60.0, gt=0, le=300, description="how long to wait for the answer")


class AckRequest(BaseModel):
    by: str = Field(default="", max_length=200, description="who acknowledges")
    note: str = Field(default="", max_length=2000)


class ReportRequest(RangeFields):
    timeout_s: float = Field(default=600.0, gt=0, le=3600, description="how long to wait for the report")


def replied(ask: Callable[[], Answer], timeout_s: float, what: str) -> Answer | JSONResponse:
    """The pipeline's reply, or the response that says why there is none: 422 for an error reply
    or a request that cannot be sent, 504 when no reply came in time."""
    try:
        return ask()
    except QuestionError as exc:
        return JSONResponse({"detail": str(exc), "reply": exc.reply.model_dump(mode="json")}, status_code=422)
    except TimeoutError:
        return JSONResponse({"detail": f"no {what} within {timeout_s:g} s (is the pipeline running?)"},
                            status_code=504)
    except ValueError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)


def hit_json(hit: Hit) -> dict:
    return hit.model_dump(mode="json") | {"picture_url": picture_path(hit.stream, hit)}


# ---------------------------------------------------------------------------- reading Redis


def caption_json(caption: Caption | None) -> dict | None:
    if caption is None:
        return None
    return caption.model_dump(mode="json") | {"entry_id": caption.entry_id}


def event_json(stream: str, entry_id: str | None, event: Any, acks: dict[str, EventAck]) -> dict:
    """An event record with its picture's URL and its event's acknowledgement (None if none)."""
    out = event.model_dump(mode="json") | {"entry_id": entry_id}
    if event.snapshot_id:
        out["snapshot_url"] = f"/api/streams/{stream}/snapshots/{event.snapshot_id}.jpg"
    ack = acks.get(event.event_id) if event.event_id else None
    out["ack"] = ack.model_dump(mode="json") if ack else None
    return out


def stream_summary(client: SlowFastClient, info: StreamInfo) -> dict:
    """Everything a stream's card shows: state, latest caption and picture, recent events."""
    sid = info.id
    status = client.status(sid)
    frame = client.frame_info(sid)
    since = time.time() - EVENT_WINDOW_S
    # Openings and closings; an open event's updates (one per window) would crowd them out.
    recent = [(eid, e) for eid, e in client.older("events", sid, count=RECENT_RECORDS)
              if e.created_at >= since and e.phase != EventPhase.UPDATED][:20]
    acks = client.acks(sid)
    return {
        "id": sid,
        "source": info.source,
        "live": info.live,
        "state": str(status.state) if status else "starting",
        "last_error": status.last_error if status else None,
        "status": status.model_dump(mode="json") if status else None,
        "caption": caption_json(client.latest(sid)),
        "frame": None if frame is None else frame.model_dump(mode="json") | {
            "entry_id": frame.entry_id, "url": f"/api/streams/{sid}/frame.jpg?w={frame.entry_id}"},
        "events": [event_json(sid, eid, e, acks) for eid, e in recent],
        "open_events": [event_json(sid, None, e, acks) for e in client.open_events(sid)],
        # A running stream's status is re-published every STATUS_INTERVAL_S: much older means
        # the pipeline itself is gone, whatever the last state says.
        "stale_after_s": STALE_AFTER_INTERVALS * STATUS_INTERVAL_S,
    }


def standing_answers(client: SlowFastClient, stream: str, scan: int = 200) -> list[dict]:
    """The newest answer of each standing question, from the answers history."""
    latest: dict[str, dict] = {}
    for _, answer in client.older("answers", stream, count=scan):
        if answer.kind == "standing" and answer.question_id not in latest:
            latest[answer.question_id] = answer.model_dump(mode="json")
    return sorted(latest.values(), key=lambda a: a["question_id"])


# ---------------------------------------------------------------------------- live updates


class UpdateHub:
    """One Redis subscription for all browsers: summaries of changed streams go to every queue."""

    def __init__(self, redis_url: str, keys: Keys) -> None:
        self.redis_url, self.keys = redis_url, keys
        self.queues: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop = threading.Event()
        self.summaries: dict[str, str] = {}  # sid -> last summary JSON sent
        self.redis_error: str | None = None
        self.thread = threading.Thread(target=self._run, name="sfs-web-updates", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def end_streams(self) -> None:
        """End every open update stream (the server is shutting down)."""
        self.stop.set()
        self._send("bye", {})

    def close(self) -> None:
        self.end_streams()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self.queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.queues.discard(queue)

    def _send(self, kind: str, payload: Any) -> None:
        if self.loop is None:
            return
        message = (kind, json.dumps(payload))
        for queue in list(self.queues):
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown
                self.loop.call_soon_threadsafe(_put_latest, queue, message)

    def _run(self) -> None:
        client = SlowFastClient(self.redis_url, keys=self.keys)
        try:
            for update in client.updates(None, UPDATE_KINDS, stop=self.stop, poll_s=0.5, catch_up_s=RESYNC_S):
                try:
                    self._relay(client, update)
                except UNREACHABLE:
                    pass  # the follower meets the outage too, and re-reads everything once Redis is back
        finally:
            client.close()

    def _relay(self, client: SlowFastClient, update: Update) -> None:
        if update.kind == OUTAGE:
            log.warning("Redis unreachable: %s", update.error)
            self.redis_error = f"Redis unreachable: {update.error}"
            self._send("redis", {"ok": False, "error": self.redis_error})
        elif update.kind == RESYNC:
            self._resync(client)
        elif update.kind == NotificationKind.REMOVED:
            self.summaries.pop(update.stream, None)
            self._send("removed", {"id": update.stream})
        elif (info := client.stream(update.stream)) is not None:
            self._publish(client, info)

    def _resync(self, client: SlowFastClient) -> None:
        infos = client.streams()
        if self.redis_error is not None:
            self.redis_error = None
            self._send("redis", {"ok": True})
            # a browser that connected during the outage has no summaries yet: send them all again
            self.summaries = dict.fromkeys(self.summaries, "")
        for info in infos:
            self._publish(client, info)
        for sid in set(self.summaries) - {i.id for i in infos}:
            del self.summaries[sid]
            self._send("removed", {"id": sid})

    def _publish(self, client: SlowFastClient, info: StreamInfo) -> None:
        summary = stream_summary(client, info)
        encoded = json.dumps(summary, sort_keys=True)
        if self.summaries.get(info.id) != encoded:
            self.summaries[info.id] = encoded
            self._send("stream", summary)


def _put_latest(queue: asyncio.Queue, message: tuple[str, str]) -> None:
    """A browser that stopped reading loses its oldest updates, never blocks the others."""
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(message)


# ---------------------------------------------------------------------------- the app


def create_app(redis_url: str, *, token: str | None = None, local_only: bool = True, keys: Keys = DEFAULT_KEYS) -> FastAPI:
    """The web app for the pipeline whose Redis is `redis_url`.

    `token`: required from every request (header, bearer or the login cookie) when set.
    `local_only`: the app is bound to loopback; requests naming another Host are refused, so a
    web page elsewhere cannot reach it through DNS rebinding.
    """
    hub = UpdateHub(redis_url, keys)
    client = SlowFastClient(redis_url, keys=keys)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        hub.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            hub.close()
            client.close()

    app = FastAPI(
        title="slowfast-stream", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Streams, captions, events and questions of a slowfast-stream pipeline, read from Redis.",
    )
    app.state.hub = hub
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        response = await _checked(request, call_next)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _checked(request: Request, call_next) -> Response:
        path = request.url.path
        if local_only and (request.url.hostname or "") not in LOOPBACK_HOSTS:
            return JSONResponse({"detail": "this server answers to localhost / 127.0.0.1 only"}, status_code=400)
        if token is None or path == "/login" or path.startswith("/static/") or _authorized(request, token):
            return await call_next(request)
        if request.method == "GET" and not path.startswith("/api") and path != "/openapi.json":
            return RedirectResponse(f"/login?next={path}", status_code=303)
        return JSONResponse({"detail": f"a token is needed (header {TOKEN_HEADER}, bearer, or log in)"},
                            status_code=401)

    async def unreachable(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"Redis unreachable: {exc}"}, status_code=503)

    for error in UNREACHABLE[:2]:  # redis-py's connection and timeout errors
        app.add_exception_handler(error, unreachable)

    # ---- pages
    @app.get("/", include_in_schema=False)
    def grid_page() -> FileResponse:
        return _page("index.html")

    @app.get("/streams/{stream}", include_in_schema=False)
    def stream_page(stream: StreamIdPath) -> FileResponse:
        return _page("stream.html")

    @app.get("/docs", include_in_schema=False)
    def api_page() -> FileResponse:
        return _page("api.html")

    @app.get("/login", include_in_schema=False)
    def login_page() -> FileResponse:
        return _page("login.html")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        supplied = (form.get("token") or [""])[0]
        target = (form.get("next") or ["/"])[0]
        if not target.startswith("/") or target.startswith("//"):
            target = "/"  # only this site's pages
        if token is None or not hmac.compare_digest(supplied.encode(), token.encode()):
            return RedirectResponse(f"/login?failed=1&next={target}", status_code=303)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    # ---- API
    def known(stream: str) -> StreamInfo:
        info = client.stream(stream)
        if info is None:
            raise HTTPException(404, f"no stream {stream!r} in the registry")
        return info

    @app.get("/api/streams", summary="Every registered stream with its state, latest caption and recent events")
    def api_streams() -> list[dict]:
        return [stream_summary(client, info) for info in client.streams()]

    @app.get("/api/streams/{stream}", summary="One stream: summary, config and the standing questions' latest answers")
    def api_stream(stream: StreamIdPath) -> dict:
        info = known(stream)
        return stream_summary(client, info) | {"config": info.config, "standing": standing_answers(client, stream)}

    @app.get("/api/streams/{stream}/captions", summary="Captions, newest first; page back with `before`, forward with `after`")
    def api_captions(
        stream: StreamIdPath,
        before: Annotated[str | None, Query(pattern=r"^\d+-\d+$", description="entry id: captions older than it")] = None,
        after: Annotated[str | None, Query(pattern=r"^\d+-\d+$", description="entry id: captions newer than it")] = None,
        count: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[dict]:
        known(stream)
        if after is not None:
            return [caption_json(c) for c in reversed(client.history(stream, since=after, count=count))]
        return [caption_json(c) for _, c in client.older("captions", stream, before=before, count=count)]

    @app.get("/api/streams/{stream}/events", summary="Events (standing-question triggers), newest first")
    def api_events(
        stream: StreamIdPath,
        before: Annotated[str | None, Query(pattern=r"^\d+-\d+$")] = None,
        count: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[dict]:
        known(stream)
        acks = client.acks(stream)
        return [event_json(stream, eid, e, acks) for eid, e in client.older("events", stream, before=before, count=count)]

    @app.post("/api/streams/{stream}/events/{event_id}/ack", summary="Acknowledge an event (open or closed)")
    def api_ack(stream: StreamIdPath, event_id: Annotated[str, PathParam(max_length=200)], request: AckRequest) -> dict:
        known(stream)
        try:
            ack = client.acknowledge(stream, event_id, by=request.by, note=request.note)
        except KeyError as exc:
            raise HTTPException(404, exc.args[0]) from None
        return ack.model_dump(mode="json")

    @app.get("/api/streams/{stream}/frame.jpg", summary="The latest window's last frame (JPEG)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def api_frame(stream: StreamIdPath) -> Response:
        found = client.frame(stream)
        if found is None:
            raise HTTPException(404, f"no picture of stream {stream!r} yet")
        info, jpeg = found
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "no-cache", "X-Window": str(info.window)})

    @app.get("/api/streams/{stream}/snapshots/{snapshot_id}.jpg", summary="An event's window picture (JPEG)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def api_snapshot(stream: StreamIdPath, snapshot_id: Annotated[str, PathParam(pattern=r"^\d+-\d+$")]) -> Response:
        jpeg = client.snapshot(stream, snapshot_id)
        if jpeg is None:
            raise HTTPException(404, "snapshot trimmed or expired")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400, immutable"})

    @app.post("/api/streams/{stream}/questions", summary="Ask about the stream's latest window, or (kind "
              "`history`) about its past; waits for the reply")
    def api_ask(stream: StreamIdPath, question: QuestionRequest) -> JSONResponse:
        known(stream)
        if question.kind == QuestionKind.HISTORY:
            answer = replied(lambda: client.ask_history(stream, question.text, since=question.since,
                                                        start=question.start, end=question.end,
                                                        timeout=question.timeout_s), question.timeout_s, "answer")
        else:
            answer = replied(lambda: client.ask(stream, question.text, timeout=question.timeout_s, kind=question.kind),
                             question.timeout_s, "answer")
        if isinstance(answer, JSONResponse):
            return answer
        body = answer.model_dump(mode="json")
        if answer.sources is not None:
            body["sources"] = [hit_json(h) for h in answer.sources]
        return JSONResponse(body)

    @app.get("/api/search", summary="Search every caption, answer, event and summary Redis holds",
             description="`q`: words (all must appear), \"a phrase\", prefix*. Best first (BM25, a phrase as "
                         "written scores double), newest first among equals. Filters: `stream`, `kind` (repeatable), "
                         "`since` (30m, 2h) or `from`/`to` (ISO date-time, 14:00, unix seconds).")
    def api_search(
        q: Annotated[str, Query(description="the query")],
        stream: Annotated[list[str] | None, Query(description="only these streams")] = None,
        kind: Annotated[list[str] | None, Query(description="caption, answer, event or summary")] = None,
        since: Annotated[str | None, Query(description="the last DURATION: 90s, 30m, 2h, 1d")] = None,
        start: Annotated[str | None, Query(alias="from", description="range start")] = None,
        end: Annotated[str | None, Query(alias="to", description="range end")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
    ) -> JSONResponse:
        try:
            result = client.search(q, streams=stream, kinds=kind, since=since, start=start, end=end, limit=limit)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return JSONResponse({"total": result.total, "complete": result.complete,
                             "elapsed_ms": round(result.elapsed_ms, 1),
                             "hits": [hit_json(h) for h in result.hits]})

    @app.post("/api/streams/{stream}/report", summary="A report on a range: summary, events, pictures; waits for it")
    def api_report(stream: StreamIdPath, request: ReportRequest) -> JSONResponse:
        known(stream)
        answer = replied(lambda: client.report(stream, since=request.since, start=request.start, end=request.end,
                                               timeout=request.timeout_s), request.timeout_s, "report")
        if isinstance(answer, JSONResponse):
            return answer
        report = answer.report
        return JSONResponse({
            "markdown": report_markdown(report, lambda item: picture_path(stream, item)),
            "report": report.model_dump(mode="json") | {"pictures": [hit_json(h) for h in report.pictures]},
            "model": answer.model,
        })

    @app.get("/api/streams/{stream}/captions.jsonl", summary="The caption history as JSON lines (download)",
             response_class=Response)
    def api_captions_jsonl(stream: StreamIdPath) -> Response:
        return _caption_file(stream, "jsonl")

    @app.get("/api/streams/{stream}/captions.vtt", summary="The caption history as WebVTT (download)",
             response_class=Response)
    def api_captions_vtt(stream: StreamIdPath) -> Response:
        return _caption_file(stream, "vtt")

    def _caption_file(stream: str, kind: str) -> Response:
        """The same files the pipeline writes for a file stream, built from the Redis history."""
        info = known(stream)
        captions = _all_captions(client, stream)
        # the run's fps sets where each cue ends; registries older than window_settings lack it
        fps = info.window_settings.get("fps") or PipelineConfig.model_fields["fps"].default
        with tempfile.TemporaryDirectory() as tmp:
            files = CaptionFiles(Path(tmp), 1.0 / fps)
            try:
                for caption in captions:
                    files.write(caption)
            finally:
                files.close()
            body = (files.jsonl_path if kind == "jsonl" else files.vtt_path).read_bytes()
        media = "application/x-ndjson" if kind == "jsonl" else "text/vtt"
        return Response(body, media_type=f"{media}; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{stream}-captions.{kind}"'})

    @app.get("/api/updates", summary="Live updates (text/event-stream)", response_class=StreamingResponse,
             description="Server-sent events: `stream` (a stream's summary, as in /api/streams), `removed` "
                         "({id}), `redis` ({ok, error}). Every stream's summary is sent first.")
    async def api_updates(request: Request, stream: Annotated[str | None, Query(pattern=STREAM_ID_RE.pattern)] = None):
        queue = hub.subscribe()
        down = None
        try:
            first = await asyncio.to_thread(lambda: [stream_summary(client, i) for i in client.streams()
                                                     if stream is None or i.id == stream])
        except UNREACHABLE as exc:  # opens anyway (a browser gives up on an error status): the hub
            first, down = [], f"Redis unreachable: {exc}"  # sends the summaries once Redis is back

        async def events() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                if down is not None:
                    yield _sse("redis", json.dumps({"ok": False, "error": down}))
                for summary in first:
                    yield _sse("stream", json.dumps(summary))
                while True:
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if kind == "bye":
                        return
                    if stream is None or json.loads(data).get("id", stream) == stream:
                        yield _sse(kind, data)
            finally:
                hub.unsubscribe(queue)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _all_captions(client: SlowFastClient, stream: str) -> list[Caption]:
    captions: list[Caption] = []
    since = "0-0"
    while batch := client.history(stream, since=since, count=1000):
        captions += batch
        since = batch[-1].entry_id
    return captions


def _sse(kind: str, data: str) -> str:
    return f"event: {kind}\ndata: {data}\n\n"


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type="text/html", headers={"Cache-Control": "no-cache"})


def _authorized(request: Request, token: str) -> bool:
    supplied = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE) or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    return bool(supplied) and hmac.compare_digest(supplied.encode(), token.encode())
