"""What a model worker does with windows, as a plain class (unit-testable without Ray).

Per stream it keeps a feature ring keyed by frame seq (each frame is encoded once, then
reused by every overlapping window) and the latest window's features for ad-hoc
questions. Tasks of several streams' windows run in batched generate calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from connectors.publisher import Publisher, PublishResult
from connectors.redis_schema import Answer, AnswerKind, Caption, Event, Question, QuestionKind, Summary
from connectors.sources import redact_uri
from model import SlowFastVLM, TextQuery, VideoQuery

from .config import GenerationConfig, StandingQuestion, StreamConfig
from .outputs import CaptionFiles
from .pictures import window_picture
from .summaries import FinalSummary, RollingSummaries, SummaryTask, summary_markdown
from .window import FrameRef, FramesLost, Window

log = logging.getLogger("slowfast.pipeline")
FrameFetcher = Callable[[Sequence[FrameRef]], list[np.ndarray]]  # raises FramesLost for frames that are gone


@dataclass
class StreamState:
    config: StreamConfig
    run: int
    files: CaptionFiles | None
    ring: dict[int, torch.Tensor] = field(default_factory=dict)
    latest: Window | None = None
    latest_features: torch.Tensor | None = None
    frames_encoded: int = 0
    frames_dropped: int = 0  # sampled frames no processed window covered (their windows were skipped)
    last_frame_seq: int | None = None  # of the latest processed window; None after a restart
    latency_s: float | None = None
    summaries: RollingSummaries | None = None
    final: FinalSummary | None = None


class TaskKind(StrEnum):
    CAPTION = "caption"
    STANDING = "standing"


@dataclass(frozen=True)
class Task:
    """One generate query due on a window; a window's tasks share one batched model call."""

    window: Window
    prompt: str
    kind: TaskKind
    standing: StandingQuestion | None = None


class WindowProcessor:
    def __init__(
        self,
        vlm: SlowFastVLM,
        publisher: Publisher,
        generation: GenerationConfig,
        batch_size: int,
        fetch_frames: FrameFetcher,
        model_name: str,
    ):
        self.vlm = vlm
        self.publisher = publisher
        self.generation = generation
        self.batch_size = batch_size
        self.fetch_frames = fetch_frames
        self.model_name = model_name
        self.streams: dict[str, StreamState] = {}
        self.frames_encoded = 0

    # ---- streams ----------------------------------------------------------------
    def add_stream(
        self, config: StreamConfig, run: int, files: CaptionFiles | None, summary_every: int = 0,
        earlier: tuple[list[Summary], list[Caption]] = ([], []),
    ) -> None:
        """`summary_every` > 0: rolling summaries every that many windows. `earlier`: this run's
        rolling summaries and the captions after the last one, when the stream resumes."""
        state = StreamState(config, run, files)
        if summary_every:
            state.summaries = RollingSummaries(config.id, run, summary_every)
            done, since = earlier
            state.summaries.done = list(done)
            state.summaries.previous = done[-1] if done else None
            state.summaries.pending = list(since)
        self.streams[config.id] = state

    def remove_stream(self, stream: str) -> None:
        state = self.streams.pop(stream, None)
        if state is not None and state.files is not None:
            state.files.close()

    # ---- features -----------------------------------------------------------------
    def window_features(self, window: Window) -> torch.Tensor:
        """[T, tokens, hidden] for the window, encoding only frames not in the ring."""
        state = self.streams[window.stream]
        first = window.frames[0].seq
        # A local copy: a restarting ingest actor may clear the ring meanwhile (resume_point).
        features = {f.seq: state.ring[f.seq] for f in window.frames if f.seq in state.ring}
        missing = [f for f in window.frames if f.seq not in features]
        if missing:
            try:
                images = np.stack(self.fetch_frames(missing))
            except FramesLost as exc:
                raise FramesLost(str(exc), window) from exc
            encoded = dict(zip((f.seq for f in missing), self.vlm.encode_frames(self.vlm.preprocess(images))))
            features |= encoded
            state.ring.update(encoded)
            self.frames_encoded += len(missing)
            state.frames_encoded += len(missing)
        if state.last_frame_seq is not None and first > state.last_frame_seq + 1:
            state.frames_dropped += first - state.last_frame_seq - 1
        state.last_frame_seq = max(state.last_frame_seq or 0, window.frames[-1].seq)
        for seq in [s for s in state.ring if s < first]:
            del state.ring[seq]  # slid out: released as the window moves
        return torch.stack([features[f.seq] for f in window.frames])

    # ---- windows ----------------------------------------------------------------------
    def tasks_for(self, window: Window) -> list[Task]:
        config = self.streams[window.stream].config
        tasks = []
        if window.seq % config.caption_every_n_windows == 0:
            tasks.append(Task(window, config.caption_prompt, TaskKind.CAPTION))
        for question in config.standing_questions:
            if window.seq % question.every_n_windows == 0:
                tasks.append(Task(window, question.prompt, TaskKind.STANDING, question))
        return tasks

    def process(self, windows: Sequence[Window]) -> list[Caption]:
        """Run every task due for these windows (several streams) and publish each window."""
        windows = [w for w in windows if w.stream in self.streams]
        features = {(w.stream, w.seq): self.window_features(w) for w in windows}
        tasks = [t for w in windows for t in self.tasks_for(w)]
        summary_tasks = self._due_summaries(room=self.batch_size - len(tasks))
        try:
            texts = self._generate([VideoQuery(features=features[(t.window.stream, t.window.seq)], question=t.prompt)
                                    for t in tasks] + [TextQuery(t.prompt) for t in summary_tasks])
        except Exception:
            for task in summary_tasks:  # their captions stay pending for the next summary
                self.streams[task.stream].summaries.in_flight = None
            raise
        for task, text in zip(summary_tasks, texts[len(tasks):]):
            self._publish_summary(self.streams[task.stream].summaries.complete(text))
        captions = []
        for window in windows:
            state = self.streams[window.stream]
            state.latest = window
            state.latest_features = features[(window.stream, window.seq)]
            own = [(t, text) for t, text in zip(tasks, texts) if t.window is window]
            caption_text = next((text for t, text in own if t.kind is TaskKind.CAPTION), None)
            answers, events = self._standing_results(window, features[(window.stream, window.seq)], own)
            latency = time.time() - window.closed_at
            caption = Caption(
                stream=window.stream, window=window.seq, run=state.run,
                start=window.start, end=window.end, wall_start=window.wall_start, wall_end=window.wall_end,
                text=caption_text if caption_text is not None else "", model=self.model_name,
                prompt=state.config.caption_prompt if caption_text is not None else None, latency_s=latency,
            )
            result = self.publisher.publish_window(caption, answers, events, frame=self._picture(window, caption))
            # A window re-sent after an ingest restart is a duplicate: it is in the files already.
            if state.files is not None and caption_text is not None and result != PublishResult.DUPLICATE:
                state.files.write(caption)
            state.latency_s = latency
            if state.summaries is not None and caption_text is not None:
                state.summaries.add_caption(caption)
            captions.append(caption)
        return captions

    def publish_failure(self, window: Window, error: str) -> None:
        """Record a window the model failed on: an entry with `error` and no text in the caption
        history (and the file's JSONL), so a consumer sees the gap and why."""
        state = self.streams.get(window.stream)
        if state is None:
            return
        caption = Caption(
            stream=window.stream, window=window.seq, run=state.run, start=window.start, end=window.end,
            wall_start=window.wall_start, wall_end=window.wall_end, text="", model=self.model_name,
            error=error, latency_s=time.time() - window.closed_at,
        )
        result = self.publisher.publish_window(caption, [], [])
        if state.files is not None and result != PublishResult.DUPLICATE:
            state.files.write(caption)

    # ---- summaries ------------------------------------------------------------------
    def _due_summaries(self, room: int) -> list[SummaryTask]:
        """Rolling summaries that fit in the batch's free slots: they never take a window's
        place. A live stream's summary without room is skipped (its captions roll into the
        next one); a file's waits for the next batch."""
        tasks = []
        for state in self.streams.values():
            rolling = state.summaries
            if rolling is None or not rolling.due():
                continue
            if len(tasks) < room:
                tasks.append(rolling.next_task())
            elif state.config.live:
                rolling.next_task()
                rolling.skip()
        return tasks

    def _publish_summary(self, summary: Summary) -> None:
        self.publisher.publish_summary(summary.model_copy(update={"model": self.model_name}))

    def final_summary_step(self, stream: str) -> bool:
        """One model call towards a file's final summary, after its last window: first a
        rolling summary of the captions left, then each round of summaries of summaries; at
        the end it is published and written to summary.md. True when done (or nothing to do)."""
        state = self.streams.get(stream)
        if state is None or state.summaries is None:
            return True
        rolling = state.summaries
        if rolling.pending:
            rolling.in_flight = None
            (text,) = self._generate([TextQuery(rolling.next_task(force=True).prompt)])
            self._publish_summary(rolling.complete(text))
            return False
        if not rolling.done:
            return True  # no caption at all
        if state.final is None:
            state.final = FinalSummary(rolling.done)
        if state.final.finished is None:
            state.final.complete(self._generate([TextQuery(t.prompt) for t in state.final.tasks()]), first_seq=0)
            if state.final.finished is None:
                return False
        summary = state.final.finished.model_copy(update={"model": self.model_name})
        self.publisher.publish_summary(summary)
        if state.files is not None:
            state.files.write_summary(summary_markdown(stream, redact_uri(state.config.source), summary, rolling.done))
        return True

    def _standing_results(self, window: Window, features: torch.Tensor, own) -> tuple[list[Answer], list[Event]]:
        answers, events = [], []
        run = self.streams[window.stream].run
        for task, text in own:
            if task.kind is not TaskKind.STANDING:
                continue
            question = task.standing
            trigger = question.trigger
            probability = None
            if trigger is not None and trigger.p_yes_above is not None:
                probability = self.vlm.yes_probability(VideoQuery(features=features, question=question.prompt))
            answers.append(Answer(
                question_id=question.id, stream=window.stream, question=question.prompt, kind=AnswerKind.STANDING,
                window=window.seq, start=window.start, end=window.end, text=text, probability=probability,
                model=self.model_name,
            ))
            fired = trigger is not None and (
                (trigger.starts_with is not None and text.strip().lower().startswith(trigger.starts_with.lower()))
                or (trigger.p_yes_above is not None and probability is not None and probability > trigger.p_yes_above)
            )
            if fired:
                events.append(Event(
                    stream=window.stream, window=window.seq, run=run, question_id=question.id,
                    question=question.prompt, text=text, probability=probability, trigger=trigger.describe(),
                    start=window.start, end=window.end, wall_end=window.wall_end,
                ))
        return answers, events

    def _picture(self, window: Window, caption: Caption):
        """The window's last frame as JPEG, or None if that frame is gone (its ingest actor
        died after the frame was encoded): a window is never lost for want of its picture."""
        try:
            (image,) = self.fetch_frames(window.frames[-1:])
        except FramesLost as exc:
            log.warning("window %d of %s published without a picture: %s", window.seq, window.stream, exc)
            return None
        return window_picture(image, caption)

    # ---- ad-hoc questions ----------------------------------------------------------
    def answer(self, question: Question) -> Answer:
        """Answer on the stream's latest window, or an error reply saying why not."""
        base = dict(question_id=question.id, stream=question.stream, question=question.text, kind=AnswerKind.ADHOC)
        state = self.streams.get(question.stream)
        if state is None or state.latest is None:
            reason = "is not running" if state is None else "has no window yet"
            return Answer(**base, error=f"stream {question.stream!r} {reason}")
        window = state.latest
        query = VideoQuery(features=state.latest_features, question=question.text)
        try:
            (text,) = self._generate([query])
            probability = self.vlm.yes_probability(query) if question.kind == QuestionKind.YESNO else None
        except ValueError as exc:  # ModelInputError: the question itself is unusable
            return Answer(**base, window=window.seq, error=str(exc))
        return Answer(**base, window=window.seq, start=window.start, end=window.end, text=text,
                      probability=probability, model=self.model_name)

    def _generate(self, queries: list[VideoQuery | TextQuery]) -> list[str]:
        texts: list[str] = []
        g = self.generation
        for start in range(0, len(queries), self.batch_size):
            outs = self.vlm.generate(
                queries[start : start + self.batch_size], max_new_tokens=g.max_new_tokens,
                temperature=g.temperature, top_p=g.top_p, repetition_penalty=g.repetition_penalty,
                decode_cross_attention=g.decode_cross_attention,
            )
            texts += [o.text for o in outs]
        return texts
