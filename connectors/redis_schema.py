"""The Redis contract: key layout, entry-id rules and message formats (pydantic v2, JSON).

Everything that reads or writes Redis (publisher, intake, client, the pipeline) takes its
key names and message shapes from here, so the layout lives in exactly one place and the
README documents it for downstream consumers.

Stream entries carry one field, `data`, holding the JSON of a model below. Hashes carry a
`data` field with the model's JSON plus flat copies of a few fields for redis-cli users;
`data` is authoritative. Nothing read from Redis is ever unpickled or evaluated: values are
decoded with `json` through pydantic validation only.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.validation import describe_validation_error

from .redact import redact_text, redact_uri

DATA = "data"  # the one field of every stream entry, and the authoritative hash field
# Status hash field counting writes the publisher dropped while Redis was unreachable. It is
# HINCRBY'd by whichever process dropped them, so it lives beside `data`, not inside it.
OFFLINE_DROPPED = "offline_dropped"

# Stream ids end up inside key names between braces (Redis Cluster hash tags), so no braces,
# colons, spaces or glob characters.
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Question ids end up inside `{...}` of reply keys.
QUESTION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,79}$")

# Producers XADD requests with MAXLEN ~ this, so the intake streams stay bounded; only a
# backlog this deep could trim an entry before a worker reads it.
INTAKE_MAXLEN = 10_000
# The longest question the pipeline accepts, ad-hoc or standing: its one limit. The model has a
# higher bound of its own (model.prompt.MAX_PROMPT_CHARS), for every prompt it is given.
MAX_QUESTION_CHARS = 2000
MAX_MESSAGE_BYTES = 16 * 1024  # a raw question/control entry larger than this is refused
# Pictures: the latest frame of each stream and a snapshot per event window, as JPEG bytes in
# the `JPEG` field (binary: read it with a client that does not decode responses).
JPEG = "jpeg"
FRAME_MAX_SIDE = 576  # px of the longer side; the model's input size, so usually no resize
FRAME_JPEG_QUALITY = 80
SNAPSHOTS_MAXLEN = 500  # event snapshots kept per stream (XADD MAXLEN ~), about 50 KB each


def check_stream_id(value: str, what: str = "stream id") -> str:
    """Return `value` if it is a valid stream id, else raise ValueError naming it (as `what`)."""
    if not isinstance(value, str) or not STREAM_ID_RE.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 of letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return value


StreamId = Annotated[str, AfterValidator(check_stream_id)]


def check_message_id(value: str) -> str:
    if not QUESTION_ID_RE.match(value):
        raise ValueError(f"invalid message id {value!r}: 1-80 of letters, digits, '_', '.', ':', '-'")
    return value


MessageId = Annotated[str, AfterValidator(check_message_id)]


def safe_stream_id(name: str) -> str:
    """A valid stream id made from free text (e.g. a file stem): other characters become '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", name).strip("_.-")[:64]
    return cleaned or "stream"


class EntryKind(StrEnum):
    """The kinds of history entries that are searched."""

    CAPTION = "caption"
    ANSWER = "answer"
    EVENT = "event"
    SUMMARY = "summary"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names. `prefix` is `sfs` in production; tests may isolate themselves with another.

    Per-stream keys carry the stream id as a hash tag (`{sid}`) so one stream's keys share a
    Redis Cluster slot and can be written in one MULTI.
    """

    prefix: str = "sfs"

    def captions(self, sid: str) -> str:
        """Stream: caption history, capped with MAXLEN ~."""
        return f"{self.prefix}:{{{sid}}}:captions"

    def answers(self, sid: str) -> str:
        """Stream: every answer produced on this stream's windows (standing and ad-hoc)."""
        return f"{self.prefix}:{{{sid}}}:answers"

    def events(self, sid: str) -> str:
        """Stream: standing-question triggers."""
        return f"{self.prefix}:{{{sid}}}:events"

    def open_events(self, sid: str) -> str:
        """Hash: event id -> the open event's latest record (Event JSON); removed when it closes."""
        return f"{self.prefix}:{{{sid}}}:events:open"

    def acks(self, sid: str) -> str:
        """Hash: event id -> its acknowledgement (EventAck JSON)."""
        return f"{self.prefix}:{{{sid}}}:events:acks"

    def undelivered(self, sid: str) -> str:
        """Stream: event notifications given up on (Undelivered JSON), capped."""
        return f"{self.prefix}:{{{sid}}}:events:undelivered"

    def summaries(self, sid: str) -> str:
        """Stream: rolling summaries and the final summary of a file, capped."""
        return f"{self.prefix}:{{{sid}}}:summaries"

    def state(self, sid: str) -> str:
        """Hash: the latest window's caption and answers, and the latest summary."""
        return f"{self.prefix}:{{{sid}}}:state"

    def status(self, sid: str) -> str:
        """Hash: ingest/processing status of the stream."""
        return f"{self.prefix}:{{{sid}}}:status"

    def frame(self, sid: str) -> str:
        """Hash: the newest window's last frame: `jpeg` (JPEG bytes), `data` (FrameInfo JSON)."""
        return f"{self.prefix}:{{{sid}}}:frame"

    def snapshots(self, sid: str) -> str:
        """Stream: `jpeg` of an event's window, entry id = the window's entry id; capped."""
        return f"{self.prefix}:{{{sid}}}:snapshots"

    def entries(self, sid: str, kind: EntryKind | str) -> str:
        """The stream of entries of one kind (captions, answers, events, summaries)."""
        by_kind = {EntryKind.CAPTION: self.captions, EntryKind.ANSWER: self.answers, EntryKind.EVENT: self.events,
                   EntryKind.SUMMARY: self.summaries}
        return by_kind[EntryKind(kind)](sid)

    def index_hours(self, sid: str, kind: EntryKind | str) -> str:
        """Sorted set: the hours the search index of one kind holds, scored by when each hour's TTL was set."""
        return f"{self.prefix}:{{{sid}}}:ix:{EntryKind(kind).value}"

    def index_hour(self, sid: str, kind: EntryKind | str, hour: int | str) -> str:
        """Hash: one hour's postings of one kind, term -> connectors.search postings (hour: unix s // 3600)."""
        return f"{self.index_hours(sid, kind)}:{hour}"

    def index_terms(self, sid: str, kind: EntryKind | str) -> str:
        """Sorted set (all scores 0, so in byte order): every term of one kind the search index has held."""
        return f"{self.index_hours(sid, kind)}:terms"

    def index_last(self, sid: str, kind: EntryKind | str) -> str:
        """String: the id of the last entry of one kind the search index holds (8 bytes, big-endian)."""
        return f"{self.index_hours(sid, kind)}:last"

    def per_stream(self, sid: str) -> tuple[str, ...]:
        """The stream's fixed keys (the search index's hour keys are named by the index_hours sets)."""
        return (self.captions(sid), self.answers(sid), self.events(sid), self.open_events(sid), self.acks(sid),
                self.undelivered(sid),
                self.summaries(sid), self.state(sid), self.status(sid), self.frame(sid), self.snapshots(sid),
                *(self.index_hours(sid, kind) for kind in EntryKind))

    @property
    def registry(self) -> str:
        """Hash: stream id -> StreamInfo JSON."""
        return f"{self.prefix}:streams"

    @property
    def questions(self) -> str:
        """Stream with consumer group `answerers`: ad-hoc questions."""
        return f"{self.prefix}:questions"

    @property
    def control(self) -> str:
        """Stream with consumer group `controllers`: add/remove stream requests."""
        return f"{self.prefix}:control"

    def dead(self, intake_key: str) -> str:
        """Stream: entries of an intake stream given up on (malformed or delivered too often)."""
        return f"{intake_key}:dead"

    def done(self, message_id: str) -> str:
        """String, SET NX EX: the one reply to a question/control message; guards duplicates."""
        return f"{self.prefix}:answer:{{{message_id}}}"

    def reply(self, message_id: str) -> str:
        """List: default reply_to; the reply is RPUSHed once, the asker BLPOPs."""
        return f"{self.prefix}:reply:{{{message_id}}}"

    @property
    def reply_prefix(self) -> str:
        """A reply_to named by an asker must start with this, so workers only write there."""
        return f"{self.prefix}:reply:"

    def notify(self, sid: str) -> str:
        """Pub/sub channel: small Notification JSON for each caption, event and status."""
        return f"{self.prefix}:notify:{sid}"

    @property
    def notify_pattern(self) -> str:
        return f"{self.prefix}:notify:*"


DEFAULT_KEYS = Keys()  # frozen, so one shared instance is safe as a default argument

QUESTION_GROUP = "answerers"
CONTROL_GROUP = "controllers"


def window_entry_id(run: int, window: int, index: int = 0) -> str:
    """Explicit stream entry id for the `index`-th entry of a window.

    `<run + window>-<index>`: `run` is the stream run's start in ms since the epoch, so ids read
    as (roughly) timestamps, grow with the window, and a retried publish of the same window
    reproduces the same id, which Redis rejects instead of duplicating. A new run of a stream
    must start above the previous run's last id (Publisher.register_stream ensures it).
    """
    return f"{run + window}-{index}"


def now() -> float:
    return time.time()


class Model(BaseModel):
    """Base: immutable, JSON in and out. Unknown fields are ignored, so consumers keep working
    when a newer pipeline adds fields; requests (Question, Control) refuse them instead."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


M = TypeVar("M", bound=Model)


class Caption(Model):
    """The caption of one window."""

    stream: StreamId
    window: int = Field(ge=0, description="window sequence number within the run")
    run: int = Field(ge=1, description="run start, ms since the epoch (see window_entry_id)")
    start: float = Field(description="stream time of the first frame, seconds")
    end: float = Field(description="stream time of the last frame, seconds")
    wall_start: float = Field(description="wall-clock capture time of the first frame, unix s")
    wall_end: float = Field(description="wall-clock capture time of the last frame, unix s")
    text: str
    model: str = ""
    prompt: str | None = None
    latency_s: float | None = Field(default=None, description="window closed -> result ready")
    error: str | None = Field(
        default=None, description="set when the model failed on this window twice: `text` is empty, the "
        "window is counted in `windows_failed`, never in `windows_done`",
    )
    unchanged_since_window: int | None = Field(
        default=None, description="set when the scene gate found this window unchanged: the model did not run, "
        "and `text` is the caption of this earlier window",
    )
    unchanged_since: float | None = Field(
        default=None, description="wall-clock end of that earlier window, unix s: when the caption dates from"
    )
    created_at: float = Field(default_factory=now)

    @property
    def entry_id(self) -> str:
        return window_entry_id(self.run, self.window)


class SummaryKind(StrEnum):
    ROLLING = "rolling"  # the captions since the previous summary, given that summary
    PARTIAL = "partial"  # an inner node of a file's final summary (not published)
    FINAL = "final"  # the whole file


# State-hash field holding the latest Summary JSON.
STATE_SUMMARY = "summary"


class Summary(Model):
    """A summary of windows first_window..last_window (`sfs:{sid}:summaries`)."""

    stream: StreamId
    run: int = Field(ge=1)
    seq: int = Field(ge=0, description="number of this summary within the run's summaries of its kind")
    kind: SummaryKind
    level: int = Field(default=0, ge=0, description="0: over captions; n: over level n-1 summaries")
    first_window: int = Field(ge=0)
    last_window: int = Field(ge=0)
    start: float = Field(description="stream time of the first window's first frame, seconds")
    end: float = Field(description="stream time of the last window's last frame, seconds")
    text: str
    model: str = ""
    created_at: float = Field(default_factory=now)

    @property
    def entry_id(self) -> str:
        """Rolling summaries are ordered by their last window; the final one comes after the
        last rolling summary, which ends at the same window."""
        return window_entry_id(self.run, self.last_window, 1 if self.kind == SummaryKind.FINAL else 0)


class AnswerKind(StrEnum):
    STANDING = "standing"
    ADHOC = "adhoc"
    HISTORY = "history"  # the reply to a question about a time range (QuestionKind.HISTORY)
    REPORT = "report"  # the reply to a report request (QuestionKind.REPORT)


class Hit(Model):
    """One history entry found by a search, or drawn on by an answer about the past."""

    stream: StreamId
    kind: EntryKind
    entry_id: str = Field(description="its id in the kind's stream (sfs:{sid}:captions, ...)")
    window: int | None = Field(default=None, description="its window; a summary's last window")
    first_window: int | None = Field(default=None, description="a summary's first window")
    window_entry_id: str | None = Field(default=None, description="the entry id of its window (pictures)")
    start: float | None = Field(default=None, description="stream time, seconds")
    end: float | None = None
    wall_time: float = Field(description="when it happened, unix s: the window's capture end; a summary's creation")
    text: str
    question: str | None = Field(default=None, description="an answer's or event's question")
    score: float = 0.0
    picture_key: str | None = Field(default=None, description="where the window's JPEG is, while Redis holds it")
    picture_id: str | None = None


class EventSpan(Model):
    """A standing question's events in a row: opened at its first window, closed after its last."""

    question_id: str
    question: str
    first_window: int
    last_window: int
    windows: int = Field(description="windows that fired")
    start: float = Field(description="stream time of the first window's start, seconds")
    end: float = Field(description="stream time of the last window's end, seconds")
    opened: float = Field(description="wall-clock end of the first window, unix s")
    closed: float = Field(description="wall-clock end of the last window, unix s")
    text: str = Field(description="the answer that opened it")
    picture_key: str | None = None
    picture_id: str | None = None


class Report(Model):
    """A stream's report on a wall-clock range (the reply to QuestionKind.REPORT, with its Markdown
    in Answer.text)."""

    stream: StreamId
    start: float | None = None
    end: float | None = None
    captions: int = Field(description="captions of the range the summary was built from")
    first_window: int | None = None
    last_window: int | None = None
    summary: str = ""
    events: list[EventSpan] = Field(default_factory=list)
    pictures: list[Hit] = Field(default_factory=list, description="windows of the range whose picture Redis holds")


class Answer(Model):
    """An answer to a question on one window, or the error reply to a question.

    This is both the entry of `sfs:{sid}:answers` and the reply an asker receives.
    """

    question_id: str
    stream: str | None = None  # as asked: may be the invalid id an error reply is about
    question: str | None = None
    kind: AnswerKind = AnswerKind.ADHOC
    window: int | None = None
    start: float | None = None
    end: float | None = None
    text: str | None = None
    probability: float | None = Field(default=None, ge=0.0, le=1.0, description="P(yes)")
    error: str | None = None
    model: str | None = None
    sources: list[Hit] | None = Field(default=None, description="history: the entries the answer drew on")
    report: Report | None = Field(default=None, description="report: its parts (text is its Markdown)")
    answered_at: float = Field(default_factory=now)

    @property
    def ok(self) -> bool:
        return self.error is None


class QuestionKind(StrEnum):
    OPEN = "open"
    YESNO = "yesno"  # answered with the probability of "Yes" as well
    HISTORY = "history"  # about the stream's history in [start, end], answered from retrieved entries
    REPORT = "report"  # a report on [start, end]: `text` is an optional note, the reply is a Report


class Question(Model):
    """An ad-hoc question, XADDed to `sfs:questions` as `data=<this JSON>`.

    `id` and `reply_to` are optional on the wire: the intake fills `id` with the entry id and
    `reply_to` with `sfs:reply:{<id>}`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: MessageId | None = None
    stream: StreamId
    text: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    kind: QuestionKind = QuestionKind.OPEN
    start: float | None = Field(default=None, ge=0, description="history/report: range start, unix s")
    end: float | None = Field(default=None, ge=0, description="history/report: range end, unix s")
    reply_to: str | None = None
    created_at: float = Field(default_factory=now)

    @model_validator(mode="after")
    def _range(self) -> Question:
        if (self.start is not None or self.end is not None) and self.kind not in PAST_KINDS:
            raise ValueError(f"a time range goes with kind {QuestionKind.HISTORY.value!r} or {QuestionKind.REPORT.value!r}")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError("the range ends before it starts")
        return self


PAST_KINDS = (QuestionKind.HISTORY, QuestionKind.REPORT)  # answered from the history, not the latest window


class IngestState(StrEnum):
    STARTING = "starting"
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    FAILED = "failed"
    STOPPED = "stopped"


class StreamStatus(Model):
    """Ingest and processing status of one stream (`sfs:{sid}:status`), refreshed every
    `STATUS_INTERVAL_S` while the stream runs, whether or not frames flow. For a file that
    ended, windows_done + windows_failed + windows_skipped == windows_emitted."""

    stream: StreamId
    state: IngestState
    fps_in: float = Field(default=0.0, description="frames sampled per second, over the last interval")
    fps_out: float = Field(default=0.0, description="frames whose window was processed, per second")
    lag_s: float = Field(default=0.0, description="live: now - capture time of the latest processed window's end")
    frames_in: int = 0
    frames_dropped: int = Field(
        default=0, description="sampled frames no processed window covered (their windows were skipped)"
    )
    frames_corrupt: int = Field(default=0, description="corrupt packets and frames the decoder skipped")
    windows_emitted: int = Field(default=0, description="windows the ingest sent to the model worker")
    windows_done: int = 0
    windows_skipped: int = Field(default=0, description="live windows overtaken by a newer one (newest wins)")
    windows_gated: int = Field(
        default=0, description="of windows_done, those the scene gate found unchanged: published without the model"
    )
    windows_failed: int = Field(default=0, description="windows the model raised on twice (see Caption.error)")
    windows_total: int | None = Field(
        default=None, description="a file split over the model workers: its windows in all (the progress is "
        "windows_done + windows_failed of it; those wait to be published in window order)")
    eta_s: float | None = Field(default=None, description="a split file: seconds to go, at its rate so far")
    summaries_skipped: int = Field(default=0, description="rolling summaries with no room in a live stream's batch")
    events_opened: int = Field(default=0, description="events its standing questions opened (this worker's count)")
    events_open: int = Field(default=0, description="its events open now")
    deliveries_pending: int = Field(default=0, description="event notifications waiting to be delivered or retried")
    deliveries_failed: int = Field(
        default=0, description="event notifications given up on (see `sfs:{sid}:events:undelivered`)")
    last_delivery_error: str | None = Field(default=None, description="why the latest failed delivery attempt failed")
    last_delivery_error_at: float | None = None
    reconnects: int = 0
    latency_s: float | None = Field(default=None, description="latest window's end-to-end latency")
    offline_dropped: int = Field(
        default=0, description="writes dropped while Redis was unreachable (publisher overflow)"
    )
    last_error: str | None = Field(
        default=None, description="the source's error while it is down (cleared when it is live again), "
        "else the latest window failure",
    )
    last_error_at: float | None = Field(default=None, description="when last_error happened, unix s")
    updated_at: float = Field(default_factory=now)


STATUS_INTERVAL_S = 1.0  # every running stream's status is re-published this often
# Flat copies in the state and status hashes, for redis-cli users (`data` is authoritative).
CAPTION_FLAT = ("window", "start", "end", "wall_start", "wall_end", "text", "model", "latency_s", "error",
                "created_at")
STATUS_FLAT = ("state", "fps_in", "fps_out", "lag_s", "frames_in", "frames_dropped", "windows_emitted",
               "windows_done", "windows_skipped", "windows_failed", "reconnects", "last_error", "last_error_at",
               "updated_at")


class EventPhase(StrEnum):
    OPENED = "opened"  # the trigger said yes on `open_after` windows in a row
    UPDATED = "updated"  # it said yes again while the event was open
    CLOSED = "closed"  # it said no on `close_after` windows in a row (or the stream ended)


class Event(Model):
    """One record of a standing question's event (`sfs:{sid}:events`): its opening, an update
    on each later window the trigger fires on while it is open, and its closing. All records of
    one event share `event_id` and name its first window's picture."""

    stream: StreamId
    window: int = Field(ge=0, description="the window of this record")
    run: int = Field(ge=1)
    question_id: str
    question: str
    text: str
    probability: float | None = Field(default=None, ge=0.0, le=1.0)
    trigger: str = Field(description="the rule that fired, e.g. 'starts_with:yes' or 'p_yes>0.8'")
    start: float
    end: float
    wall_end: float
    event_id: str = Field(default="", description="`{question_id}:{run}:{first_window}`, the same in every record")
    phase: EventPhase = EventPhase.OPENED
    first_window: int | None = Field(default=None, ge=0, description="the window that opened the event")
    opened_at: float | None = Field(default=None, description="wall-clock end of the first window, unix s")
    snapshot_key: str | None = Field(default=None, description="stream holding the first window's JPEG")
    snapshot_id: str | None = Field(default=None, description="its entry id in `snapshot_key`")
    created_at: float = Field(default_factory=now)


def event_id(question_id: str, run: int, first_window: int) -> str:
    return f"{question_id}:{run}:{first_window}"


class EventAck(Model):
    """A person's acknowledgement of an event (`sfs:{sid}:events:acks`)."""

    event_id: str
    by: str = Field(default="", max_length=200)
    note: str = Field(default="", max_length=2000)
    at: float = Field(default_factory=now)


class Undelivered(Model):
    """An event notification that never reached its sink (`sfs:{sid}:events:undelivered`): it
    failed `attempts` times, was refused, or was still due when the pipeline stopped."""

    stream: StreamId
    event_id: str
    phase: EventPhase
    sink: Annotated[str, AfterValidator(redact_uri)] = Field(description="the webhook URL, credentials masked")
    idempotency_key: str
    attempts: int = Field(ge=0, description="attempts made (0: none before the stop)")
    error: str = Field(description="why it was given up on")
    event: Event
    at: float = Field(default_factory=now)


class FrameInfo(Model):
    """What the latest-frame picture (`sfs:{sid}:frame`) shows: the last frame of a window."""

    stream: StreamId
    window: int = Field(ge=0)
    run: int = Field(ge=1)
    time: float = Field(description="stream time of the frame, seconds")
    wall_time: float = Field(description="wall-clock capture time of the frame, unix s")
    width: int
    height: int
    created_at: float = Field(default_factory=now)

    @property
    def entry_id(self) -> str:
        return window_entry_id(self.run, self.window)


def _redact_values(value: Any) -> Any:
    """Mask credentials in every URL found in string values of a (nested) config."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_values(v) for v in value]
    return value


class StreamInfo(Model):
    """Registry entry (`sfs:streams` field `<sid>`). Credentials in `source` are masked here."""

    id: StreamId
    source: Annotated[str, AfterValidator(redact_uri)] = Field(description="URI, credentials masked")
    live: bool = True
    config: Annotated[dict[str, Any], AfterValidator(_redact_values)] = Field(default_factory=dict)
    run: int = Field(default=0, description="current run start (ms); set by register_stream")
    pipeline: int = Field(default=0, description="start (ms) of the pipeline run that registered it; the "
                          "highest in the registry is the current run")
    window_settings: dict[str, float] = Field(
        default_factory=dict, description="window, stride, fps of the run: a file resumes only with the same"
    )
    registered_at: float = Field(default_factory=now)


class ControlAction(StrEnum):
    ADD = "add"
    REMOVE = "remove"


class Control(Model):
    """A request to add or remove a stream at runtime, XADDed to `sfs:control`.

    `source` is the real URI the pipeline opens, credentials included: protect the control
    stream with ACLs. The pipeline replies with a ControlReply on `reply_to`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: MessageId | None = None
    action: ControlAction
    stream: StreamId
    source: str | None = None
    live: bool | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    reply_to: str | None = None
    created_at: float = Field(default_factory=now)


class ControlReply(Model):
    """Reply to a Control message: ok, or the error."""

    request_id: str
    stream: str | None = None
    action: ControlAction | None = None
    error: str | None = None
    answered_at: float = Field(default_factory=now)

    @property
    def ok(self) -> bool:
        return self.error is None


class NotificationKind(StrEnum):
    CAPTION = "caption"
    EVENT = "event"
    STATUS = "status"
    REMOVED = "removed"


class Notification(Model):
    """Pub/sub payload on `sfs:notify:<sid>`: a nudge only; the data is in the streams."""

    kind: NotificationKind
    stream: StreamId
    window: int | None = None
    entry_id: str | None = None


class InvalidMessage(Model):
    """A message read from an intake stream that could not be accepted, and why."""

    entry_id: str
    reason: str
    message_id: str | None = None
    reply_to: str | None = None


# ---------------------------------------------------------------------------- encoding


def encode_entry(model: Model) -> dict[str, str]:
    """Fields of a stream entry for `model`."""
    return {DATA: model.to_json()}


def decode_entry(cls: type[M], fields: dict[str, str]) -> M:
    """The model stored in a stream entry or hash (its `data` field). Raises ValueError."""
    raw = fields.get(DATA)
    if raw is None:
        raise ValueError(f"entry has no {DATA!r} field")
    try:
        return cls.model_validate_json(raw)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None


def encode_hash(model: Model, flat: tuple[str, ...]) -> dict[str, str]:
    """Hash fields: `data` plus flat string copies of `flat` fields (missing/None -> "")."""
    dumped = model.model_dump(mode="json")
    out = {DATA: model.to_json()}
    for name in flat:
        value = dumped.get(name)
        out[name] = "" if value is None else str(value)
    return out


def check_reply_to(keys: Keys, value: str | None) -> str | None:
    """Return `value` if workers may write a reply there, else raise ValueError."""
    if value is None:
        return None
    if not value.startswith(keys.reply_prefix) or len(value) > 200 or any(c.isspace() for c in value):
        raise ValueError(f"reply_to must be a key starting with {keys.reply_prefix!r} (max 200 chars)")
    return value
