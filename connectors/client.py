"""Typed client for downstream consumers (and the `slowfast` CLI): read results, ask questions,
add or remove streams. Synchronous; one instance per thread.

>>> with SlowFastClient("redis://localhost:6379/0") as sfs:
...     for info in sfs.streams(): print(info.id, sfs.latest(info.id))
...     answer = sfs.ask("cam1", "Is anyone in the loading bay?", timeout=30)
...     for caption in sfs.follow("cam1"): print(caption.start, caption.text)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from redis.client import PubSub

from .redis_conn import MAX_BLOCK_S, block_ms, connect
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
    Event,
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
    decode_entry,
    encode_entry,
)

# Quiet seconds after which a follower re-reads its streams: redis-py re-subscribes on its own
# after a short Redis restart, and the nudges sent in between never arrive.
FOLLOW_CATCH_UP_S = 3.0


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

    def history(self, stream: str, since: str | None = None, count: int = 100) -> list[Caption]:
        """Captions in window order: the last `count`, or the first `count` after entry id
        `since` (exclusive; use a previous caption's `entry_id`)."""
        return self._range(self.keys.captions(stream), Caption, since, count)

    def answers(self, stream: str, since: str | None = None, count: int = 100) -> list[Answer]:
        return self._range(self.keys.answers(stream), Answer, since, count)

    def events(self, stream: str, since: str | None = None, count: int = 100) -> list[Event]:
        return self._range(self.keys.events(stream), Event, since, count)

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

    def follow(
        self, stream: str, since: str | None = None, *, stop: threading.Event | None = None, poll_s: float = 1.0
    ) -> Iterator[Caption]:
        """Yield new captions as they are published, in order, until `stop` is set (or forever).

        Starts after the newest caption at the time of the call (not of the first next()), or
        after entry id `since`. Uses XREAD BLOCK in short slices (below the socket timeout), so
        `stop` is honoured within `poll_s`.
        """
        key = self.keys.captions(stream)
        last = since
        if last is None:
            top = self.redis.xrevrange(key, count=1)
            last = top[0][0] if top else "0-0"
        return self._follow(key, last, stop, poll_s)

    def _follow(self, key: str, last: str, stop: threading.Event | None, poll_s: float) -> Iterator[Caption]:
        while stop is None or not stop.is_set():
            resp = self.redis.xread({key: last}, count=100, block=block_ms(min(poll_s, self._max_block_s)))
            for _, entries in resp or ():
                for entry_id, fields in entries:
                    last = entry_id
                    yield decode_entry(Caption, fields)

    def follow_events(
        self, stream: str | None = None, *, stop: threading.Event | None = None, poll_s: float = 1.0
    ) -> Iterator[Event]:
        """Yield standing-question events as they fire (one stream or all), in order per
        stream, starting after the newest ones at the time of the call. Woken by the pub/sub
        nudges, it reads each stream's events after the last one yielded, so a burst is never
        cut short; a stream that appears later starts at the event its first nudge names."""
        # subscribed from here on; idle ticks re-read what a silent re-subscription missed
        notes = self.notifications(stream, stop=stop, poll_s=poll_s, idle_tick_s=FOLLOW_CATCH_UP_S)
        last: dict[str, str] = {}
        for sid in [stream] if stream else [s.id for s in self.streams()]:
            top = self.redis.xrevrange(self.keys.events(sid), count=1)
            last[sid] = top[0][0] if top else "0-0"
        return self._follow_events(notes, last)

    def _follow_events(self, notes: Iterator[Notification | None], last: dict[str, str]) -> Iterator[Event]:
        for note in notes:
            if note is None:
                for sid in list(last):
                    yield from self._events_after(sid, last)
            elif note.kind == NotificationKind.EVENT and note.entry_id is not None:
                yield from self._events_after(note.stream, last, first=note.entry_id)

    def _events_after(self, sid: str, last: dict[str, str], first: str = "0-0") -> Iterator[Event]:
        """The stream's events after the last one yielded (from `first` for a new stream)."""
        since = last.get(sid)
        entries = self.redis.xrange(self.keys.events(sid), min=f"({since}" if since else first, count=1000)
        for entry_id, fields in entries:
            last[sid] = entry_id
            yield decode_entry(Event, fields)

    def notifications(
        self, stream: str | None = None, *, stop: threading.Event | None = None, poll_s: float = 1.0,
        idle_tick_s: float | None = None,
    ) -> Iterator[Notification | None]:
        """Yield pub/sub nudges (new caption, event, status, stream removed) for one stream or
        all, subscribing at the time of the call. Push only: messages sent while not subscribed
        are missed; read the data with history()/events() (or use follow(), which misses
        nothing). With `idle_tick_s`, also yield None after that long without a nudge, so a
        consumer can re-read the data: redis-py re-subscribes silently after a short Redis
        restart, and what was published in between never arrives as a nudge."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        if stream is None:
            pubsub.psubscribe(self.keys.notify_pattern)
        else:
            pubsub.subscribe(self.keys.notify(stream))
        return self._notifications(pubsub, stop, poll_s, idle_tick_s)

    def _notifications(
        self, pubsub: PubSub, stop: threading.Event | None, poll_s: float, idle_tick_s: float | None
    ) -> Iterator[Notification | None]:
        last_yield = time.monotonic()
        try:
            while stop is None or not stop.is_set():
                msg = pubsub.get_message(timeout=min(poll_s, self._max_block_s))
                if msg and msg.get("type") in ("message", "pmessage"):
                    try:
                        note = Notification.model_validate_json(msg["data"])
                    except ValueError:
                        continue  # not ours: a nudge is never worth crashing a consumer
                    last_yield = time.monotonic()
                    yield note
                elif idle_tick_s is not None and time.monotonic() - last_yield >= idle_tick_s:
                    last_yield = time.monotonic()
                    yield None
        finally:
            pubsub.close()

    # ------------------------------------------------------------------ questions

    def ask(self, stream: str, question: str, timeout: float = 30.0, *, kind: QuestionKind | str = "open") -> Answer:
        """Ask about the stream's latest window and wait for the one reply.

        Returns the Answer; raises QuestionError with the error reply (unknown stream,
        malformed, model failure, ...), TimeoutError if no reply came within `timeout`, and
        ValueError for a question that cannot be sent (empty, too long, bad stream id).
        """
        q = Question(stream=stream, text=question, kind=QuestionKind(kind))
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

    def _range(self, key: str, cls: type[M], since: str | None, count: int) -> list[M]:
        if since is None:
            entries = list(reversed(self.redis.xrevrange(key, count=count)))
        else:
            entries = self.redis.xrange(key, min=f"({since}", count=count)
        return [decode_entry(cls, fields) for _, fields in entries]


def _json_list(raw: str | None) -> list[Any]:
    value = json.loads(raw) if raw else []
    return value if isinstance(value, list) else []
