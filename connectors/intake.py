"""Reading requests from Redis intake streams: ad-hoc questions and stream control messages.

Delivery is at least once, replies exactly once:
1. `poll()` reads new entries with XREADGROUP (a consumer group shared by all workers);
2. the worker answers, `reply()` writes the one reply (SET NX on `sfs:answer:{id}` guards
   it; only the winner RPUSHes to `reply_to`), then `ack()` (XACK);
3. `reclaim()` takes over entries another worker left unacked for `min_idle_ms` (XAUTOCLAIM);
   an entry delivered more than `max_deliveries` times goes to the dead-letter stream with an
   error reply instead of being retried forever.
Malformed entries (bad JSON, missing fields, oversize, unknown stream) are never returned for
processing: they get an error reply, a dead-letter record and an XACK right away, so they
cannot block the intake. Entries are decoded only as JSON through pydantic.

An unreachable Redis raises redis-py's ConnectionError/TimeoutError from the calls (the caller
retries); a Redis that came back empty gets its stream and consumer group created again by the
next poll() or reclaim().
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

import redis

from .redis_conn import block_ms as capped_block_ms
from .redis_conn import UNREACHABLE, connect
from .redis_schema import (
    CONTROL_GROUP,
    DATA,
    DEFAULT_KEYS,
    MAX_MESSAGE_BYTES,
    QUESTION_GROUP,
    QUESTION_ID_RE,
    Answer,
    Control,
    ControlAction,
    ControlReply,
    InvalidMessage,
    Keys,
    Question,
    check_reply_to,
    decode_entry,
)

log = logging.getLogger(__name__)

R = TypeVar("R", Question, Control)

# Sets the guard and pushes the reply only if nobody replied before: one atomic step, so a
# crash between "reply" and "ack" or two workers racing on a reclaimed entry cannot produce a
# second reply.
_REPLY_ONCE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


@dataclass(slots=True)
class IntakeStats:
    received: int = 0  # entries delivered to this consumer (new and reclaimed)
    invalid: int = 0  # rejected as malformed
    reclaimed: int = 0  # taken over from another consumer
    dead_lettered: int = 0  # given up after max_deliveries
    already_replied: int = 0  # delivered again after a reply was written: acked, skipped
    replies: int = 0  # replies this consumer wrote


class _GroupIntake(Generic[R]):
    """Consumer-group mechanics shared by the question and control intakes."""

    model: type[R]
    group: str

    def __init__(
        self,
        redis_url: str,
        consumer_name: str,
        *,
        keys: Keys = DEFAULT_KEYS,
        max_deliveries: int = 3,
        min_idle_ms: int = 60_000,
        reply_ttl_s: int = 3600,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        dead_maxlen: int = 10_000,
    ) -> None:
        """`min_idle_ms` must exceed the worst-case time to answer one entry, or entries still
        being worked on are taken over (and answered twice, though replied to once)."""
        self.keys = keys
        self.consumer = consumer_name
        self.stream_key = self._stream_key(keys)
        self.dead_key = keys.dead(self.stream_key)
        self.max_deliveries = max_deliveries
        self.min_idle_ms = min_idle_ms
        self.reply_ttl_s = reply_ttl_s
        self.max_message_bytes = max_message_bytes
        self.dead_maxlen = dead_maxlen
        self.stats = IntakeStats()
        self.redis = connect(redis_url, client_name=f"sfs-intake-{consumer_name}")
        self._reply_script = self.redis.register_script(_REPLY_ONCE)
        self._cursor = "0-0"
        try:
            self.ensure_group()
        except UNREACHABLE:
            pass  # created by the first poll() once Redis answers

    # ------------------------------------------------------------------ group plumbing

    def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (from the start: nothing lost)."""
        try:
            self.redis.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self, block_ms: int = 1000, count: int = 10) -> list[tuple[str, R | InvalidMessage]]:
        """New entries for this consumer, waiting up to `block_ms` (capped below the socket
        timeout). Invalid ones come back as InvalidMessage, already replied to and acked."""
        try:
            resp = self.redis.xreadgroup(
                self.group, self.consumer, {self.stream_key: ">"}, count=count, block=capped_block_ms(block_ms / 1000)
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # gone under us: a restart without persistence, a FLUSHDB
            self._cursor = "0-0"
            return []
        entries = resp[0][1] if resp else []
        self.stats.received += len(entries)
        return self._accept(entries)

    def reclaim(self, min_idle_ms: int | None = None, count: int = 10) -> list[tuple[str, R | InvalidMessage]]:
        """Take over entries pending longer than `min_idle_ms` in any consumer (XAUTOCLAIM).

        Entries already delivered more than `max_deliveries` times are dead-lettered with an
        error reply instead of being returned.
        """
        idle = self.min_idle_ms if min_idle_ms is None else min_idle_ms
        try:
            cursor, entries, *deleted = self.redis.xautoclaim(
                self.stream_key, self.group, self.consumer, min_idle_time=idle, start_id=self._cursor, count=count
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            self._cursor = "0-0"
            return []
        self._cursor = cursor
        for entry_id in deleted[0] if deleted else ():
            # trimmed away while pending (Redis drops it from the PEL): nothing left to answer
            log.error("%s entry %s was trimmed before it was answered", self.stream_key, entry_id)
        if not entries:
            return []
        self.stats.received += len(entries)
        self.stats.reclaimed += len(entries)
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self.stream_key, self.group, entry_id, entry_id, 1, consumername=self.consumer)
        deliveries = {rows[0]["message_id"]: rows[0]["times_delivered"] for rows in pipe.execute() if rows}
        keep = []
        for entry_id, fields in entries:
            times = deliveries.get(entry_id, 0)
            if times > self.max_deliveries:
                self._dead_letter(entry_id, fields, times)
            else:
                keep.append((entry_id, fields))
        return self._accept(keep)

    def ack(self, *entry_ids: str) -> int:
        """XACK: the entries are done (reply written). Returns how many were pending."""
        return self.redis.xack(self.stream_key, self.group, *entry_ids) if entry_ids else 0

    def pending(self) -> int:
        """How many entries the group has delivered and not yet acked (all consumers)."""
        return int(self.redis.xpending(self.stream_key, self.group)["pending"])

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> _GroupIntake[R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ validation

    def _accept(self, entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, R | InvalidMessage]]:
        out: list[tuple[str, R | InvalidMessage]] = []
        valid: list[tuple[str, R]] = []
        for entry_id, fields in entries:
            item = self._parse(entry_id, fields)
            if isinstance(item, InvalidMessage):
                self._reject(item, fields)
                out.append((entry_id, item))
            else:
                valid.append((entry_id, item))
        if not valid:
            return out
        # Delivered again after its reply was written (crash between reply and ack, or a
        # producer retry with the same id): finish it instead of redoing the work.
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, msg in valid:
            pipe.exists(self.keys.done(msg.id or entry_id))
        for (entry_id, msg), done in zip(valid, pipe.execute(), strict=True):
            if done:
                self.stats.already_replied += 1
                self.ack(entry_id)
            else:
                out.append((entry_id, msg))
        return out

    def _parse(self, entry_id: str, fields: dict[str, str]) -> R | InvalidMessage:
        size = sum(len(k) + len(v) for k, v in fields.items())
        if size > self.max_message_bytes:
            return self._invalid(entry_id, None, f"message too large: {size} bytes > {self.max_message_bytes}")
        try:
            msg = decode_entry(self.model, fields)
        except ValueError as exc:
            return self._invalid(entry_id, fields.get(DATA), f"malformed {self.model.__name__.lower()}: {exc}")
        msg = msg.model_copy(
            update={"id": msg.id or entry_id, "reply_to": msg.reply_to or self.keys.reply(msg.id or entry_id)}
        )
        try:
            check_reply_to(self.keys, msg.reply_to)
        except ValueError as exc:
            return self._invalid(entry_id, None, str(exc), message_id=msg.id)
        reason = self._check(msg)
        return self._invalid(entry_id, None, reason, message_id=msg.id, reply_to=msg.reply_to) if reason else msg

    @staticmethod
    def _stream_key(keys: Keys) -> str:
        raise NotImplementedError

    def _check(self, msg: R) -> str | None:
        """Extra checks beyond the schema; a reason string rejects the message."""
        return None

    def _invalid(
        self, entry_id: str, raw: str | None, reason: str, *, message_id: str | None = None, reply_to: str | None = None
    ) -> InvalidMessage:
        """Work out where the error reply goes: the message's own id/reply_to as far as they
        can be read and are safe, else the entry id's default reply key."""
        if raw is not None and message_id is None:
            try:
                loose = json.loads(raw)
            except ValueError:
                loose = None
            if isinstance(loose, dict):
                cand = loose.get("id")
                message_id = cand if isinstance(cand, str) and QUESTION_ID_RE.match(cand) else None
                cand = loose.get("reply_to")
                try:
                    reply_to = check_reply_to(self.keys, cand) if isinstance(cand, str) else None
                except ValueError:
                    reply_to = None
        message_id = message_id or entry_id
        return InvalidMessage(
            entry_id=entry_id, reason=reason, message_id=message_id, reply_to=reply_to or self.keys.reply(message_id)
        )

    def _reject(self, invalid: InvalidMessage, fields: dict[str, str]) -> None:
        self.stats.invalid += 1
        log.warning("rejected %s entry %s: %s", self.stream_key, invalid.entry_id, invalid.reason)
        self._write_reply(invalid.message_id, invalid.reply_to, self._error_payload(invalid))
        self._record_dead(invalid.entry_id, fields, invalid.reason, deliveries=1)
        self.ack(invalid.entry_id)

    def _dead_letter(self, entry_id: str, fields: dict[str, str], times: int) -> None:
        self.stats.dead_lettered += 1
        reason = f"gave up after {times - 1} deliveries without an answer"
        log.error("dead-lettered %s entry %s: %s", self.stream_key, entry_id, reason)
        item = self._parse(entry_id, fields)
        if isinstance(item, InvalidMessage):
            invalid = item.model_copy(update={"reason": reason})
        else:
            invalid = InvalidMessage(entry_id=entry_id, reason=reason, message_id=item.id, reply_to=item.reply_to)
        self._write_reply(invalid.message_id, invalid.reply_to, self._error_payload(invalid))
        self._record_dead(entry_id, fields, reason, deliveries=times)
        self.ack(entry_id)

    def _record_dead(self, entry_id: str, fields: dict[str, str], reason: str, deliveries: int) -> None:
        raw = fields.get(DATA, "")
        self.redis.xadd(
            self.dead_key,
            {
                "entry_id": entry_id,
                "reason": reason,
                "deliveries": str(deliveries),
                "consumer": self.consumer,
                DATA: raw[: self.max_message_bytes],
            },
            maxlen=self.dead_maxlen,
            approximate=True,
        )

    # ------------------------------------------------------------------ replies

    def _write_reply(self, message_id: str | None, reply_to: str | None, payload: str) -> bool:
        if not message_id or not reply_to:
            return False
        won = bool(self._reply_script(keys=[self.keys.done(message_id), reply_to], args=[payload, self.reply_ttl_s]))
        self.stats.replies += won
        return won

    def _error_payload(self, invalid: InvalidMessage) -> str:
        raise NotImplementedError


class QuestionIntake(_GroupIntake[Question]):
    """Ad-hoc questions from `sfs:questions` (consumer group `answerers`).

    >>> intake = QuestionIntake(url, "worker-1")
    >>> for entry_id, q in intake.poll(block_ms=1000):
    ...     if isinstance(q, InvalidMessage): continue       # already answered with an error
    ...     intake.complete(entry_id, q, Answer(question_id=q.id, stream=q.stream, text="..."))
    """

    model = Question
    group = QUESTION_GROUP

    @staticmethod
    def _stream_key(keys: Keys) -> str:
        return keys.questions

    def _check(self, msg: Question) -> str | None:
        if not self.redis.hexists(self.keys.registry, msg.stream):
            return f"unknown stream {msg.stream!r}"
        return None

    def reply(self, question: Question, answer: Answer) -> bool:
        """Write the reply to `question`. True if it was the first (the one that counts);
        False if the question had already been replied to."""
        if answer.question_id != question.id:
            answer = answer.model_copy(update={"question_id": question.id})
        return self._write_reply(question.id, question.reply_to, answer.to_json())

    def reply_error(self, question: Question, error: str) -> bool:
        """Reply with an error (e.g. the stream has no window yet, the model failed)."""
        return self.reply(
            question, Answer(question_id=question.id or "", stream=question.stream, question=question.text, error=error)
        )

    def complete(self, entry_id: str, question: Question, answer: Answer) -> bool:
        """reply() then ack(): the usual end of handling one question."""
        first = self.reply(question, answer)
        self.ack(entry_id)
        return first

    def _error_payload(self, invalid: InvalidMessage) -> str:
        return Answer(question_id=invalid.message_id or invalid.entry_id, error=invalid.reason).to_json()


class ControlIntake(_GroupIntake[Control]):
    """Add/remove-stream requests from `sfs:control` (consumer group `controllers`)."""

    model = Control
    group = CONTROL_GROUP

    @staticmethod
    def _stream_key(keys: Keys) -> str:
        return keys.control

    def _check(self, msg: Control) -> str | None:
        if msg.action is ControlAction.ADD and not msg.source:
            return "add needs a source URI"
        return None

    def reply(self, control: Control, error: str | None = None) -> bool:
        """Tell the requester the outcome (error=None means done)."""
        payload = ControlReply(request_id=control.id or "", stream=control.stream, action=control.action, error=error)
        return self._write_reply(control.id, control.reply_to, payload.to_json())

    def complete(self, entry_id: str, control: Control, error: str | None = None) -> bool:
        first = self.reply(control, error)
        self.ack(entry_id)
        return first

    def _error_payload(self, invalid: InvalidMessage) -> str:
        return ControlReply(request_id=invalid.message_id or invalid.entry_id, error=invalid.reason).to_json()
