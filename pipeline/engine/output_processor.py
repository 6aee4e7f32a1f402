"""The output side of the engine: model replies become `Caption`, `Answer`, `Event` and
`Summary` records (built here and nowhere else), published to Redis one transaction per
window, written to a file stream's files, and fed to its rolling and final summaries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from connectors.publisher import Publisher, PublishResult
from connectors.redis_schema import Answer, AnswerKind, Caption, Event, EventPhase, Question, Summary, event_id
from connectors.sources import redact_uri

from ..config import PipelineConfig, StandingQuestion, StreamConfig, Trigger
from ..messages import Reply, WindowReplies
from ..outputs import CaptionFiles
from ..pictures import window_picture
from ..resume import EarlierOutputs
from ..summaries import FinalSummary, RollingSummaries, SummaryTask, summary_markdown
from ..window import Window
from .events import EventTracker, OpenEvent

PictureSource = Callable[[Window], np.ndarray | bytes | None]  # the window's last frame (or its JPEG), None if gone
# Takes a segment's window instead of publishing it: (window, replies or None, picture, error).
Relay = Callable[[Window, WindowReplies | None, np.ndarray | None, str | None], None]
# Told of each event record that opens or closes an event, after its window is published.
EventListener = Callable[[StreamConfig, StandingQuestion, Event], None]


def stream_files(config: PipelineConfig, stream: StreamConfig, run: int, summary_every: int,
                 earlier: EarlierOutputs) -> tuple[CaptionFiles | None, RollingSummaries | None]:
    """A stream's files (a file's captions; rewritten with the `earlier` ones) and its rolling summaries."""
    files = None
    if not stream.live:
        files = CaptionFiles(Path(config.out_dir) / stream.id, 1.0 / config.fps, earlier.captions)
    summaries = None
    if summary_every:
        summaries = RollingSummaries.resumed(stream.id, run, summary_every, earlier.summaries, earlier.since_summary)
    return files, summaries


@dataclass
class StreamOutputs:
    config: StreamConfig
    run: int
    files: CaptionFiles | None
    summaries: RollingSummaries | None
    final: FinalSummary | None = None
    final_published: bool = False
    latency_s: float | None = None  # of the latest published window
    last_caption: Caption | None = None  # the latest the model wrote: what an unchanged window repeats
    last_answers: dict[str, Answer] = field(default_factory=dict)  # question id -> latest standing answer
    trackers: dict[str, EventTracker] = field(default_factory=dict)  # question id -> its event lifecycle
    open_events: dict[str, Event] = field(default_factory=dict)  # question id -> the open event's latest record
    windows_gated: int = 0
    events_opened: int = 0
    relay: Relay | None = None  # a segment of a split file: its merge publishes its windows, in order

    def tracker(self, question: StandingQuestion) -> EventTracker:
        if question.id not in self.trackers:
            trigger = question.trigger
            self.trackers[question.id] = EventTracker(trigger.open_after, trigger.close_after, trigger.cooldown_windows)
        return self.trackers[question.id]


def error_answer(question: Question, error: str, window: Window | None = None) -> Answer:
    """The reply to an ad-hoc question that could not be answered, saying why."""
    return Answer(question_id=question.id, stream=question.stream, question=question.text, kind=AnswerKind.ADHOC,
                  window=window.seq if window else None, error=error)


def trigger_fires(trigger: Trigger | None, reply: Reply) -> bool:
    if trigger is None:
        return False
    if trigger.starts_with is not None:
        return reply.text.strip().lower().startswith(trigger.starts_with.lower())
    return reply.yes_probability > trigger.p_yes_above


class OutputProcessor:
    def __init__(self, publisher: Publisher, model_name: str, picture_of: PictureSource,
                 on_event: EventListener | None = None):
        self.publisher, self.model_name, self.picture_of = publisher, model_name, picture_of
        self.on_event = on_event
        self.streams: dict[str, StreamOutputs] = {}

    def add_stream(self, config: StreamConfig, run: int, files: CaptionFiles | None,
                   summaries: RollingSummaries | None, open_events: Sequence[Event] = (),
                   relay: Relay | None = None) -> None:
        """`open_events`: the run's events still open in Redis (a restarted worker continues them)."""
        outputs = StreamOutputs(config, run, files, summaries, relay=relay)
        questions = {q.id: q for q in config.standing_questions if q.trigger is not None}
        for event in open_events:
            question = questions.get(event.question_id)
            if question is not None and event.run == run and event.first_window is not None:
                outputs.tracker(question).open = OpenEvent(event.first_window, event.opened_at or event.wall_end)
                outputs.open_events[question.id] = event
        self.streams[config.id] = outputs

    def remove_stream(self, stream: str) -> None:
        outputs = self.streams.pop(stream, None)
        if outputs is not None and outputs.files is not None:
            outputs.files.close()

    # ---- windows -------------------------------------------------------------------
    def _caption(self, window: Window, text: str = "", prompt: str | None = None, error: str | None = None) -> Caption:
        return Caption(
            stream=window.stream, window=window.seq, run=self.streams[window.stream].run,
            start=window.start, end=window.end, wall_start=window.wall_start, wall_end=window.wall_end,
            text=text, model=self.model_name, prompt=prompt, error=error, latency_s=time.time() - window.closed_at,
        )

    def window_done(self, replies: WindowReplies) -> Caption | None:
        """Publish the window (caption, standing answers, event records, picture) in one
        transaction, then its file line and its place in the rolling summary."""
        window = replies.window
        outputs = self.streams[window.stream]
        if outputs.relay is not None:
            outputs.relay(window, replies, self.picture_of(window), None)
            return None
        captioned = replies.caption is not None
        caption = self._caption(window, replies.caption.text, outputs.config.caption_prompt) if captioned else self._caption(window)
        answers, events = [], []
        for question, reply in replies.standing:
            answer = self._standing_answer(window, question, reply)
            answers.append(answer)
            outputs.last_answers[question.id] = answer
            if question.trigger is not None:
                events += self._lifecycle(outputs, window, question, reply)
        self._publish(outputs, window, caption, answers, events, captioned)
        if captioned:
            outputs.last_caption = caption
        return caption

    def window_unchanged(self, window: Window) -> Caption:
        """A window the scene gate found unchanged: published without the model, with the last
        caption and the window it dates from, and the last standing answers. It does not move
        any event on (no new evidence)."""
        outputs = self.streams[window.stream]
        last = outputs.last_caption
        caption = self._caption(window, last.text, last.prompt).model_copy(
            update={"unchanged_since_window": last.unchanged_since_window if last.unchanged_since_window is not None
                    else last.window, "unchanged_since": last.unchanged_since or last.wall_end})
        answers = [a.model_copy(update={"window": window.seq, "start": window.start, "end": window.end})
                   for a in outputs.last_answers.values()]
        self._publish(outputs, window, caption, answers, [], captioned=True)
        outputs.windows_gated += 1
        return caption

    def can_repeat(self, stream: str) -> bool:
        """An unchanged window can be published: there is a caption to repeat."""
        outputs = self.streams.get(stream)
        return outputs is not None and outputs.last_caption is not None

    def _publish(self, outputs: StreamOutputs, window: Window, caption: Caption, answers: list[Answer],
                 events: list[Event], captioned: bool) -> None:
        picture = self.picture_of(window)
        result = self.publisher.publish_window(
            caption, answers, events, frame=window_picture(picture, caption) if picture is not None else None,
        )
        # A window re-sent after an ingest restart is a duplicate: it is in the files already.
        if outputs.files is not None and captioned and result != PublishResult.DUPLICATE:
            outputs.files.write(caption)
        outputs.latency_s = caption.latency_s
        if outputs.summaries is not None and captioned and caption.unchanged_since_window is None:
            outputs.summaries.add_caption(caption)
        if self.on_event is not None and result != PublishResult.DUPLICATE:
            questions = {q.id: q for q in outputs.config.standing_questions}
            for event in events:
                if event.phase != EventPhase.UPDATED:
                    self.on_event(outputs.config, questions[event.question_id], event)

    def _lifecycle(self, outputs: StreamOutputs, window: Window, question: StandingQuestion, reply: Reply) -> list[Event]:
        """The event record this answer makes, if any: opened, updated or closed."""
        tracker = outputs.tracker(question)
        phase = tracker.observe(window.seq, window.wall_end, trigger_fires(question.trigger, reply))
        if phase is None:
            return []
        if phase == EventPhase.OPENED:
            first_window, opened_at = window.seq, window.wall_end
            outputs.events_opened += 1
        else:
            opened = outputs.open_events[question.id]
            first_window, opened_at = opened.first_window, opened.opened_at
        record = self._event(window, question, reply).model_copy(update={
            "phase": phase, "first_window": first_window, "opened_at": opened_at,
            "event_id": event_id(question.id, outputs.run, first_window)})
        if phase == EventPhase.CLOSED:
            outputs.open_events.pop(question.id, None)
        else:
            outputs.open_events[question.id] = record
        return [record]

    def close_open_events(self, stream: str) -> None:
        """The stream is over: its open events close on its last window."""
        outputs = self.streams.get(stream)
        if outputs is None or not outputs.open_events:
            return
        records = [event.model_copy(update={"phase": EventPhase.CLOSED}) for event in outputs.open_events.values()]
        self.publisher.close_events(stream, records)
        questions = {q.id: q for q in outputs.config.standing_questions}
        for record in records:
            outputs.trackers.pop(record.question_id, None)
            if self.on_event is not None:
                self.on_event(outputs.config, questions[record.question_id], record)
        outputs.open_events.clear()

    def window_failed(self, window: Window, error: str) -> None:
        """A window the model failed on: an entry with `error` and no text in the caption history
        (and the file's JSONL), so a consumer sees the gap and why."""
        outputs = self.streams.get(window.stream)
        if outputs is None:
            return
        if outputs.relay is not None:
            outputs.relay(window, None, None, error)
            return
        caption = self._caption(window, error=error)
        result = self.publisher.publish_window(caption, [], [])
        if outputs.files is not None and result != PublishResult.DUPLICATE:
            outputs.files.write(caption)

    def _standing_answer(self, window: Window, question: StandingQuestion, reply: Reply) -> Answer:
        trigger = question.trigger
        wants_probability = question.answer == "probability" or (trigger is not None and trigger.p_yes_above is not None)
        return Answer(
            question_id=question.id, stream=window.stream, question=question.prompt, kind=AnswerKind.STANDING,
            window=window.seq, start=window.start, end=window.end, text=reply.text,
            probability=reply.yes_probability if wants_probability else None, model=self.model_name,
        )

    def _event(self, window: Window, question: StandingQuestion, reply: Reply) -> Event:
        trigger = question.trigger
        return Event(
            stream=window.stream, window=window.seq, run=self.streams[window.stream].run, question_id=question.id,
            question=question.prompt, text=reply.text,
            probability=reply.yes_probability if trigger.p_yes_above is not None else None,
            trigger=trigger.describe(), start=window.start, end=window.end, wall_end=window.wall_end,
        )

    # ---- ad-hoc answers ----------------------------------------------------------------
    def adhoc_answer(self, question: Question, window: Window, reply: Reply, with_probability: bool) -> Answer:
        return Answer(
            question_id=question.id, stream=question.stream, question=question.text, kind=AnswerKind.ADHOC,
            window=window.seq, start=window.start, end=window.end, text=reply.text,
            probability=reply.yes_probability if with_probability else None, model=self.model_name,
        )

    # ---- rolling summaries -------------------------------------------------------------
    def due_summaries(self, room: int) -> list[SummaryTask]:
        """Rolling summaries that fit in the batch's free slots: they never take a window's
        place. A live stream's summary without room is skipped (its captions roll into the
        next one); a file's waits for the next batch."""
        tasks = []
        for outputs in self.streams.values():
            rolling = outputs.summaries
            if rolling is None or not rolling.due():
                continue
            if len(tasks) < room:
                tasks.append(rolling.next_task())
            elif outputs.config.live:
                rolling.next_task()
                rolling.skip()
        return tasks

    def summaries_done(self, tasks: Sequence[SummaryTask], texts: Sequence[str]) -> None:
        for task, text in zip(tasks, texts):
            self._publish_summary(self.streams[task.stream].summaries.complete(text))

    def summaries_abandoned(self, tasks: Sequence[SummaryTask]) -> None:
        """Their model call failed: their captions stay pending for the next summary."""
        for task in tasks:
            outputs = self.streams.get(task.stream)
            if outputs is not None and outputs.summaries is not None:
                outputs.summaries.abandon()

    def _publish_summary(self, summary: Summary) -> None:
        self.publisher.publish_summary(summary.model_copy(update={"model": self.model_name}))

    # ---- a file's final summary ------------------------------------------------------------
    def final_summary_tasks(self, stream: str) -> list[SummaryTask]:
        """The next model call towards a file's final summary, after its last window: first a
        rolling summary of the captions left, then each round of summaries of summaries.
        Empty when it is published (or there is nothing to summarise)."""
        outputs = self.streams.get(stream)
        if outputs is None or outputs.summaries is None or outputs.final_published:
            return []
        rolling = outputs.summaries
        if rolling.pending:
            rolling.abandon()
            return [rolling.next_task(force=True)]
        if not rolling.done:
            return []  # no caption at all
        if outputs.final is None:
            outputs.final = FinalSummary(rolling.done)
        return outputs.final.tasks()

    def final_summary_results(self, stream: str, tasks: Sequence[SummaryTask], texts: Sequence[str]) -> None:
        outputs = self.streams[stream]
        if tasks and tasks[0].level == 0:  # the rolling summary of the captions left
            self.summaries_done(tasks, texts)
            return
        outputs.final.complete(texts, first_seq=0)
        summary = outputs.final.finished
        if summary is None:
            return
        summary = summary.model_copy(update={"model": self.model_name})
        self.publisher.publish_summary(summary)
        if outputs.files is not None:
            outputs.files.write_summary(summary_markdown(stream, redact_uri(outputs.config.source), summary,
                                                         outputs.summaries.done))
        outputs.final_published = True
