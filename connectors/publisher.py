"""Writing pipeline results to Redis: one MULTI/EXEC per window, idempotent, buffered offline.

Each window's caption, answers and events, the latest-state hash, TTL refreshes and the
pub/sub nudge go in one transaction. Entry ids derive from (run, window) (see
`redis_schema.window_entry_id`), so publishing the same window twice (an actor retry, a redis-py
retry after a lost EXEC reply) is rejected by Redis and reported as a duplicate.

When Redis is unreachable, writes queue in a bounded in-memory buffer and are flushed in order
once it answers again. When the buffer is full the oldest window is dropped; drops are counted
per stream in `stats` and, after reconnecting, added to the stream's status hash field
`offline_dropped`. A buffered status is superseded by a newer one of the same stream.

A background thread (`maintain_interval_s`) flushes the buffer as soon as Redis answers again,
even when nothing new is published, and writes back the registry entries and latest statuses
this publisher wrote if Redis lost them (a restart without persistence, a FLUSHDB).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from redis import Redis
from redis.client import Pipeline

from .redis_conn import UNREACHABLE, connect
from .search import INDEX_ENTRY, INDEX_LIFETIME, IndexedEntry, entry_text, entry_time, index_commands
from .redis_schema import (
    CAPTION_FLAT,
    DATA,
    DEFAULT_KEYS,
    OFFLINE_DROPPED,
    STATUS_FLAT,
    STATE_SUMMARY,
    Answer,
    JPEG,
    SNAPSHOTS_MAXLEN,
    Caption,
    EntryKind,
    Event,
    EventPhase,
    FrameInfo,
    Keys,
    Notification,
    NotificationKind,
    StreamInfo,
    StreamStatus,
    Summary,
    Undelivered,
    encode_entry,
    encode_hash,
    window_entry_id,
)

log = logging.getLogger(__name__)
# Closing records written after a stream's last window take entry indexes from here on, past
# any that window's own events used.
EVENTS_AT_END = 1000

_DUPLICATE = "equal or smaller than the target stream top item"

# HSET the latest-state hash unless it already holds a newer window (a late retry of an old
# window must not turn "latest" back). Ids are compared as (ms, seq); doubles are exact here.
_SET_STATE_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], 'entry_id')
if cur then
  local cms, cseq = string.match(cur, '^(%d+)-(%d+)$')
  local nms, nseq = string.match(ARGV[1], '^(%d+)-(%d+)$')
  if cms and nms then
    cms, cseq, nms, nseq = tonumber(cms), tonumber(cseq), tonumber(nms), tonumber(nseq)
    if cms > nms or (cms == nms and cseq > nseq) then return 0 end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# Write a status hash back only if it is missing, so a fresher status written meanwhile wins.
_SET_IF_MISSING = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class PublishResult(StrEnum):
    PUBLISHED = "published"
    DUPLICATE = "duplicate"  # this window was already in Redis: nothing written twice
    OUT_OF_ORDER = "out_of_order"  # older than the stream's newest window and never published: refused
    BUFFERED = "buffered"  # Redis unreachable: queued, flushed on reconnect


class PublishError(RuntimeError):
    """Redis refused a write for a reason other than being unreachable (WRONGTYPE, OOM...)."""


@dataclass(slots=True)
class PublisherStats:
    published: int = 0  # writes that reached Redis (windows, statuses, registry changes)
    duplicates: int = 0  # windows Redis already had
    out_of_order: int = 0  # windows refused because a newer window of the stream was already in
    flushed: int = 0  # of `published`, those that waited in the buffer first
    overflowed: int = 0  # writes dropped because the buffer was full
    overflowed_by_stream: Counter[str] = field(default_factory=Counter)
    offline_since: float | None = None  # time.time() of the first failure of the current outage

    @property
    def online(self) -> bool:
        return self.offline_since is None


@dataclass(slots=True)
class _Op:
    """One buffered write: adds its commands to a transaction; `window` ops can overflow."""

    stream: str
    kind: str  # "window" | "status" | "registry" | "record"
    build: Callable[[Pipeline], None]
    entry: tuple[str, str] | None = None  # (captions key, entry id) of a window op
    waited: bool = False  # sat in the buffer during an outage


class Publisher:
    """The pipeline's writer. Synchronous; thread-safe (one lock: writes stay in order), so it
    can be called from `asyncio.to_thread`. Use one per actor.

    Windows of one stream must be published in window order: ids only grow, so a window older
    than the stream's newest is refused (OUT_OF_ORDER, counted), never inserted out of place.

    history_len / answers_len / events_len: approximate caps (XADD MAXLEN ~) of the
    per-stream streams. key_ttl_s: every write refreshes a TTL on the stream's keys, so keys
    of a stream nobody writes any more disappear (None: no TTL). removed_ttl_s: TTL given to
    the keys of an unregistered stream. buffer_size: writes kept while Redis is unreachable.
    reconnect_interval_s: while offline, how often a write tries Redis instead of buffering
    straight away (so a dead Redis costs the pipeline no time per window).
    maintain_interval_s: how often the background thread flushes the buffer and restores lost
    registry entries and statuses (None: no thread; call `maintain()` yourself).
    """

    def __init__(
        self,
        redis_url: str,
        *,
        keys: Keys = DEFAULT_KEYS,
        history_len: int = 10_000,
        answers_len: int = 10_000,
        events_len: int = 10_000,
        snapshots_len: int = SNAPSHOTS_MAXLEN,
        key_ttl_s: int | None = 7 * 24 * 3600,
        removed_ttl_s: int = 3600,
        buffer_size: int = 1000,
        reconnect_interval_s: float = 1.0,
        notify: bool = True,
        retries: int = 2,
        socket_timeout: float = 5.0,
        maintain_interval_s: float | None = 2.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.keys = keys
        self.history_len = history_len
        self.answers_len = answers_len
        self.events_len = events_len
        self.snapshots_len = snapshots_len
        self.key_ttl_s = key_ttl_s
        self.removed_ttl_s = removed_ttl_s
        self.buffer_size = buffer_size
        self.reconnect_interval_s = reconnect_interval_s
        self.notify = notify
        self.stats = PublisherStats()
        self.redis = connect(redis_url, retries=retries, socket_timeout=socket_timeout, client_name="sfs-publisher")
        self._buffer: deque[_Op] = deque()
        self._pending_drops: Counter[str] = Counter()  # overflow not yet written to status
        self._next_try = 0.0
        self._last_result = PublishResult.PUBLISHED
        self._lock = threading.RLock()
        self._set_state = self.redis.register_script(_SET_STATE_IF_NEWER)
        self._set_if_missing = self.redis.register_script(_SET_IF_MISSING)
        self._index_entry = self.redis.register_script(INDEX_ENTRY)
        self._index_lifetime = self.redis.register_script(INDEX_LIFETIME)
        # What this publisher last wrote that describes the present (not history): written
        # back by maintain() if Redis lost it.
        self._registered: dict[str, StreamInfo] = {}
        self._statuses: dict[str, StreamStatus] = {}
        self._closed = threading.Event()
        self._maintainer = None
        if maintain_interval_s:
            self._maintainer = threading.Thread(
                target=self._maintain_every, args=(maintain_interval_s,), name="sfs-publisher-maintain", daemon=True
            )
            self._maintainer.start()

    # ------------------------------------------------------------------ public API

    def publish_window(
        self,
        caption: Caption,
        answers: Sequence[Answer] = (),
        events: Sequence[Event] = (),
        frame: tuple[FrameInfo, bytes] | None = None,
    ) -> PublishResult:
        """Write one window's results in one transaction.

        `frame`: the window's last frame as JPEG. It becomes the stream's latest picture and,
        if the window has events, their snapshot (named in each Event)."""
        sid = caption.stream
        foreign = ({a.stream for a in answers} | {e.stream for e in events}) - {None, sid}
        if foreign:
            raise ValueError(f"answers/events of stream(s) {sorted(map(str, foreign))} in a window of {sid!r}")
        # Every record of an event names its first window's picture, kept when the event opens.
        opens = frame is not None and any(e.phase == EventPhase.OPENED for e in events)
        events = [e.model_copy(update={
            "snapshot_key": self.keys.snapshots(sid),
            "snapshot_id": window_entry_id(e.run, e.window if e.first_window is None else e.first_window)})
            if opens or e.phase != EventPhase.OPENED else e for e in events]

        def build(p: Pipeline) -> None:
            k = self.keys
            p.xadd(k.captions(sid), encode_entry(caption), id=caption.entry_id, maxlen=self.history_len)
            self._index(p, sid, EntryKind.CAPTION, caption.entry_id, caption)
            for kind, key, entries, maxlen in ((EntryKind.ANSWER, k.answers(sid), answers, self.answers_len),
                                               (EntryKind.EVENT, k.events(sid), events, self.events_len)):
                for i, entry in enumerate(entries):
                    entry_id = window_entry_id(caption.run, caption.window, i)
                    p.xadd(key, encode_entry(entry), id=entry_id, maxlen=maxlen)
                    self._index(p, sid, kind, entry_id, entry)
            self._track_open(p, sid, events)
            state = encode_hash(caption, CAPTION_FLAT)
            state["caption"] = state.pop("text")
            state["entry_id"] = caption.entry_id
            state["answers"] = json.dumps([a.model_dump(mode="json", exclude_none=True) for a in answers])
            state["updated_at"] = str(time.time())
            flat = [x for pair in state.items() for x in pair]
            self._set_state(keys=[k.state(sid)], args=[caption.entry_id, *flat], client=p)
            if frame is not None:
                info, jpeg = frame
                picture = ["entry_id", caption.entry_id, DATA, info.to_json(), JPEG, jpeg]
                self._set_state(keys=[k.frame(sid)], args=[caption.entry_id, *picture], client=p)
                if opens:
                    p.xadd(k.snapshots(sid), {JPEG: jpeg}, id=caption.entry_id, maxlen=self.snapshots_len)
            self._refresh_ttl(p, sid)
            if self.notify:
                p.publish(
                    k.notify(sid),
                    Notification(
                        kind=NotificationKind.CAPTION, stream=sid, window=caption.window, entry_id=caption.entry_id
                    ).to_json(),
                )
                for i, event in enumerate(events):
                    p.publish(
                        k.notify(sid),
                        Notification(
                            kind=NotificationKind.EVENT,
                            stream=sid,
                            window=event.window,
                            entry_id=window_entry_id(caption.run, caption.window, i),
                        ).to_json(),
                    )

        return self._submit(_Op(sid, "window", build, entry=(self.keys.captions(sid), caption.entry_id)))

    def _track_open(self, p: Pipeline, sid: str, events: Sequence[Event]) -> None:
        """The open-events hash follows each event's records: set while open, gone once closed."""
        for event in events:
            if not event.event_id:
                continue
            if event.phase == EventPhase.CLOSED:
                p.hdel(self.keys.open_events(sid), event.event_id)
            else:
                p.hset(self.keys.open_events(sid), event.event_id, event.to_json())

    def close_events(self, sid: str, events: Sequence[Event]) -> PublishResult:
        """Closing records outside a window (the stream ended with events open), in one
        transaction; their entry ids follow the last window's."""

        def build(p: Pipeline) -> None:
            for i, event in enumerate(events):
                entry_id = window_entry_id(event.run, event.window, EVENTS_AT_END + i)
                p.xadd(self.keys.events(sid), encode_entry(event), id=entry_id, maxlen=self.events_len)
                self._index(p, sid, EntryKind.EVENT, entry_id, event)
            self._track_open(p, sid, events)
            self._refresh_ttl(p, sid)

        if not events:
            return PublishResult.PUBLISHED
        first = window_entry_id(events[0].run, events[0].window, EVENTS_AT_END)
        return self._submit(_Op(sid, "window", build, entry=(self.keys.events(sid), first)))

    def publish_undelivered(self, record: Undelivered) -> PublishResult:
        """Write down an event notification that never reached its sink (kept, capped)."""
        sid = record.stream

        def build(p: Pipeline) -> None:
            p.xadd(self.keys.undelivered(sid), encode_entry(record), maxlen=self.events_len)
            self._refresh_ttl(p, sid)

        return self._submit(_Op(sid, "record", build))

    def publish_summary(self, summary: Summary) -> PublishResult:
        """Add a summary to the stream's summaries (idempotent id) and make it the state hash's latest."""
        sid = summary.stream

        def build(p: Pipeline) -> None:
            p.xadd(self.keys.summaries(sid), encode_entry(summary), id=summary.entry_id, maxlen=self.history_len)
            self._index(p, sid, EntryKind.SUMMARY, summary.entry_id, summary)
            p.hset(self.keys.state(sid), STATE_SUMMARY, summary.to_json())
            self._refresh_ttl(p, sid)

        return self._submit(_Op(sid, "window", build, entry=(self.keys.summaries(sid), summary.entry_id)))

    def publish_status(self, status: StreamStatus) -> PublishResult:
        """Replace the stream's status hash (its `offline_dropped` counter is kept)."""
        sid = status.stream
        self._statuses[sid] = status

        def build(p: Pipeline) -> None:
            p.hset(self.keys.status(sid), mapping=encode_hash(status, STATUS_FLAT))
            self._refresh_ttl(p, sid)
            if self.notify:
                p.publish(self.keys.notify(sid), Notification(kind=NotificationKind.STATUS, stream=sid).to_json())

        return self._submit(_Op(sid, "status", build))

    def register_stream(self, info: StreamInfo) -> StreamInfo:
        """Add or update a stream in the registry and return it with its `run` set.

        `info.run == 0` starts a new run: above the current time and above every entry id the
        stream already has, so earlier runs' entries never block the new ones. A non-zero `run`
        (an actor resuming its stream) is kept, which keeps re-published windows idempotent.
        """
        sid = info.id
        if info.run == 0:
            info = info.model_copy(update={"run": self._new_run(sid)})

        def build(p: Pipeline) -> None:
            p.hset(self.keys.registry, sid, info.to_json())
            self._refresh_ttl(p, sid)

        self._registered[sid] = info
        self._submit(_Op(sid, "registry", build))
        return info

    def unregister_stream(self, stream_id: str) -> PublishResult:
        """Remove a stream from the registry; its keys expire after `removed_ttl_s`."""
        self._registered.pop(stream_id, None)
        self._statuses.pop(stream_id, None)

        def build(p: Pipeline) -> None:
            p.hdel(self.keys.registry, stream_id)
            self._index_keys(p, stream_id, "expire", self.removed_ttl_s)
            for key in self.keys.per_stream(stream_id):
                p.expire(key, self.removed_ttl_s)
            if self.notify:
                p.publish(
                    self.keys.notify(stream_id), Notification(kind=NotificationKind.REMOVED, stream=stream_id).to_json()
                )

        return self._submit(_Op(stream_id, "registry", build))

    def prune_registry(self) -> list[str]:
        """Drop the registry entries of streams whose keys have all expired: nothing was written
        to them for `key_ttl_s` (an ended stream of an earlier run). Returns their ids."""
        if not self.key_ttl_s:
            return []
        cutoff = time.time() - self.key_ttl_s
        pruned = []
        for sid, raw in self.redis.hgetall(self.keys.registry).items():
            try:
                registered_at = StreamInfo.model_validate_json(raw).registered_at
            except ValueError:
                registered_at = 0.0  # unreadable: goes once its keys are gone
            if registered_at < cutoff and not self.redis.exists(*self.keys.per_stream(sid)):
                self.redis.hdel(self.keys.registry, sid)
                pruned.append(sid)
        return pruned

    def forget_stream(self, stream_id: str) -> int:
        """Delete the stream's keys and registry entry now (a restart from scratch); returns
        how many keys existed. Needs Redis: raises when it is unreachable."""
        pipe = self.redis.pipeline(transaction=True)
        self._index_keys(pipe, stream_id, "delete")
        pipe.delete(*self.keys.per_stream(stream_id))
        pipe.hdel(self.keys.registry, stream_id)
        _, deleted, _ = pipe.execute()
        return int(deleted)

    def flush(self) -> bool:
        """Try to write everything buffered now. True if the buffer is empty afterwards."""
        with self._lock:
            self._next_try = 0.0
            return self._drain()

    def maintain(self) -> None:
        """Flush the buffer if Redis answers again, then write back the registry entries and
        statuses this publisher wrote that Redis no longer has. Never raises for an
        unreachable Redis (the next call tries again)."""
        try:
            if self._buffer or self._pending_drops or not self.stats.online:
                self.redis.ping()  # outside the lock: writers never wait on this probe
                with self._lock:
                    if not self.flush():
                        return
            self._restore()
        except UNREACHABLE:
            pass  # still down: the write path logged the outage when it began

    def _maintain_every(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.maintain()
            except Exception:  # a refused write (PublishError...) must not end the thread
                log.exception("publisher maintenance failed")

    def _restore(self) -> None:
        registered, statuses = dict(self._registered), dict(self._statuses)
        if not registered and not statuses:
            return
        ids = sorted(set(registered) | set(statuses))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.registry, ids)
        for sid in ids:
            pipe.exists(self.keys.status(sid))
        in_registry, *status_exists = pipe.execute()
        present = {sid for sid, raw in zip(ids, in_registry) if raw is not None}
        lost_registry = [registered[sid] for sid in ids if sid in registered and sid not in present]
        # Only statuses of registered streams: a stream removed elsewhere stays removed.
        lost_status = [statuses[sid] for sid, exists in zip(ids, status_exists)
                       if sid in statuses and not exists and (sid in present or sid in registered)]
        if not lost_registry and not lost_status:
            return
        pipe = self.redis.pipeline(transaction=True)
        for info in lost_registry:
            pipe.hsetnx(self.keys.registry, info.id, info.to_json())
            self._refresh_ttl(pipe, info.id)
        for status in lost_status:
            flat = [x for pair in encode_hash(status, STATUS_FLAT).items() for x in pair]
            self._set_if_missing(keys=[self.keys.status(status.stream)], args=flat, client=pipe)
            self._refresh_ttl(pipe, status.stream)
        pipe.execute()
        log.warning("Redis had lost %d registry entries and %d statuses (restarted without persistence?); "
                    "written again", len(lost_registry), len(lost_status))

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        """Stop the maintenance thread, try a last flush, then close the connection pool."""
        self._closed.set()
        if self._maintainer is not None and self._maintainer is not threading.current_thread():
            self._maintainer.join(timeout=10)
        try:
            if self._buffer:
                self.flush()
        finally:
            self.redis.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _index(self, p: Pipeline, sid: str, kind: EntryKind, entry_id: str,
               entry: Answer | Caption | Event | Summary) -> None:
        """The entry's search postings, after its XADD in the same transaction (connectors.search)."""
        indexed = IndexedEntry(kind, entry_id, entry_text(kind, entry), entry_time(kind, entry))
        index_commands(self._index_entry, p, self.keys, sid, indexed, self.key_ttl_s)

    def _index_keys(self, p: Pipeline, sid: str, action: str, seconds: int = 0) -> None:
        """Expire or delete every hour key of the stream's search index with its other keys."""
        self._index_lifetime(keys=[self.keys.index_hours(sid, kind) for kind in EntryKind],
                             args=[action, seconds], client=p)

    def _refresh_ttl(self, p: Pipeline, sid: str) -> None:
        for key in self.keys.per_stream(sid):
            if self.key_ttl_s:
                p.expire(key, self.key_ttl_s)
            else:
                p.persist(key)

    def _new_run(self, sid: str) -> int:
        floor = int(time.time() * 1000)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in (self.keys.captions(sid), self.keys.answers(sid), self.keys.events(sid)):
                pipe.xrevrange(key, count=1)
            for top in pipe.execute():
                if top:
                    floor = max(floor, int(top[0][0].split("-")[0]) + 1)
        except UNREACHABLE:
            pass  # offline: the clock alone; a clash is reported as duplicates, never overwritten
        return floor

    def _submit(self, op: _Op) -> PublishResult:
        with self._lock:
            if op.kind == "status":  # only the newest status of a stream is worth keeping
                self._buffer = deque(o for o in self._buffer if not (o.kind == "status" and o.stream == op.stream))
            self._buffer.append(op)
            if not self._drain():
                self._enforce_bound()
                return PublishResult.BUFFERED
            return self._last_result

    def _drain(self) -> bool:
        """Write buffered ops in order; stop at the first connection failure."""
        if not self._buffer and not self._pending_drops:
            return True
        if not self.stats.online and time.monotonic() < self._next_try:
            return False
        try:
            while self._buffer:
                op = self._buffer[0]
                try:
                    self._last_result = self._execute(op)
                except PublishError:
                    self._buffer.popleft()  # can never succeed: do not let it block the rest
                    raise
                self._buffer.popleft()
                self.stats.flushed += op.waited
            if self._pending_drops:
                self._write_drop_counts()
        except UNREACHABLE as exc:
            for queued in self._buffer:
                queued.waited = True
            if self.stats.online:
                log.warning("Redis unreachable, buffering writes (%d queued): %s", len(self._buffer), exc)
                self.stats.offline_since = time.time()
            self._next_try = time.monotonic() + self.reconnect_interval_s
            return False
        if self.stats.offline_since is not None:
            log.info("Redis reachable again after %.1f s; buffer flushed", time.time() - self.stats.offline_since)
            self.stats.offline_since = None
        return True

    def _execute(self, op: _Op) -> PublishResult:
        pipe = self.redis.pipeline(transaction=True)
        op.build(pipe)
        results = pipe.execute(raise_on_error=False)
        errors = [r for r in results if isinstance(r, Exception)]
        duplicate = any(_DUPLICATE in str(e) for e in errors)
        real = [e for e in errors if _DUPLICATE not in str(e)]
        if real:
            raise PublishError(f"Redis refused a write for stream {op.stream!r}: {real[0]}")
        self.stats.published += 1
        if not duplicate:
            return PublishResult.PUBLISHED
        # Redis says "not above the top": either this very window is there already, or a newer
        # one was published first (windows of a stream must be published in order).
        if op.entry is None or self.redis.xrange(op.entry[0], op.entry[1], op.entry[1], count=1):
            self.stats.duplicates += 1
            return PublishResult.DUPLICATE
        self.stats.out_of_order += 1
        log.warning("window %s of %s refused: a newer window was published first", op.entry[1], op.stream)
        return PublishResult.OUT_OF_ORDER

    def _enforce_bound(self) -> None:
        while len(self._buffer) > self.buffer_size:
            victim = next((o for o in self._buffer if o.kind == "window"), self._buffer[0])
            self._buffer.remove(victim)
            self.stats.overflowed += 1
            self.stats.overflowed_by_stream[victim.stream] += 1
            self._pending_drops[victim.stream] += 1
            log.warning("publish buffer full (%d): dropped the oldest write of %s", self.buffer_size, victim.stream)

    def _write_drop_counts(self) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for sid, n in self._pending_drops.items():
            pipe.hincrby(self.keys.status(sid), OFFLINE_DROPPED, n)
            self._refresh_ttl(pipe, sid)
        pipe.execute()
        self._pending_drops.clear()


def patch_status(redis: Redis, sid: str, change: Callable[[StreamStatus], dict],
                 keys: Keys = DEFAULT_KEYS) -> StreamStatus | None:
    """Write some fields (`change` of the status Redis holds) over a stream's status, keeping the
    rest: the ingest's own side while the stream's model worker, which publishes the whole
    status, is gone. Nothing is written where Redis holds no status (the stream was never
    published, or was removed). Returns the status written, or None."""
    key = keys.status(sid)

    def patch(p: Pipeline) -> StreamStatus | None:
        raw = p.hget(key, DATA)
        if raw is None:
            return None
        held = StreamStatus.model_validate_json(raw)
        status = held.model_copy(update=change(held))
        p.multi()
        p.hset(key, mapping=encode_hash(status, STATUS_FLAT))
        p.publish(keys.notify(sid), Notification(kind=NotificationKind.STATUS, stream=sid).to_json())
        return status

    return redis.transaction(patch, key, value_from_callable=True)
