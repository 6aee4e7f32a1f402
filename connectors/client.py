"""Typed client for downstream consumers (and the `slowfast` CLI): read results, ask questions,
add or remove streams. Synchronous; one instance per thread.

>>> with SlowFastClient("redis://localhost:6379/0") as sfs:
...     for info in sfs.streams(): print(info.id, sfs.latest(info.id))
...     answer = sfs.ask("cam1", "Is anyone in the loading bay?", timeout=30)
...     for caption in sfs.follow("cam1"): print(caption.start, caption.text)
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from redis.client import PubSub

from .redis_conn import MAX_BLOCK_S, UNREACHABLE, Outage, block_ms, connect
from .search import Searcher, SearchRequest, SearchResult, entry_time, time_range
from .redis_schema import (
    DATA,
    DEFAULT_KEYS,
    INTAKE_MAXLEN,
    JPEG,
    MAX_MESSAGE_BYTES,
    OFFLINE_DROPPED,
    STATE_SUMMARY,
    Answer,
    Caption,
    Control,
    ControlAction,
    ControlReply,
    EntryKind,
    Event,
    EventAck,
    FrameInfo,
    Keys,
    M,
    Notification,
    NotificationKind,
    Question,
    QuestionKind,
    StreamInfo,
    StreamStatus,
    Summary,
    Undelivered,
    decode_entry,
    encode_entry,
)

log = logging.getLogger(__name__)

# Seconds between a follower's full re-reads of its streams: redis-py re-subscribes on its own
# after a short Redis restart, and the nudges sent in between never arrive.
FOLLOW_CATCH_UP_S = 3.0
READ_BATCH = 1000

# What a follower reads from the streams, by the nudge kind that announces it.
ENTRY_TYPES: dict[str, type[Caption] | type[Event]] = {NotificationKind.CAPTION: Caption, NotificationKind.EVENT: Event}
_STREAM_KEYS: dict[str, Callable[[Keys, str], str]] = {
    NotificationKind.CAPTION: Keys.captions, NotificationKind.EVENT: Keys.events}
# Update kinds besides NotificationKind's:
RESYNC = "resync"  # every stream was re-read (after (re)subscribing, and every catch_up_s)
OUTAGE = "outage"  # Redis became unreachable: the follower pauses and retries with backoff


@dataclass(frozen=True)
class Update:
    """One thing a follower saw. `caption`/`event`: a new entry (`entry`), each exactly once, in
    order per stream. `status`/`removed`: a nudge, which carries no data (push only, so one can
    be missed). `resync`: state that is not an entry (status, registry) may have changed unseen;
    re-read it. `outage`: Redis is unreachable (`error`); a `resync` follows once it is back."""

    kind: str
    stream: str | None = None
    entry: Caption | Event | None = None
    error: str | None = None


class QuestionError(RuntimeError):
    """The pipeline replied to a question with an error; `.reply` holds the whole reply."""

    def __init__(self, reply: Answer | ControlReply) -> None:
        self.reply = reply
        super().__init__(reply.error)


class SlowFastClient:
    """Consumer side of the Redis contract (see README, "Redis interface")."""

    def __init__(self, redis_url: str, *, keys: Keys = DEFAULT_KEYS, socket_timeout: float = 5.0) -> None:
        self.keys = keys
        self.redis = connect(redis_url, socket_timeout=socket_timeout, client_name="sfs-client")
        # Pictures are binary: a second connection pool that returns bytes, opened on first use.
        self._url, self._socket_timeout = redis_url, socket_timeout
        self._bytes_redis: Any = None
        self._max_block_s = min(MAX_BLOCK_S, socket_timeout / 2)  # blocking reads stay below the timeout
        self._searcher: Searcher | None = None

    # ------------------------------------------------------------------ reading results

    def streams(self) -> list[StreamInfo]:
        """Registered streams, sorted by id (entries that fail validation are skipped)."""
        out = []
        for _, raw in sorted(self.redis.hgetall(self.keys.registry).items()):
            try:
                out.append(StreamInfo.model_validate_json(raw))
            except ValueError:
                continue
        return out

    def stream(self, stream: str) -> StreamInfo | None:
        raw = self.redis.hget(self.keys.registry, stream)
        return StreamInfo.model_validate_json(raw) if raw else None

    def latest(self, stream: str) -> Caption | None:
        """The newest window's caption, or None if the stream has none yet."""
        fields = self.redis.hgetall(self.keys.state(stream))
        return decode_entry(Caption, fields) if DATA in fields else None

    def latest_summary(self, stream: str) -> Summary | None:
        """The newest summary (rolling, or the final one of a file), or None."""
        raw = self.redis.hget(self.keys.state(stream), STATE_SUMMARY)
        return Summary.model_validate_json(raw) if raw else None

    def latest_answers(self, stream: str) -> list[Answer]:
        """Answers computed on the newest window (standing questions, ad-hoc ones)."""
        raw = self.redis.hget(self.keys.state(stream), "answers")
        return [Answer.model_validate(a) for a in _json_list(raw)]

    def status(self, stream: str) -> StreamStatus | None:
        fields = self.redis.hgetall(self.keys.status(stream))
        if DATA not in fields:
            return None
        status = decode_entry(StreamStatus, fields)
        return status.model_copy(update={"offline_dropped": int(fields.get(OFFLINE_DROPPED) or 0)})

    def history(self, stream: str, since: str | None = None, count: int | None = 100) -> list[Caption]:
        """Captions in window order: the last `count`, or the first `count` after entry id
        `since` (exclusive; use a previous caption's `entry_id`); `count=None`: all of them."""
        return self._range(self.keys.captions(stream), Caption, since, count)

    def answers(self, stream: str, since: str | None = None, count: int = 100) -> list[Answer]:
        return self._range(self.keys.answers(stream), Answer, since, count)

    def events(self, stream: str, since: str | None = None, count: int = 100) -> list[Event]:
        """Event records (opened, updated, closed) in window order."""
        return self._range(self.keys.events(stream), Event, since, count)

    def open_events(self, stream: str) -> list[Event]:
        """The stream's events open now (each one's latest record), oldest first."""
        raw = self.redis.hgetall(self.keys.open_events(stream))
        return sorted((Event.model_validate_json(v) for v in raw.values()), key=lambda e: (e.first_window, e.event_id))

    def acknowledge(self, stream: str, event_id: str, by: str = "", note: str = "") -> EventAck:
        """Record that a person has seen an event (open or closed); raises KeyError for an
        event the stream never had."""
        if not self.redis.hexists(self.keys.open_events(stream), event_id) and not any(
                e.event_id == event_id for e in self.events(stream, count=10_000)):
            raise KeyError(f"stream {stream!r} has no event {event_id!r}")
        ack = EventAck(event_id=event_id, by=by, note=note)
        self.redis.hset(self.keys.acks(stream), event_id, ack.to_json())
        return ack

    def undelivered(self, stream: str, count: int = 100) -> list[Undelivered]:
        """Event notifications the pipeline gave up on, oldest first (the last `count`)."""
        return self._range(self.keys.undelivered(stream), Undelivered, None, count)

    def acks(self, stream: str) -> dict[str, EventAck]:
        """Event id -> its acknowledgement."""
        return {k: EventAck.model_validate_json(v) for k, v in self.redis.hgetall(self.keys.acks(stream)).items()}

    def older(self, key_of: str, stream: str, before: str | None = None, count: int = 50) -> list[Any]:
        """Newest first: the last `count` captions/answers/events (`key_of`: "captions",
        "answers" or "events"), or the `count` before entry id `before` (exclusive), for
        paging back through the history."""
        cls = {"captions": Caption, "answers": Answer, "events": Event}[key_of]
        key = getattr(self.keys, key_of)(stream)
        entries = self.redis.xrevrange(key, max=f"({before}" if before else "+", count=count)
        return [(entry_id, decode_entry(cls, fields)) for entry_id, fields in entries]

    def frame_info(self, stream: str) -> FrameInfo | None:
        """What the latest picture shows (window, time), without the picture."""
        raw = self.redis.hget(self.keys.frame(stream), DATA)
        return FrameInfo.model_validate_json(raw) if raw else None

    def frame(self, stream: str) -> tuple[FrameInfo, bytes] | None:
        """The stream's latest picture (the last frame of its newest window) as JPEG."""
        fields = self._binary().hgetall(self.keys.frame(stream))
        if JPEG.encode() not in fields or DATA.encode() not in fields:
            return None
        info = FrameInfo.model_validate_json(fields[DATA.encode()])
        return info, fields[JPEG.encode()]

    def snapshot(self, stream: str, snapshot_id: str) -> bytes | None:
        """The JPEG of an event's window (Event.snapshot_id), or None once trimmed or expired."""
        entries = self._binary().xrange(self.keys.snapshots(stream), snapshot_id, snapshot_id, count=1)
        return entries[0][1].get(JPEG.encode()) if entries else None

    def summaries(self, stream: str, since: str | None = None, count: int = 100) -> list[Summary]:
        return self._range(self.keys.summaries(stream), Summary, since, count)

    def entries_between(self, stream: str, kind: EntryKind | str, start: float | None = None,
                        end: float | None = None, batch: int = READ_BATCH) -> list[tuple[str, Any]]:
        """(entry id, entry) of one kind whose time (see Hit.wall_time) is in [start, end], oldest
        first. Read newest first, so a recent range costs only its own entries."""
        kind = EntryKind(kind)
        cls = {EntryKind.CAPTION: Caption, EntryKind.ANSWER: Answer, EntryKind.EVENT: Event,
               EntryKind.SUMMARY: Summary}[kind]
        key, out, before = self.keys.entries(stream, kind), [], "+"
        while True:
            page = self.redis.xrevrange(key, max=before, count=batch)
            for entry_id, fields in page:
                entry = decode_entry(cls, fields)
                wall = entry_time(kind, entry)
                if end is not None and wall > end:
                    continue
                if start is not None and wall < start:
                    return out[::-1]
                out.append((entry_id, entry))
            if len(page) < batch:
                return out[::-1]
            before = f"({page[-1][0]}"

    def search(self, query: str, *, streams: Collection[str] | None = None, kinds: Collection[str] | None = None,
               since: str | float | None = None, start: Any = None, end: Any = None, limit: int = 20) -> SearchResult:
        """Captions, answers, events and summaries that hold the query's words, best first (BM25,
        a phrase as written scores double), newest first among equals. `query`: words (all must
        appear), "a phrase", prefix*. Filters: `streams` (default all registered), `kinds`,
        `since` (seconds or "30m") or `start`/`end` (unix s, ISO date-time, "14:00").
        Raises ValueError for a query or filter that cannot be searched."""
        request = SearchRequest.build(query, streams=streams, kinds=kinds, since=since, start=start, end=end,
                                      limit=limit)
        return self.searcher.search(request)

    @property
    def searcher(self) -> Searcher:
        if self._searcher is None:
            self._searcher = Searcher(self.redis, self._binary(), self.keys)
        return self._searcher

    def follow(
        self, stream: str | None = None, since: str | None = None, *, past: int = 0,
        stop: threading.Event | None = None, poll_s: float = 1.0,
    ) -> Iterator[Caption]:
        """Yield new captions (one stream, or all) as they are published, in order per stream,
        until `stop` is set (or forever); see `updates` for the start and for outages."""
        updates = self.updates(stream, (NotificationKind.CAPTION,), since=since, past=past, stop=stop, poll_s=poll_s)
        return (u.entry for u in updates if u.entry is not None)

    def follow_events(
        self, stream: str | None = None, *, past: int = 0, stop: threading.Event | None = None, poll_s: float = 1.0
    ) -> Iterator[Event]:
        """Yield standing-question events as they fire (one stream or all), in order per stream;
        see `updates`."""
        updates = self.updates(stream, (NotificationKind.EVENT,), past=past, stop=stop, poll_s=poll_s)
        return (u.entry for u in updates if u.entry is not None)

    def updates(
        self, stream: str | None = None, kinds: Collection[str] = (NotificationKind.CAPTION,), *,
        since: str | None = None, past: int = 0, stop: threading.Event | None = None, poll_s: float = 1.0,
        catch_up_s: float = FOLLOW_CATCH_UP_S,
    ) -> Iterator[Update]:
        """Follow one stream, or all, until `stop` is set (or forever): the entries of `kinds`
        (captions, events) as they are published, nudges of `kinds` (status, removed) as they come,
        and the `resync` and `outage` markers (see Update).

        Subscribed at the time of the call, and starts there: after each stream's newest entry, or
        its last `past` entries, or after entry id `since`; a stream registered later starts at its
        run's first entry. Push nudges only wake it up: it reads each stream after the last entry
        it yielded, so a missed nudge loses nothing and nothing comes twice, and it re-reads every
        stream each `catch_up_s`. A Redis outage pauses it (retried with backoff); it subscribes
        again and catches up on what was published meanwhile."""
        return iter(_Follower(self, stream, kinds, since, past, stop, poll_s, catch_up_s))

    def notifications(
        self, stream: str | None = None, *, stop: threading.Event | None = None, poll_s: float = 1.0
    ) -> Iterator[Notification]:
        """Yield pub/sub nudges (new caption, event, status, stream removed) for one stream or
        all, subscribing at the time of the call. Push only: messages sent while not subscribed
        are missed; read the data with history()/events() (or use updates(), which misses
        nothing)."""
        return self._notifications(self._subscribed(stream), stop, poll_s)

    def _notifications(self, pubsub: PubSub, stop: threading.Event | None, poll_s: float) -> Iterator[Notification]:
        try:
            while stop is None or not stop.is_set():
                note = _notification(pubsub.get_message(timeout=min(poll_s, self._max_block_s)))
                if note is not None:
                    yield note
        finally:
            pubsub.close()

    def _subscribed(self, stream: str | None) -> PubSub:
        """A pub/sub connection subscribed to the nudges of one stream, or of all."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            if stream is None:
                pubsub.psubscribe(self.keys.notify_pattern)
            else:
                pubsub.subscribe(self.keys.notify(stream))
        except BaseException:
            pubsub.close()
            raise
        return pubsub

    # ------------------------------------------------------------------ questions

    def ask(self, stream: str, question: str, timeout: float = 30.0, *, kind: QuestionKind | str = "open") -> Answer:
        """Ask about the stream's latest window and wait for the one reply.

        Returns the Answer; raises QuestionError with the error reply (unknown stream,
        malformed, model failure, ...), TimeoutError if no reply came within `timeout`, and
        ValueError for a question that cannot be sent (empty, too long, bad stream id).
        """
        return self._question(Question(stream=stream, text=question, kind=QuestionKind(kind)), timeout)

    def ask_history(self, stream: str, question: str, *, since: str | float | None = None, start: Any = None,
                    end: Any = None, timeout: float = 120.0) -> Answer:
        """Ask about the stream's history in a wall-clock range (`since` or `start`/`end`, as in
        `search`; none: all of it). The pipeline retrieves the range's relevant captions, events
        and summaries, asks its model a text-only question holding them, and replies with the
        answer and the entries it drew on (`Answer.sources`). Errors as in `ask`."""
        lo, hi = time_range(since, start, end)
        return self._question(Question(stream=stream, text=question, kind=QuestionKind.HISTORY, start=lo, end=hi),
                              timeout)

    def report(self, stream: str, *, since: str | float | None = None, start: Any = None, end: Any = None,
               timeout: float = 600.0) -> Answer:
        """A report on the stream's wall-clock range, built by the running pipeline: a summary of
        the range's captions by the summary tree, its events, the pictures Redis holds.
        `Answer.report` holds the parts, `Answer.text` the Markdown. Errors as in `ask`."""
        lo, hi = time_range(since, start, end)
        return self._question(Question(stream=stream, text="report", kind=QuestionKind.REPORT, start=lo, end=hi),
                              timeout)

    def _question(self, q: Question, timeout: float) -> Answer:
        entry_id = self._send(self.keys.questions, q)
        # The intake fills id/reply_to from the entry id: waiting on that key also catches the
        # error reply to a message the pipeline could not parse.
        reply = Answer.model_validate_json(self._wait_reply(self.keys.reply(entry_id), timeout, "question"))
        if not reply.ok:
            raise QuestionError(reply)
        return reply

    # ------------------------------------------------------------------ control

    def add_stream(
        self,
        stream: str,
        source: str,
        *,
        live: bool | None = None,
        config: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ControlReply | None:
        """Ask the running pipeline to start a stream. With `timeout`, wait for its reply
        (raises QuestionError on an error reply); without, return None once sent."""
        msg = Control(action=ControlAction.ADD, stream=stream, source=source, live=live, config=config or {})
        return self._control(msg, timeout)

    def remove_stream(self, stream: str, *, timeout: float | None = None) -> ControlReply | None:
        """Ask the running pipeline to stop a stream (its keys then expire)."""
        return self._control(Control(action=ControlAction.REMOVE, stream=stream), timeout)

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self.redis.close()
        if self._bytes_redis is not None:
            self._bytes_redis.close()

    def _binary(self) -> Any:
        if self._bytes_redis is None:
            self._bytes_redis = connect(self._url, socket_timeout=self._socket_timeout, client_name="sfs-client",
                                        decode_responses=False)
        return self._bytes_redis

    def __enter__(self) -> SlowFastClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _control(self, msg: Control, timeout: float | None) -> ControlReply | None:
        entry_id = self._send(self.keys.control, msg)
        if timeout is None:
            return None
        reply = ControlReply.model_validate_json(self._wait_reply(self.keys.reply(entry_id), timeout, "control"))
        if not reply.ok:
            raise QuestionError(reply)
        return reply

    def _send(self, key: str, msg: Question | Control) -> str:
        fields = encode_entry(msg)
        if len(fields[DATA]) > MAX_MESSAGE_BYTES:
            raise ValueError(f"message too large: {len(fields[DATA])} bytes > {MAX_MESSAGE_BYTES}")
        return self.redis.xadd(key, fields, maxlen=INTAKE_MAXLEN, approximate=True)

    def _wait_reply(self, reply_key: str, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to the {what} within {timeout:g} s (reply key {reply_key})")
            popped = self.redis.blpop([reply_key], timeout=block_ms(min(left, self._max_block_s)) / 1000)
            if popped:
                return popped[1]

    def _range(self, key: str, cls: type[M], since: str | None, count: int | None) -> list[M]:
        if since is None:
            entries = list(reversed(self.redis.xrevrange(key, count=count)))
        else:
            entries = self.redis.xrange(key, min=f"({since}", count=count)
        return [decode_entry(cls, fields) for _, fields in entries]


class _Follower:
    """The state of one `SlowFastClient.updates` call."""

    def __init__(
        self, client: SlowFastClient, stream: str | None, kinds: Collection[str], since: str | None, past: int,
        stop: threading.Event | None, poll_s: float, catch_up_s: float,
    ) -> None:
        self.client, self.redis, self.keys, self.stream = client, client.redis, client.keys, stream
        self.kinds = frozenset(kinds)
        self.entry_kinds = [k for k in ENTRY_TYPES if k in self.kinds]
        self.stop = stop or threading.Event()
        self.poll_s, self.catch_up_s = min(poll_s, client._max_block_s), catch_up_s
        self.since, self.past = since, past
        self.after: dict[str, dict[str, str]] | None = None  # stream -> kind -> XRANGE min of its next read
        self.pubsub: PubSub | None = None
        self.outage = Outage("follower", log, level=logging.INFO)
        self.failed_at_start: BaseException | None = None
        try:  # now, not at the first next()
            self._subscribe()
            self._start()
        except UNREACHABLE as exc:
            self.failed_at_start = exc

    def __iter__(self) -> Iterator[Update]:
        try:
            if self.failed_at_start is not None:
                yield from self._pause(self.failed_at_start)
            while not self.stop.is_set():
                try:
                    yield from self._follow()
                except UNREACHABLE as exc:
                    yield from self._pause(exc)
        finally:
            self._unsubscribe()

    def _follow(self) -> Iterator[Update]:
        self._subscribe()
        self._start()
        yield from self._catch_up()
        self.outage.ended()
        next_catch_up = time.monotonic() + self.catch_up_s
        while not self.stop.is_set():
            note = _notification(self.pubsub.get_message(timeout=self.poll_s))
            if note is not None:
                yield from self._nudged(note)
            if time.monotonic() >= next_catch_up:
                yield from self._catch_up()
                next_catch_up = time.monotonic() + self.catch_up_s

    def _pause(self, exc: BaseException) -> Iterator[Update]:
        self._unsubscribe()
        if not self.outage.down:
            yield Update(OUTAGE, error=str(exc))
        self.stop.wait(self.outage.failed(exc))

    def _subscribe(self) -> None:
        if self.pubsub is None:
            self.pubsub = self.client._subscribed(self.stream)

    def _unsubscribe(self) -> None:
        if self.pubsub is not None:
            with contextlib.suppress(*UNREACHABLE):
                self.pubsub.close()
            self.pubsub = None

    def _start(self) -> None:
        """Where each stream known now starts (after subscribing: nothing falls in between)."""
        if self.after is not None:
            return
        sids = [self.stream] if self.stream is not None else [info.id for info in self.client.streams()]
        after = {}
        for sid in sids:
            after[sid] = {}
            for kind in self.entry_kinds:
                if self.since is not None:
                    after[sid][kind] = f"({self.since}"
                    continue
                # the entry before the last `past`: read after it
                newest = self.redis.xrevrange(_STREAM_KEYS[kind](self.keys, sid), count=self.past + 1)
                after[sid][kind] = f"({newest[self.past][0]}" if len(newest) > self.past else "-"
        self.after = after

    def _add(self, sid: str, info: StreamInfo | None, first: str | None = None) -> None:
        """A stream seen after the start: all of its current run is new."""
        start = f"{info.run}-0" if info is not None and info.run else first or "-"
        self.after[sid] = dict.fromkeys(self.entry_kinds, start)

    def _catch_up(self) -> Iterator[Update]:
        if self.stream is None:
            for info in self.client.streams():
                if info.id not in self.after:
                    self._add(info.id, info)
        reads = [(sid, kind) for sid in self.after for kind in self.entry_kinds]
        pipe = self.redis.pipeline(transaction=False)  # every stream in one round trip
        for sid, kind in reads:
            pipe.xrange(_STREAM_KEYS[kind](self.keys, sid), min=self.after[sid][kind], count=READ_BATCH)
        for (sid, kind), entries in zip(reads, pipe.execute()):
            yield from self._entries(sid, kind, entries)
            if len(entries) == READ_BATCH:
                yield from self._read(sid, kind)
        yield Update(RESYNC)

    def _nudged(self, note: Notification) -> Iterator[Update]:
        sid = note.stream
        if self.stream is not None and sid != self.stream:
            return
        if note.kind in self.entry_kinds:
            if sid not in self.after:
                self._add(sid, self.client.stream(sid), note.entry_id)
            yield from self._read(sid, note.kind)
        elif note.kind == NotificationKind.REMOVED and self.stream is None and sid in self.after:
            for kind in self.entry_kinds:  # what it published last, then no more reads of it
                yield from self._read(sid, kind)
            del self.after[sid]
        if note.kind in self.kinds and note.kind not in ENTRY_TYPES:
            yield Update(note.kind, sid)

    def _read(self, sid: str, kind: str) -> Iterator[Update]:
        while True:
            entries = self.redis.xrange(_STREAM_KEYS[kind](self.keys, sid), min=self.after[sid][kind], count=READ_BATCH)
            yield from self._entries(sid, kind, entries)
            if len(entries) < READ_BATCH:
                return

    def _entries(self, sid: str, kind: str, entries: list[tuple[str, dict[str, str]]]) -> Iterator[Update]:
        for entry_id, fields in entries:
            self.after[sid][kind] = f"({entry_id}"
            try:
                entry = decode_entry(ENTRY_TYPES[kind], fields)
            except ValueError:
                log.debug("skipped an unreadable %s entry %s of stream %s", kind, entry_id, sid)
                continue
            yield Update(kind, sid, entry)


def _notification(message: dict | None) -> Notification | None:
    if not message or message.get("type") not in ("message", "pmessage"):
        return None
    try:
        return Notification.model_validate_json(message["data"])
    except ValueError:
        return None  # not ours: a nudge is never worth crashing a consumer


def _json_list(raw: str | None) -> list[Any]:
    value = json.loads(raw) if raw else []
    return value if isinstance(value, list) else []
